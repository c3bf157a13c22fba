//! Where a denoiser call spends its time: every node of a plan timed, summed per operator kind.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use ndarray::{Array4, ArrayD, IxDyn};
use tract_onnx::prelude::*;

use super::bind::Conditions;
use super::load::one_line;
use super::threads::{in_pool, run_on};
use super::Denoiser;
use crate::error::{Error, Result};

/// Calls run before timing, so that the plan's buffers and caches are warm.
const WARM_UP: usize = 3;

/// Nodes that [`OpProfile`]'s `Display` lists.
const SLOWEST_SHOWN: usize = 15;

/// Time per operator kind of one call of a plan, from [`Denoiser::profile_ops`]. `Display`
/// prints it as a table, then the slowest nodes (every node with `{:#}`).
#[derive(Debug, Clone)]
pub struct OpProfile {
    /// Images per call.
    pub batch: usize,
    /// Timed calls the times are averaged over.
    pub runs: usize,
    /// Nodes in the optimized graph, its inputs and the constants tract does not evaluate
    /// included; [`ops`](OpProfile::ops) and [`slowest`](OpProfile::slowest) count only the
    /// nodes that a call evaluates.
    pub nodes: usize,
    /// Mean time of one call run as [`Denoiser::predict`] runs it, without timing each node.
    pub call: Duration,
    /// Sum of the nodes' mean times; timing each node adds a little time per node.
    pub timed: Duration,
    /// One row per operator kind, slowest first.
    pub ops: Vec<OpTime>,
    /// Every node, slowest first.
    pub slowest: Vec<NodeTime>,
}

/// One operator kind in an [`OpProfile`].
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// tract's name of the operator (ours: `Winograd3x3`, `Pointwise`, `GroupNorm`, `RowSoftmax`).
    pub op: String,
    /// Nodes of this kind in the plan.
    pub nodes: usize,
    /// Mean time of all of them in one call.
    pub time: Duration,
    /// Their part of [`OpProfile::timed`], from 0 to 1.
    pub share: f64,
}

/// One node in an [`OpProfile`].
#[derive(Debug, Clone, PartialEq)]
pub struct NodeTime {
    /// tract's name of its operator.
    pub op: String,
    /// The node's name in the graph.
    pub name: String,
    /// The shapes of its inputs, e.g. `[1, 64, 16, 16] [64]`.
    pub inputs: String,
    /// Mean time of the node in one call.
    pub time: Duration,
}

impl Denoiser {
    /// Runs the plan for `batch` images `runs` times as [`predict`](Denoiser::predict) does,
    /// then `runs` times more with every node timed, and sums the node times per operator
    /// kind. The plan is the one this denoiser runs: the same precision, convolution setting
    /// and threads. The inputs are a constant sample (0.3), timestep 500, class label 1 and a
    /// zero conditioning where the model takes them.
    ///
    /// Builds the plan first when needed, which fails once the source graph is released
    /// ([`release_graph`](Denoiser::release_graph)).
    pub fn profile_ops(&mut self, batch: usize, runs: usize) -> Result<OpProfile> {
        if batch == 0 || runs == 0 {
            return Err(Error::config("profile", format!("batch and runs must be at least 1, got {batch} and {runs}")));
        }
        self.prepare(batch)?;
        let [_, h, w] = self.chw;
        let sample = Array4::from_elem((batch, self.in_channels, h, w), 0.3f32);
        let labels = vec![1i64; batch];
        // prepare() succeeded, so the plan knows both sizes.
        let context = self
            .bindings
            .context
            .as_ref()
            .map(|(_, [tokens, dim])| ArrayD::<f32>::zeros(IxDyn(&[batch, tokens.unwrap_or(1), dim.unwrap_or(1)])));
        let extra: Vec<ArrayD<f32>> = self
            .bindings
            .conditioning
            .iter()
            .map(|c| ArrayD::zeros(IxDyn(&std::iter::once(batch).chain(c.dims.iter().copied()).collect::<Vec<_>>())))
            .collect();
        let conditions = Conditions { class_labels: Some(&labels), context: context.as_ref(), extra: &extra };
        let inputs = self.graph_inputs(&sample, 500.0, &conditions)?;
        let executor = self.executor.clone();
        let plan = self.plans.get_mut().get_mut(&batch).expect("prepared above");
        let nodes = plan.model.nodes().len();
        profile_state(&executor, &mut plan.state, nodes, inputs, batch, runs)
    }
}

impl super::Graph {
    /// Runs the graph `runs` times on `inputs`, then `runs` times more with every node timed,
    /// as [`Denoiser::profile_ops`] does (batch: the first input's first axis).
    pub fn profile_ops(&mut self, inputs: &[ArrayD<f32>], runs: usize) -> Result<OpProfile> {
        if runs == 0 {
            return Err(Error::config("profile", "runs must be at least 1"));
        }
        let batch = inputs.first().and_then(|x| x.shape().first().copied()).unwrap_or(1);
        let (executor, state, nodes, values) = self.parts(inputs)?;
        profile_state(&executor, state, nodes, values, batch, runs)
    }
}

