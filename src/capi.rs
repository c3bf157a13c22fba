//! The C API (cargo feature `capi`), declared for C in `include/edge_diffuse.h`.
//!
//! A firmware app opens a pipeline once, fills an [`EdRequest`] and calls [`ed_generate`] on
//! every trigger with buffers it owns. Every entry point:
//! - returns an [`EdStatus`] and leaves a one-line message for [`ed_last_error`] on failure;
//! - checks its pointers and buffer lengths, so a NULL pointer or a short buffer is an error
//!   code, never a crash;
//! - catches Rust panics ([`EdStatus::Panic`]) so none unwinds into C. That needs the default
//!   `panic = "unwind"`; an app built with `panic = "abort"` aborts instead. A panic is a bug: the
//!   pipeline it happened in should be freed.
//!
//! Build the libraries with
//! `cargo rustc --release --lib --features capi --crate-type staticlib,cdylib` (see README,
//! "Embedding"). The header is written by hand; `tests/capi.rs` compiles `examples/c/main.c`
//! against it and the library, so the two cannot drift apart unnoticed.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::card::ModelCard;
use crate::error::Error;
use crate::pipeline::{LoadOptions, Pipeline, Request, StepInfo};

/// Result of every fallible C call (`ed_status` in C).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdStatus {
    /// Success.
    Ok = 0,
    /// A required pointer was NULL.
    Null = 1,
    /// An output buffer is shorter than the request needs; the message names the size needed.
    BufferTooSmall = 2,
    /// An argument is malformed (not UTF-8, misaligned buffer, wrong struct size).
    InvalidArgument = 3,
    /// The step callback returned nonzero.
    Cancelled = 4,
    /// A file could not be read.
    Io = 5,
    /// The model card is not valid.
    Card = 6,
    /// The ONNX model could not be loaded or does not fit its card.
    Model = 7,
    /// A request value is out of range or unsupported (sampler, steps, class, guidance, eta).
    Config = 8,
    /// A tensor has the wrong shape or values.
    Tensor = 9,
    /// The inference engine failed.
    Inference = 10,
    /// The denoiser produced NaN or infinite values.
    NonFinite = 11,
    /// A bug in edge-diffuse: a Rust panic was caught at the boundary.
    Panic = 12,
}

/// What to generate (`ed_request` in C). Fill it with [`ed_request_init`], then set fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdRequest {
    /// Seed of the noise: image `i` reads stream `i` of this seed, as in the Rust API and CLI.
    pub seed: u64,
    /// Images to generate; 0 means 1.
    pub num_images: u32,
    /// Sampler steps; 0 takes the card's default.
    pub steps: u32,
    /// Class labels, one for all images or one per image (cycled); may be NULL when
    /// `num_classes` is 0 (the card's null class).
    pub classes: *const i64,
    /// Entries in `classes`.
    pub num_classes: usize,
    /// Classifier-free guidance scale; negative takes the card's default.
    pub guidance: f32,
    /// DDIM's η; negative takes the card's default.
    pub eta: f32,
    /// Sampler name (`"lcm"`, `"ddim"`, …), NUL-terminated; NULL takes the card's default.
    pub sampler: *const c_char,
    /// Image-to-image: the images to start from, `[init_images][channels][height][width]` in
    /// the output's value range (a latent model encodes them with its VAE encoder); NULL: none.
    pub init: *const f32,
    /// Images in `init`: 1 (for every image) or `num_images`.
    pub init_images: u32,
    /// How much of the schedule image-to-image runs, in (0, 1]; negative: 0.8, or 1 with a mask.
    pub strength: f32,
    /// Image-to-image from this σ instead of a strength (the σ-space samplers and σ-conditioned
    /// models); 0: none.
    pub init_sigma: f32,
    /// Inpainting, with `init`: `[mask_images][height][width]` in `[0, 1]` (1: draw anew); NULL:
    /// none.
    pub mask: *const f32,
    /// Masks in `mask`: 1 (for every image) or `num_images`.
    pub mask_images: u32,
    /// Every this many steps, and at the last, `on_preview` gets the image the model predicts
    /// (x̂₀); 0: never.
    pub preview_every: u32,
    /// Receives the previews; NULL: none.
    pub on_preview: Option<EdPreviewFn>,
    /// Passed to `on_preview`.
    pub preview_user_data: *mut c_void,
}

