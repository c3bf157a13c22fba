//! The tract plumbing: an ONNX denoiser loaded once, bound to the card's input names, and run
//! through one optimized plan per batch size.
//!
//! Weights: the file is memory-mapped and the protobuf decoded straight from the map (tract
//! then copies weights into its own aligned tensors; it has no borrowed-tensor storage).
//!
//! One file per job: decoding the file (`load`), binding inputs (`bind`), building plans with
//! the graph rewrites of `crate::passes` (`plan`) from input shapes that fix the graph's
//! symbolic dimensions (`symbols`), graphs other than denoisers run once ([`run_graph`]),
//! the thread pool a call runs on (`threads`),
//! handing memory back once the source graph is dropped (`memory`), and timing a plan's nodes
//! ([`Denoiser::profile_ops`]). [`Precision`] and [`Convolution`] pick how plans compute.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use ndarray::Array4;
use tract_linalg::multithread::Executor;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::InferenceModel;

use crate::card::ModelCard;
use crate::error::{Error, Result};
use crate::ops;

mod bind;
mod graph;
mod load;
mod memory;
mod plan;
mod plan_file;
mod profile;
mod settings;
mod skeleton;
mod symbols;
mod threads;

pub use bind::{ConditioningInput, Conditions, TimestepInput, TimestepShape};
pub use graph::{run_graph, Graph};
pub use load::IoInfo;
pub use plan_file::PlanFile;
pub use profile::{NodeTime, OpProfile, OpTime};
pub use settings::{Convolution, PlanCache, Precision, WeightPrecision};

use bind::{bind, copy_output, Bindings};
use load::{count_params, decode, describe, one_line, parse, read_proto};
use memory::return_freed_memory;
use plan::{Plan, Plans};
use plan_file::{PlanStore, Source, SourceId};
use threads::{executor_for, run_on};

/// A denoiser: ONNX model + input bindings + optimized plans (one per batch size).
pub struct Denoiser {
    path: PathBuf,
    /// The decoded ONNX graph that plans are built from; `None` once released
    /// ([`Denoiser::release_graph`]).
    source: Option<InferenceModel>,
    bindings: Bindings,
    /// The output's `[C, H, W]` (the card's `[image]`).
    chw: [usize; 3],
    /// Channels of the sample input: C, or `2·C + 1` for an inpainting model.
    in_channels: usize,
    threads: usize,
    executor: Executor,
    precision: Precision,
    convolution: Convolution,
    /// 3×3 convolutions running as Winograd in the plans built so far.
    winograd_convs: usize,
    group_norms: usize,
    plans: Plans,
    /// The plan file of the packed weights, and the packer the builds take them from.
    plan_file: PlanStore,
    /// The builds a plan file proved when `source` has stand-ins for the weights it covers
    /// (`skeleton`); `None` when `source` holds every weight.
    skeleton: Option<Vec<String>>,
    params: usize,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    /// The start of the plan file, locked in memory ([`Denoiser::lock_weights`]).
    pinned: Option<memmap2::Mmap>,
}

impl Denoiser {
    /// Loads `card`'s ONNX file through a memory map, to run on `threads` threads: at least 1
    /// and at most the cores the process may use ([`threads`](Denoiser::threads) tells how many).
    pub fn load(card: &ModelCard, threads: usize) -> Result<Self> {
        let path = card.onnx_path();
        let (proto, source) = read_proto(&path)?;
        Self::from_proto(proto, source, card, threads, path.parent(), path.clone())
    }

