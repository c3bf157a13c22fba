//! Packed weights: what our operators read their constant weights from, in the layout their
//! kernel wants (Winograd-transformed, packed into panels). They live on the heap, or in a
//! memory-mapped plan file (`crate::runtime` writes and validates it), in which case the kernel
//! reads them straight from the map: file-backed pages that the OS can drop and read again, and
//! that several processes share.
//!
//! A [`Packer`] hands them out while the passes build a plan: from the plan file when it has the
//! weight, else packed on the heap and kept, so that the runtime can write the plan file after
//! the build and later plans of other batch sizes share the same weights.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use half::f16;

use crate::kernels::Floats;

/// Where a [`Packed`]'s floats are.
#[derive(Clone)]
enum Backing {
    Heap(Arc<[f32]>),
    HeapHalf(Arc<[f16]>),
    /// A read-only map, the element range in it (its start aligned to the element: the map is
    /// page-aligned and the runtime checks every offset), whether the elements are f16, and
    /// the bytes of the weight that follows in the file.
    Map(Arc<memmap2::Mmap>, std::ops::Range<usize>, bool, Option<std::ops::Range<usize>>),
}

/// Read-only weights in a kernel's layout, float32 or float16, and the [`Packer`] key they were
/// handed out under; cheap to clone.
#[derive(Clone)]
pub(crate) struct Packed(Backing, Option<Arc<str>>);

impl Packed {
    /// Weights packed on the heap.
    pub(crate) fn heap(values: Vec<f32>) -> Self {
        Packed(Backing::Heap(values.into()), None)
    }

    /// Weights packed on the heap, rounded to float16 (to nearest even).
    pub(crate) fn heap_half(values: &[f32]) -> Self {
        Packed(Backing::HeapHalf(values.iter().map(|&v| f16::from_f32(v)).collect()), None)
    }

    /// `len` elements (f16 when `half`, else f32) of `map` from byte `offset`; `None` when
    /// they are out of its bounds or `offset` is not a multiple of the element's size.
    pub(crate) fn mapped(map: &Arc<memmap2::Mmap>, offset: usize, len: usize, half: bool) -> Option<Self> {
        let size = if half { 2 } else { 4 };
        let end = len.checked_mul(size)?.checked_add(offset)?;
        if !offset.is_multiple_of(size) || end > map.len() || !(map.as_ptr() as usize).is_multiple_of(size) {
            return None;
        }
        Some(Packed(Backing::Map(map.clone(), offset / size..end / size, half, None), None))
    }

    /// The same weights, with the bytes `next` of the map (the weight after them in the file,
    /// which the next layer reads) to ask for ahead of use ([`Packed::prefetch_next`]).
    fn followed_by(self, next: Option<std::ops::Range<usize>>) -> Self {
        match self.0 {
            Backing::Map(map, range, half, _) => {
                let next = next.filter(|r| r.end <= map.len());
                Packed(Backing::Map(map, range, half, next), self.1)
            }
            other => Packed(other, self.1),
        }
    }

    /// The same weights, handed out under `key`.
    fn keyed(self, key: &str) -> Self {
        Packed(self.0, Some(key.into()))
    }

    /// The key the [`Packer`] handed these weights out under (`None`: made otherwise, as a
    /// float16 copy is).
    pub(crate) fn key(&self) -> Option<&str> {
        self.1.as_deref()
    }

    /// Asks the OS to start reading the next layer's weights from the plan file
    /// (`madvise(MADV_WILLNEED)`), so that when memory is short and its pages were dropped,
    /// their read overlaps this layer's arithmetic. Nothing for heap weights, and nothing while
    /// the process has taken no page from disk since the last ask: the kernel walks the whole
    /// range even when every page is resident, which made the call cost more than the read it
    /// could hide.
    pub(crate) fn prefetch_next(&self) {
        #[cfg(unix)]
        if let Backing::Map(map, _, _, Some(next)) = &self.0 {
            if pages_were_dropped() {
                // Only advice: a failure changes nothing but the timing.
                let _ = map.advise_range(memmap2::Advice::WillNeed, next.start, next.len());
            }
        }
    }

