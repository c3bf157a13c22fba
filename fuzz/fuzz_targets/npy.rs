//! Fuzzes the `.npy` reader (`read_npy4_from`, the code path behind `read_npy4`): it must never
//! panic, abort or allocate far beyond its input, and an array it accepts must be 4-D with as
//! many elements as its shape says.
#![no_main]

use edge_diffuse::files::read_npy4_from;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(arr) = read_npy4_from(data, "fuzz.npy") else { return };
    assert_eq!(arr.ndim(), 4);
    let shape = arr.shape();
    let n: usize = shape.iter().product();
    assert_eq!(arr.len(), n, "shape {shape:?}");
    assert_eq!(arr.iter().count(), n);
    // The data came from the input, 4 bytes per element.
    assert!(n * 4 <= data.len(), "{n} elements from {} bytes", data.len());
});
