//! The tract plumbing: an ONNX denoiser loaded once, bound to the card's input names, and run
//! through one optimized plan per batch size.
//!
//! Weights: the file is memory-mapped and the protobuf decoded straight from the map (tract
//! then copies weights into its own aligned tensors; it has no borrowed-tensor storage).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::Array4;
use tract_linalg::multithread::Executor;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::transform::ModelTransform;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModel};

use crate::card::ModelCard;
use crate::error::{Error, Result};

/// How the timestep input is typed and shaped in the ONNX graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestepInput {
    /// Element type: float32, float64, int64 or int32.
    pub datum_type: DatumType,
    /// `[]`, `[1]` or `[batch]`.
    pub shape: TimestepShape,
}

/// The timestep's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepShape {
    /// A scalar.
    Scalar,
    /// One value for the whole batch.
    One,
    /// One value per image.
    Batch,
}

/// Arithmetic precision of the denoiser's float operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// float32 everywhere, as exported.
    #[default]
    F32,
    /// float16 inside the graph (tract's f32→f16 translation of weights and operators); the
    /// sample and the prediction stay float32 at the boundary. Fast on CPUs with fp16
    /// arithmetic (ARMv8.2-A: Cortex-A55/A75/A76/A78, Pi 5, Jetson Orin); elsewhere tract falls
    /// back to a generic kernel that is many times slower than f32.
    F16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            other => Err(Error::config("precision", format!("expected f32 or f16, got {other:?}"))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        })
    }
}

impl Precision {
    fn float_type(self) -> DatumType {
        match self {
            Precision::F32 => f32::datum_type(),
            Precision::F16 => f16::datum_type(),
        }
    }
}

/// How the denoiser's 3×3 convolutions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Convolution {
    /// Float32 3×3, stride-1, padding-1 convolutions by Winograd's F(2×2, 3×3) (2.25× fewer
    /// multiplications; rounding differences of a few 1e-7 relative), and on x86-64 with AVX2
    /// and FMA the 1×1 convolutions on the same matrix kernel; the rest as `Im2col`.
    /// Float16 plans, and 32-bit ARM builds (no fast matrix product for it there), always use
    /// `Im2col`.
    #[default]
    Winograd,
    /// Every convolution as tract compiles it: an im2col (3×3) or plain (1×1) matrix product.
    Im2col,
}

impl std::str::FromStr for Convolution {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "winograd" => Ok(Convolution::Winograd),
            "im2col" => Ok(Convolution::Im2col),
            other => Err(Error::config("convolution", format!("expected winograd or im2col, got {other:?}"))),
        }
    }
}

impl std::fmt::Display for Convolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Convolution::Winograd => "winograd",
            Convolution::Im2col => "im2col",
        })
    }
}

/// Description of one graph input or output, for `info`.
#[derive(Debug, Clone)]
pub struct IoInfo {
    /// Name in the ONNX graph.
    pub name: String,
    /// Element type and shape as tract reads them from the file (`?` for unknown).
    pub fact: String,
}

#[derive(Debug, Clone)]
struct Bindings {
    sample: usize,
    timestep: usize,
    timestep_input: TimestepInput,
    class_labels: Option<(usize, DatumType)>,
    context: Option<(usize, Vec<usize>)>,
    output: usize,
}

struct Plan {
    state: TypedSimpleState,
    /// The optimized graph, shared (weights included) by every plan built from it.
    model: Arc<TypedModel>,
    /// Two more plans over the same graph, each with its own half of the threads, for guidance
    /// branches run at once; built on first use.
    branches: Option<Box<[Branch; 2]>>,
}

/// A plan's state and the executor it runs on.
struct Branch {
    state: TypedSimpleState,
    executor: Executor,
}

/// The plans, reachable only through `&mut`.
///
/// tract's run state holds `Box<dyn OpState>`, which is `Send` but not `Sync`, so a `Denoiser`
/// holding it directly could not be shared between threads even though nothing reads the state
/// through `&self`. This wrapper makes that guarantee structural: it has no `&self` access at
/// all, so a shared `&Plans` gives another thread nothing to touch (the pattern of the standard
/// library's unstable `std::sync::Exclusive`).
struct Plans(HashMap<usize, Plan>);

// SAFETY: `Plans` exposes its contents only through `&mut self` (`get_mut`), and `&mut` access
// is exclusive, so no two threads can ever reach the inner state at once. Moving it between
// threads is left to the auto trait `Send`, which tract's state has.
unsafe impl Sync for Plans {}

