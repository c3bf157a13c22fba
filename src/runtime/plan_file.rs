//! Plan files: a graph's packed weights (`crate::ops::packed`) in one file, written after the
//! first build and memory-mapped read-only by later loads.
//!
//! Layout (little-endian, native floats; the header names the architecture):
//! - 8 bytes of magic, a u32 format version, a u32 header length, a u64 XXH3 of the header;
//! - the header, JSON: crate version, architecture, kernels, the ONNX file's identity, and one
//!   entry per weight (key, offset from the data start, floats, fingerprint of the source);
//! - the data, from the first 4 KiB boundary after the header, each weight on a 4 KiB boundary;
//! - after the weights, the rewritten graph of each build the load that wrote the file proved
//!   (`crate::ops::serial`'s bytes, with an XXH3 of them), each on a 4 KiB boundary.
//!
//! Anything that does not match (magic, version, crate, architecture, kernels, the ONNX file's
//! length and hash, a checksum, offsets out of bounds or unaligned) makes the file stale: the
//! build packs on the heap and writes it again. The ONNX file's hash is taken from the header
//! when the file's [`FileStat`] is the one recorded, and computed otherwise. Written to a
//! temporary file in the same folder, synced, then renamed over the old one: a reader maps
//! either the old file or the new one, and two processes building at once each rename a whole
//! file.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::settings::{PlanCache, WeightPrecision};
use crate::ops::packed::{Entry, Held, Packer};

const MAGIC: &[u8; 8] = b"EDPLAN\0\0";
const FORMAT: u32 = 4;
const PREFIX: usize = 24;
const ALIGN: usize = 4096;

/// What identifies the ONNX model a plan file was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SourceId {
    /// Bytes of the ONNX file.
    pub len: u64,
    /// XXH3 of the ONNX file's bytes, and of the name, length and modification time of each
    /// file of external data it names (the name only, not the folder: a model folder copied
    /// with its times keeps its plan file).
    pub hash: u64,
    /// Where the file was and when it last changed, as its filesystem says, when it was
    /// hashed: a later load that finds the same vouches for the hash without reading the file.
    #[serde(default)]
    pub stat: Option<FileStat>,
}

impl SourceId {
    /// The identity of the ONNX file `bytes` with the external data files `external`;
    /// `stat`: its [`FileStat`], taken before the bytes were read.
    pub(super) fn of(bytes: &[u8], external: &[PathBuf], stat: Option<FileStat>) -> Self {
        SourceId { len: bytes.len() as u64, hash: content_hash(bytes, external), stat }
    }
}

fn content_hash(bytes: &[u8], external: &[PathBuf]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(bytes);
    external_identity(&mut h, external);
    h.digest()
}

fn external_identity(h: &mut xxhash_rust::xxh3::Xxh3, external: &[PathBuf]) {
    for path in external {
        let meta = std::fs::metadata(path).ok();
        let len = meta.as_ref().map_or(0, |m| m.len());
        let modified = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        h.update(path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default().as_bytes());
        h.update(&len.to_le_bytes());
        h.update(&modified.to_le_bytes());
    }
}

/// A file's device, inode, length, and times of its last modification and last status change
/// (seconds and nanoseconds), with the identity of its external data files. A write to the
/// file moves its status-change time, which no program can set back, and a file put in its
/// place by rename has another inode: the same `FileStat` means the same bytes, the rule
/// `make` and git's index live by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FileStat {
    device: u64,
    inode: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
    external: u64,
}

impl FileStat {
    /// The stat in `meta` (of the ONNX file); `None` off Unix.
    pub(super) fn of(meta: &std::fs::Metadata) -> Option<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Some(FileStat {
                device: meta.dev(),
                inode: meta.ino(),
                len: meta.len(),
                modified: (meta.mtime(), meta.mtime_nsec()),
                changed: (meta.ctime(), meta.ctime_nsec()),
                external: 0,
            })
        }
        #[cfg(not(unix))]
        {
            let _ = meta;
            None
        }
    }

    /// With the identity of the external data files `external`.
    pub(super) fn with_external(self, external: &[PathBuf]) -> Self {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        external_identity(&mut h, external);
        FileStat { external: h.digest(), ..self }
    }
}

/// The ONNX file being loaded, whose hash is computed only when needed: a plan file that
/// recorded the same [`FileStat`] vouches for it, so a later load does not read the weights
/// it leaves out just to hash them.
pub(super) struct Source {
    len: u64,
    stat: Option<FileStat>,
    hash: u64,
    /// Computes `hash`, until it is known.
    pending: Option<Box<dyn FnOnce() -> u64 + Send + Sync>>,
}

impl Source {
    pub(super) fn known(id: SourceId) -> Self {
        Source { len: id.len, stat: id.stat, hash: id.hash, pending: None }
    }