/// The preview callback (`ed_preview_fn` in C): the image index, the 1-based step, the steps
/// per image, and the clean image the model predicts at that step, `len` floats laid out as one
/// output image (`[channels][height][width]`, the output's value range), valid during the call.
/// A nonzero return cancels the run.
pub type EdPreviewFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    image: u32,
    step: u32,
    total: u32,
    preview: *const f32,
    len: usize,
) -> c_int;

/// The per-step callback (`ed_step_fn` in C): runs after every model call with the image
/// index, the 1-based step, the steps per image and the step's time in milliseconds. A nonzero
/// return cancels the run ([`EdStatus::Cancelled`]).
pub type EdStepFn =
    unsafe extern "C" fn(user_data: *mut c_void, image: u32, step: u32, total: u32, elapsed_ms: f64) -> c_int;

/// A loaded pipeline (`ed_pipeline` in C, opaque), with what repeated calls reuse.
pub struct EdPipeline {
    pipe: Pipeline,
    request: Request,
    /// Class labels kept while a request has none, so switching back does not allocate.
    spare_classes: Vec<i64>,
    /// Samples when the caller asks for pixels only; grows to the largest request once.
    samples: Vec<f32>,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// A failure on its way to C: the status and the message for [`ed_last_error`].
struct Fail {
    status: EdStatus,
    message: String,
}

impl Fail {
    fn new(status: EdStatus, message: impl Into<String>) -> Self {
        Fail { status, message: message.into() }
    }

    fn null(what: &str) -> Self {
        Fail::new(EdStatus::Null, format!("{what} is NULL"))
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Io { .. } => EdStatus::Io,
            // A tokenizer file is part of the model's configuration, as its card is.
            Error::Card { .. } | Error::Tokenizer { .. } => EdStatus::Card,
            Error::Config { .. } => EdStatus::Config,
            Error::Model { .. } => EdStatus::Model,
            Error::Inference(_) => EdStatus::Inference,
            Error::NonFinite { .. } => EdStatus::NonFinite,
            Error::Tensor { .. } => EdStatus::Tensor,
            Error::BufferTooSmall { .. } => EdStatus::BufferTooSmall,
            Error::Cancelled { .. } => EdStatus::Cancelled,
        };
        Fail::new(status, e.to_string())
    }
}

fn set_last_error(message: &str) {
    let bytes: Vec<u8> = message.bytes().filter(|&b| b != 0).collect();
    let text = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = Some(text));
}

/// Runs `body` with panics caught, turning its outcome into a status and the last error.
fn guard(body: impl FnOnce() -> Result<(), Fail>) -> EdStatus {
    let fail = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return EdStatus::Ok,
        Ok(Err(fail)) => fail,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Fail::new(EdStatus::Panic, format!("internal error (please report): {what}"))
        }
    };
    set_last_error(&fail.message);
    fail.status
}

/// `ptr` as a `&CStr`, or a [`Fail`] naming `what`.
///
/// # Safety
/// A non-NULL `ptr` must point to a NUL-terminated string.
unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a CStr, Fail> {
    if ptr.is_null() {
        return Err(Fail::null(what));
    }
    Ok(CStr::from_ptr(ptr))
}

fn utf8<'a>(s: &'a CStr, what: &str) -> Result<&'a str, Fail> {
    s.to_str().map_err(|_| Fail::new(EdStatus::InvalidArgument, format!("{what} is not valid UTF-8")))
}

fn c_path(s: &CStr) -> Result<PathBuf, Fail> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        Ok(PathBuf::from(utf8(s, "model_dir")?))
    }
}

fn load_options(threads: u32) -> LoadOptions {
    match threads {
        0 => LoadOptions::default(),
        n => LoadOptions { threads: n as usize, ..LoadOptions::default() },
    }
}

fn boxed(pipe: Pipeline) -> *mut EdPipeline {
    let request = Request { num_images: 1, ..Request::default() };
    Box::into_raw(Box::new(EdPipeline { pipe, request, spare_classes: Vec::new(), samples: Vec::new() }))
}