impl Plans {
    fn get_mut(&mut self) -> &mut HashMap<usize, Plan> {
        &mut self.0
    }
}

/// A denoiser: ONNX model + input bindings + optimized plans (one per batch size).
pub struct Denoiser {
    path: PathBuf,
    /// The decoded ONNX graph that plans are built from; `None` once released
    /// ([`Denoiser::release_graph`]).
    source: Option<InferenceModel>,
    bindings: Bindings,
    chw: [usize; 3],
    threads: usize,
    executor: Executor,
    precision: Precision,
    convolution: Convolution,
    /// 3×3 convolutions running as Winograd in the plans built so far.
    winograd_convs: usize,
    group_norms: usize,
    plans: Plans,
    params: usize,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
}

impl Denoiser {
    /// Loads `card`'s ONNX file through a memory map.
    pub fn load(card: &ModelCard, threads: usize) -> Result<Self> {
        let path = card.onnx_path();
        if path.is_dir() {
            return Err(Error::Model { path, message: "is a directory, expected an ONNX file".into() });
        }
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len == 0 {
            return Err(Error::Model { path, message: "the ONNX file is empty".into() });
        }
        // SAFETY: the map is read during decoding only and dropped before this function returns,
        // so a later change to the file cannot reach memory tract holds. A file truncated by
        // another process *during* decoding would raise SIGBUS (see docs/model-card.md).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let proto = decode(&map, &path)?;
        // The decoded protobuf holds its own copy of the weights: unmapping the file now keeps
        // its pages out of the resident set while tract converts them (the load's peak was
        // file + protobuf + tract's tensors, 3× the weights).
        drop(map);
        Self::from_proto(proto, card, threads, path)
    }

    /// Loads an ONNX model held in memory (for models compiled into the program).
    /// `name` labels errors.
    pub fn from_bytes(bytes: &[u8], card: &ModelCard, threads: usize, name: impl Into<PathBuf>) -> Result<Self> {
        let path: PathBuf = name.into();
        let proto = decode(bytes, &path)?;
        Self::from_proto(proto, card, threads, path)
    }

    fn from_proto(proto: ModelProto, card: &ModelCard, threads: usize, path: PathBuf) -> Result<Self> {
        let fail = |e: &dyn std::fmt::Display| Error::Model { path: path.clone(), message: one_line(e) };
        let params = count_params(&proto);
        let model = tract_onnx::onnx().model_for_proto_model(&proto).map_err(|e| fail(&format!("{e:#}")))?;
        drop(proto);
        let (inputs, outputs) = describe(&model);
        let bindings = bind(&model, card).map_err(|m| Error::Model { path: path.clone(), message: m })?;
        let (threads, executor) = executor_for(threads);
        Ok(Denoiser {
            path,
            source: Some(model),
            bindings,
            chw: [card.image.channels, card.image.height, card.image.width],
            threads,
            executor,
            precision: Precision::F32,
            convolution: Convolution::default(),
            winograd_convs: 0,
            group_norms: 0,
            plans: Plans(HashMap::new()),
            params,
            inputs,
            outputs,
        })
    }

    /// Switches the arithmetic precision; plans built so far are dropped and rebuilt on demand.
    pub fn set_precision(&mut self, precision: Precision) {
        if precision != self.precision {
            self.precision = precision;
            self.plans.get_mut().clear();
        }
    }

    /// Switches how 3×3 convolutions run; plans built so far are dropped and rebuilt on demand.
    pub fn set_convolution(&mut self, convolution: Convolution) {
        if convolution != self.convolution {
            self.convolution = convolution;
            self.plans.get_mut().clear();
        }
    }

    /// Builds (once) the optimized plan for `batch` images per call.
    pub fn prepare(&mut self, batch: usize) -> Result<()> {
        if self.plans.get_mut().contains_key(&batch) {
            return Ok(());
        }
        let source = self.source.as_ref().ok_or_else(|| self.released(batch))?.clone();
        self.insert_plan(batch, source)
    }

    /// [`prepare`](Denoiser::prepare) for the last plan this denoiser will need, then
    /// [`release_graph`](Denoiser::release_graph). The plan is built from the source graph
    /// itself rather than a copy, so each weight that the plan replaces (a 3×3 kernel by its
    /// Winograd transform) is freed as soon as it is replaced, and the load never holds all
    /// the kernels and all their transforms at once (on the 35.7M UNet, about 130 and 250 MB).
    /// The source is gone afterwards even if the build fails.
    pub fn prepare_final(&mut self, batch: usize) -> Result<()> {
        if !self.plans.get_mut().contains_key(&batch) {
            let source = self.source.take().ok_or_else(|| self.released(batch))?;
            self.insert_plan(batch, source)?;
        }
        self.source = None;
        return_freed_memory();
        Ok(())
    }