    /// [`load`](Denoiser::load) with a plan file as `plan_cache` says
    /// ([`set_plan_cache`](Denoiser::set_plan_cache)). When the plan file holds a proof
    /// for the weights it covers, they are not read from the ONNX file at all: the graph gets
    /// untouched stand-ins for them, and the plans read the packed weights from the plan file.
    /// A plan the proof does not cover (another batch size or setting) reads the ONNX file
    /// again first.
    ///
    /// `weights`: the precision of the packed weights ([`set_weight_precision`](Denoiser::set_weight_precision)).
    pub fn load_with(
        card: &ModelCard,
        threads: usize,
        plan_cache: PlanCache,
        weights: WeightPrecision,
    ) -> Result<Self> {
        if plan_cache == PlanCache::Off {
            let mut denoiser = Self::load(card, threads)?;
            denoiser.set_weight_precision(weights);
            return Ok(denoiser);
        }
        let path = card.onnx_path();
        let dir = path.parent();
        let (map, heads, source) = skeleton::map_source(&path)?;
        if heads.is_none() {
            // Not a protobuf the walk understands: decoding says why.
            drop((map, source));
            let mut denoiser = Self::load(card, threads)?;
            denoiser.set_plan_cache(plan_cache);
            denoiser.set_weight_precision(weights);
            return Ok(denoiser);
        }
        let mut plan_file = PlanStore::new(plan_cache, &path, true, source);
        plan_file.set_weights(weights);
        if let Some(proof) = plan_file.proof() {
            if let Some((model, params, left_out)) = Self::leave_out(&map, &path, &proof) {
                plan_file.left_out = left_out;
                let mut denoiser = Self::from_model(model, params, plan_file, card, threads, path)?;
                denoiser.skeleton = Some(proof.builds);
                return Ok(denoiser);
            }
        }
        let proto = decode(&map, &path)?;
        drop(map);
        let params = count_params(&proto);
        let model = parse(&proto, dir)
            .map_err(|e| Error::Model { path: path.clone(), message: one_line(&format!("{e:#}")) })?;
        drop(proto);
        Self::from_model(model, params, plan_file, card, threads, path)
    }

    /// The graph of the ONNX file `bytes` (at `path`) without the initializers `proof` covers,
    /// each replaced by a stand-in; its parameter count, and how many were left out. `None`
    /// when the proof does not fit the file (it names initializers the file lacks).
    fn leave_out(bytes: &[u8], path: &Path, proof: &plan_file::Proof) -> Option<(InferenceModel, usize, usize)> {
        let names: HashSet<String> = proof.stand_ins.iter().cloned().collect();
        let (model, params, left_out) = skeleton::without(bytes, path, &names, 0..0)?;
        Some((model, params, left_out.len()))
    }

    /// Loads an ONNX model held in memory (for models compiled into the program).
    /// `name` labels errors.
    pub fn from_bytes(bytes: &[u8], card: &ModelCard, threads: usize, name: impl Into<PathBuf>) -> Result<Self> {
        let path: PathBuf = name.into();
        let proto = decode(bytes, &path)?;
        Self::from_proto(proto, SourceId::of(bytes, &[], None), card, threads, None, path)
    }

    /// `dir`: where external data lives (the ONNX file's folder), `None` for a model in memory.
    fn from_proto(
        proto: ModelProto,
        source: SourceId,
        card: &ModelCard,
        threads: usize,
        dir: Option<&Path>,
        path: PathBuf,
    ) -> Result<Self> {
        let fail = |e: &dyn std::fmt::Display| Error::Model { path: path.clone(), message: one_line(e) };
        let params = count_params(&proto);
        let model = parse(&proto, dir).map_err(|e| fail(&format!("{e:#}")))?;
        drop(proto);
        let plan_file = PlanStore::new(PlanCache::Off, &path, dir.is_some(), Source::known(source));
        Self::from_model(model, params, plan_file, card, threads, path)
    }

    /// A denoiser over the parsed `model`.
    fn from_model(
        model: InferenceModel,
        params: usize,
        plan_file: PlanStore,
        card: &ModelCard,
        threads: usize,
        path: PathBuf,
    ) -> Result<Self> {
        let (inputs, outputs) = describe(&model);
        let bindings = bind(&model, card).map_err(|m| Error::Model { path: path.clone(), message: m })?;
        let (threads, executor) = executor_for(threads);
        Ok(Denoiser {
            path: path.clone(),
            source: Some(model),
            bindings,
            chw: [card.image.channels, card.image.height, card.image.width],
            in_channels: card.sample_channels(),
            threads,
            executor,
            precision: Precision::F32,
            convolution: Convolution::default(),
            winograd_convs: 0,
            group_norms: 0,
            plans: Plans::new(HashMap::new()),
            plan_file,
            skeleton: None,
            params,
            inputs,
            outputs,
            pinned: None,
        })
    }

    /// Switches the arithmetic precision; plans built so far are dropped and rebuilt on demand.
    pub fn set_precision(&mut self, precision: Precision) {
        if precision != self.precision {
            self.precision = precision;
            self.plans.get_mut().clear();
            self.plan_file.reset();
        }
    }