    /// The weights as the kernels read them.
    pub(crate) fn floats(&self) -> Floats<'_> {
        match &self.0 {
            Backing::Heap(v) => Floats::F32(v),
            Backing::HeapHalf(v) => Floats::F16(v),
            // SAFETY: `mapped` checked that the range is inside the map and that the map starts
            // aligned to the element; any bit pattern is a valid f32 or f16; the map is
            // read-only and lives as long as `self` holds its Arc.
            Backing::Map(map, range, false, _) => Floats::F32(unsafe {
                &std::slice::from_raw_parts(map.as_ptr() as *const f32, map.len() / 4)[range.clone()]
            }),
            Backing::Map(map, range, true, _) => Floats::F16(unsafe {
                &std::slice::from_raw_parts(map.as_ptr() as *const f16, map.len() / 2)[range.clone()]
            }),
        }
    }

    /// The raw bytes (native endianness), as a plan file stores them.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: f32 and f16 are plain bytes; the slice borrows `self`.
        match self.floats() {
            Floats::F32(v) => unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) },
            Floats::F16(v) => unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2) },
        }
    }

    /// Elements.
    pub(crate) fn len(&self) -> usize {
        self.floats().len()
    }

    /// The same weights in float16, for a float16 kernel: as they are when they already are
    /// (a plan file of `--weights f16` stays mapped), else rounded onto the heap once.
    pub(crate) fn into_half(self) -> Self {
        match self.floats() {
            Floats::F16(_) => self,
            Floats::F32(v) => Packed::heap_half(v),
        }
    }

    /// Whether the elements are float16.
    pub(crate) fn is_half(&self) -> bool {
        matches!(self.floats(), Floats::F16(_))
    }

    /// Whether the floats come from a plan file's map.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.0, Backing::Map(..))
    }

    /// The bytes [`Packed::prefetch_next`] asks for, and where its own start in the map.
    #[cfg(test)]
    pub(crate) fn next_bytes(&self) -> Option<(usize, std::ops::Range<usize>)> {
        match &self.0 {
            Backing::Map(map, _, _, next) => {
                Some((self.bytes().as_ptr() as usize - map.as_ptr() as usize, next.clone()?))
            }
            _ => None,
        }
    }

    /// Every value as float32 (tests and small weights).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<f32> {
        let mut buf = vec![];
        self.floats().widen(0..self.len(), &mut buf).to_vec()
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.is_mapped() { "mapped" } else { "heap" };
        let kind = if self.is_half() { "f16" } else { "f32" };
        write!(f, "Packed({} {kind}, {at})", self.len())
    }
}

/// The same bytes at the same address: two operators built from one entry.
impl PartialEq for Packed {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.bytes(), other.bytes());
        std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len() && self.is_half() == other.is_half()
    }
}

impl Eq for Packed {}

impl Hash for Packed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let s = self.bytes();
        (s.as_ptr() as usize, s.len()).hash(state);
    }
}

/// A fingerprint of source weights: their length and a sample of their values. It tells apart
/// two graph nodes that share a name, not two versions of a file (the plan file records the
/// ONNX file's own hash for that).
pub(crate) fn fingerprint(source: &[f32]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(source.len() as u64).to_le_bytes());
    let step = (source.len() / 64).max(1);
    for v in source.iter().step_by(step).chain(source.iter().rev().take(8)) {
        h.update(&v.to_bits().to_le_bytes());
    }
    h.digest()
}

/// One weight of a plan file, as the runtime read it from the file's index.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Byte offset in the map.
    pub offset: usize,
    /// Elements.
    pub len: usize,
    /// Whether they are float16.
    pub half: bool,
    /// The bytes of the weight that follows in the file, if any.
    pub next: Option<std::ops::Range<usize>>,
    /// [`fingerprint`] of the source weights it was packed from.
    pub fingerprint: u64,
}

