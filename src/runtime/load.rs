//! Decoding an ONNX file: the protobuf, its weight count, and its declared inputs and outputs.

use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::InferenceModel;

use std::path::Path;

use super::plan_file::{FileStat, SourceId};
use crate::error::{Error, Result};

/// Description of one graph input or output, for `info`.
#[derive(Debug, Clone)]
pub struct IoInfo {
    /// Name in the ONNX graph.
    pub name: String,
    /// Element type and shape as tract reads them from the file (`?` for unknown).
    pub fact: String,
}

/// The ONNX file at `path`, memory-mapped, and its [`FileStat`] from before the map (without
/// its external data: [`FileStat::with_external`]).
pub(super) fn map_onnx(path: &Path) -> Result<(memmap2::Mmap, Option<FileStat>)> {
    if path.is_dir() {
        return Err(Error::Model { path: path.to_path_buf(), message: "is a directory, expected an ONNX file".into() });
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let stat = FileStat::of(&meta);
    if meta.len() == 0 {
        return Err(Error::Model { path: path.to_path_buf(), message: "the ONNX file is empty".into() });
    }
    // SAFETY: the callers read the map while they decode the file and drop it before they
    // return, so a later change to the file cannot reach memory tract holds. A file truncated
    // by another process *during* decoding would raise SIGBUS (see docs/model-card.md).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok((map, stat))
}

/// The ONNX protobuf of the file at `path`, decoded from a memory map, and the file's identity
/// for its plan file.
pub(super) fn read_proto(path: &Path) -> Result<(ModelProto, SourceId)> {
    let (map, stat) = map_onnx(path)?;
    // The decoded protobuf holds its own copy of the weights: unmapping the file on return
    // keeps its pages out of the resident set while tract converts them (the load's peak was
    // file + protobuf + tract's tensors, 3× the weights).
    let proto = decode(&map, path)?;
    let locations = proto.graph.iter().flat_map(|g| &g.initializer).flat_map(|t| &t.external_data);
    let locations = locations.filter(|kv| kv.key == "location").map(|kv| kv.value.as_str());
    let external = external_paths(locations, path.parent());
    let source = SourceId::of(&map, &external, stat.map(|s| s.with_external(&external)));
    Ok((proto, source))
}

/// The files of external data named by `locations`, resolved against `dir` (the ONNX file's
/// folder), sorted, each once.
pub(super) fn external_paths<'a>(
    locations: impl Iterator<Item = &'a str>,
    dir: Option<&Path>,
) -> Vec<std::path::PathBuf> {
    let mut files: Vec<std::path::PathBuf> = locations.map(|l| dir.unwrap_or(Path::new("")).join(l)).collect();
    files.sort();
    files.dedup();
    files
}

/// The ONNX protobuf in `bytes`; `path` labels the error.
pub(super) fn decode(bytes: &[u8], path: &std::path::Path) -> Result<ModelProto> {
    <ModelProto as prost::Message>::decode(bytes).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: one_line(&format!("not an ONNX model (protobuf decoding failed: {e})")),
    })
}

/// The graph of `proto`, with tensors stored as external data read from `dir` (the folder of the
/// ONNX file; ONNX resolves `location` against it). `None` for a model held in memory: one with
/// external data then fails to load.
pub(super) fn parse(proto: &ModelProto, dir: Option<&std::path::Path>) -> TractResult<InferenceModel> {
    parse_leaving_out(proto, dir, &Default::default())
}

/// [`parse`], where the values named in `left_out` (initializers left out of the file,
/// `super::skeleton`) may be undefined: tract makes a source of each.
pub(super) fn parse_leaving_out(
    proto: &ModelProto,
    dir: Option<&std::path::Path>,
    left_out: &std::collections::HashSet<String>,
) -> TractResult<InferenceModel> {
    // tract takes the folder as `&str`; an empty parent (a bare file name) means the working
    // directory to tract as to the OS.
    let dir = match dir {
        Some(d) => Some(d.to_str().ok_or_else(|| anyhow::anyhow!("the model's folder {d:?} is not valid UTF-8"))?),
        None => None,
    };
    let parsed = tract_onnx::onnx().parse(proto, dir)?;
    let undefined: Vec<&String> = parsed.unresolved_inputs.iter().filter(|n| !left_out.contains(*n)).collect();
    if !undefined.is_empty() {
        anyhow::bail!("the graph uses values it never defines: {undefined:?}");
    }
    Ok(parsed.model)
}

pub(super) fn count_params(proto: &ModelProto) -> usize {
    let Some(g) = &proto.graph else { return 0 };
    g.initializer.iter().map(|t| t.dims.iter().product::<i64>().max(0) as usize).sum()
}

pub(super) fn input_names(model: &InferenceModel) -> Vec<String> {
    model.input_outlets().map(|outs| outs.iter().map(|o| model.node(o.node).name.clone()).collect()).unwrap_or_default()
}

pub(super) fn describe(model: &InferenceModel) -> (Vec<IoInfo>, Vec<IoInfo>) {
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

pub(super) fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}