/// The library version, e.g. `"0.1.0"` (static, never NULL).
#[no_mangle]
pub extern "C" fn ed_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread (`""` if none failed yet). The pointer
/// stays valid until the next failing `ed_*` call on the same thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn ed_last_error() -> *const c_char {
    LAST_ERROR.try_with(|slot| slot.borrow().as_ref().map(|m| m.as_ptr())).ok().flatten().unwrap_or(c"".as_ptr())
}

/// Loads the model directory `model_dir` (its `model.toml` and ONNX file) with `threads`
/// threads for tract (0: all cores) and stores the new pipeline in `*out` (NULL on failure).
///
/// # Safety
/// `model_dir` must be NULL or a NUL-terminated string; `out` must be NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ed_pipeline_open(
    model_dir: *const c_char,
    threads: u32,
    out: *mut *mut EdPipeline,
) -> EdStatus {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        *out = std::ptr::null_mut();
        let dir = c_path(c_str(model_dir, "model_dir")?)?;
        let pipe = Pipeline::load(dir, load_options(threads))?;
        *out = boxed(pipe);
        Ok(())
    })
}

/// [`ed_pipeline_open`], with the plan file of packed weights where `plan_cache` says: NULL or
/// `"auto"` (beside the ONNX file when its folder is writable, else the cache folder), `"off"`
/// (packed on the heap at every load), or a folder. The first load writes the file; later
/// loads map it and the kernels read their weights through the map. `weights`: NULL or
/// `"f32"`, or `"f16"` to keep the packed weights in half the bytes
/// ([`LoadOptions::weights`](crate::LoadOptions)).
///
/// # Safety
/// `model_dir`, `plan_cache` and `weights` must be NULL or NUL-terminated strings; `out` must
/// be NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ed_pipeline_open_with(
    model_dir: *const c_char,
    threads: u32,
    plan_cache: *const c_char,
    weights: *const c_char,
    out: *mut *mut EdPipeline,
) -> EdStatus {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        *out = std::ptr::null_mut();
        let dir = c_path(c_str(model_dir, "model_dir")?)?;
        let mut options = load_options(threads);
        if !plan_cache.is_null() {
            options.plan_cache = utf8(c_str(plan_cache, "plan_cache")?, "plan_cache")?.parse()?;
        }
        if !weights.is_null() {
            options.weights = utf8(c_str(weights, "weights")?, "weights")?.parse()?;
        }
        let pipe = Pipeline::load(dir, options)?;
        *out = boxed(pipe);
        Ok(())
    })
}

/// Loads a model held in memory (e.g. linked into the firmware image): `card_toml` is the
/// text of its `model.toml`, `onnx`/`onnx_len` the ONNX file's bytes (read during this call
/// only). Stores the new pipeline in `*out` (NULL on failure).
///
/// # Safety
/// `card_toml` must be NULL or a NUL-terminated string; `onnx` must be NULL or valid for
/// `onnx_len` bytes; `out` must be NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ed_pipeline_open_bytes(
    card_toml: *const c_char,
    onnx: *const u8,
    onnx_len: usize,
    threads: u32,
    out: *mut *mut EdPipeline,
) -> EdStatus {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        *out = std::ptr::null_mut();
        let text = utf8(c_str(card_toml, "card_toml")?, "card_toml")?;
        if onnx.is_null() {
            return Err(Fail::null("onnx"));
        }
        let bytes = std::slice::from_raw_parts(onnx, onnx_len);
        let card = ModelCard::parse(text, Path::new(""), Path::new("model.toml"))?;
        let pipe = Pipeline::from_bytes(card, bytes, load_options(threads))?;
        *out = boxed(pipe);
        Ok(())
    })
}

/// Frees a pipeline from [`ed_pipeline_open`] or [`ed_pipeline_open_bytes`]; NULL is ignored.
///
/// # Safety
/// `pipe` must be NULL or a pipeline from this library not freed before.
#[no_mangle]
pub unsafe extern "C" fn ed_pipeline_free(pipe: *mut EdPipeline) {
    if !pipe.is_null() {
        // A panic while dropping cannot be reported through `void`; swallowing it keeps it out
        // of C.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(pipe))));
    }
}

