//! The user's files: `.npy` tensors in and out, PNG images out. Every write goes to a temporary
//! file in the destination folder, then is renamed over the target, so a failed run leaves
//! neither a partial file nor a damaged earlier output.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD, Ix4};
use ndarray_npy::npy::header::Header;
use ndarray_npy::{ReadNpyError, ReadNpyExt, WriteNpyExt};

use crate::error::{Error, Result};

/// Writes `path` through a temporary sibling file and an atomic rename.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    if path.is_dir() {
        return Err(Error::io(path, std::io::Error::other("is a directory, expected a file path")));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("folder {} does not exist", dir.display())),
        ));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        drop(w);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Reads a float32 `[batch, C, H, W]` tensor from a `.npy` file.
pub fn read_npy4(path: &Path) -> Result<Array4<f32>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_npy4_from(std::io::BufReader::new(file), &path.display().to_string())
}

/// Reads a float32 `[batch, C, H, W]` tensor from `.npy` bytes; `what` names the source in errors.
pub fn read_npy4_from(mut reader: impl Read, what: &str) -> Result<Array4<f32>> {
    let tensor_err = |e: ReadNpyError| Error::Tensor {
        what: what.to_string(),
        message: match e {
            ReadNpyError::WrongDescriptor(d) => {
                format!("expected a float32 ('<f4') array, found dtype {d}")
            }
            other => format!("not a readable .npy file: {other}"),
        },
    };
    let head = read_declared(&mut reader).map_err(tensor_err)?;
    let arr = ArrayD::<f32>::read_npy(std::io::Cursor::new(head).chain(reader)).map_err(tensor_err)?;
    let shape = arr.shape().to_vec();
    arr.into_dimensionality::<Ix4>().map_err(|_| Error::Tensor {
        what: what.to_string(),
        message: format!("expected shape [batch, C, H, W], found {shape:?}"),
    })
}

/// Reads a `.npy` file's preamble, header and float32 data, as much as they declare and never more
/// than is there. ndarray-npy allocates the header's declared length (up to 4 GiB) and then the
/// declared array before reading either, so that a few bytes declaring a large one would abort
/// the process; here each allocation follows the bytes actually read. What is not understood is
/// returned as read: ndarray-npy then reports it as before, without a large allocation. The errors
/// returned here are the ones ndarray-npy reports for the same bytes.
fn read_declared(reader: &mut impl Read) -> std::result::Result<Vec<u8>, ReadNpyError> {
    let mut bytes = Vec::new();
    reader.by_ref().take(8).read_to_end(&mut bytes)?;
    let len_size = match bytes.as_slice() {
        [b'\x93', b'N', b'U', b'M', b'P', b'Y', 1, 0] => 2,
        [b'\x93', b'N', b'U', b'M', b'P', b'Y', 2 | 3, 0] => 4,
        _ => return Ok(bytes),
    };
    reader.by_ref().take(len_size).read_to_end(&mut bytes)?;
    if bytes.len() < 8 + len_size as usize {
        return Ok(bytes);
    }
    let header_len = bytes[8..].iter().rev().fold(0u64, |n, &b| n << 8 | u64::from(b));
    let start = bytes.len();
    reader.by_ref().take(header_len).read_to_end(&mut bytes)?;
    if ((bytes.len() - start) as u64) < header_len {
        // What `read_exact` reports for a short header.
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "failed to fill whole buffer").into());
    }
    let Ok(header) = Header::from_reader(&mut bytes.as_slice()) else { return Ok(bytes) };
    let Some(data_len) = data_len::<f32>(&header.shape) else { return Ok(bytes) };
    if !header.type_descriptor.as_string().is_some_and(|d| d == "<f4" || d == ">f4") {
        return Err(ReadNpyError::WrongDescriptor(header.type_descriptor));
    }
    let start = bytes.len();
    reader.by_ref().take(data_len as u64).read_to_end(&mut bytes)?;
    if bytes.len() - start < data_len {
        return Err(ReadNpyError::MissingData);
    }
    Ok(bytes)
}