    /// Switches how 3×3 convolutions run; plans built so far are dropped and rebuilt on demand.
    pub fn set_convolution(&mut self, convolution: Convolution) {
        if convolution != self.convolution {
            self.convolution = convolution;
            self.plans.get_mut().clear();
            self.plan_file.reset();
        }
    }

    /// Builds (once) the optimized plan for `batch` images per call.
    pub fn prepare(&mut self, batch: usize) -> Result<()> {
        if self.plans.get_mut().contains_key(&batch) {
            return Ok(());
        }
        self.insert_plan(batch, false)
    }

    /// [`prepare`](Denoiser::prepare) for the last plan this denoiser will need, then
    /// [`release_graph`](Denoiser::release_graph). The plan is built from the source graph
    /// itself rather than a copy, so each weight that the plan replaces (a 3×3 kernel by its
    /// Winograd transform) is freed as soon as it is replaced, and the load never holds all
    /// the kernels and all their transforms at once.
    /// The source is gone afterwards even if the build fails.
    pub fn prepare_final(&mut self, batch: usize) -> Result<()> {
        if !self.plans.get_mut().contains_key(&batch) {
            self.insert_plan(batch, true)?;
        }
        self.source = None;
        self.skeleton = None;
        self.prove_stand_ins();
        self.map_written();
        return_freed_memory();
        Ok(())
    }

    /// After the load that wrote and proved the plan file: builds each plan again from the
    /// rewritten graph the file saved, with its weights read through the file's map, so that
    /// the packed weights leave the heap and this process runs as a later load's would. The
    /// saved graphs were proven to give bit-identical outputs over the same weights. A plan
    /// whose graph the file lacks, or that does not build, keeps its heap weights.
    fn map_written(&mut self) {
        if self.precision != Precision::F32 || !matches!(self.plan_file.status, PlanFile::Written { .. }) {
            return;
        }
        let Some(packer) = self.plan_file.map_written() else { return };
        let batches: Vec<usize> = self.plans.get_mut().keys().copied().collect();
        let mut all = true;
        for batch in batches {
            match self.signature(batch).ok().and_then(|s| self.saved_plan(batch, &s, &packer)) {
                Some((plan, ..)) => {
                    self.plans.get_mut().insert(batch, plan);
                }
                None => all = false,
            }
        }
        if all {
            self.plan_file.mark_mapped();
        }
    }

    /// Builds the plan for `batch` from the source graph (`take`: consuming it).
    fn insert_plan(&mut self, batch: usize, take: bool) -> Result<()> {
        let model_error = |path: &Path, m: String| Error::Model { path: path.to_path_buf(), message: m };
        let signature = self.signature(batch).map_err(|m| model_error(&self.path, m))?;
        if self.skeleton.as_ref().is_some_and(|proven| !proven.contains(&signature)) {
            self.load_whole()?;
        }
        if self.skeleton.is_some() && self.insert_saved_plan(batch, &signature) {
            return Ok(());
        }
        let source = if take { self.source.take() } else { self.source.clone() };
        let source = source.ok_or_else(|| self.released(batch))?;
        let packer = self.plan_file.packer();
        packer.by_key_alone(self.skeleton.is_some());
        // The rewritten graph is cloned (its constants shared) for the plan file, which this
        // load may write.
        let keep = self.skeleton.is_none() && self.precision == Precision::F32;
        let mut rewritten = None;
        let built = self.rewritten(batch, source, &packer).and_then(|(typed, winograd, group_norms)| {
            rewritten = keep.then(|| typed.clone());
            Ok((self.finish(batch, typed)?, winograd, group_norms))
        });
        if self.skeleton.is_some() && (packer.failed() || built.is_err()) {
            // The build wanted a weight the plan file lacks: only the whole file has it.
            self.load_whole()?;
            return self.insert_plan(batch, take);
        }
        let (mut plan, winograd_convs, group_norms) = built.map_err(|m| model_error(&self.path, m))?;
        plan.rewritten = rewritten;
        self.keep_plan(batch, signature, plan, winograd_convs, group_norms);
        Ok(())
    }