    fn insert_plan(&mut self, batch: usize, source: InferenceModel) -> Result<()> {
        let (plan, winograd_convs, group_norms) =
            self.build_plan(batch, source).map_err(|m| Error::Model { path: self.path.clone(), message: m })?;
        self.winograd_convs = winograd_convs;
        self.group_norms = group_norms;
        self.plans.get_mut().insert(batch, plan);
        Ok(())
    }

    fn released(&self, batch: usize) -> Error {
        Error::Model {
            path: self.path.clone(),
            message: format!(
                "no plan for batch {batch} ({} {}), and the source graph was released \
                 (Denoiser::release_graph): load the model again to run other batch sizes or settings",
                self.precision, self.convolution
            ),
        }
    }

    /// Drops the decoded source graph once the plans this denoiser will run are built
    /// ([`prepare`](Denoiser::prepare)), to keep its weights out of memory: a plan holds its
    /// own (for a 3×3 convolution on Winograd, a transformed copy, so the source's kernels would
    /// be held twice). Plans already built keep working; building another (a new batch size, or
    /// after [`set_precision`](Denoiser::set_precision) or
    /// [`set_convolution`](Denoiser::set_convolution) changed the setting) then fails with
    /// [`Error::Model`]. [`Pipeline`](crate::Pipeline) builds its last plan with
    /// [`prepare_final`](Denoiser::prepare_final), which ends with this.
    pub fn release_graph(&mut self) {
        if self.source.take().is_some() {
            return_freed_memory();
        }
    }

    /// Whether the source graph is still held (see [`release_graph`](Denoiser::release_graph)).
    pub fn holds_graph(&self) -> bool {
        self.source.is_some()
    }

    /// The plan, and how many convolutions in it run as Winograd.
    fn build_plan(&self, batch: usize, mut model: InferenceModel) -> std::result::Result<(Plan, usize, usize), String> {
        let [c, h, w] = self.chw;
        let b = &self.bindings;
        let err = |e: TractError| one_line(&format!("{e:#}"));
        model.set_input_fact(b.sample, f32::fact([batch, c, h, w]).into()).map_err(err)?;
        let ts_shape: TVec<usize> = match b.timestep_input.shape {
            TimestepShape::Scalar => tvec![],
            TimestepShape::One => tvec![1],
            TimestepShape::Batch => tvec![batch],
        };
        model
            .set_input_fact(b.timestep, InferenceFact::dt_shape(b.timestep_input.datum_type, ts_shape))
            .map_err(err)?;
        if let Some((ix, dt)) = b.class_labels {
            model.set_input_fact(ix, InferenceFact::dt_shape(dt, tvec![batch])).map_err(err)?;
        }
        if let Some((ix, dims)) = &b.context {
            let mut shape: TVec<usize> = tvec![batch];
            shape.extend(dims.iter().copied());
            model.set_input_fact(*ix, f32::fact(shape).into()).map_err(err)?;
        }
        let out_outlet = model.output_outlets().map_err(err)?[b.output];
        model.select_output_outlets(&[out_outlet]).map_err(err)?;
        let optimizing = |e: TractError| format!("optimizing for batch {batch}: {}", err(e));
        // The f16 translation must come before tract fuses operators into kernels picked for f32.
        let typed = model.into_typed().map_err(optimizing)?;
        let (typed, winograd_convs, group_norms) = match self.precision {
            Precision::F32 => {
                let ours = self.convolution == Convolution::Winograd;
                let rewritten = f32_rewrites(typed, ours).map_err(optimizing)?;
                (rewritten.model, rewritten.winograd_convolutions, rewritten.group_norms)
            }
            Precision::F16 => {
                let mut typed = typed.into_decluttered().map_err(optimizing)?;
                FloatPrecisionTranslator::new(f32::datum_type(), f16::datum_type())
                    .transform(&mut typed)
                    .map_err(|e| format!("translating to f16: {}", err(e)))?;
                (typed, 0, 0)
            }
        };
        let mut typed = typed.into_optimized().map_err(optimizing)?;
        contiguous_constants(&mut typed).map_err(err)?;
        let out_fact = typed.output_fact(0).map_err(err)?;
        let expected = [batch, c, h, w];
        let ok = out_fact.datum_type == self.precision.float_type()
            && out_fact.shape.as_concrete().map(|s| s == expected).unwrap_or(false);
        if !ok {
            return Err(format!(
                "the output is {out_fact:?}, expected float {expected:?} (the sample's shape): not a denoiser for this card's [image]"
            ));
        }
        let model = Arc::new(typed);
        let options = RunOptions { executor: Some(self.executor.clone()), ..Default::default() };
        let plan = TypedSimplePlan::new_with_options(model.clone(), &options).map_err(err)?;
        let mut state = TypedSimpleState::new(&plan).map_err(err)?;
        crate::winograd::install_scratch(&mut state);
        Ok((Plan { state, model, branches: None }, winograd_convs, group_norms))
    }

