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

/// Where a [`Packed`]'s floats are.
#[derive(Clone)]
enum Backing {
    Heap(Arc<[f32]>),
    /// A read-only map and the float range in it (its start 4-byte aligned: the map is
    /// page-aligned and the runtime checks every offset).
    Map(Arc<memmap2::Mmap>, std::ops::Range<usize>),
}

/// Read-only float32 weights in a kernel's layout; cheap to clone.
#[derive(Clone)]
pub(crate) struct Packed(Backing);

impl Packed {
    /// Weights packed on the heap.
    pub(crate) fn heap(values: Vec<f32>) -> Self {
        Packed(Backing::Heap(values.into()))
    }

    /// `len` floats of `map` from byte `offset`; `None` when they are out of its bounds or
    /// `offset` is not a multiple of 4.
    pub(crate) fn mapped(map: &Arc<memmap2::Mmap>, offset: usize, len: usize) -> Option<Self> {
        let end = len.checked_mul(4)?.checked_add(offset)?;
        if !offset.is_multiple_of(4) || end > map.len() || !(map.as_ptr() as usize).is_multiple_of(4) {
            return None;
        }
        Some(Packed(Backing::Map(map.clone(), offset / 4..end / 4)))
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        match &self.0 {
            Backing::Heap(v) => v,
            Backing::Map(map, range) => {
                // SAFETY: `mapped` checked that the range is inside the map and that the map
                // starts 4-byte aligned; any bit pattern is a valid f32; the map is read-only
                // and lives as long as `self` holds its Arc.
                let all = unsafe { std::slice::from_raw_parts(map.as_ptr() as *const f32, map.len() / 4) };
                &all[range.clone()]
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether the floats come from a plan file's map.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.0, Backing::Map(..))
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.is_mapped() { "mapped" } else { "heap" };
        write!(f, "Packed({} floats, {at})", self.len())
    }
}

/// The same floats at the same address: two operators built from one entry.
impl PartialEq for Packed {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.as_slice(), other.as_slice());
        std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len()
    }
}

impl Eq for Packed {}

impl Hash for Packed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let s = self.as_slice();
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
    /// Floats.
    pub len: usize,
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

/// Hands out packed weights during plan builds; see the module docs.
#[derive(Default)]
pub(crate) struct Packer(Mutex<State>);

impl Packer {
    /// A packer over a validated plan file's map and index.
    pub(crate) fn over_map(map: Arc<memmap2::Mmap>, index: HashMap<String, Entry>) -> Self {
        Packer(Mutex::new(State { store: Store::Map(map, index), ..Default::default() }))
    }

    /// A packer that hands out `held` by key alone (the proof build of `crate::runtime`).
    pub(crate) fn over_held(held: Vec<Held>) -> Self {
        let store = Store::Held(held.into_iter().map(|h| (h.key.clone(), h)).collect());
        Packer(Mutex::new(State { store, by_key_alone: true, ..Default::default() }))
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
        let found = match &s.store {
            Store::Nothing => None,
            Store::Map(map, index) => index
                .get(key)
                .filter(|e| fits(e.fingerprint))
                .and_then(|e| Some((Packed::mapped(map, e.offset, e.len)?, e.fingerprint))),
            Store::Held(held) => {
                held.get(key).filter(|h| fits(h.fingerprint)).map(|h| (h.packed.clone(), h.fingerprint))
            }
        };
        let (packed, fp) = match found {
            Some(found) => found,
            None => {
                s.packed_here += 1;
                s.failed |= alone;
                (Packed::heap(pack()), fp.unwrap_or_else(|| fingerprint(source)))
            }
        };
        // A second node of the same name with other weights is served, not held: the plan file
        // could not tell the two apart.
        if !s.by_key.contains_key(key) {
            let i = s.held.len();
            s.held.push(Held { key: key.to_string(), fingerprint: fp, packed: packed.clone() });
            s.by_key.insert(key.to_string(), i);
        }
        packed
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
        assert_eq!(a.as_slice(), &[2.0, 4.0]);
        let other = packer.get("w/a", &[3.0, 2.0], None, || pack(&[3.0, 2.0]));
        assert_eq!(other.as_slice(), &[6.0, 4.0]);
        assert_eq!(packer.packed_here(), 2);
        assert_eq!(packer.held().len(), 1);
    }

    #[test]
    fn a_mapped_range_is_bounds_and_alignment_checked() {
        let path = std::env::temp_dir().join(format!("ed-packed-{}", std::process::id()));
        std::fs::write(&path, [0u8; 64]).unwrap();
        let map = Arc::new(unsafe { memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()) }.unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(Packed::mapped(&map, 0, 16).is_some());
        assert!(Packed::mapped(&map, 4, 16).is_none());
        assert!(Packed::mapped(&map, 2, 1).is_none());
        assert!(Packed::mapped(&map, usize::MAX - 3, 1).is_none());
        assert_eq!(Packed::mapped(&map, 8, 2).unwrap().as_slice(), &[0.0, 0.0]);
    }
}