/// Times `state`'s plan on `inputs`: whole calls, then node by node.
fn profile_state(
    executor: &tract_linalg::multithread::Executor,
    state: &mut TypedSimpleState,
    nodes: usize,
    inputs: TVec<TValue>,
    batch: usize,
    runs: usize,
) -> Result<OpProfile> {
    let failed = |e: TractError| Error::Inference(one_line(&format!("{e:#}")));
    let plan_state = state;

    for _ in 0..WARM_UP {
        run_on(executor, plan_state, inputs.clone()).map_err(failed)?;
    }
    let start = Instant::now();
    for _ in 0..runs {
        run_on(executor, plan_state, inputs.clone()).map_err(failed)?;
    }
    let call = start.elapsed() / runs as u32;

    // Per node: operator, name, total time over the runs; and its input shapes.
    let state = plan_state;
    let (per_node, mut shapes) = in_pool(executor, move || -> TractResult<_> {
        let mut per_node: HashMap<usize, (String, String, Duration)> = HashMap::new();
        let mut shapes: HashMap<usize, String> = HashMap::new();
        for _ in 0..runs {
            state.run_plan_with_eval(inputs.clone(), |ctx, op_state, node, input| {
                shapes
                    .entry(node.id)
                    .or_insert_with(|| input.iter().map(|t| format!("{:?}", t.shape())).collect::<Vec<_>>().join(" "));
                let t = Instant::now();
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                let e = per_node
                    .entry(node.id)
                    .or_insert_with(|| (node.op().name().to_string(), node.name.clone(), Duration::ZERO));
                e.2 += t.elapsed();
                out
            })?;
        }
        Ok((per_node, shapes))
    })
    .map_err(failed)?;

    let mut per_op: HashMap<String, (usize, Duration)> = HashMap::new();
    for (op, _, d) in per_node.values() {
        let e = per_op.entry(op.clone()).or_default();
        e.0 += 1;
        e.1 += *d / runs as u32;
    }
    let timed: Duration = per_op.values().map(|v| v.1).sum();
    let share = |d: Duration| if timed.is_zero() { 0.0 } else { d.as_secs_f64() / timed.as_secs_f64() };
    let mut ops: Vec<OpTime> =
        per_op.into_iter().map(|(op, (nodes, time))| OpTime { op, nodes, time, share: share(time) }).collect();
    ops.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.op.cmp(&b.op)));
    let mut slowest: Vec<NodeTime> = per_node
        .into_iter()
        .map(|(id, (op, name, d))| NodeTime {
            op,
            name,
            inputs: shapes.remove(&id).unwrap_or_default(),
            time: d / runs as u32,
        })
        .collect();
    slowest.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.name.cmp(&b.name)));
    Ok(OpProfile { batch, runs, nodes, call, timed, ops, slowest })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for OpProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} nodes, batch {}, {} runs: untimed call {:.2} ms, sum of node times {:.2} ms",
            self.nodes,
            self.batch,
            self.runs,
            ms(self.call),
            ms(self.timed)
        )?;
        writeln!(f, "{:<28} {:>6} {:>9} {:>6}", "operator", "nodes", "ms/call", "share")?;
        for op in &self.ops {
            writeln!(f, "{:<28} {:>6} {:>9.3} {:>5.1}%", op.op, op.nodes, ms(op.time), 100.0 * op.share)?;
        }
        writeln!(f, "\nslowest nodes (inputs):")?;
        // `{:#}` lists every node.
        let shown = if f.alternate() { self.slowest.len() } else { SLOWEST_SHOWN };
        for node in self.slowest.iter().take(shown) {
            writeln!(f, "{:>8.3} ms  {:<20} {} ({})", ms(node.time), node.op, node.name, node.inputs)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::ModelCard;

    #[test]
    fn profiles_the_plan_it_runs() -> Result<()> {
        let card = ModelCard::load(concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student"))?;
        let mut denoiser = Denoiser::load(&card, 1)?;
        let profile = denoiser.profile_ops(1, 2)?;
        let evaluated = profile.ops.iter().map(|op| op.nodes).sum::<usize>();
        assert!(evaluated == profile.slowest.len() && evaluated <= profile.nodes, "{profile}");
        assert!((profile.ops.iter().map(|op| op.share).sum::<f64>() - 1.0).abs() < 1e-6);
        assert!(profile.ops.windows(2).all(|w| w[0].time >= w[1].time));
        assert!(profile.ops.iter().any(|op| op.op == "GroupNorm"), "{profile}");
        let text = profile.to_string();
        assert!(text.contains("GroupNorm") && text.contains("slowest nodes"), "{text}");
        assert!(denoiser.profile_ops(1, 0).is_err());
        Ok(())
    }
}