/// Writes the size of one generated image: `*width`, `*height` in pixels and `*channels`.
///
/// # Safety
/// `pipe` must be NULL or a live pipeline; the outputs must be NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ed_image_info(
    pipe: *const EdPipeline,
    width: *mut u32,
    height: *mut u32,
    channels: *mut u32,
) -> EdStatus {
    guard(|| {
        let pipe = pipe.as_ref().ok_or_else(|| Fail::null("pipe"))?;
        if width.is_null() || height.is_null() || channels.is_null() {
            return Err(Fail::null("width, height or channels"));
        }
        let im = &pipe.pipe.card().image;
        // The card limits height and width to 8192 and channels to 4, so these fit.
        *width = im.width as u32;
        *height = im.height as u32;
        *channels = im.channels as u32;
        Ok(())
    })
}

/// Fills `*req` with the defaults: seed 0, one image, the card's sampler, steps, guidance and
/// η, the null class. `req_size` must be `sizeof(ed_request)`: a header from another version
/// of the library is refused ([`EdStatus::InvalidArgument`]) instead of misread.
///
/// # Safety
/// `req` must be NULL or valid for a write of an `ed_request`.
#[no_mangle]
pub unsafe extern "C" fn ed_request_init(req: *mut EdRequest, req_size: usize) -> EdStatus {
    guard(|| {
        if req.is_null() {
            return Err(Fail::null("req"));
        }
        let want = std::mem::size_of::<EdRequest>();
        if req_size != want {
            return Err(Fail::new(
                EdStatus::InvalidArgument,
                format!(
                    "req_size is {req_size}, this library's ed_request has {want} bytes: header and library differ"
                ),
            ));
        }
        req.write(EdRequest {
            seed: 0,
            num_images: 1,
            steps: 0,
            classes: std::ptr::null(),
            num_classes: 0,
            guidance: -1.0,
            eta: -1.0,
            sampler: std::ptr::null(),
            init: std::ptr::null(),
            init_images: 1,
            strength: -1.0,
            init_sigma: 0.0,
            mask: std::ptr::null(),
            mask_images: 1,
            preview_every: 0,
            on_preview: None,
            preview_user_data: std::ptr::null_mut(),
        });
        Ok(())
    })
}

/// Resolves a class name (`"sneaker"`) or number (`"7"`) to its label in `*label`.
///
/// # Safety
/// `pipe` must be NULL or a live pipeline, `name` NULL or a NUL-terminated string, `label` NULL
/// or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ed_class_label(pipe: *const EdPipeline, name: *const c_char, label: *mut i64) -> EdStatus {
    guard(|| {
        let pipe = pipe.as_ref().ok_or_else(|| Fail::null("pipe"))?;
        let name = utf8(c_str(name, "name")?, "name")?;
        if label.is_null() {
            return Err(Fail::null("label"));
        }
        *label = pipe.pipe.card().class_label(name)?;
        Ok(())
    })
}

/// Sets the values of the card's conditioning input `name` (`[model.conditioning.NAME]`) for
/// the following [`ed_generate`] calls: `count` floats, one image's values or rows of them
/// cycled over the images, as `--cond` takes them. `count` 0 (with `values` NULL or not) goes
/// back to the card's default. A name the model does not take, or values of the wrong size, are
/// reported by the next `ed_generate` ([`EdStatus::Config`], [`EdStatus::Tensor`]).
///
/// # Safety
/// `pipe` must be NULL or a live pipeline, `name` NULL or a NUL-terminated string, `values`
/// valid for `count` reads when `count` > 0.
#[no_mangle]
pub unsafe extern "C" fn ed_set_conditioning(
    pipe: *mut EdPipeline,
    name: *const c_char,
    values: *const f32,
    count: usize,
) -> EdStatus {
    guard(|| {
        let pipe = pipe.as_mut().ok_or_else(|| Fail::null("pipe"))?;
        let name = utf8(c_str(name, "name")?, "name")?;
        if count == 0 {
            pipe.request.conditioning.remove(name);
            return Ok(());
        }
        if values.is_null() {
            return Err(Fail::null("values (with count > 0)"));
        }
        let v = std::slice::from_raw_parts(values, count).to_vec();
        let array = ndarray::ArrayD::from_shape_vec(vec![count], v).expect("one-dimensional");
        pipe.request.conditioning.insert(name.to_string(), array);
        Ok(())
    })
}