    /// The graph's inputs for one call, in tract's order and precision.
    fn graph_inputs(
        &self,
        sample: &Array4<f32>,
        timestep: f64,
        class_labels: Option<&[i64]>,
        context: Option<&ndarray::ArrayD<f32>>,
    ) -> Result<TVec<TValue>> {
        let batch = sample.shape()[0];
        let b = &self.bindings;
        // One per graph input (`describe` lists them all), also once the source is released.
        let mut inputs: Vec<Option<TValue>> = vec![None; self.inputs.len()];
        let float_dt = self.precision.float_type();
        // The f16 graph takes f16 floats: convert at the boundary so callers always see f32.
        let to_graph = |t: Tensor| -> Result<TValue> {
            let t = if t.datum_type() == f32::datum_type() && float_dt != t.datum_type() {
                t.cast_to_dt(float_dt).map_err(|e| Error::Inference(e.to_string()))?.into_owned()
            } else {
                t
            };
            Ok(t.into_tvalue())
        };
        let x = Tensor::from_shape(sample.shape(), sample.as_slice().expect("standard layout"))
            .map_err(|e| Error::Inference(e.to_string()))?;
        inputs[b.sample] = Some(to_graph(x)?);
        let n_t = match b.timestep_input.shape {
            TimestepShape::Scalar | TimestepShape::One => 1,
            TimestepShape::Batch => batch,
        };
        let t = timestep_tensor(b.timestep_input, timestep, n_t).map_err(|e| Error::Inference(e.to_string()))?;
        inputs[b.timestep] = Some(to_graph(t)?);
        if let Some((ix, dt)) = b.class_labels {
            let labels = class_labels.ok_or_else(|| Error::config("class", "this model needs a class label"))?;
            let t = tensor1(labels).cast_to_dt(dt).map_err(|e| Error::Inference(e.to_string()))?.into_owned();
            inputs[ix] = Some(t.into_tvalue());
        }
        if let Some((ix, _)) = &b.context {
            let ctx = context.ok_or_else(|| {
                Error::config("context", "this model takes encoder_hidden_states; pass a conditioning tensor")
            })?;
            inputs[*ix] = Some(to_graph(Tensor::from(ctx.clone()))?);
        }
        Ok(inputs.into_iter().map(|v| v.expect("every input bound")).collect())
    }

    /// Runs the model once: `sample` is `[batch, C, H, W]`, `timestep` the same for every image,
    /// `class_labels` one per image when the model is class-conditional. Writes into `out`.
    pub fn predict(
        &mut self,
        sample: &Array4<f32>,
        timestep: f64,
        class_labels: Option<&[i64]>,
        context: Option<&ndarray::ArrayD<f32>>,
        out: &mut Array4<f32>,
    ) -> Result<()> {
        let batch = sample.shape()[0];
        self.prepare(batch)?;
        let inputs = self.graph_inputs(sample, timestep, class_labels, context)?;
        let plan = self.plans.get_mut().get_mut(&batch).expect("prepared above");
        copy_output(run_on(&self.executor, &mut plan.state, inputs), out)
    }

