//! Where a denoiser call spends its time: runs the optimized tract plan of a model at batch 1 and
//! times every node, then prints the time per operator kind (and the slowest nodes).
//!
//!     cargo run --release --example profile_ops -- models/fmnist-teacher [runs]
//!
//! Timing each node adds a little overhead per node; the total is printed next to an untimed run.
//! `PROFILE_BATCH=2` profiles a batch of 2 (a guided step in one call).
//! `PROFILE_THREADS=2` runs it on tract's rayon pool of that many threads, as `--threads 2` does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edge_diffuse::card::ModelCard;
use tract_onnx::prelude::*;
use tract_onnx::tract_core;
use tract_onnx::tract_hir::infer::Factoid;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().context("usage: profile_ops MODEL_DIR [RUNS]")?;
    let runs: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(20);
    let card = ModelCard::load(std::path::Path::new(&dir))?;
    let mut model = tract_onnx::onnx().model_for_path(card.onnx_path())?;
    let [c, h, w] = [card.image.channels, card.image.height, card.image.width];
    // `PROFILE_BATCH=2`: the batch of a guided step run as one call (conditional + null class).
    let n = env_usize("PROFILE_BATCH")?.unwrap_or(1);
    let names: Vec<String> = model.input_outlets()?.iter().map(|o| model.node(o.node).name.clone()).collect();
    let mut inputs: TVec<TValue> = tvec![];
    for (ix, name) in names.iter().enumerate() {
        let t: Tensor = if *name == card.model.inputs.sample {
            Tensor::from(tract_ndarray::Array4::<f32>::from_elem((n, c, h, w), 0.3))
        } else if *name == card.model.inputs.timestep {
            let dt = model.input_fact(ix)?.datum_type.concretize().unwrap_or(f32::datum_type());
            tensor1(&vec![500f32; n]).cast_to_dt(dt)?.into_owned()
        } else {
            tensor1(&vec![1i64; n])
        };
        model.set_input_fact(ix, InferenceFact::dt_shape(t.datum_type(), t.shape()))?;
        inputs.push(t.into_tvalue());
    }
    // The load-time rewrites the runtime applies (see `Denoiser`), so this profiles what it runs;
    // `PROFILE_IM2COL=1` leaves the convolutions to tract.
    let ours = std::env::var_os("PROFILE_IM2COL").is_none();
    let typed = edge_diffuse::denoiser::f32_rewrites(model.into_typed()?, ours)?.model;
    let mut typed = typed.into_optimized()?;
    edge_diffuse::denoiser::contiguous_constants(&mut typed)?;
    let threads = env_usize("PROFILE_THREADS")?.unwrap_or(1);
    #[cfg(not(feature = "multithread"))]
    anyhow::ensure!(threads <= 1, "PROFILE_THREADS needs the multithread feature");
    #[cfg(feature = "multithread")]
    if threads > 1 {
        use tract_linalg::multithread as mt;
        // tract's gates for threading a product or an elementwise op, to try other values.
        if let Some(v) = env_usize("PROFILE_PANEL_THRESHOLD")? {
            mt::set_threading_panel_threshold(v);
        }
        if let Some(v) = env_usize("PROFILE_MAC_THRESHOLD")? {
            mt::set_threading_mac_threshold(v);
        }
        if let Some(v) = env_usize("PROFILE_ELEMENT_THRESHOLD")? {
            mt::set_threading_element_threshold(v);
        }
        // As the runtime runs a plan: on a worker of the pool, with the pool as tract's executor
        // there (the executor is thread-local, so it is set inside the worker).
        use mt::{multithread_tract_scope, Executor};
        let pool = Executor::multithread(threads);
        let Executor::MultiThread(workers) = &pool else { unreachable!("a multithread executor") };
        return workers.install(|| {
            multithread_tract_scope(pool.clone(), || {
                edge_diffuse::denoiser::with_spinning_workers(|| profile(&dir, typed, inputs, runs))
            })
        });
    }
    profile(&dir, typed, inputs, runs)
}

fn profile(dir: &str, typed: TypedModel, inputs: TVec<TValue>, runs: usize) -> Result<()> {
    let plan = typed.into_runnable()?;
    let mut state = TypedSimpleState::new(&plan)?;
    edge_diffuse::winograd::install_scratch(&mut state);
    for _ in 0..3 {
        state.run(inputs.clone())?;
    }
    let t0 = Instant::now();
    for _ in 0..runs {
        state.run(inputs.clone())?;
    }
    let plain = t0.elapsed() / runs as u32;

    let mut per_node: HashMap<usize, (String, String, Duration)> = HashMap::new();
    let mut shapes: HashMap<usize, String> = HashMap::new();
    for _ in 0..runs {
        state.run_plan_with_eval(inputs.clone(), |ctx, op_state, node, input| {
            shapes
                .entry(node.id)
                .or_insert_with(|| input.iter().map(|t| format!("{:?}", t.shape())).collect::<Vec<_>>().join(" "));
            let t = Instant::now();
            let out = tract_core::plan::eval(ctx, op_state, node, input);
            let e = per_node
                .entry(node.id)
                .or_insert_with(|| (node.op().name().to_string(), node.name.clone(), Duration::ZERO));
            e.2 += t.elapsed();
            out
        })?;
    }
    let mut per_op: HashMap<String, (usize, Duration)> = HashMap::new();
    for (op, _, d) in per_node.values() {
        let e = per_op.entry(op.clone()).or_default();
        e.0 += 1;
        e.1 += *d / runs as u32;
    }
    let total: Duration = per_op.values().map(|v| v.1).sum();
    let mut ops: Vec<_> = per_op.into_iter().collect();
    ops.sort_by_key(|o| std::cmp::Reverse(o.1 .1));
    println!(
        "{dir}: {} nodes; untimed call {:.2} ms, sum of node times {:.2} ms",
        plan.model().nodes().len(),
        ms(plain),
        ms(total)
    );
    println!("{:<28} {:>6} {:>9} {:>6}", "operator", "nodes", "ms/call", "share");
    for (op, (n, d)) in &ops {
        println!("{op:<28} {n:>6} {:>9.3} {:>5.1}%", ms(*d), 100.0 * d.as_secs_f64() / total.as_secs_f64());
    }
    let mut nodes: Vec<_> = per_node.into_iter().collect();
    nodes.sort_by_key(|n| std::cmp::Reverse(n.1 .2));
    println!("\nslowest nodes (inputs):");
    // `PROFILE_TOP=N` lists N nodes; `PROFILE_OP=name` only those of one operator.
    let top = env_usize("PROFILE_TOP")?.unwrap_or(15);
    let only = std::env::var("PROFILE_OP").ok();
    let listed = nodes.iter().filter(|n| only.as_deref().is_none_or(|o| n.1 .0 == o));
    for (id, (op, name, d)) in listed.take(top) {
        println!("{:>8.3} ms  {op:<20} {name} ({})", ms(*d / runs as u32), shapes.get(id).map_or("", |s| s));
    }
    Ok(())
}

/// An optional numeric setting from the environment; a value that is not a number is an error.
fn env_usize(name: &str) -> Result<Option<usize>> {
    std::env::var(name).ok().map(|v| v.parse().with_context(|| format!("{name}={v}: not a number"))).transpose()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
