//! The user's files: `.npy` tensors in and out, PNG images out. Every write goes to a temporary
//! file in the destination folder, then is renamed over the target, so a failed run leaves
//! neither a partial file nor a damaged earlier output.

use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD, Ix4};
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
    let what = path.display().to_string();
    let arr = ArrayD::<f32>::read_npy(std::io::BufReader::new(file)).map_err(|e| Error::Tensor {
        what: what.clone(),
        message: match e {
            ReadNpyError::WrongDescriptor(d) => {
                format!("expected a float32 ('<f4') array, found dtype {d}")
            }
            other => format!("not a readable .npy file: {other}"),
        },
    })?;
    let shape = arr.shape().to_vec();
    arr.into_dimensionality::<Ix4>()
        .map_err(|_| Error::Tensor { what, message: format!("expected shape [batch, C, H, W], found {shape:?}") })
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