    /// Runs the model on one image `[1, C, H, W]` with two class labels at once, each call on
    /// its own thread with half of [`threads`](Denoiser::threads): classifier-free guidance's
    /// conditional and unconditional branches. The results equal two [`predict`] calls.
    ///
    /// Two batch-1 calls side by side keep both cores busy on small layers where splitting one
    /// matrix product between threads does not (tract's batch-2 convolution is slower still).
    ///
    /// [`predict`]: Denoiser::predict
    pub fn predict_pair(
        &mut self,
        sample: &Array4<f32>,
        timestep: f64,
        labels: [i64; 2],
        context: Option<&ndarray::ArrayD<f32>>,
        outs: [&mut Array4<f32>; 2],
    ) -> Result<()> {
        if sample.shape()[0] != 1 {
            return Err(Error::Inference(format!(
                "predict_pair takes one image, got a batch of {}",
                sample.shape()[0]
            )));
        }
        self.prepare(1)?;
        let inputs_a = self.graph_inputs(sample, timestep, Some(&labels[..1]), context)?;
        let inputs_b = self.graph_inputs(sample, timestep, Some(&labels[1..]), context)?;
        let (threads, path) = (self.threads, self.path.clone());
        let plan = self.plans.get_mut().get_mut(&1).expect("prepared above");
        if plan.branches.is_none() {
            let err = |e: TractError| Error::Model { path: path.clone(), message: one_line(&format!("{e:#}")) };
            let branch = || -> Result<Branch> {
                let executor = executor_for(threads / 2).1;
                let options = RunOptions { executor: Some(executor.clone()), ..Default::default() };
                let p = TypedSimplePlan::new_with_options(plan.model.clone(), &options).map_err(err)?;
                let mut state = TypedSimpleState::new(&p).map_err(err)?;
                crate::winograd::install_scratch(&mut state);
                Ok(Branch { state, executor })
            };
            let pair = [branch()?, branch()?];
            plan.branches = Some(Box::new(pair));
        }
        let [a, b] = &mut **plan.branches.as_mut().expect("built above");
        let [out_a, out_b] = outs;
        let (res_a, res_b) = std::thread::scope(|s| {
            let other = s.spawn(|| run_on(&b.executor, &mut b.state, inputs_b));
            let mine = run_on(&a.executor, &mut a.state, inputs_a);
            (mine, other.join())
        });
        let res_b = res_b.map_err(|_| Error::Inference("the unconditional branch's thread panicked".into()))?;
        copy_output(res_a, out_a)?;
        copy_output(res_b, out_b)
    }

    /// Number of weights in the ONNX initializers.
    pub fn params(&self) -> usize {
        self.params
    }
    /// Threads given to tract's matrix-multiplication executor.
    pub fn threads(&self) -> usize {
        self.threads
    }
    /// How 3×3 convolutions run.
    pub fn convolution(&self) -> Convolution {
        self.convolution
    }

    /// How many convolutions run as Winograd in the last plan built (0 with `Im2col`, in f16,
    /// or when the graph has no float32 3×3 stride-1 padding-1 convolution).
    pub fn winograd_convolutions(&self) -> usize {
        self.winograd_convs
    }

    /// How many GroupNorms (with their affine) the last prepared plan runs as one fused
    /// operator each (float32 only).
    pub fn fused_group_norms(&self) -> usize {
        self.group_norms
    }

    /// Arithmetic precision of the plans.
    pub fn precision(&self) -> Precision {
        self.precision
    }
    /// The graph's inputs as declared in the file.
    pub fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }
    /// The graph's outputs as declared in the file.
    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }
    /// How the timestep is fed.
    pub fn timestep_input(&self) -> TimestepInput {
        self.bindings.timestep_input
    }
    /// The ONNX file (or the label given to [`Denoiser::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(feature = "multithread")]
fn executor_for(threads: usize) -> (usize, Executor) {
    let threads = threads.max(1);
    (threads, if threads > 1 { Executor::multithread(threads) } else { Executor::SingleThread })
}

// Built without tract's rayon executor (a trimmed board build): one thread whatever is asked.
#[cfg(not(feature = "multithread"))]
fn executor_for(_threads: usize) -> (usize, Executor) {
    (1, Executor::SingleThread)
}

/// Runs one call of `state`, on a worker of `executor`'s pool when it has one.
///
/// tract hands every threaded matrix product to the pool; from outside it, each hand-off parks
/// the calling thread and wakes a worker, while from inside, the worker runs its share itself
/// and the others steal the rest. Measured at 2 threads, medians of 10 images, 2–3 alternating
/// runs: student step 19.1–22.3 → 14.3–17.3 ms, teacher 20.5–25.6 → 19.1–19.6 ms.
fn run_on(executor: &Executor, state: &mut TypedSimpleState, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
    match executor {
        #[cfg(feature = "multithread")]
        Executor::MultiThread(pool) => pool.install(|| with_spinning_workers(|| state.run(inputs))),
        _ => state.run(inputs),
    }
}

