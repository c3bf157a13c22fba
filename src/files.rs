//! The user's files: `.npy` tensors in and out, PNG images out.
//!
//! Outputs never break what they are written to, and a failed write never leaves a partial
//! file or damages an earlier output:
//! - `-` is standard output;
//! - a character device, FIFO or socket is opened and written in place (a rename would put a
//!   regular file where the device node or the pipe was);
//! - a symlink is followed, and the file it points to is replaced, so the link stays;
//! - a regular file (or a new one) is written to a temporary sibling, flushed to disk and renamed
//!   over the target; it keeps the permission bits of the file it replaces, and its owner where
//!   the process may set it.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD, Ix4};
use ndarray_npy::npy::header::Header;
use ndarray_npy::{ReadNpyError, ReadNpyExt};

use crate::error::{Error, Result};

/// The largest grid [`Grid::new`] assembles, in bytes of 8-bit pixels.
pub const MAX_GRID_BYTES: usize = 64 << 20;

/// Symlinks followed before a path is taken to loop (Linux's own limit).
const MAX_LINKS: usize = 40;

/// How an output path is written, decided from what is at the path now.
#[derive(Debug)]
enum Target {
    /// `-`: standard output.
    Stdout,
    /// A character device, FIFO, socket or block device: written in place.
    InPlace(PathBuf),
    /// A regular file, or none yet: replaced through a temporary sibling. `keep` holds the
    /// metadata of the file replaced, whose mode and owner the new file takes.
    Replace { dest: PathBuf, keep: Option<std::fs::Metadata> },
}

impl Target {
    /// Follows symlinks to the file that will be written and says how.
    fn resolve(path: &Path) -> Result<Target> {
        if path.as_os_str() == "-" {
            return Ok(Target::Stdout);
        }
        let mut at = path.to_path_buf();
        for _ in 0..MAX_LINKS {
            let meta = match std::fs::symlink_metadata(&at) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let dir = parent_of(&at);
                    if !dir.is_dir() {
                        return Err(Error::io(
                            path,
                            std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                format!("folder {} does not exist", dir.display()),
                            ),
                        ));
                    }
                    return Ok(Target::Replace { dest: at, keep: None });
                }
                Err(e) => return Err(Error::io(path, e)),
            };
            let kind = meta.file_type();
            if kind.is_symlink() {
                let link = std::fs::read_link(&at).map_err(|e| Error::io(path, e))?;
                at = if link.is_absolute() { link } else { parent_of(&at).join(link) };
            } else if kind.is_dir() {
                return Err(Error::io(path, std::io::Error::other("is a directory, expected a file path")));
            } else if kind.is_file() {
                return Ok(Target::Replace { dest: at, keep: Some(meta) });
            } else {
                return Ok(Target::InPlace(at));
            }
        }
        Err(Error::io(path, std::io::Error::other(format!("more than {MAX_LINKS} symlinks to follow"))))
    }
}

/// The folder holding `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks, before any work, that `path` can be written as an output: its folder exists, it is
/// not a directory, and its symlinks lead somewhere. Nothing is created.
pub fn check_output(path: &Path) -> Result<()> {
    Target::resolve(path).map(drop)
}

/// Where an [`OutputFile`]'s bytes go.
enum Sink {
    Stdout(std::io::Stdout),
    File(std::fs::File),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stdout(s) => s.write(buf),
            Sink::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout(s) => s.flush(),
            Sink::File(f) => f.flush(),
        }
    }
}

/// An output being written (see the module docs for how each kind of path is treated).
///
/// Nothing reaches a replaced file until [`commit`](OutputFile::commit); dropped without it, the
/// temporary file is removed and the earlier file is left as it was.
pub struct OutputFile {
    /// The path as given, for messages.
    shown: PathBuf,
    w: std::io::BufWriter<Sink>,
    /// The temporary file and its destination, for a replaced file.
    rename: Option<(PathBuf, PathBuf)>,
}