    /// The ONNX file mapped as `map`, with its external data files `external`; `stat` taken
    /// before the map.
    pub(super) fn mapped(map: Arc<memmap2::Mmap>, external: Vec<PathBuf>, stat: Option<FileStat>) -> Self {
        let len = map.len() as u64;
        Source { len, stat, hash: 0, pending: Some(Box::new(move || content_hash(&map, &external))) }
    }

    fn hash(&mut self) -> u64 {
        if let Some(compute) = self.pending.take() {
            self.hash = compute();
        }
        self.hash
    }

    pub(super) fn id(&mut self) -> SourceId {
        SourceId { len: self.len, hash: self.hash(), stat: self.stat }
    }

    /// Computes the hash if nothing vouched for it yet, and lets go of the file's bytes.
    pub(super) fn settle(&mut self) {
        self.hash();
    }

    /// Whether a plan file that recorded `recorded` was built from this file: the same length,
    /// and the same [`FileStat`] or else the same hash.
    fn matches(&mut self, recorded: &SourceId) -> bool {
        if recorded.len != self.len {
            return false;
        }
        if self.stat.is_some() && recorded.stat == self.stat && self.pending.take().is_some() {
            self.hash = recorded.hash;
        }
        self.hash() == recorded.hash
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Header {
    crate_version: String,
    arch: String,
    kernels: String,
    source: SourceId,
    /// The weights' precision: `f32` or `f16`.
    weights: String,
    entries: Vec<HeaderEntry>,
    /// What the load that wrote the file proved (`super::skeleton`).
    #[serde(default)]
    proof: Proof,
    /// The rewritten graphs of the proven builds.
    #[serde(default)]
    graphs: Vec<GraphEntry>,
}

/// A rewritten graph in the file: the build it is (its signature), where its bytes are (from
/// the data start) and their XXH3.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct GraphEntry {
    build: String,
    offset: u64,
    bytes: u64,
    hash: u64,
}

/// A saved graph's build, absolute byte range in the file, and XXH3.
type GraphAt = (String, std::ops::Range<usize>, u64);

/// The rewritten graphs of a mapped plan file, by build.
#[derive(Clone, Default)]
pub(super) struct Graphs {
    map: Option<Arc<memmap2::Mmap>>,
    entries: Vec<GraphAt>,
}

impl Graphs {
    /// The bytes of the graph of `build`, when the file has them and they hash as recorded.
    pub(super) fn get(&self, build: &str) -> Option<&[u8]> {
        let (_, range, hash) = self.entries.iter().find(|(b, ..)| b == build)?;
        let bytes = self.map.as_ref()?.get(range.clone())?;
        (xxhash_rust::xxh3::xxh3_64(bytes) == *hash).then_some(bytes)
    }
}

/// Initializers a later load may leave out of the graph, and the builds (their input facts and
/// settings) for which that was proven: see `super::skeleton`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Proof {
    pub stand_ins: Vec<String>,
    pub builds: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct HeaderEntry {
    key: String,
    /// Bytes from the data start.
    offset: u64,
    /// Elements (of the header's `weights` precision).
    floats: u64,
    fingerprint: u64,
}

/// What became of a graph's plan file at its last build.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanFile {
    /// No plan file ([`PlanCache::Off`]), or no build yet.
    Off,
    /// The graph has no packed weights (no operator of ours with constant weights).
    Unneeded,
    /// The weights are read through the map of this file.
    Mapped {
        /// The plan file.
        path: PathBuf,
        /// How many initializers the load left out of the ONNX file, which the plan file's
        /// proof covers (0: the whole file was read).
        left_out: usize,
        /// Whether the plans were built from the rewritten graphs the file holds, without
        /// typing, decluttering and rewriting the ONNX graph.
        saved_graph: bool,
    },
    /// Written by this load, in this many milliseconds; `stale`: why the file that was there
    /// could not be used.
    Written {
        /// The plan file.
        path: PathBuf,
        /// Milliseconds to write it.
        ms: f64,
        /// Why the file that was there could not be used, if one was.
        stale: Option<String>,
        /// Whether the plans were built again from the graphs the file saved, once proven, so
        /// that this process too reads the weights through the file's map and holds no packed
        /// weight on the heap (`false`: they stay on the heap until a later load maps them).
        mapped: bool,
    },
    /// Not written: why (a read-only folder, a full disk); the weights stay on the heap.
    Unwritten(String),
}

impl PlanFile {
    /// A line for the user when something went other than planned: a stale file rebuilt, a
    /// file that could not be written.
    pub fn notice(&self) -> Option<String> {
        match self {
            PlanFile::Written { path, stale: Some(why), .. } => {
                Some(format!("rebuilt the plan file {} ({why})", path.display()))
            }
            PlanFile::Unwritten(why) => Some(format!("no plan file, the weights stay on the heap: {why}")),
            _ => None,
        }
    }
}