/// Runs `f` on this pool worker while the pool's other workers spin, taking its parallel work
/// the moment it is queued, until `f` returns.
///
/// A call forks and joins a hundred times or more (every convolution, group norm and large
/// matrix product), with serial operators in between. Between two forks an idle rayon worker
/// goes to sleep after a few dozen `sched_yield`s, and the next fork then waits for the kernel
/// (and, in a VM, the hypervisor) to wake it. Spinning for the length of one call costs the
/// cores the caller gave us anyway; onnxruntime's pool spins the same way by default.
/// Measured at 2 threads, alternating A/B, 10 rounds of 20 images: student step median
/// 12.84 → 10.82 ms; teacher unguided, 4 rounds: 10.73 → 8.37 ms.
#[cfg(feature = "multithread")]
#[doc(hidden)]
pub fn with_spinning_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    let home = rayon::current_thread_index();
    rayon::scope(|s| {
        for _ in 1..rayon::current_num_threads() {
            s.spawn(|_| {
                // `f`'s own thread may pop a spinner while it waits inside a join of `f`:
                // spinning there would wait for `f`, which waits below it on the same stack.
                if rayon::current_thread_index() == home {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if let Some(rayon::Yield::Idle) | None = rayon::yield_now() {
                        // Not a bare spin: with more threads than free cores, a spinner would
                        // take the time slices of the thread running `f`.
                        std::thread::yield_now();
                    }
                }
            });
        }
        // Set on the way out, unwinding included: the scope waits for the spinners, and a
        // panic in `f` would otherwise leave them spinning and the call hanging.
        struct Finish<'a>(&'a AtomicBool);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _finish = Finish(&done);
        f()
    })
}

#[cfg(all(test, feature = "multithread"))]
mod tests {
    use super::*;

    fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        let Executor::MultiThread(pool) = Executor::multithread(threads) else { unreachable!() };
        pool.install(|| with_spinning_workers(f))
    }

    #[test]
    fn forked_work_is_done_while_the_workers_spin() {
        use rayon::prelude::*;
        for threads in [2, 3] {
            let sum: u64 = on_pool(threads, || (0..10_000u64).into_par_iter().map(|i| i * i).sum());
            assert_eq!(sum, (0..10_000u64).map(|i| i * i).sum::<u64>(), "{threads} threads");
        }
    }

    #[test]
    fn a_panic_in_the_call_stops_the_spinners() {
        let caught = std::panic::catch_unwind(|| on_pool(2, || panic!("inside the call")));
        assert!(caught.is_err());
    }
}

/// Copies a run's first output into `out` as f32.
fn copy_output(outputs: TractResult<TVec<TValue>>, out: &mut Array4<f32>) -> Result<()> {
    let outputs = outputs.map_err(|e| Error::Inference(one_line(&format!("{e:#}"))))?;
    let out32 = outputs[0].cast_to::<f32>().map_err(|e| Error::Inference(e.to_string()))?;
    let view = out32.to_plain_array_view::<f32>().map_err(|e| Error::Inference(e.to_string()))?;
    out.assign(&view.into_dimensionality::<ndarray::Ix4>().map_err(|e| Error::Inference(e.to_string()))?);
    Ok(())
}

fn timestep_tensor(ti: TimestepInput, t: f64, n: usize) -> TractResult<Tensor> {
    // Integer-timestep models get the nearest integer (Euler/Heun produce fractional ones).
    let mut tensor = match ti.datum_type {
        DatumType::F64 => tensor1(&vec![t; n]),
        DatumType::I64 => tensor1(&vec![t.round() as i64; n]),
        DatumType::I32 => tensor1(&vec![t.round() as i32; n]),
        _ => tensor1(&vec![t as f32; n]),
    };
    if ti.shape == TimestepShape::Scalar {
        tensor = tensor.into_shape(&[])?;
    }
    Ok(tensor)
}

/// A float32 graph after [`f32_rewrites`], decluttered, not yet optimized.
#[doc(hidden)]
pub struct Rewritten {
    pub model: TypedModel,
    pub winograd_convolutions: usize,
    pub group_norms: usize,
}