impl OutputFile {
    /// Opens `path` for writing: standard output for `-`, a device or FIFO in place, else a
    /// temporary sibling of the file (the target of its symlinks).
    pub fn create(path: &Path) -> Result<Self> {
        let err = |e| Error::io(path, e);
        let (sink, rename) = match Target::resolve(path)? {
            Target::Stdout => (Sink::Stdout(std::io::stdout()), None),
            Target::InPlace(at) => (Sink::File(std::fs::OpenOptions::new().write(true).open(at).map_err(err)?), None),
            Target::Replace { dest, keep } => {
                let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let tmp = parent_of(&dest).join(format!(".{name}.{}.tmp", std::process::id()));
                let file = create_like(&tmp, keep.as_ref()).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    err(e)
                })?;
                (Sink::File(file), Some((tmp, dest)))
            }
        };
        Ok(OutputFile { shown: path.to_path_buf(), w: std::io::BufWriter::new(sink), rename })
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Writes bytes; an error names the file.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.w.write_all(bytes).map_err(|e| Error::io(&self.shown, e))
    }

    /// Runs `write` on the buffered writer; an error names the file.
    pub fn write_with(&mut self, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
        write(&mut self.w).map_err(|e| Error::io(&self.shown, e))
    }

    /// Overwrites bytes at `offset` of a replaced file and returns to the end; `false` (and
    /// nothing written) for standard output, devices and FIFOs, which cannot go back.
    fn patch(&mut self, offset: u64, bytes: &[u8]) -> Result<bool> {
        if self.rename.is_none() {
            return Ok(false);
        }
        let shown = self.shown.clone();
        let err = |e| Error::io(&shown, e);
        self.w.flush().map_err(err)?;
        let Sink::File(f) = self.w.get_mut() else { return Ok(false) };
        let end = f.stream_position().map_err(err)?;
        f.seek(std::io::SeekFrom::Start(offset)).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.seek(std::io::SeekFrom::Start(end)).map_err(err)?;
        Ok(true)
    }

    /// Cuts a replaced file to `len` bytes (no-op elsewhere).
    fn truncate(&mut self, len: u64) -> Result<()> {
        let shown = self.shown.clone();
        self.w.flush().map_err(|e| Error::io(&shown, e))?;
        match (self.w.get_mut(), &self.rename) {
            (Sink::File(f), Some(_)) => f.set_len(len).map_err(|e| Error::io(&shown, e)),
            _ => Ok(()),
        }
    }

    /// Finishes the output: flushes it, and for a replaced file syncs it to disk and renames it
    /// over the target.
    pub fn commit(mut self) -> Result<()> {
        let shown = self.shown.clone();
        let err = |e| Error::io(&shown, e);
        self.w.flush().map_err(err)?;
        if let Some((tmp, dest)) = self.rename.take() {
            let done = (|| {
                if let Sink::File(f) = self.w.get_ref() {
                    f.sync_all()?;
                }
                std::fs::rename(&tmp, &dest)
            })();
            if let Err(e) = done {
                let _ = std::fs::remove_file(&tmp);
                return Err(err(e));
            }
        }
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let Some((tmp, _)) = &self.rename {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Creates the temporary file `tmp`; when it replaces an existing file (`keep`), with that
/// file's permission bits and, where the process may set it, its owner.
fn create_like(tmp: &Path, keep: Option<&std::fs::Metadata>) -> std::io::Result<std::fs::File> {
    // A stale temporary file of an earlier process with the same id would keep its own mode.
    let _ = std::fs::remove_file(tmp);
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        // Private until the mode is set, so a file meant to be 0600 is never readable by others.
        open.mode(if keep.is_some() { 0o600 } else { 0o666 });
        let file = open.open(tmp)?;
        if let Some(m) = keep {
            // Before the mode: a change of owner clears the set-id bits.
            match std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid())) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                Err(e) => return Err(e),
            }
            file.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
        Ok(file)
    }
    #[cfg(not(unix))]
    {
        let file = open.open(tmp)?;
        if let Some(m) = keep {
            file.set_permissions(m.permissions())?;
        }
        Ok(file)
    }
}

/// Writes `path` in one go (see [`OutputFile`]).
pub fn write_file(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let mut out = OutputFile::create(path)?;
    out.write_with(write)?;
    out.commit()
}

/// Reads a float32 `[batch, C, H, W]` tensor from a `.npy` file.
pub fn read_npy4(path: &Path) -> Result<Array4<f32>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_npy4_from(std::io::BufReader::new(file), &path.display().to_string())
}