/// A graph's plan file: where it goes, the packer over it, and what became of it.
pub(super) struct PlanStore {
    setting: PlanCache,
    /// The ONNX file (for the plan file's name and folder).
    onnx: PathBuf,
    /// Whether [`PlanCache::Auto`] may put the file beside the ONNX file (not for a model
    /// given as bytes, whose path only labels it).
    beside: bool,
    source: Source,
    /// The precision of the weights packed, and so of the plan file.
    weights: WeightPrecision,
    packer: Option<Arc<Packer>>,
    /// The plan file the packer maps, and the proof it records.
    mapped: Option<(PathBuf, Proof)>,
    /// The rewritten graphs that file holds.
    graphs: Graphs,
    /// Why the file found was not used.
    stale: Option<String>,
    /// [`Packer::packed_here`] when the file was last written (or found).
    covered: usize,
    /// The origins ([`Packer::take_origins`]) every build of this load shared, and the
    /// builds' signatures.
    origins: Option<HashSet<String>>,
    builds: Vec<String>,
    /// The file this load wrote.
    written: Option<PathBuf>,
    /// How many initializers the load left out of the ONNX file (`super::skeleton`).
    pub(super) left_out: usize,
    /// Whether the last build came from a rewritten graph in the file.
    pub(super) saved_graph: bool,
    pub(super) status: PlanFile,
}

impl PlanStore {
    pub(super) fn new(setting: PlanCache, onnx: &Path, beside: bool, source: Source) -> Self {
        PlanStore {
            setting,
            onnx: onnx.to_path_buf(),
            beside,
            source,
            weights: WeightPrecision::F32,
            packer: None,
            mapped: None,
            graphs: Graphs::default(),
            stale: None,
            covered: 0,
            origins: None,
            builds: vec![],
            written: None,
            left_out: 0,
            saved_graph: false,
            status: PlanFile::Off,
        }
    }

    /// Another setting; the next build starts over.
    pub(super) fn set(&mut self, setting: PlanCache) {
        self.setting = setting;
        self.reset();
    }

    /// Another weight precision; the next build starts over.
    pub(super) fn set_weights(&mut self, weights: WeightPrecision) {
        self.weights = weights;
        self.reset();
    }

    /// The weight precision of the packed weights.
    pub(super) fn weights(&self) -> WeightPrecision {
        self.weights
    }

    /// Forgets the weights held: the plans they served are gone.
    pub(super) fn reset(&mut self) {
        self.packer = None;
        self.mapped = None;
        self.graphs = Graphs::default();
        self.stale = None;
        self.covered = 0;
        self.origins = None;
        self.builds.clear();
        self.written = None;
        self.left_out = 0;
        self.saved_graph = false;
        self.status = PlanFile::Off;
    }

    /// The packer for a build: over the plan file when there is a valid one.
    pub(super) fn packer(&mut self) -> Arc<Packer> {
        if self.packer.is_none() {
            let mut packer = Packer::default();
            packer.set_half(self.weights == WeightPrecision::F16);
            if self.setting != PlanCache::Off {
                for place in places(&self.setting, &self.onnx, self.beside) {
                    let path = place.path(&self.onnx, &mut self.source, self.weights);
                    match open(&path, &mut self.source, self.weights) {
                        Ok(Some((p, proof, graphs))) => {
                            packer = p;
                            self.mapped = Some((path, proof));
                            self.graphs = graphs;
                            break;
                        }
                        Ok(None) => {}
                        Err(why) => {
                            self.stale = Some(why);
                            break;
                        }
                    }
                }
            }
            // The plan file found vouched for the hash, or it is computed now: either way the
            // ONNX file's bytes are not held beyond this.
            self.source.settle();
            self.packer = Some(Arc::new(packer));
        }
        self.packer.clone().expect("set above")
    }

    /// Whether the ONNX file is a file of its own (not bytes held in memory).
    pub(super) fn beside_allowed(&self) -> bool {
        self.beside
    }

    /// What the plan file found proves ([`Proof`]), opening it first.
    pub(super) fn proof(&mut self) -> Option<Proof> {
        self.packer();
        self.mapped.as_ref().map(|(_, proof)| proof.clone()).filter(|p| !p.stand_ins.is_empty())
    }