/// Declutters a float32 graph with this crate's operators swapped in: 1×1 convolutions before
/// declutter (which turns them into forms tract runs slower, see `pointwise`); GroupNorms,
/// softmaxes, where it pays Winograd 3×3 convolutions, and strided convolutions after it (these
/// swaps need tract's convolutions as they are before optimization; declutter has by then folded
/// an exported `Pad` into the convolution after it). `convolutions: false` leaves every
/// convolution to tract (`Convolution::Im2col`).
///
/// Public only for `examples/profile_ops.rs`, which must profile the graph the runtime runs.
#[doc(hidden)]
pub fn f32_rewrites(model: TypedModel, convolutions: bool) -> TractResult<Rewritten> {
    #[allow(unused_mut)] // only x86-64 rewrites here
    let mut model = model;
    #[cfg(target_arch = "x86_64")]
    if convolutions {
        crate::pointwise::rewrite(&mut model).map_err(|e| e.context("1x1 convolution"))?;
    }
    let mut model = model.into_decluttered()?;
    let group_norms = crate::groupnorm::rewrite(&mut model).map_err(|e| e.context("group norm"))?;
    #[cfg(target_arch = "x86_64")]
    crate::softmax::rewrite(&mut model).map_err(|e| e.context("softmax"))?;
    let mut winograd_convolutions = 0;
    if convolutions && crate::winograd::PAYS_OFF {
        winograd_convolutions = crate::winograd::rewrite(&mut model).map_err(|e| e.context("winograd"))?;
    }
    #[cfg(target_arch = "x86_64")]
    if convolutions {
        crate::pointwise::rewrite_strided(&mut model).map_err(|e| e.context("strided convolution"))?;
    }
    Ok(Rewritten { model, winograd_convolutions, group_norms })
}

/// Gives every constant natural (C-order) strides.
///
/// Exporters store per-channel constants as `[C,1,1]`; tract broadcasts them to `[1,C,1,1]` by
/// inserting an axis, which leaves strides it then does not recognise as contiguous, and its
/// elementwise kernels fall back to a generic broadcasting loop for them (measured: the GroupNorm
/// affine and time-embedding scale/shift took 15–25 % of a UNet call instead of ≈ 2 %).
///
/// Public only for `examples/profile_ops.rs`, which must profile the graph the runtime runs.
#[doc(hidden)]
pub fn contiguous_constants(model: &mut TypedModel) -> TractResult<()> {
    for id in 0..model.nodes().len() {
        let Some(konst) = model.node(id).op_as::<Const>() else { continue };
        let t = konst.val();
        if t.strides() == &*Tensor::natural_strides(t.shape()) {
            continue;
        }
        let fixed = (**t).clone().into_shape(t.shape())?;
        model.node_mut(id).op = Box::new(Const::new(Arc::new(fixed))?);
    }
    Ok(())
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Hands the allocator's free pages back to the OS. glibc serves allocations of up to 32 MB from
/// its heap once one of that size has been freed, and keeps freed heap pages resident: after the
/// 35.7M UNet's source graph was dropped the process still held 360 MiB, 220 MiB once trimmed.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes glibc's own allocator locks and touches only free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The ONNX protobuf in `bytes`; `path` labels the error.
fn decode(bytes: &[u8], path: &std::path::Path) -> Result<ModelProto> {
    <ModelProto as prost::Message>::decode(bytes).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: one_line(&format!("not an ONNX model (protobuf decoding failed: {e})")),
    })
}

fn count_params(proto: &ModelProto) -> usize {
    let Some(g) = &proto.graph else { return 0 };
    g.initializer.iter().map(|t| t.dims.iter().product::<i64>().max(0) as usize).sum()
}

fn input_names(model: &InferenceModel) -> Vec<String> {
    model.input_outlets().map(|outs| outs.iter().map(|o| model.node(o.node).name.clone()).collect()).unwrap_or_default()
}

fn describe(model: &InferenceModel) -> (Vec<IoInfo>, Vec<IoInfo>) {
    let fact = |o: OutletId| model.outlet_fact(o).map(|f| format!("{f:?}")).unwrap_or_else(|_| "?".into());
    let inputs = model
        .input_outlets()
        .map(|outs| outs.iter().map(|&o| IoInfo { name: model.node(o.node).name.clone(), fact: fact(o) }).collect())
        .unwrap_or_default();
    let outputs = model
        .output_outlets()
        .map(|outs| {
            outs.iter()
                .map(|&o| IoInfo {
                    name: model.outlet_label(o).unwrap_or(&model.node(o.node).name).to_string(),
                    fact: fact(o),
                })
                .collect()
        })
        .unwrap_or_default();
    (inputs, outputs)
}