/// Reads a float32 `[batch, C, H, W]` tensor from `.npy` bytes; `what` names the source in errors.
pub fn read_npy4_from(reader: impl Read, what: &str) -> Result<Array4<f32>> {
    let arr = read_npy_from(reader, what)?;
    let shape = arr.shape().to_vec();
    arr.into_dimensionality::<Ix4>().map_err(|_| Error::Tensor {
        what: what.to_string(),
        message: format!("expected shape [batch, C, H, W], found {shape:?}"),
    })
}

/// Reads a float32 tensor of any shape from a `.npy` file.
pub fn read_npy(path: &Path) -> Result<ArrayD<f32>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_npy_from(std::io::BufReader::new(file), &path.display().to_string())
}

/// Reads a float32 tensor of any shape from `.npy` bytes; `what` names the source in errors.
pub fn read_npy_from(mut reader: impl Read, what: &str) -> Result<ArrayD<f32>> {
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
    ArrayD::<f32>::read_npy(std::io::Cursor::new(head).chain(reader)).map_err(tensor_err)
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

/// A float32 `.npy` file of `[images, C, H, W]` written one image at a time, so that memory
/// does not grow with the number of images.
pub struct NpyWriter {
    out: OutputFile,
    /// `[images, C, H, W]` as declared in the header.
    shape: [usize; 4],
    header_len: usize,
    written: usize,
    bytes: Vec<u8>,
}

impl NpyWriter {
    /// Opens `path` (as [`OutputFile::create`]) and writes the header of a `shape` array.
    pub fn create(path: &Path, shape: [usize; 4]) -> Result<Self> {
        let mut out = OutputFile::create(path)?;
        let header = npy_header(shape, npy_header_len(shape[0]));
        out.write_all(&header)?;
        Ok(NpyWriter { out, shape, header_len: header.len(), written: 0, bytes: Vec::new() })
    }

    /// Appends the next image, `C·H·W` values.
    pub fn push(&mut self, image: &[f32]) -> Result<()> {
        let per: usize = self.shape[1..].iter().product();
        if image.len() != per || self.written == self.shape[0] {
            return Err(Error::Tensor {
                what: self.out.path().display().to_string(),
                message: format!(
                    "image {} of {} values, expected {} of {per}",
                    self.written + 1,
                    image.len(),
                    self.shape[0]
                ),
            });
        }
        self.bytes.clear();
        self.bytes.extend(image.iter().flat_map(|v| v.to_le_bytes()));
        self.out.write_all(&self.bytes)?;
        self.written += 1;
        Ok(())
    }

    /// Images written so far.
    pub fn written(&self) -> usize {
        self.written
    }

    /// Finishes a file holding every declared image.
    pub fn finish(self) -> Result<()> {
        if self.written != self.shape[0] {
            return Err(Error::Tensor {
                what: self.out.path().display().to_string(),
                message: format!("{} of {} images written", self.written, self.shape[0]),
            });
        }
        self.out.commit()
    }

    /// Finishes the file with the images written so far: the header is rewritten to declare
    /// them (same length, so the data stays in place). Standard output, devices and FIFOs cannot
    /// go back, so there the stream ends after the last whole image. Returns the images kept.
    pub fn finish_partial(mut self) -> Result<usize> {
        let mut shape = self.shape;
        shape[0] = self.written;
        let header = npy_header(shape, self.header_len);
        if self.out.patch(0, &header)? {
            let per: usize = shape[1..].iter().product();
            self.out.truncate((self.header_len + self.written * per * 4) as u64)?;
        }
        let kept = self.written;
        self.out.commit()?;
        Ok(kept)
    }
}

/// The header length (a multiple of 64) for arrays of up to `images` images: fewer images take
/// fewer digits, so a header rewritten for them fits the same length.
fn npy_header_len(images: usize) -> usize {
    let widest = npy_header_text([images, usize::MAX, usize::MAX, usize::MAX]);
    (10 + widest.len() + 1).div_ceil(64) * 64
}

fn npy_header_text([n, c, h, w]: [usize; 4]) -> String {
    format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {c}, {h}, {w}), }}")
}