/// The data length in bytes of an array of `shape`; `None` where ndarray-npy reports an overflow.
fn data_len<T>(shape: &[usize]) -> Option<usize> {
    let len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    let bytes = len.checked_mul(std::mem::size_of::<T>())?;
    (len <= isize::MAX as usize && bytes <= isize::MAX as usize).then_some(bytes)
}

/// Writes a float32 tensor as `.npy`.
pub fn write_npy(path: &Path, arr: &Array4<f32>) -> Result<()> {
    write_atomic(path, |w| arr.write_npy(w).map_err(std::io::Error::other))
}

/// Maps model values in `range` to 8-bit pixels (clamped, rounded half away from zero).
pub fn to_u8(v: f32, range: [f32; 2]) -> u8 {
    let [lo, hi] = range;
    let y = (v.clamp(lo, hi) - lo) / (hi - lo) * 255.0;
    (y + 0.5).floor() as u8
}

/// Lays images out on a grid of `cols` columns, one pixel of gap, as 8-bit pixels.
/// Channels 1 → grey, 3 → RGB, 4 → RGBA, 2 → grey of the first channel.
pub fn grid_image(samples: &Array4<f32>, cols: usize, range: [f32; 2]) -> image::DynamicImage {
    let (n, c, h, w) = samples.dim();
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let (gw, gh) = ((cols * w + cols.saturating_sub(1)) as u32, (rows * h + rows.saturating_sub(1)) as u32);
    let out_c = match c {
        3 => 3,
        4 => 4,
        _ => 1,
    };
    let mut buf = vec![0u8; gw as usize * gh as usize * out_c];
    for i in 0..n {
        let (r, col) = (i / cols, i % cols);
        for y in 0..h {
            for x in 0..w {
                let (px, py) = (col * (w + 1) + x, r * (h + 1) + y);
                for k in 0..out_c {
                    buf[(py * gw as usize + px) * out_c + k] = to_u8(samples[[i, k, y, x]], range);
                }
            }
        }
    }
    match out_c {
        3 => image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(gw, gh, buf).expect("sized")),
        4 => image::DynamicImage::ImageRgba8(image::RgbaImage::from_raw(gw, gh, buf).expect("sized")),
        _ => image::DynamicImage::ImageLuma8(image::GrayImage::from_raw(gw, gh, buf).expect("sized")),
    }
}