/// Writes in `*len` the length of the buffers [`ed_generate`] needs for `req`: images × width ×
/// height × channels (floats for samples, bytes for pixels).
///
/// # Safety
/// `pipe` must be NULL or a live pipeline, `req` NULL or a valid request, `len` NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn ed_output_len(pipe: *const EdPipeline, req: *const EdRequest, len: *mut usize) -> EdStatus {
    guard(|| {
        let pipe = pipe.as_ref().ok_or_else(|| Fail::null("pipe"))?;
        let req = req.as_ref().ok_or_else(|| Fail::null("req"))?;
        if len.is_null() {
            return Err(Fail::null("len"));
        }
        *len = (req.num_images.max(1) as usize).saturating_mul(pipe.pipe.image_len());
        Ok(())
    })
}

/// Copies a C request into the handle's reusable [`Request`].
///
/// # Safety
/// `src`'s pointers must be NULL or valid as documented on [`EdRequest`].
unsafe fn fill_request(h: &mut EdPipeline, src: &EdRequest) -> Result<(), Fail> {
    let sampler =
        if src.sampler.is_null() { None } else { Some(utf8(CStr::from_ptr(src.sampler), "sampler")?.parse()?) };
    let dst = &mut h.request;
    dst.seed = src.seed;
    dst.num_images = src.num_images.max(1) as usize;
    dst.sampler = sampler;
    dst.steps = (src.steps != 0).then_some(src.steps as usize);
    // Negative means the card's default; NaN passes through so the library rejects it by name.
    dst.guidance = if src.guidance < 0.0 { None } else { Some(src.guidance) };
    dst.eta = if src.eta < 0.0 { None } else { Some(src.eta) };
    dst.noise = None;
    dst.context = None;
    // The decimal the caller wrote, not the float32 nearest it: int(steps × 0.7) is 7 of 10
    // steps in diffusers, where 0.7 as a float32 would give 6.
    dst.strength = (src.strength >= 0.0 || src.strength.is_nan())
        .then(|| (src.strength as f64 * 1e6).round() / 1e6)
        .map(|s| if s.is_nan() { f64::NAN } else { s });
    // 0 is none; a negative σ goes through for the library to refuse by name.
    dst.init_sigma = (src.init_sigma != 0.0).then_some(src.init_sigma as f64);
    dst.preview_every = src.preview_every as usize;
    let [c, height, width] = h.pipe.output_shape();
    let images = match src.init.is_null() {
        true => None,
        false => {
            let n = src.init_images.max(1) as usize;
            let values = std::slice::from_raw_parts(src.init, n * c * height * width);
            Some(
                ndarray::Array4::from_shape_vec((n, c, height, width), values.to_vec())
                    .map_err(|e| Fail::new(EdStatus::InvalidArgument, format!("init: {e}")))?,
            )
        }
    };
    dst.init = images.as_ref().map(|i| h.pipe.encode(i)).transpose()?;
    let masks = match src.mask.is_null() {
        true => None,
        false => {
            let n = src.mask_images.max(1) as usize;
            let values = std::slice::from_raw_parts(src.mask, n * height * width);
            Some(
                ndarray::Array4::from_shape_vec((n, 1, height, width), values.to_vec())
                    .map_err(|e| Fail::new(EdStatus::InvalidArgument, format!("mask: {e}")))?,
            )
        }
    };
    dst.mask = masks.as_ref().map(|m| h.pipe.mask_from_image(m)).transpose()?;
    // An inpainting model takes the masked image too (encoded, for a latent model).
    dst.masked_init = match (&images, &masks) {
        (Some(i), Some(m)) if h.pipe.card().model.inpainting => Some(h.pipe.masked_init(i, m)?),
        _ => None,
    };
    if src.num_classes == 0 {
        if let Some(v) = dst.classes.take() {
            h.spare_classes = v;
        }
    } else {
        if src.classes.is_null() {
            return Err(Fail::null("req->classes (with num_classes > 0)"));
        }
        let given = std::slice::from_raw_parts(src.classes, src.num_classes);
        let mut v = dst.classes.take().unwrap_or_else(|| std::mem::take(&mut h.spare_classes));
        v.clear();
        v.extend_from_slice(given);
        dst.classes = Some(v);
    }
    Ok(())
}