/// A version 1.0 `.npy` header of `len` bytes, padded with spaces and ending in a newline.
fn npy_header(shape: [usize; 4], len: usize) -> Vec<u8> {
    let text = npy_header_text(shape);
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend(((len - 10) as u16).to_le_bytes());
    out.extend(text.as_bytes());
    out.resize(len - 1, b' ');
    out.push(b'\n');
    out
}

/// Writes a float32 tensor as `.npy`.
pub fn write_npy(path: &Path, arr: &Array4<f32>) -> Result<()> {
    let (n, c, h, w) = arr.dim();
    let mut out = NpyWriter::create(path, [n, c, h, w])?;
    for image in arr.outer_iter() {
        let image = image.as_standard_layout();
        out.push(image.as_slice().expect("standard layout"))?;
    }
    out.finish()
}

/// Maps model values in `range` to 8-bit pixels (clamped, rounded half away from zero).
pub fn to_u8(v: f32, range: [f32; 2]) -> u8 {
    let [lo, hi] = range;
    let y = (v.clamp(lo, hi) - lo) / (hi - lo) * 255.0;
    (y + 0.5).floor() as u8
}

/// Reads a PNG (or any image the `image` crate decodes) as one image `[1, C, H, W]` of `shape`
/// (`[C, H, W]`), mapping 0–255 onto `range` as [`to_u8`] maps back: 1 channel is grey, 3 RGB, 4
/// RGBA. Its size must be the shape's, unless `resize`: then it is resized to it (Lanczos, as
/// diffusers' image processor resizes).
pub fn read_image(path: &Path, shape: [usize; 3], range: [f32; 2], resize: bool) -> Result<Array4<f32>> {
    let [c, h, w] = shape;
    let img = decode_image(path)?;
    let img = match (img.width() as usize, img.height() as usize) == (w, h) {
        true => img,
        false if resize => img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Lanczos3),
        false => {
            return Err(Error::Tensor {
                what: path.display().to_string(),
                message: format!(
                    "is {}×{} pixels, expected {w}×{h} (the model's image size)",
                    img.width(),
                    img.height()
                ),
            })
        }
    };
    let values: Vec<u8> = match c {
        1 => img.to_luma8().into_raw(),
        3 => img.to_rgb8().into_raw(),
        4 => img.to_rgba8().into_raw(),
        _ => {
            return Err(Error::Tensor {
                what: path.display().to_string(),
                message: format!("the model's images have {c} channels; an image file gives 1, 3 or 4"),
            })
        }
    };
    let [lo, hi] = range;
    // Interleaved pixels to planes.
    Ok(Array4::from_shape_fn((1, c, h, w), |(_, k, y, x)| lo + (hi - lo) * values[(y * w + x) * c + k] as f32 / 255.0))
}

/// Reads a greyscale mask image of `[height, width]` as `[1, 1, H, W]` in `[0, 1]` (white 1). An
/// image in colour is refused: which channel would say where to draw is not clear.
pub fn read_mask(path: &Path, [h, w]: [usize; 2]) -> Result<Array4<f32>> {
    let img = decode_image(path)?;
    let what = || path.display().to_string();
    if (img.width() as usize, img.height() as usize) != (w, h) {
        return Err(Error::Tensor {
            what: what(),
            message: format!("is {}×{} pixels, expected {w}×{h} (the output's size)", img.width(), img.height()),
        });
    }
    if img.color().has_color() && img.to_rgb8().pixels().any(|p| p.0[0] != p.0[1] || p.0[1] != p.0[2]) {
        return Err(Error::Tensor {
            what: what(),
            message: "is in colour; a mask is greyscale (white: draw anew, black: keep)".into(),
        });
    }
    let grey = img.to_luma8();
    Ok(Array4::from_shape_fn((1, 1, h, w), |(_, _, y, x)| grey.get_pixel(x as u32, y as u32).0[0] as f32 / 255.0))
}

fn decode_image(path: &Path) -> Result<image::DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    image::load_from_memory(&bytes)
        .map_err(|e| Error::Tensor { what: path.display().to_string(), message: format!("not a readable image: {e}") })
}