    /// Keeps the plan built for `batch` (build `signature`), with its rewrite counts, and lets
    /// the plan file know of the build (which may write it). The plan keeps its rewritten graph
    /// only when the plan file written will hold it.
    fn keep_plan(
        &mut self,
        batch: usize,
        signature: String,
        mut plan: Plan,
        winograd_convs: usize,
        group_norms: usize,
    ) {
        self.plan_file.after_build(signature);
        if !self.saves_graphs() {
            plan.rewritten = None;
        }
        self.winograd_convs = winograd_convs;
        self.group_norms = group_norms;
        self.plans.get_mut().insert(batch, plan);
    }

    /// Whether the plan file being written this load will also hold the builds' rewritten
    /// graphs, once proven: float32 plans (float16 ones rewrite their weights after packing).
    fn saves_graphs(&self) -> bool {
        self.precision == Precision::F32 && matches!(self.plan_file.status, PlanFile::Written { .. })
    }

    /// Builds the plan for `batch` from the rewritten graph the plan file holds for
    /// `signature`, reading no ONNX: whether it did. A graph that does not read back leaves
    /// the build to the source graph.
    fn insert_saved_plan(&mut self, batch: usize, signature: &str) -> bool {
        if self.precision != Precision::F32 {
            return false;
        }
        let packer = self.plan_file.packer();
        let Some((plan, winograd_convs, group_norms)) = self.saved_plan(batch, signature, &packer) else {
            return false;
        };
        self.plan_file.saved_graph = true;
        self.keep_plan(batch, signature.to_string(), plan, winograd_convs, group_norms);
        true
    }

    /// The plan for `batch` built from the rewritten graph the plan file holds for
    /// `signature`, its packed weights from `packer`, with its Winograd convolutions and group
    /// norms counted; `None` when the file lacks that graph, or it does not read back or build.
    fn saved_plan(
        &self,
        batch: usize,
        signature: &str,
        packer: &Arc<ops::packed::Packer>,
    ) -> Option<(Plan, usize, usize)> {
        let typed = ops::serial::read(self.plan_file.graph(signature)?, packer).ok()?;
        let count = |name: &str| typed.nodes.iter().filter(|n| n.op.name() == name).count();
        let (winograd_convs, group_norms) = (count("Winograd3x3"), count("GroupNorm"));
        let plan = self.finish(batch, typed).ok()?;
        Some((plan, winograd_convs, group_norms))
    }

    /// Reads the ONNX file again, every weight included, in place of a source graph with
    /// stand-ins.
    fn load_whole(&mut self) -> Result<()> {
        let (proto, _) = read_proto(&self.path)?;
        let model = parse(&proto, self.path.parent())
            .map_err(|e| Error::Model { path: self.path.clone(), message: one_line(&format!("{e:#}")) })?;
        self.source = Some(model);
        self.skeleton = None;
        self.plan_file.reset();
        Ok(())
    }

    /// After the load that wrote the plan file: proves which initializers a later load may
    /// leave out (`skeleton`), and records them in the file. A proof that fails is not
    /// recorded, and later loads read the whole file.
    fn prove_stand_ins(&mut self) {
        if self.precision != Precision::F32 || !self.plan_file.beside_allowed() {
            return;
        }
        let Some((held, origins, builds)) = self.plan_file.to_prove() else { return };
        if let Ok(Some((stand_ins, graphs))) = self.prove(held, &origins) {
            self.plan_file.record(plan_file::Proof { stand_ins, builds }, &graphs);
        }
        for plan in self.plans.get_mut().values_mut() {
            plan.rewritten = None;
        }
    }

