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
        if offset % 4 != 0 || end > map.len() || (map.as_ptr() as usize) % 4 != 0 {
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

/// A weight the [`Packer`] holds: packed this load, or read from the map.
#[derive(Clone)]
pub(crate) struct Held {
    pub key: String,
    pub fingerprint: u64,
    pub packed: Packed,
}

#[derive(Default)]
struct State {
    map: Option<(Arc<memmap2::Mmap>, HashMap<String, Entry>)>,
    /// Every weight handed out, in the order first asked for.
    held: Vec<Held>,
    by_key: HashMap<String, usize>,
    /// How many were packed on the heap because the map lacked them (or has none).
    packed_here: usize,
}

/// Hands out packed weights during plan builds; see the module docs.
#[derive(Default)]
pub(crate) struct Packer(Mutex<State>);

impl Packer {
    /// A packer over a validated plan file's map and index.
    pub(crate) fn over_map(map: Arc<memmap2::Mmap>, index: HashMap<String, Entry>) -> Self {
        Packer(Mutex::new(State { map: Some((map, index)), ..Default::default() }))
    }

    /// The weights for `key` (an operator kind and a node name) packed from `source`: held
    /// ones, else the map's, else `pack()`'s on the heap.
    pub(crate) fn get(&self, key: &str, source: &[f32], pack: impl FnOnce() -> Vec<f32>) -> Packed {
        let fp = fingerprint(source);
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = s.by_key.get(key) {
            if s.held[i].fingerprint == fp {
                return s.held[i].packed.clone();
            }
        }
        let from_map = s.map.as_ref().and_then(|(map, index)| {
            let e = index.get(key).filter(|e| e.fingerprint == fp)?;
            Packed::mapped(map, e.offset, e.len)
        });
        let packed = match from_map {
            Some(p) => p,
            None => {
                s.packed_here += 1;
                Packed::heap(pack())
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

    /// How many weights were packed on the heap (not found in the map) so far.
    pub(crate) fn packed_here(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).packed_here
    }

    /// Every weight handed out so far.
    pub(crate) fn held(&self) -> Vec<Held> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).held.clone()
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
        let a = packer.get("w/a", &[1.0, 2.0], || pack(&[1.0, 2.0]));
        let again = packer.get("w/a", &[1.0, 2.0], || pack(&[1.0, 2.0]));
        assert_eq!(calls.get(), 1);
        assert_eq!(a, again);
        assert_eq!(a.as_slice(), &[2.0, 4.0]);
        let other = packer.get("w/a", &[3.0, 2.0], || pack(&[3.0, 2.0]));
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