/// Images laid out on a grid, one pixel of gap, as 8-bit pixels, filled one image at a time.
/// Channels 1 → grey, 3 → RGB, 4 → RGBA, 2 → grey of the first channel.
pub struct Grid {
    images: usize,
    cols: usize,
    shape: [usize; 3],
    size: (u32, u32),
    out_c: usize,
    range: [f32; 2],
    buf: Vec<u8>,
}

impl Grid {
    /// A grid of `images` images of `[C, H, W]` in `cols` columns, mapping `range` to 0–255.
    /// A grid over [`MAX_GRID_BYTES`] is refused before anything is allocated.
    pub fn new(images: usize, shape: [usize; 3], cols: usize, range: [f32; 2]) -> Result<Self> {
        let (mut grid, bytes) = Grid::unallocated(images, shape, cols, range);
        if bytes > MAX_GRID_BYTES as u128 {
            let [_, h, w] = shape;
            let (gw, gh) = grid.size;
            return Err(Error::config(
                "grid",
                format!(
                    "{images} images of {w}x{h} in {} columns make a {gw}x{gh} grid of {} MiB, over the \
                     maximum of {} MiB: write separate files or fewer images",
                    grid.cols,
                    bytes.div_ceil(1 << 20),
                    MAX_GRID_BYTES >> 20
                ),
            ));
        }
        grid.buf = vec![0; bytes as usize];
        Ok(grid)
    }

    /// The layout, with no pixels yet, and the bytes its pixels take.
    fn unallocated(images: usize, shape: [usize; 3], cols: usize, range: [f32; 2]) -> (Self, u128) {
        let [c, h, w] = shape;
        let cols = cols.clamp(1, images.max(1));
        let rows = images.div_ceil(cols);
        let out_c = match c {
            3 => 3,
            4 => 4,
            _ => 1,
        };
        let gw = ((cols as u128) * (w as u128 + 1)).saturating_sub(1);
        let gh = ((rows as u128) * (h as u128 + 1)).saturating_sub(1);
        // Saturated sizes are over the limit anyway; only a grid within it is ever allocated.
        let size = (gw.min(u32::MAX.into()) as u32, gh.min(u32::MAX.into()) as u32);
        let grid = Grid { images, cols, shape, size, out_c, range, buf: Vec::new() };
        (grid, gw.saturating_mul(gh).saturating_mul(out_c as u128))
    }

    /// `(images, columns)` of the grid.
    pub fn size_in_images(&self) -> (usize, usize) {
        (self.images, self.cols)
    }

    /// Size in pixels, width × height.
    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// Draws image `i` (its `C·H·W` values, planar) into its cell.
    pub fn place(&mut self, i: usize, image: &[f32]) {
        let [_, h, w] = self.shape;
        assert!(i < self.images && image.len() == self.shape.iter().product::<usize>(), "image {i} fits the grid");
        let (r, col) = (i / self.cols, i % self.cols);
        let gw = self.size.0 as usize;
        for k in 0..self.out_c {
            let plane = &image[k * h * w..(k + 1) * h * w];
            for y in 0..h {
                let row = (r * (h + 1) + y) * gw + col * (w + 1);
                for x in 0..w {
                    self.buf[(row + x) * self.out_c + k] = to_u8(plane[y * w + x], self.range);
                }
            }
        }
    }

    /// The picture.
    pub fn image(self) -> image::DynamicImage {
        let (gw, gh) = self.size;
        match self.out_c {
            3 => image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(gw, gh, self.buf).expect("sized")),
            4 => image::DynamicImage::ImageRgba8(image::RgbaImage::from_raw(gw, gh, self.buf).expect("sized")),
            _ => image::DynamicImage::ImageLuma8(image::GrayImage::from_raw(gw, gh, self.buf).expect("sized")),
        }
    }
}

/// Lays out samples already in memory on a grid of `cols` columns (see [`Grid`]); the size
/// limit of [`Grid::new`] does not apply, the samples being as large already.
pub fn grid_image(samples: &Array4<f32>, cols: usize, range: [f32; 2]) -> image::DynamicImage {
    let (n, c, h, w) = samples.dim();
    let (mut grid, bytes) = Grid::unallocated(n, [c, h, w], cols, range);
    grid.buf = vec![0; bytes as usize];
    for (i, image) in samples.outer_iter().enumerate() {
        grid.place(i, image.as_standard_layout().as_slice().expect("standard layout"));
    }
    grid.image()
}