/// The weight an operator asks the [`Packer`] for: the graph node it replaces, and the constant
/// its weights come from when nothing else reads that constant (its origin).
#[derive(Clone, Copy)]
pub(crate) struct Site<'a> {
    pub packer: &'a Packer,
    pub node: &'a str,
    pub origin: Option<&'a str>,
}

impl Site<'_> {
    /// Whether the operator built here multiplies in float16: the plan asks for it
    /// ([`Packer::set_half_products`]) and this CPU has the kernel.
    pub(crate) fn half_products(&self) -> bool {
        self.packer.half_products() && crate::kernels::half_products()
    }

    /// The packed weights of kind `kind` (an operator's layout) from `source`.
    pub(crate) fn get(&self, kind: &str, source: &[f32], pack: impl FnOnce() -> Vec<f32>) -> Packed {
        self.packer.get(&format!("{kind}/{}", self.node), source, self.origin, pack)
    }
}

/// A weight the [`Packer`] holds: packed this load, or read from the map.
#[derive(Clone)]
pub(crate) struct Held {
    pub key: String,
    pub fingerprint: u64,
    pub packed: Packed,
}

/// Where a [`Packer`] looks before packing.
#[derive(Default)]
enum Store {
    #[default]
    Nothing,
    /// A validated plan file's map and index.
    Map(Arc<memmap2::Mmap>, HashMap<String, Entry>),
    /// Weights packed by an earlier build of this load.
    Held(HashMap<String, Held>),
}

#[derive(Default)]
struct State {
    store: Store,
    /// Take a weight by its key alone, without the source's fingerprint: the graph was loaded
    /// with stand-ins for the weights (`crate::runtime`), which have no values to fingerprint.
    /// A weight the store lacks is then a failure ([`Packer::failed`]).
    by_key_alone: bool,
    /// Round the weights packed here to float16.
    half: bool,
    /// The operators built now multiply in float16 (`--precision f16` where the CPU has FP16
    /// arithmetic).
    half_products: bool,
    failed: bool,
    /// Every weight handed out, in the order first asked for.
    held: Vec<Held>,
    by_key: HashMap<String, usize>,
    /// How many were packed on the heap because the store lacked them.
    packed_here: usize,
    /// The constants the weights handed out since the last [`Packer::take_origins`] were packed
    /// from, when each was read by nothing else.
    origins: Vec<String>,
}

impl State {
    /// The store's weight under `key` whose source fingerprint `fits`, with that fingerprint.
    fn lookup(&self, key: &str, fits: impl Fn(u64) -> bool) -> Option<(Packed, u64)> {
        match &self.store {
            Store::Nothing => None,
            Store::Map(map, index) => index.get(key).filter(|e| fits(e.fingerprint)).and_then(|e| {
                Some((Packed::mapped(map, e.offset, e.len, e.half)?.followed_by(e.next.clone()), e.fingerprint))
            }),
            Store::Held(held) => {
                held.get(key).filter(|h| fits(h.fingerprint)).map(|h| (h.packed.clone(), h.fingerprint))
            }
        }
    }

    /// Holds `packed` under `key`, which names it from now on, and hands it out.
    fn hold(&mut self, key: &str, fingerprint: u64, packed: Packed) -> Packed {
        let packed = packed.keyed(key);
        self.by_key.insert(key.to_string(), self.held.len());
        self.held.push(Held { key: key.to_string(), fingerprint, packed: packed.clone() });
        packed
    }
}

/// Hands out packed weights during plan builds; see the module docs.
#[derive(Default)]
pub(crate) struct Packer(Mutex<State>);