/// Generates the images of `req`.
///
/// Writes the samples (float, `[images][channels][height][width]`, in the card's value range)
/// into `samples` and/or the 8-bit pixels (`[images][height][width][channels]`, channels
/// interleaved) into `pixels`. Either buffer may be NULL (with any length) when not wanted,
/// not both. Each given buffer must hold [`ed_output_len`] values, else
/// [`EdStatus::BufferTooSmall`] before any work. `on_step` (may be NULL) runs after every model
/// call; returning nonzero cancels the run ([`EdStatus::Cancelled`], buffers unspecified). The
/// pipeline stays usable after any error but [`EdStatus::Panic`].
///
/// After the first call, calls with the same number of images do not grow the heap (tract
/// allocates temporaries inside each model call and frees them again).
///
/// # Safety
/// `pipe` must be NULL or a live pipeline used by no other thread during the call; `req` NULL or
/// a valid request; a non-NULL `samples` valid for `samples_len` floats and a non-NULL `pixels`
/// for `pixels_len` bytes, neither overlapping the other. `on_step` must not unwind and must not
/// call `ed_generate` on the same pipeline.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ed_generate(
    pipe: *mut EdPipeline,
    req: *const EdRequest,
    samples: *mut f32,
    samples_len: usize,
    pixels: *mut u8,
    pixels_len: usize,
    on_step: Option<EdStepFn>,
    user_data: *mut c_void,
) -> EdStatus {
    guard(|| {
        let h = pipe.as_mut().ok_or_else(|| Fail::null("pipe"))?;
        let req = req.as_ref().ok_or_else(|| Fail::null("req"))?;
        if samples.is_null() && pixels.is_null() {
            return Err(Fail::null("both samples and pixels (nothing to write into)"));
        }
        if !samples.is_null() && samples.align_offset(std::mem::align_of::<f32>()) != 0 {
            return Err(Fail::new(EdStatus::InvalidArgument, "samples is not aligned for float"));
        }
        fill_request(h, req)?;
        let needed = h.pipe.output_len(&h.request);
        for (given, len, what) in
            [(!samples.is_null(), samples_len, "samples"), (!pixels.is_null(), pixels_len, "pixels")]
        {
            if given && len < needed {
                return Err(Fail::new(
                    EdStatus::BufferTooSmall,
                    format!("{what}: the buffer holds {len} values, the request needs {needed}"),
                ));
            }
        }
        let (on_preview, preview_data) = (req.on_preview, req.preview_user_data);
        let mut callback = |s: &StepInfo| {
            // Counts fit: images are bounded by the u32 request field, steps by the sampler.
            let (image, step, total) = (s.image as u32, s.step as u32, s.total as u32);
            if let (Some(f), Some(p)) = (on_preview, s.preview) {
                if f(preview_data, image, step, total, p.as_ptr(), p.len()) != 0 {
                    return ControlFlow::Break(());
                }
            }
            match on_step {
                Some(f) if f(user_data, image, step, total, s.elapsed.as_secs_f64() * 1e3) != 0 => {
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        };
        let out: &mut [f32] = if samples.is_null() {
            if h.samples.len() < needed {
                h.samples.resize(needed, 0.0);
            }
            &mut h.samples[..needed]
        } else {
            std::slice::from_raw_parts_mut(samples, samples_len)
        };
        h.pipe.generate_into(&h.request, out, &mut callback)?;
        if !pixels.is_null() {
            let px = std::slice::from_raw_parts_mut(pixels, pixels_len);
            h.pipe.pixels_into(&out[..needed], px)?;
        }
        Ok(())
    })
}