    /// After the build `signature`: writes the plan file when the build packed weights that it
    /// lacked.
    pub(super) fn after_build(&mut self, signature: String) {
        let Some(packer) = &self.packer else { return };
        let origins: HashSet<String> = packer.take_origins().into_iter().collect();
        self.origins = Some(match self.origins.take() {
            None => origins,
            Some(before) => before.intersection(&origins).cloned().collect(),
        });
        self.builds.push(signature);
        let held = packer.held();
        if self.setting == PlanCache::Off {
            return;
        }
        if held.is_empty() {
            self.status = PlanFile::Unneeded;
            return;
        }
        let packed_here = packer.packed_here();
        if packed_here == self.covered {
            if let (PlanFile::Off, Some((path, _))) = (&self.status, &self.mapped) {
                self.status =
                    PlanFile::Mapped { path: path.clone(), left_out: self.left_out, saved_graph: self.saved_graph };
            }
            return;
        }
        self.covered = packed_here;
        self.write(&held, &Proof::default(), &[]);
    }

    /// After this load wrote and proved its plan file: a packer over the map of that file, with
    /// the graphs it saved, in place of the weights packed on the heap. Plans built again from
    /// those graphs read their weights from the page cache as a later load's do, and the heap
    /// copies go with the plans that held them. `None` (nothing changed) when the file saved
    /// no graph or does not open. The status stays [`PlanFile::Written`]; the caller marks it
    /// mapped ([`PlanStore::mark_mapped`]) once every plan reads from the map.
    pub(super) fn map_written(&mut self) -> Option<Arc<Packer>> {
        let path = self.written.clone()?;
        let (packer, proof, graphs) = open(&path, &mut self.source, self.weights).ok()??;
        if graphs.entries.is_empty() {
            return None;
        }
        let packer = Arc::new(packer);
        self.packer = Some(packer.clone());
        self.mapped = Some((path, proof));
        self.graphs = graphs;
        Some(packer)
    }

    /// Records that every plan now reads its weights through the map of the file this load
    /// wrote ([`PlanStore::map_written`]).
    pub(super) fn mark_mapped(&mut self) {
        if let PlanFile::Written { mapped, .. } = &mut self.status {
            *mapped = true;
        }
    }

    /// The plan file the weights are read through, when they are.
    pub(super) fn mapped_path(&self) -> Option<&Path> {
        match &self.status {
            PlanFile::Mapped { path, .. } | PlanFile::Written { path, mapped: true, .. } => Some(path),
            _ => None,
        }
    }

    /// The rewritten graph of `build` from the mapped plan file.
    pub(super) fn graph(&self, build: &str) -> Option<&[u8]> {
        self.graphs.get(build)
    }

    fn write(&mut self, held: &[Held], proof: &Proof, graphs: &[(String, Vec<u8>)]) {
        let started = Instant::now();
        let mut last_error = String::from("no folder to write to");
        let source = self.source.id();
        for path in candidates(&self.setting, &self.onnx, self.beside, &mut self.source, self.weights) {
            match write(&path, &source, held, proof, graphs) {
                Ok(()) => {
                    let ms = started.elapsed().as_secs_f64() * 1e3;
                    let stale = match &self.status {
                        PlanFile::Written { stale, .. } => stale.clone(),
                        _ => self.stale.take(),
                    };
                    self.written = Some(path.clone());
                    self.status = PlanFile::Written { path, ms, stale, mapped: false };
                    return;
                }
                Err(e) => last_error = format!("{}: {e}", path.display()),
            }
        }
        self.written = None;
        self.status = PlanFile::Unwritten(last_error);
    }

    /// The weights packed so far and the origins every build shared, when this load wrote the
    /// plan file: what a proof starts from.
    pub(super) fn to_prove(&self) -> Option<(Vec<Held>, HashSet<String>, Vec<String>)> {
        self.written.as_ref()?;
        let origins = self.origins.clone().filter(|o| !o.is_empty())?;
        Some((self.packer.as_ref()?.held(), origins, self.builds.clone()))
    }

    /// Writes the plan file again with `proof`, which this load established, and the
    /// rewritten `graphs` of its builds that read back to the same outputs.
    pub(super) fn record(&mut self, proof: Proof, graphs: &[(String, Vec<u8>)]) {
        let Some(packer) = &self.packer else { return };
        let held = packer.held();
        self.write(&held, &proof, graphs);
    }
}

/// Where the plan file of the ONNX file `onnx` may be, in the order tried: beside it, then in
/// the cache folder ([`PlanCache::Auto`]); in the folder given ([`PlanCache::Dir`]).
pub(super) fn candidates(
    setting: &PlanCache,
    onnx: &Path,
    beside: bool,
    source: &mut Source,
    weights: WeightPrecision,
) -> Vec<PathBuf> {
    places(setting, onnx, beside).into_iter().map(|p| p.path(onnx, source, weights)).collect()
}

/// A folder a plan file may be in: beside the model, or shared, where the name also carries
/// the source's hash (two models of the same file name do not take turns overwriting one plan
/// file). The hash is computed only when a shared place is tried.
enum Place {
    Beside(PathBuf),
    Shared(PathBuf),
}