impl Packer {
    /// A packer over a validated plan file's map and index.
    pub(crate) fn over_map(map: Arc<memmap2::Mmap>, mut index: HashMap<String, Entry>) -> Self {
        let size = |e: &Entry| e.len * if e.half { 2 } else { 4 };
        let mut spans: Vec<std::ops::Range<usize>> = index.values().map(|e| e.offset..e.offset + size(e)).collect();
        spans.sort_by_key(|r| r.start);
        for e in index.values_mut() {
            let after = spans.partition_point(|r| r.start <= e.offset);
            e.next = spans.get(after).cloned();
        }
        Packer(Mutex::new(State { store: Store::Map(map, index), ..Default::default() }))
    }

    /// A packer that hands out `held` by key alone (the proof build of `crate::runtime`).
    pub(crate) fn over_held(held: Vec<Held>) -> Self {
        let store = Store::Held(held.into_iter().map(|h| (h.key.clone(), h)).collect());
        Packer(Mutex::new(State { store, by_key_alone: true, ..Default::default() }))
    }

    /// From now on, round the weights packed here to float16 (`half`), or keep float32.
    pub(crate) fn set_half(&self, half: bool) {
        self.state().half = half;
    }

    /// From now on, the operators built with these weights multiply in float16
    /// (`crate::kernels::gemm::product_f16`), or in float32.
    pub(crate) fn set_half_products(&self, on: bool) {
        self.state().half_products = on;
    }