/// Writes a PNG atomically.
pub fn write_png(path: &Path, img: &image::DynamicImage) -> Result<()> {
    write_atomic(path, |w| img.write_to(w, image::ImageFormat::Png).map_err(std::io::Error::other))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_mapping_matches_python_tools() {
        let r = [-1.0, 1.0];
        assert_eq!((to_u8(-1.0, r), to_u8(1.0, r), to_u8(0.0, r), to_u8(5.0, r)), (0, 255, 128, 255));
    }

    /// A `.npy` file as numpy writes it: magic, version, header length, header, data.
    fn npy(version: u8, descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let pre = if version == 1 { 10 } else { 12 };
        while (pre + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend([version, 0]);
        match version {
            1 => out.extend((header.len() as u16).to_le_bytes()),
            _ => out.extend((header.len() as u32).to_le_bytes()),
        }
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn npy_err(bytes: &[u8]) -> String {
        read_npy4_from(bytes, "x.npy").unwrap_err().to_string()
    }

    /// The message `read_npy4` gave before `read_declared`: ndarray-npy on its own.
    fn plain_err(bytes: &[u8]) -> String {
        let message = match ArrayD::<f32>::read_npy(bytes) {
            Ok(a) => return format!("ok {:?}", a.shape()),
            Err(ReadNpyError::WrongDescriptor(d)) => format!("expected a float32 ('<f4') array, found dtype {d}"),
            Err(other) => format!("not a readable .npy file: {other}"),
        };
        Error::Tensor { what: "x.npy".into(), message }.to_string()
    }

    #[test]
    fn npy_reads_what_numpy_writes() {
        let data: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let a = read_npy4_from(&npy(1, "<f4", "(1, 2, 3, 1)", &data)[..], "x.npy").unwrap();
        assert_eq!(a.shape(), [1, 2, 3, 1]);
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let be: Vec<u8> = (0..4u32).flat_map(|i| (i as f32).to_be_bytes()).collect();
        let a = read_npy4_from(&npy(3, ">f4", "(1, 1, 2, 2)", &be)[..], "x.npy").unwrap();
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), [0.0, 1.0, 2.0, 3.0]);
        let a = read_npy4_from(&npy(2, "<f4", "(0, 1, 2, 2)", &[])[..], "x.npy").unwrap();
        assert_eq!(a.shape(), [0, 1, 2, 2]);
    }

    /// Found by `cargo fuzz run npy` (fuzz/README.md): a version 3 header declaring 4 GiB of header
    /// text, 72 bytes in all, made ndarray-npy allocate 4 GiB before reading it.
    #[test]
    fn npy_huge_declared_header_is_an_error_not_an_allocation() {
        let mut bytes = b"\x93NUMPY\x03\x00".to_vec();
        bytes.extend([0xff; 4]);
        bytes.extend(b"{'descr': '<f4'");
        let err = npy_err(&bytes);
        assert!(err.contains("not a readable .npy file") && err.contains("failed to fill whole buffer"), "{err}");
        assert!(err.contains("x.npy"), "{err}");
    }

    /// A header declaring 2^40 float32 elements over 8 bytes of data made ndarray-npy allocate
    /// 4 TiB before reading: "memory allocation failed", an abort.
    #[test]
    fn npy_huge_declared_shape_is_an_error_not_an_allocation() {
        // On 32-bit targets (armv7) these dimensions do not fit a usize, and the header parser
        // refuses them before anything is sized.
        let either = |err: &str, on_64_bit: &str| {
            err.contains(on_64_bit)
                || (cfg!(target_pointer_width = "32") && err.contains("illegal value for key shape"))
        };
        let err = npy_err(&npy(1, "<f4", "(1099511627776, 1, 1, 1)", &[0; 8]));
        assert!(either(&err, "reached EOF before reading all data"), "{err}");
        let err = npy_err(&npy(1, "<f8", "(1099511627776, 1, 1, 1)", &[0; 8]));
        assert!(either(&err, "expected a float32 ('<f4') array, found dtype '<f8'"), "{err}");
        let err = npy_err(&npy(1, "<f4", "(4611686018427387904, 1, 1, 1)", &[0; 8]));
        assert!(either(&err, "overflow computing length from shape"), "{err}");
    }

    /// Every error is the one ndarray-npy gave on its own for the same bytes.
    #[test]
    fn npy_errors_are_unchanged() {
        let data: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut cases = Vec::new();
        for version in [1, 2, 3] {
            let good = npy(version, "<f4", "(1, 2, 3, 1)", &data);
            cases.extend((0..good.len()).map(|n| good[..n].to_vec()));
            cases.push([good.as_slice(), b"xyz"].concat());
            for (i, b) in [(0, b'X'), (6, 4), (7, 1), (8, 0), (9, 0xff), (20, b'!'), (70, 0)] {
                let mut bad = good.clone();
                bad[i] = b;
                cases.push(bad);
            }
            cases.push(npy(version, "<f4", "(1, 2, 3)", &data[..24]));
            cases.push(npy(version, "<i4", "(1, 2, 3, 1)", &data));
            cases.push(npy(version, "<f4", "(1, -2, 3, 1)", &data));
            cases.push(npy(version, "<f4", "(1, 2, 3, 1)", &data[..23]));
        }
        for bytes in &cases {
            let new = read_npy4_from(bytes.as_slice(), "x.npy");
            let new = match new {
                Ok(a) => format!("ok {:?}", a.shape()),
                Err(e) => e.to_string(),
            };
            let old = plain_err(bytes);
            if old.starts_with("ok ") && !old.starts_with("ok [1, 2, 3, 1]") {
                continue; // not 4-D: read_npy4_from's own shape error
            }
            assert_eq!(new, old, "{bytes:?}");
        }
    }

    #[test]
    fn failed_write_keeps_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.png");
        std::fs::write(&p, b"old").unwrap();
        let err = write_atomic(&p, |_| Err(std::io::Error::other("boom"))).unwrap_err();
        assert!(err.to_string().contains("out.png"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