fn places(setting: &PlanCache, onnx: &Path, beside: bool) -> Vec<Place> {
    match setting {
        PlanCache::Off => vec![],
        PlanCache::Dir(dir) => vec![Place::Shared(dir.clone())],
        PlanCache::Auto => {
            let mut out = vec![];
            if let Some(dir) = onnx.parent().filter(|d| beside && (d.is_dir() || d.as_os_str().is_empty())) {
                out.push(Place::Beside(dir.to_path_buf()));
            }
            if let Some(cache) = cache_dir() {
                out.push(Place::Shared(cache));
            }
            out
        }
    }
}

impl Place {
    fn path(&self, onnx: &Path, source: &mut Source, weights: WeightPrecision) -> PathBuf {
        // Float16 weights have a file of their own: switching back and forth rewrites neither.
        let kernels = match weights {
            WeightPrecision::F32 => crate::kernels::tag(),
            WeightPrecision::F16 => format!("{}.f16", crate::kernels::tag()),
        };
        let file = onnx.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        match self {
            Place::Beside(dir) => dir.join(format!("{file}.{kernels}.edplan")),
            Place::Shared(dir) => dir.join(format!("{file}.{:016x}.{kernels}.edplan", source.hash())),
        }
    }
}

/// `$XDG_CACHE_HOME/edge-diffuse`, else `$HOME/.cache/edge-diffuse`.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("edge-diffuse"))
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A packer over the plan file at `path`: `Ok(None)` when there is none, `Err(why)` when it is
/// there but stale or damaged.
pub(super) fn open(
    path: &Path,
    source: &mut Source,
    weights: WeightPrecision,
) -> Result<Option<(Packer, Proof, Graphs)>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    // SAFETY: the map is read-only and shared. Files are only ever replaced by rename, which
    // leaves a mapped inode alone; truncating or rewriting the file in place while a process
    // maps it is unsupported (SIGBUS, as for any map: docs/memory.md).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot map it: {e}"))?;
    let map = Arc::new(map);
    let (index, proof, mut graphs) = validate(&map, source, weights)?;
    graphs.map = Some(map.clone());
    let packer = Packer::over_map(map, index);
    packer.set_half(weights == WeightPrecision::F16);
    Ok(Some((packer, proof, graphs)))
}

/// The first `bytes` of the plan file at `path` (all of it when shorter), mapped again and
/// locked in memory (`mlock`): the pages are the page cache's, the same the weights' map reads,
/// so the kernel cannot drop them under memory pressure. Dropping the map unlocks them.
pub(super) fn pin(path: &Path, bytes: u64) -> std::io::Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len().min(bytes);
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("more bytes than this target addresses"))?;
    // SAFETY: as in `open`: read-only and shared, and the file is only ever replaced by rename.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file) }?;
    map.lock()?;
    Ok(map)
}

