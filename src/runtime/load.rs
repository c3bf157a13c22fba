//! Decoding an ONNX file: the protobuf, its weight count, and its declared inputs and outputs.

use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::InferenceModel;

use crate::error::{Error, Result};

/// Description of one graph input or output, for `info`.
#[derive(Debug, Clone)]
pub struct IoInfo {
    /// Name in the ONNX graph.
    pub name: String,
    /// Element type and shape as tract reads them from the file (`?` for unknown).
    pub fact: String,
}

/// The ONNX protobuf in `bytes`; `path` labels the error.
pub(super) fn decode(bytes: &[u8], path: &std::path::Path) -> Result<ModelProto> {
    <ModelProto as prost::Message>::decode(bytes).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: one_line(&format!("not an ONNX model (protobuf decoding failed: {e})")),
    })
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