    /// Whether the operators built now multiply in float16 ([`Packer::set_half_products`]).
    pub(crate) fn half_products(&self) -> bool {
        self.state().half_products
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, take weights by key alone (see [`State::by_key_alone`]).
    pub(crate) fn by_key_alone(&self, on: bool) {
        self.state().by_key_alone = on;
    }

    /// The weights for `key` (an operator kind and a node name) packed from `source`: held
    /// ones, else the store's, else `pack()`'s on the heap. `origin`: the constant `source`
    /// is, when nothing else reads it.
    pub(crate) fn get(
        &self,
        key: &str,
        source: &[f32],
        origin: Option<&str>,
        pack: impl FnOnce() -> Vec<f32>,
    ) -> Packed {
        let mut s = self.state();
        let alone = s.by_key_alone;
        s.origins.extend(origin.map(str::to_string));
        let fp = if alone { None } else { Some(fingerprint(source)) };
        let fits = |stored: u64| fp.is_none_or(|f| f == stored);
        if let Some(&i) = s.by_key.get(key) {
            if fits(s.held[i].fingerprint) {
                return s.held[i].packed.clone();
            }
        }
        let (packed, fp) = match s.lookup(key, fits) {
            Some(found) => found,
            None => {
                s.packed_here += 1;
                s.failed |= alone;
                let packed = if s.half { Packed::heap_half(&pack()) } else { Packed::heap(pack()) };
                (packed, fp.unwrap_or_else(|| fingerprint(source)))
            }
        };
        // A second node of the same name with other weights is served, not held: the plan file
        // could not tell the two apart, nor can a key name it.
        if s.by_key.contains_key(key) {
            return packed;
        }
        s.hold(key, fp, packed)
    }

    /// The weights stored under `key` (in the plan file's map, or held by an earlier build),
    /// taken by key alone: how a graph read back from a plan file gets its weights
    /// (`crate::ops::serial`).
    pub(crate) fn stored(&self, key: &str) -> Option<Packed> {
        let mut s = self.state();
        if let Some(&i) = s.by_key.get(key) {
            return Some(s.held[i].packed.clone());
        }
        let (packed, fingerprint) = s.lookup(key, |_| true)?;
        Some(s.hold(key, fingerprint, packed))
    }

    /// How many weights were packed on the heap (not found in the store) so far.
    pub(crate) fn packed_here(&self) -> usize {
        self.state().packed_here
    }

    /// Whether a weight taken by key alone was missing: the build read a stand-in's values.
    pub(crate) fn failed(&self) -> bool {
        self.state().failed
    }

    /// Every weight handed out so far.
    pub(crate) fn held(&self) -> Vec<Held> {
        self.state().held.clone()
    }

    /// The origins of the weights handed out since the last call.
    pub(crate) fn take_origins(&self) -> Vec<String> {
        std::mem::take(&mut self.state().origins)
    }
}

/// Whether the process has read a page from disk (a major fault) since the last call; true on the
/// first call, and always where that count cannot be read. A mapped weight read from disk means
/// memory is short and the pages after it may be gone too.
#[cfg(unix)]
fn pages_were_dropped() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::atomic::{AtomicIsize, Ordering};
        static SEEN: AtomicIsize = AtomicIsize::new(-1);
        // SAFETY: `getrusage` only writes the struct it is given, which is plain data.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return true;
        }
        let faults = usage.ru_majflt as isize;
        SEEN.swap(faults, Ordering::Relaxed) != faults
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packer_packs_once_per_key_and_tells_same_named_weights_apart() {
        let packer = Packer::default();
        let calls = std::cell::Cell::new(0);
        let pack = |v: &[f32]| {
            calls.set(calls.get() + 1);
            v.iter().map(|x| x * 2.0).collect::<Vec<_>>()
        };
        let a = packer.get("w/a", &[1.0, 2.0], None, || pack(&[1.0, 2.0]));
        let again = packer.get("w/a", &[1.0, 2.0], None, || pack(&[1.0, 2.0]));
        assert_eq!(calls.get(), 1);
        assert_eq!(a, again);
        assert_eq!(a.to_vec(), &[2.0, 4.0]);
        let other = packer.get("w/a", &[3.0, 2.0], None, || pack(&[3.0, 2.0]));
        assert_eq!(other.to_vec(), &[6.0, 4.0]);
        assert_eq!(packer.packed_here(), 2);
        assert_eq!(packer.held().len(), 1);
    }

    #[test]
    fn a_half_packer_rounds_to_float16_and_widens_any_range_back() {
        let packer = Packer::default();
        packer.set_half(true);
        let source: Vec<f32> = (0..40).map(|i| 1.0 + i as f32 / 3.0).collect();
        let packed = packer.get("w/h", &source, None, || source.clone());
        assert!(packed.is_half());
        assert_eq!(packed.bytes().len(), 80);
        let rounded: Vec<f32> = source.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        assert_ne!(rounded, source, "some values are not exact in f16");
        let mut buf = vec![];
        for range in [0..40, 3..11, 17..18, 9..9] {
            assert_eq!(packed.floats().widen(range.clone(), &mut buf), &rounded[range]);
        }
        // A float32 packer hands its own slice out, unwidened.
        let plain = Packer::default().get("w/h", &source, None, || source.clone());
        let mut unused = vec![];
        assert_eq!(plain.floats().widen(5..9, &mut unused), &source[5..9]);
        assert!(unused.is_empty());
    }

    #[test]
    fn a_mapped_range_is_bounds_and_alignment_checked() {
        let path = std::env::temp_dir().join(format!("ed-packed-{}", std::process::id()));
        std::fs::write(&path, [0u8; 64]).unwrap();
        let map = Arc::new(unsafe { memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()) }.unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(Packed::mapped(&map, 0, 16, false).is_some());
        assert!(Packed::mapped(&map, 4, 16, false).is_none());
        assert!(Packed::mapped(&map, 2, 1, false).is_none());
        assert!(Packed::mapped(&map, 2, 1, true).is_some());
        assert!(Packed::mapped(&map, 1, 1, true).is_none());
        assert!(Packed::mapped(&map, 0, 33, true).is_none());
        assert!(Packed::mapped(&map, usize::MAX - 3, 1, false).is_none());
        assert_eq!(Packed::mapped(&map, 8, 2, false).unwrap().to_vec(), &[0.0, 0.0]);
    }
}