    /// Builds every plan again from a graph whose initializers in `origins` are stand-ins, with
    /// the weights packed this load, and runs one call on both, once per pass of stand-ins
    /// filled with NaN ([`skeleton::PROOF_PASS_BYTES`] at a time): the names of the stand-ins
    /// when every output agrees bit for bit in every pass. With them, the rewritten graph of
    /// each build as `ops::serial` writes it, where the plan built from it read back gives the
    /// same outputs bit for bit too.
    #[allow(clippy::type_complexity)]
    fn prove(
        &mut self,
        held: Vec<ops::packed::Held>,
        origins: &HashSet<String>,
    ) -> TractResult<Option<(Vec<String>, Vec<(String, Vec<u8>)>)>> {
        let names = skeleton::initializer_names(origins);
        let batches: Vec<usize> = self.plans.get_mut().keys().copied().collect();
        let mut probes = vec![];
        for &batch in &batches {
            let plan = self.plans.get_mut().get_mut(&batch).expect("listed above");
            let inputs = skeleton::probe_inputs(&plan.model)?;
            let ours = run_on(&self.executor, &mut plan.state, inputs.clone())?;
            probes.push((batch, inputs, ours));
        }
        let path = self.path.clone();
        let proven = skeleton::prove_in_passes(&path, &names, |model| -> TractResult<bool> {
            let packer = ops::packed::Packer::over_held(held.clone());
            for (batch, inputs, ours) in &probes {
                let (mut proof, ..) =
                    self.build_plan(*batch, model.clone(), &packer).map_err(|m| anyhow::anyhow!(m))?;
                if packer.failed() {
                    return Ok(false);
                }
                let theirs = run_on(&self.executor, &mut proof.state, inputs.clone())?;
                if !skeleton::same_outputs(ours, &theirs) {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        let Some(stand_ins) = proven else { return Ok(None) };
        let saved = Arc::new(ops::packed::Packer::over_held(held));
        let mut graphs = vec![];
        for (batch, inputs, ours) in probes {
            let plan = self.plans.get_mut().get_mut(&batch).expect("listed above");
            let Some(bytes) = plan.rewritten.take().and_then(|r| ops::serial::write(&r).ok()) else { continue };
            let Ok(Ok(mut read_back)) = ops::serial::read(&bytes, &saved).map(|typed| self.finish(batch, typed)) else {
                continue;
            };
            // A read-back plan that fails to run costs only its own graph, not the proof.
            let again = run_on(&self.executor, &mut read_back.state, inputs);
            if again.is_ok_and(|outputs| skeleton::same_outputs(&ours, &outputs)) {
                graphs.push((self.signature(batch).map_err(|m| anyhow::anyhow!(m))?, bytes));
            }
        }
        Ok(Some((stand_ins, graphs)))
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

    /// Where the plans' packed weights come from and go ([`PlanCache::Off`] unless set; a
    /// [`Pipeline`](crate::Pipeline) sets its [`LoadOptions::plan_cache`](crate::LoadOptions)).
    /// Takes effect at the next plan build: call it before the first call or `prepare`.
    pub fn set_plan_cache(&mut self, setting: PlanCache) {
        self.plan_file.set(setting);
    }

    /// The precision our operators' packed weights are kept in ([`WeightPrecision::F32`]
    /// unless set; a [`Pipeline`](crate::Pipeline) sets its
    /// [`LoadOptions::weights`](crate::LoadOptions)). Takes effect at the next plan build: call
    /// it before the first call or `prepare`.
    pub fn set_weight_precision(&mut self, weights: WeightPrecision) {
        if self.plan_file.weights() != weights {
            self.plan_file.set_weights(weights);
        }
    }

    /// What became of the plan file at the last plan build.
    pub fn plan_file(&self) -> &PlanFile {
        &self.plan_file.status
    }

    /// Locks the first `bytes` of the plan file that the weights are read from in memory
    /// (`mlock`), so that the OS never drops those pages under memory pressure and the steps
    /// never wait to read them again: for a model that does not fit in memory, the part that
    /// does. The file holds the weights in the order the graph runs them. A second call
    /// replaces the first; 0 unlocks.
    ///
    /// Returns the bytes locked: 0 when the weights are not read from a plan file (none, or
    /// this load wrote it and could not map it: [`PlanFile::Written`] with `mapped: false`).
    /// Locking needs the bytes within the process's `RLIMIT_MEMLOCK` (`ulimit -l`) or the
    /// `CAP_IPC_LOCK` capability; otherwise it fails with [`Error::Config`] for `lock-weights`.
    pub fn lock_weights(&mut self, bytes: u64) -> Result<u64> {
        self.pinned = None;
        let Some(path) = self.plan_file.mapped_path() else { return Ok(0) };
        if bytes == 0 {
            return Ok(0);
        }
        let map = plan_file::pin(path, bytes).map_err(|e| {
            let mib = bytes.div_ceil(1 << 20);
            Error::config(
                "lock-weights",
                format!(
                    "cannot lock {mib} MiB of {} in memory: {e}; a process may lock up to its RLIMIT_MEMLOCK \
                     (`ulimit -l`) unless it has CAP_IPC_LOCK",
                    path.display()
                ),
            )
        })?;
        let locked = map.len() as u64;
        self.pinned = Some(map);
        Ok(locked)
    }

    /// The bytes of the plan file locked in memory by [`lock_weights`](Denoiser::lock_weights).
    pub fn locked_weights(&self) -> u64 {
        self.pinned.as_ref().map_or(0, |m| m.len() as u64)
    }

    /// Whether the source graph is still held (see [`release_graph`](Denoiser::release_graph)).
    pub fn holds_graph(&self) -> bool {
        self.source.is_some()
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
        self.predict_with(sample, timestep, &Conditions { class_labels, context, extra: &[] }, out)
    }

    /// [`predict`](Denoiser::predict) with every conditioning input: `time` is the timestep, or
    /// σ for a σ-conditioned model (the card's `model.inputs.sigma`).
    pub fn predict_with(
        &mut self,
        sample: &Array4<f32>,
        time: f64,
        conditions: &Conditions,
        out: &mut Array4<f32>,
    ) -> Result<()> {
        let batch = sample.shape()[0];
        self.prepare(batch)?;
        let inputs = self.graph_inputs(sample, time, conditions)?;
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
        let cond = |l| Conditions { class_labels: Some(l), context, extra: &[] };
        self.predict_pair_with(sample, timestep, [&cond(&labels[..1]), &cond(&labels[1..])], outs)
    }

    /// [`predict_pair`](Denoiser::predict_pair) with every conditioning input, one set per
    /// branch.
    pub fn predict_pair_with(
        &mut self,
        sample: &Array4<f32>,
        time: f64,
        conditions: [&Conditions; 2],
        outs: [&mut Array4<f32>; 2],
    ) -> Result<()> {
        if sample.shape()[0] != 1 {
            return Err(Error::Inference(format!(
                "predict_pair takes one image, got a batch of {}",
                sample.shape()[0]
            )));
        }
        self.prepare(1)?;
        let inputs_a = self.graph_inputs(sample, time, conditions[0])?;
        let inputs_b = self.graph_inputs(sample, time, conditions[1])?;
        let (threads, path) = (self.threads, self.path.clone());
        let plan = self.plans.get_mut().get_mut(&1).expect("prepared above");
        let err = |e: TractError| Error::Model { path: path.clone(), message: one_line(&format!("{e:#}")) };
        let [a, b] = plan.branches(threads).map_err(err)?;
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

    /// Fixes the shape of `encoder_hidden_states` to `[batch, tokens, dim]`, for a graph that
    /// leaves it open (an optimum export). A size the file fixes must agree: a text encoder of
    /// another width than the UNet's cross-attention is an error naming both. Plans built so far
    /// are dropped when the shape changes.
    pub fn set_context_shape(&mut self, tokens: usize, dim: usize) -> Result<()> {
        let Some((_, known)) = &mut self.bindings.context else {
            return Err(Error::Model {
                path: self.path.clone(),
                message: "the card binds no encoder_hidden_states input: this model takes no text".into(),
            });
        };
        let fixed = |what: &str, have: Option<usize>, want: usize| match have {
            Some(h) if h != want => Err(Error::Model {
                path: self.path.clone(),
                message: format!("encoder_hidden_states takes {h} {what}, the text encoder gives {want}"),
            }),
            _ => Ok(()),
        };
        fixed("features per token (the UNet's cross-attention width)", known[1], dim)?;
        fixed("tokens", known[0], tokens)?;
        if *known != [Some(tokens), Some(dim)] {
            *known = [Some(tokens), Some(dim)];
            self.plans.get_mut().clear();
        }
        Ok(())
    }

    /// The shape of one image's `encoder_hidden_states`, `[tokens, dim]`, where known.
    pub fn context_shape(&self) -> Option<[Option<usize>; 2]> {
        self.bindings.context.as_ref().map(|(_, d)| *d)
    }

    /// The graph inputs bound by the card's `[model.conditioning.NAME]` tables, in the order
    /// [`Conditions::extra`] takes their values.
    pub fn conditioning_inputs(&self) -> &[ConditioningInput] {
        &self.bindings.conditioning
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