fn bind(model: &InferenceModel, card: &ModelCard) -> std::result::Result<Bindings, String> {
    let names = input_names(model);
    let cn = &card.model.inputs;
    let find = |field: &str, name: &str| {
        names.iter().position(|n| n == name).ok_or_else(|| {
            format!("the card's model.inputs.{field} = {name:?} is not an input of this ONNX graph (inputs: {names:?})")
        })
    };
    let sample = find("sample", &cn.sample)?;
    let timestep = find("timestep", &cn.timestep)?;
    let class_labels = cn.class_labels.as_deref().map(|n| find("class_labels", n)).transpose()?;
    let context = cn.encoder_hidden_states.as_deref().map(|n| find("encoder_hidden_states", n)).transpose()?;
    let bound: Vec<usize> = [Some(sample), Some(timestep), class_labels, context].into_iter().flatten().collect();
    if let Some(extra) = (0..names.len()).find(|i| !bound.contains(i)) {
        return Err(format!(
            "ONNX input {:?} is not named in the card's [model.inputs] (sample, timestep, class_labels, encoder_hidden_states)",
            names[extra]
        ));
    }
    let outlets = model.input_outlets().map_err(|e| e.to_string())?;
    let fact = |ix: usize| model.outlet_fact(outlets[ix]).map_err(|e| e.to_string());

    // The sample: float32, rank 4, and any concrete dims must agree with the card.
    let sf = fact(sample)?;
    if let Some(dt) = sf.datum_type.concretize() {
        if dt != f32::datum_type() {
            return Err(format!("input {:?} is {dt:?}, expected float32", cn.sample));
        }
    }
    let [c, h, w] = [card.image.channels, card.image.height, card.image.width];
    if let Some(rank) = sf.shape.rank().concretize() {
        if rank != 4 {
            return Err(format!("input {:?} has rank {rank}, expected 4 ([batch, C, H, W])", cn.sample));
        }
        for (axis, (want, what)) in [(1, (c, "image.channels")), (2, (h, "image.height")), (3, (w, "image.width"))] {
            if let Some(d) = sf.shape.dim(axis).and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()) {
                if d != want as i64 {
                    return Err(format!(
                        "input {:?} has {d} at axis {axis}, but the card's {what} is {want}",
                        cn.sample
                    ));
                }
            }
        }
    }

    let tf = fact(timestep)?;
    let datum_type = match tf.datum_type.concretize() {
        None | Some(DatumType::F32) => DatumType::F32,
        Some(dt @ (DatumType::F64 | DatumType::I64 | DatumType::I32)) => dt,
        Some(other) => {
            return Err(format!(
                "timestep input {:?} is {other:?}, expected float32, float64, int64 or int32",
                cn.timestep
            ))
        }
    };
    let shape = match tf.shape.rank().concretize() {
        Some(0) => TimestepShape::Scalar,
        Some(1) => match tf.shape.dim(0).and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()) {
            Some(1) => TimestepShape::One,
            _ => TimestepShape::Batch,
        },
        None => TimestepShape::Batch,
        Some(r) => return Err(format!("timestep input {:?} has rank {r}, expected [], [1] or [batch]", cn.timestep)),
    };

    let class_labels = match class_labels {
        Some(ix) => {
            let dt = fact(ix)?.datum_type.concretize().unwrap_or(DatumType::I64);
            if !matches!(dt, DatumType::I64 | DatumType::I32) {
                return Err(format!("class_labels input is {dt:?}, expected int64 or int32"));
            }
            Some((ix, dt))
        }
        None => None,
    };
    let context = match context {
        Some(ix) => {
            let f = fact(ix)?;
            let dims: Option<Vec<usize>> = (1..3)
                .map(|a| f.shape.dim(a).and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()).map(|d| d as usize))
                .collect();
            let dims = dims.ok_or("encoder_hidden_states must have fixed [tokens, dim] in the ONNX file")?;
            Some((ix, dims))
        }
        None => None,
    };
    let outputs = model.output_outlets().map_err(|e| e.to_string())?;
    let output = match &card.model.output {
        None => 0,
        Some(name) => outputs
            .iter()
            .position(|&o| model.outlet_label(o) == Some(name.as_str()) || model.node(o.node).name == *name)
            .ok_or_else(|| format!("the card's model.output = {name:?} is not an output of this ONNX graph"))?,
    };
    Ok(Bindings {
        sample,
        timestep,
        timestep_input: TimestepInput { datum_type, shape },
        class_labels,
        context,
        output,
    })
}