/// Writes a PNG (see [`OutputFile`] for how each kind of path is written).
pub fn write_png(path: &Path, img: &image::DynamicImage) -> Result<()> {
    write_file(path, |w| img.write_with_encoder(image::codecs::png::PngEncoder::new(w)).map_err(std::io::Error::other))
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
        let err = write_file(&p, |_| Err(std::io::Error::other("boom"))).unwrap_err();
        assert!(err.to_string().contains("out.png"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn npy_written_image_by_image_reads_back_and_a_partial_file_declares_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.npy");
        let images: Vec<Vec<f32>> = (0..12).map(|i| (0..6).map(|k| (i * 6 + k) as f32 * 0.5).collect()).collect();
        let mut w = NpyWriter::create(&p, [12, 1, 2, 3]).unwrap();
        for image in &images {
            w.push(image).unwrap();
        }
        w.finish().unwrap();
        let a = read_npy4(&p).unwrap();
        assert_eq!(a.shape(), [12, 1, 2, 3]);
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), images.concat());

        // 12 declared, 7 written: the header says 7 (one digit fewer, same length) and the file ends there.
        let q = dir.path().join("partial.npy");
        let mut w = NpyWriter::create(&q, [12, 1, 2, 3]).unwrap();
        for image in &images[..7] {
            w.push(image).unwrap();
        }
        assert_eq!(w.finish_partial().unwrap(), 7);
        let a = read_npy4(&q).unwrap();
        assert_eq!(a.shape(), [7, 1, 2, 3]);
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), images[..7].concat());
        assert_eq!(std::fs::metadata(&q).unwrap().len() as usize, npy_header_len(12) + 7 * 6 * 4);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary file");
    }

    #[test]
    fn npy_writer_refuses_a_wrong_image_and_an_unfinished_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.npy");
        std::fs::write(&p, b"old").unwrap();
        let mut w = NpyWriter::create(&p, [2, 1, 1, 2]).unwrap();
        let err = w.push(&[1.0; 3]).unwrap_err().to_string();
        assert!(err.contains("t.npy") && err.contains("expected 2 of 2"), "{err}");
        w.push(&[1.0, 2.0]).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(err.contains("1 of 2 images written"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file");
    }

    #[test]
    fn npy_headers_keep_their_length_for_fewer_images() {
        for n in [0, 1, 9, 10, 99_999, 100_000, usize::MAX] {
            let len = npy_header_len(n);
            assert_eq!(len % 64, 0);
            for k in [0, n / 2, n] {
                let h = npy_header([k, 3, 64, 64], len);
                assert_eq!(h.len(), len);
                let header = Header::from_reader(&mut h.as_slice()).unwrap();
                assert_eq!(header.shape, [k, 3, 64, 64]);
            }
        }
    }

    #[test]
    fn grids_place_images_in_their_cells_and_refuse_oversized_ones() {
        let images: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32 / 4.0 * 2.0 - 1.0; 4]).collect();
        let mut g = Grid::new(5, [1, 2, 2], 3, [-1.0, 1.0]).unwrap();
        assert_eq!(g.size(), (8, 5));
        for (i, image) in images.iter().enumerate() {
            g.place(i, image);
        }
        let img = g.image().into_luma8();
        for (i, image) in images.iter().enumerate() {
            let (x, y) = ((i % 3) * 3, (i / 3) * 3);
            assert_eq!(img.get_pixel(x as u32 + 1, y as u32 + 1)[0], to_u8(image[0], [-1.0, 1.0]), "image {i}");
        }
        assert_eq!(img.get_pixel(2, 0)[0], 0, "the gap stays black");
        let arr = Array4::from_shape_vec((5, 1, 2, 2), images.concat()).unwrap();
        assert_eq!(grid_image(&arr, 3, [-1.0, 1.0]).into_luma8(), img);

        let err = Grid::new(1 << 20, [3, 64, 64], 1024, [0.0, 1.0]).err().unwrap().to_string();
        assert!(err.contains("maximum of 64 MiB") && err.contains("1048576 images"), "{err}");
        assert!(Grid::new(usize::MAX, [3, usize::MAX, usize::MAX], 7, [0.0, 1.0]).is_err());
    }
}