/// The index of the plan file `bytes`, with absolute offsets, when every check passes.
fn validate(
    bytes: &[u8],
    source: &mut Source,
    weights: WeightPrecision,
) -> Result<(HashMap<String, Entry>, Proof, Graphs), String> {
    if bytes.len() < PREFIX {
        return Err(format!("{} bytes, shorter than its prefix", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("not a plan file (bad magic)".into());
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let format = word(8);
    if format != FORMAT {
        return Err(format!("format version {format}, this build reads {FORMAT}"));
    }
    let header_len = word(12) as usize;
    let sum = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let header = bytes.get(PREFIX..PREFIX + header_len).ok_or("its header runs past the end")?;
    if xxhash_rust::xxh3::xxh3_64(header) != sum {
        return Err("its header's checksum does not match".into());
    }
    let header: Header = serde_json::from_slice(header).map_err(|e| format!("unreadable header: {e}"))?;
    let want = |what: &str, have: &str, need: &str| {
        if have == need {
            Ok(())
        } else {
            Err(format!("built for {what} {have}, this is {need}"))
        }
    };
    want("edge-diffuse", &header.crate_version, env!("CARGO_PKG_VERSION"))?;
    want("architecture", &header.arch, std::env::consts::ARCH)?;
    want("kernels", &header.kernels, &crate::kernels::tag())?;
    want("weights", &header.weights, &weights.to_string())?;
    let (half, size) = (weights == WeightPrecision::F16, weights.bytes());
    if !source.matches(&header.source) {
        return Err("the ONNX file changed since it was built".into());
    }
    let data = align(PREFIX + header_len);
    let mut index = HashMap::new();
    for e in header.entries {
        // On 32-bit targets an offset or a length beyond a usize is out of bounds, not wrapped.
        let fits = usize::try_from(e.offset).ok().zip(usize::try_from(e.floats).ok());
        let end = fits.and_then(|(offset, floats)| floats.checked_mul(size)?.checked_add(data)?.checked_add(offset));
        let (offset, floats) = fits.unwrap_or_default();
        if offset % ALIGN != 0 || end.is_none_or(|end| end > bytes.len()) {
            return Err(format!("weight {:?} lies out of bounds or unaligned", e.key));
        }
        index.insert(e.key, Entry { offset: data + offset, len: floats, half, next: None, fingerprint: e.fingerprint });
    }
    let mut graphs = vec![];
    for g in header.graphs {
        let fits = usize::try_from(g.offset).ok().zip(usize::try_from(g.bytes).ok());
        let range =
            fits.and_then(|(offset, len)| Some(data.checked_add(offset)?..data.checked_add(offset)?.checked_add(len)?));
        match range {
            Some(r) if r.start % ALIGN == 0 && r.end <= bytes.len() => graphs.push((g.build, r, g.hash)),
            _ => return Err(format!("the graph of build {:?} lies out of bounds or unaligned", g.build)),
        }
    }
    Ok((index, header.proof, Graphs { map: None, entries: graphs }))
}

/// Writes `held` as the plan file `path`: a temporary file beside it, synced, then renamed.
pub(super) fn write(
    path: &Path,
    source: &SourceId,
    held: &[Held],
    proof: &Proof,
    graphs: &[(String, Vec<u8>)],
) -> std::io::Result<()> {
    let half = held.first().is_some_and(|h| h.packed.is_half());
    if held.iter().any(|h| h.packed.is_half() != half) {
        return Err(std::io::Error::other("weights of two precisions in one plan file"));
    }
    let weights = if half { WeightPrecision::F16 } else { WeightPrecision::F32 };
    let mut entries = vec![];
    let mut offset = 0usize;
    for h in held {
        let floats = h.packed.len();
        entries.push(HeaderEntry {
            key: h.key.clone(),
            offset: offset as u64,
            floats: floats as u64,
            fingerprint: h.fingerprint,
        });
        offset += align(floats * weights.bytes());
    }
    let mut graph_entries = vec![];
    for (build, bytes) in graphs {
        let hash = xxhash_rust::xxh3::xxh3_64(bytes);
        graph_entries.push(GraphEntry { build: build.clone(), offset: offset as u64, bytes: bytes.len() as u64, hash });
        offset += align(bytes.len());
    }
    let header = Header {
        crate_version: env!("CARGO_PKG_VERSION").into(),
        arch: std::env::consts::ARCH.into(),
        kernels: crate::kernels::tag(),
        source: source.clone(),
        weights: weights.to_string(),
        entries,
        proof: proof.clone(),
        graphs: graph_entries,
    };
    let header = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let result = (|| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create_new(&tmp)?);
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT.to_le_bytes())?;
        out.write_all(&(header.len() as u32).to_le_bytes())?;
        out.write_all(&xxhash_rust::xxh3::xxh3_64(&header).to_le_bytes())?;
        out.write_all(&header)?;
        let zeros = vec![0u8; ALIGN];
        let mut at = PREFIX + header.len();
        out.write_all(&zeros[..align(at) - at])?;
        let blobs = held.iter().map(|h| h.packed.bytes()).chain(graphs.iter().map(|(_, g)| &g[..]));
        for bytes in blobs {
            out.write_all(bytes)?;
            at = bytes.len();
            out.write_all(&zeros[..align(at) - at])?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::packed::fingerprint;
    use WeightPrecision::{F16, F32};

    fn source() -> SourceId {
        SourceId::of(b"an onnx file", &[], None)
    }

    fn known() -> Source {
        Source::known(source())
    }

    fn held(packer: &Packer) -> Vec<Held> {
        packer.get("linear/a", &[1.0, 2.0, 3.0], None, || vec![1.0, 2.0, 3.0]);
        packer.get("winograd3x3/b", &[4.0; 1500], None, || (0..1500).map(|i| i as f32).collect());
        packer.held()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ed-plan-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_written_plan_file_maps_back_the_same_weights() {
        let dir = scratch("roundtrip");
        let path = dir.join("m.edplan");
        write(&path, &source(), &held(&Packer::default()), &Proof::default(), &[]).unwrap();
        let (packer, ..) = open(&path, &mut known(), F32).unwrap().expect("a plan file");
        let mut calls = 0;
        let a = packer.get("linear/a", &[1.0, 2.0, 3.0], None, || {
            calls += 1;
            vec![]
        });
        let b = packer.get("winograd3x3/b", &[4.0; 1500], None, || {
            calls += 1;
            vec![]
        });
        assert_eq!(calls, 0);
        assert!(a.is_mapped() && b.is_mapped());
        // The first weight asks for the second ahead of use; the last asks for nothing.
        let (b_at, _) = (b.bytes().as_ptr() as usize - a.bytes().as_ptr() as usize, ());
        let (a_at, next) = a.next_bytes().expect("a mapped weight followed by another");
        assert_eq!(next, a_at + b_at..a_at + b_at + 1500 * 4);
        assert!(b.next_bytes().is_none());
        assert_eq!(a.to_vec(), &[1.0, 2.0, 3.0]);
        assert_eq!(b.to_vec(), &(0..1500).map(|i| i as f32).collect::<Vec<_>>()[..]);
        // Another source weight under the same key is packed again, not read from the map.
        let c = packer.get("linear/a", &[9.0, 2.0, 3.0], None, || vec![7.0]);
        assert_eq!((c.to_vec(), c.is_mapped()), (vec![7.0], false));
        assert_ne!(fingerprint(&[9.0, 2.0, 3.0]), fingerprint(&[1.0, 2.0, 3.0]));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_half_plan_file_maps_back_half_the_bytes_and_is_refused_for_f32() {
        let dir = scratch("half");
        let path = dir.join("m.edplan");
        let half = Packer::default();
        half.set_half(true);
        let held = held(&half);
        write(&path, &source(), &held, &Proof::default(), &[]).unwrap();
        let (packer, ..) = open(&path, &mut known(), F16).unwrap().expect("a plan file");
        let b = packer.get("winograd3x3/b", &[4.0; 1500], None, || panic!("packed again"));
        assert!(b.is_mapped() && b.is_half());
        assert_eq!(b.to_vec(), held[1].packed.to_vec());
        assert_eq!(b.bytes().len(), 3000);
        let why = open(&path, &mut known(), F32).err().expect("refused");
        assert!(why.contains("weights f16"), "{why}");
        // One plan file holds one precision.
        let mixed = [held[0].clone(), self::held(&Packer::default())[1].clone()];
        assert!(write(&dir.join("mixed"), &source(), &mixed, &Proof::default(), &[]).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_recorded_stat_vouches_for_the_hash_and_anything_else_reads_the_bytes() {
        let dir = scratch("stat");
        let onnx = dir.join("m.onnx");
        std::fs::write(&onnx, b"an onnx file").unwrap();
        let stat = FileStat::of(&std::fs::metadata(&onnx).unwrap());
        let recorded = SourceId::of(b"an onnx file", &[], stat);
        let hashed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let source = |bytes: &'static [u8], stat: Option<FileStat>| {
            let hashed = hashed.clone();
            let compute = move || {
                hashed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                content_hash(bytes, &[])
            };
            Source { len: bytes.len() as u64, stat, hash: 0, pending: Some(Box::new(compute)) }
        };
        let hashes = || hashed.load(std::sync::atomic::Ordering::SeqCst);
        if cfg!(unix) {
            // Same stat: the record's hash is taken, the bytes are not read.
            let mut same = source(b"an onnx file", stat);
            assert!(same.matches(&recorded));
            assert_eq!((hashes(), same.id().hash), (0, recorded.hash));
        }
        // Another stat (a copied folder): the bytes are hashed, and the same bytes still match.
        let other = FileStat { inode: stat.map_or(1, |s| s.inode + 1), ..stat.unwrap_or_default() };
        assert!(source(b"an onnx file", Some(other)).matches(&recorded));
        assert_eq!(hashes(), 1);
        // Other bytes of the same length under another stat do not.
        assert!(!source(b"an onnx fil!", Some(other)).matches(&recorded));
        // Rewritten in place: the status-change time moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&onnx, b"an onnx fil!").unwrap();
        let now = FileStat::of(&std::fs::metadata(&onnx).unwrap());
        assert!(now.is_none() || now != stat, "a write must change the stat");
        assert!(!source(b"an onnx fil!", now).matches(&recorded));
        // Another length is refused before anything is hashed.
        let before = hashes();
        assert!(!source(b"a longer onnx file", stat).matches(&recorded));
        assert_eq!(hashes(), before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_damaged_or_stale_plan_file_is_refused_with_a_reason() {
        let dir = scratch("damaged");
        let path = dir.join("m.edplan");
        write(&path, &source(), &held(&Packer::default()), &Proof::default(), &[]).unwrap();
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], source: &SourceId, needle: &str| {
            std::fs::write(&path, bytes).unwrap();
            let why = open(&path, &mut Source::known(source.clone()), F32)
                .err()
                .unwrap_or_else(|| panic!("accepted; expected {needle}"));
            assert!(why.contains(needle), "{why:?} should say {needle:?}");
        };
        check(&good[..10], &source(), "shorter");
        let mut bad = good.clone();
        bad[0] = b'X';
        check(&bad, &source(), "magic");
        let mut bad = good.clone();
        bad[8] = 99;
        check(&bad, &source(), "format version");
        let mut bad = good.clone();
        bad[PREFIX + 5] ^= 1;
        check(&bad, &source(), "checksum");
        check(&good[..good.len() - ALIGN], &source(), "out of bounds");
        check(&good, &SourceId::of(b"another onnx file", &[], None), "changed");
        // An entry pointing past the end, with a valid checksum: out of bounds.
        let header_len = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
        let mut header: Header = serde_json::from_slice(&good[PREFIX..PREFIX + header_len]).unwrap();
        header.entries[1].offset = 1 << 40;
        let text = serde_json::to_vec(&header).unwrap();
        let mut bad = good[..PREFIX].to_vec();
        bad[12..16].copy_from_slice(&(text.len() as u32).to_le_bytes());
        bad[16..24].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&text).to_le_bytes());
        bad.extend_from_slice(&text);
        bad.resize(good.len(), 0);
        check(&bad, &source(), "out of bounds");
        std::fs::remove_file(&path).unwrap();
        assert!(open(&path, &mut known(), F32).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn saved_graphs_map_back_by_build_and_a_damaged_one_is_not_handed_out() {
        let dir = scratch("graphs");
        let path = dir.join("m.edplan");
        let graphs = vec![("batch 1".to_string(), vec![7u8; 5000]), ("batch 2".to_string(), b"second".to_vec())];
        write(&path, &source(), &held(&Packer::default()), &Proof::default(), &graphs).unwrap();
        let (_, _, found) = open(&path, &mut known(), F32).unwrap().expect("a plan file");
        assert_eq!(found.get("batch 1"), Some(&graphs[0].1[..]));
        assert_eq!(found.get("batch 2"), Some(&graphs[1].1[..]));
        assert_eq!(found.get("batch 3"), None);
        drop(found);

        // A changed byte in a graph: that graph is not handed out, the rest of the file stands.
        let good = std::fs::read(&path).unwrap();
        let at = good.windows(6).position(|w| w == b"second").expect("the second graph's bytes");
        let mut bad = good.clone();
        bad[at] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let (_, _, found) = open(&path, &mut known(), F32).unwrap().expect("still a plan file");
        assert_eq!(found.get("batch 2"), None);
        assert_eq!(found.get("batch 1"), Some(&graphs[0].1[..]));
        drop(found);

        // A graph past the end: the file is refused.
        std::fs::write(&path, &good[..at]).unwrap();
        let why = open(&path, &mut known(), F32).err().expect("refused");
        assert!(why.contains("batch 2") && why.contains("out of bounds"), "{why}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_mapped_plan_file_outlives_its_deletion_and_replacement() {
        let dir = scratch("deleted");
        let path = dir.join("m.edplan");
        write(&path, &source(), &held(&Packer::default()), &Proof::default(), &[]).unwrap();
        let (packer, ..) = open(&path, &mut known(), F32).unwrap().unwrap();
        let before = packer.get("winograd3x3/b", &[4.0; 1500], None, Vec::new);
        std::fs::rename(&path, dir.join("moved")).unwrap();
        std::fs::remove_file(dir.join("moved")).unwrap();
        // A new file written under the same name (a rename) does not reach the old map.
        let other = Packer::default();
        other.get("winograd3x3/b", &[4.0; 1500], None, || vec![-1.0; 1500]);
        write(&path, &source(), &other.held(), &Proof::default(), &[]).unwrap();
        assert_eq!(before.to_vec()[1499], 1499.0);
        assert_eq!(
            open(&path, &mut known(), F32)
                .unwrap()
                .unwrap()
                .0
                .get("winograd3x3/b", &[4.0; 1500], None, Vec::new)
                .to_vec()[0],
            -1.0
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn candidates_go_beside_the_model_then_to_the_cache() {
        let onnx = Path::new("/models/m/unet.onnx");
        let auto = candidates(&PlanCache::Auto, onnx, true, &mut known(), F32);
        let tag = crate::kernels::tag();
        if Path::new("/models/m").is_dir() {
            assert_eq!(auto[0], Path::new(&format!("/models/m/unet.onnx.{tag}.edplan")));
        }
        assert!(auto.last().unwrap().to_string_lossy().contains("edge-diffuse"));
        let in_memory = candidates(&PlanCache::Auto, onnx, false, &mut known(), F32);
        assert!(in_memory.iter().all(|p| p.to_string_lossy().contains("edge-diffuse")));
        let dir = candidates(&PlanCache::Dir("/c".into()), onnx, true, &mut known(), F32);
        assert_eq!(dir, vec![PathBuf::from(format!("/c/unet.onnx.{:016x}.{tag}.edplan", source().hash))]);
        let half = candidates(&PlanCache::Dir("/c".into()), onnx, true, &mut known(), F16);
        assert_eq!(half, vec![PathBuf::from(format!("/c/unet.onnx.{:016x}.{tag}.f16.edplan", source().hash))]);
        assert!(candidates(&PlanCache::Off, onnx, true, &mut known(), F32).is_empty());
    }
}
