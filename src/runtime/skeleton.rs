//! Loading a graph without the weights its plan file covers: the ONNX bytes are copied without
//! those initializers (a walk over the protobuf wire format, so their bytes are never read),
//! and each becomes a stand-in constant of its shape whose memory is never touched (a fresh
//! allocation: the OS hands out its pages only when written). The passes then take every
//! packed weight from the plan file by key and never look at a stand-in's values.
//!
//! Which initializers may be stand-ins is proven at the load that writes the plan file: the
//! plans are built again with stand-ins, one call is run on both with the same inputs, and the
//! outputs must agree bit for bit. That runs in passes, each filling a share of the stand-ins
//! with NaN ([`PROOF_PASS_BYTES`]), so that each stand-in is NaN in one of them. The plan file records the names and
//! the builds (batch and input shapes) that were proven; a later load uses stand-ins only for
//! those builds.

use std::collections::HashSet;
use std::ops::Range;

use anyhow::Context;

use super::plan_file::Source;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_hir::infer::InferenceModel;

/// An initializer left out of the bytes: its name, ONNX element type and shape.
#[derive(Debug, Clone)]
pub(super) struct StandIn {
    pub name: String,
    pub data_type: i32,
    pub dims: Vec<usize>,
    /// The file of its external data, if any.
    pub location: Option<String>,
}

fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One field of a message: its number, wire type, the whole field's bytes, and for a
/// length-delimited field its payload.
struct Field<'a> {
    number: u64,
    whole: &'a [u8],
    payload: Option<&'a [u8]>,
    value: u64,
}

fn fields(bytes: &[u8]) -> impl Iterator<Item = Option<Field<'_>>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let start = at;
        let field = (|| {
            let key = varint(bytes, &mut at)?;
            let (number, wire) = (key >> 3, key & 7);
            let (payload, value) = match wire {
                0 => (None, varint(bytes, &mut at)?),
                1 => {
                    at = at.checked_add(8).filter(|&e| e <= bytes.len())?;
                    (None, 0)
                }
                2 => {
                    let len = varint(bytes, &mut at)? as usize;
                    let end = at.checked_add(len).filter(|&e| e <= bytes.len())?;
                    let p = &bytes[at..end];
                    at = end;
                    (Some(p), 0)
                }
                5 => {
                    at = at.checked_add(4).filter(|&e| e <= bytes.len())?;
                    (None, 0)
                }
                _ => return None,
            };
            Some(Field { number, whole: &bytes[start..at], payload, value })
        })();
        if field.is_none() {
            at = bytes.len();
        }
        Some(field)
    })
}

/// The name, element type and shape of a TensorProto, without reading its data.
fn tensor_head(bytes: &[u8]) -> Option<StandIn> {
    let (mut name, mut data_type, mut dims, mut location) = (None, 0, vec![], None);
    for f in fields(bytes) {
        let f = f?;
        match (f.number, f.payload) {
            (1, None) => dims.push(f.value as usize),
            (1, Some(packed)) => {
                let mut at = 0;
                while at < packed.len() {
                    dims.push(varint(packed, &mut at)? as usize);
                }
            }
            (2, None) => data_type = f.value as i32,
            (8, Some(n)) => name = Some(String::from_utf8(n.to_vec()).ok()?),
            (13, Some(entry)) => {
                let (mut key, mut value) = (None, None);
                for e in fields(entry) {
                    match e? {
                        Field { number: 1, payload: Some(k), .. } => key = Some(k),
                        Field { number: 2, payload: Some(v), .. } => value = Some(v),
                        _ => {}
                    }
                }
                if key == Some(b"location".as_slice()) {
                    location = value.and_then(|v| String::from_utf8(v.to_vec()).ok());
                }
            }
            _ => {}
        }
    }
    Some(StandIn { name: name?, data_type, dims, location })
}

/// The ONNX file at `path`, memory-mapped; the initializers [`scan`] finds in it (`None` when
/// the walk does not understand the bytes); and its identity for a plan file, whose hash is
/// computed only when needed.
pub(super) fn map_source(
    path: &std::path::Path,
) -> crate::error::Result<(Arc<memmap2::Mmap>, Option<Vec<StandIn>>, Source)> {
    let (map, stat) = super::load::map_onnx(path)?;
    let map = Arc::new(map);
    let heads = scan(&map);
    let locations = heads.iter().flatten().filter_map(|h| h.location.as_deref());
    let external = super::load::external_paths(locations, path.parent());
    let stat = stat.map(|s| s.with_external(&external));
    Ok((map.clone(), heads, Source::mapped(map, external, stat)))
}

/// The heads of the graph initializers of the ONNX file `bytes` (their data is not read);
/// `None` when the bytes are not a protobuf this walk understands.
pub(super) fn scan(bytes: &[u8]) -> Option<Vec<StandIn>> {
    let mut heads = vec![];
    for f in fields(bytes) {
        let f = f?;
        if let (7, Some(graph)) = (f.number, f.payload) {
            for g in fields(graph) {
                let g = g?;
                if let (5, Some(tensor)) = (g.number, g.payload) {
                    heads.push(tensor_head(tensor)?);
                }
            }
        }
    }
    Some(heads)
}

/// The ONNX file `bytes` without the float32 graph initializers named in `names`, and what
/// each left out was; `None` when the bytes are not a protobuf this walk understands.
pub(super) fn strip(bytes: &[u8], names: &HashSet<String>) -> Option<(Vec<u8>, Vec<StandIn>)> {
    let mut out = Vec::with_capacity(1 << 16);
    let mut left_out = vec![];
    for f in fields(bytes) {
        let f = f?;
        let (7, Some(graph)) = (f.number, f.payload) else {
            out.extend_from_slice(f.whole);
            continue;
        };
        let mut kept = Vec::with_capacity(graph.len().min(1 << 20));
        for g in fields(graph) {
            let g = g?;
            if let (5, Some(tensor)) = (g.number, g.payload) {
                let head = tensor_head(tensor)?;
                // Our operators pack float32 weights only.
                if names.contains(&head.name) && head.data_type == 1 {
                    left_out.push(head);
                    continue;
                }
            }
            kept.extend_from_slice(g.whole);
        }
        put_varint(&mut out, (7 << 3) | 2);
        put_varint(&mut out, kept.len() as u64);
        out.extend_from_slice(&kept);
    }
    Some((out, left_out))
}

/// Turns the sources tract made for the left-out initializers into constants of their shape
/// and drops them from the graph's inputs. Fails when one of them is missing or not float32.
///
/// Each stand-in's first value is a huge number of its own and the rest is never written, so
/// its pages stay unallocated; the stand-ins whose index is in `poison` have the rest filled
/// with NaN, to prove that nothing reads them. Distinct first values matter: tract merges equal
/// constants (all NaNs compare equal to it), and then equal products of one input, which would
/// make two layers one.
pub(super) fn install(model: &mut InferenceModel, stand_ins: &[StandIn], poison: Range<usize>) -> TractResult<()> {
    let inputs = model.input_outlets()?.to_vec();
    let mut replaced = HashSet::new();
    for (i, s) in stand_ins.iter().enumerate() {
        anyhow::ensure!(s.data_type == 1, "initializer {}: not float32", s.name);
        let outlet = inputs
            .iter()
            .find(|o| model.node(o.node).name == s.name)
            .with_context(|| format!("initializer {} is read by no node", s.name))?;
        // SAFETY: the values are never read unless `poison` fills them first: every reader is
        // proven to take the packed weights from the plan file instead (see the module docs).
        let mut tensor = unsafe { Tensor::uninitialized::<f32>(&s.dims)? };
        {
            let mut plain = tensor.try_as_plain_ram_mut()?;
            if let [first, rest @ ..] = plain.as_slice_mut::<f32>()? {
                *first = f32::MAX / (i + 2) as f32;
                if poison.contains(&i) {
                    rest.fill(f32::NAN);
                }
            }
        }
        let tensor = tensor.into_arc_tensor();
        let mut fact = InferenceFact::dt_shape(f32::datum_type(), &s.dims);
        fact.value = tensor.clone().into();
        let node = model.node_mut(outlet.node);
        node.op = Box::new(Const::new(tensor)?);
        node.outputs[0].fact = fact;
        replaced.insert(outlet.node);
    }
    let kept: Vec<OutletId> = inputs.into_iter().filter(|o| !replaced.contains(&o.node)).collect();
    model.set_input_outlets(&kept)?;
    Ok(())
}

/// The graph of the ONNX file `bytes` (at `path`) without the initializers named in `names`,
/// each replaced by a stand-in ([`install`]; those whose index in the file's order is in
/// `poison` full of NaN); its parameter count, and the names left out. `None` when the names
/// do not fit the file (it lacks one, or one is not float32) or the rest does not parse.
pub(super) fn without(
    bytes: &[u8],
    path: &std::path::Path,
    names: &HashSet<String>,
    poison: Range<usize>,
) -> Option<(InferenceModel, usize, Vec<String>)> {
    let (stripped, stand_ins) = strip(bytes, names)?;
    if stand_ins.is_empty() {
        return None;
    }
    let proto = super::load::decode(&stripped, path).ok()?;
    drop(stripped);
    let left_out: usize = stand_ins.iter().map(|s| s.dims.iter().product::<usize>()).sum();
    let mut model = super::load::parse_leaving_out(&proto, path.parent(), names).ok()?;
    let params = super::load::count_params(&proto) + left_out;
    drop(proto);
    install(&mut model, &stand_ins, poison).ok()?;
    let mut names: Vec<String> = stand_ins.into_iter().map(|s| s.name).collect();
    names.sort();
    Some((model, params, names))
}

/// The most bytes of stand-ins one proof pass fills with NaN (a single larger stand-in gets a
/// pass of its own): the poisoned copies are extra memory at the load that writes the plan
/// file, on top of every weight packed that load, and for the SD-Turbo UNet (3.5 GB of
/// stand-ins) they set that load's peak. A test build uses small passes, so that the unit
/// tests run the proof in several.
#[cfg(not(test))]
pub(super) const PROOF_PASS_BYTES: usize = 512 << 20;
#[cfg(test)]
pub(super) const PROOF_PASS_BYTES: usize = 64 << 10;

/// The stand-ins that [`without`] makes of `names` in the ONNX file `bytes`, cut in the file's
/// order into runs of at most `budget` bytes: what each proof pass poisons. `None` when the
/// bytes are not a protobuf the walk understands.
pub(super) fn proof_passes(bytes: &[u8], names: &HashSet<String>, budget: usize) -> Option<Vec<Range<usize>>> {
    let heads = scan(bytes)?;
    let sizes = heads.iter().filter(|h| names.contains(&h.name) && h.data_type == 1);
    Some(runs_within(sizes.map(|h| h.dims.iter().product::<usize>() * 4), budget))
}

/// Runs the proof's passes over the ONNX file at `path` ([`proof_passes`]): each pass's graph,
/// without the initializers `names` and with its share of the stand-ins full of NaN
/// ([`without`]), goes to `agrees`, which builds and runs it and says whether its outputs are
/// bit for bit the plan's. The stand-ins' names when every pass agrees; `None` when one does
/// not, or when the names do not fit the file.
pub(super) fn prove_in_passes<E: From<crate::error::Error>>(
    path: &std::path::Path,
    names: &HashSet<String>,
    mut agrees: impl FnMut(InferenceModel) -> Result<bool, E>,
) -> Result<Option<Vec<String>>, E> {
    let (map, _) = super::load::map_onnx(path)?;
    let passes = proof_passes(&map, names, PROOF_PASS_BYTES).unwrap_or_default();
    drop(map);
    let mut stand_ins = None;
    for poison in passes {
        // The map is dropped before each build: the pages its walk touched would count in the
        // load's peak.
        let (map, _) = super::load::map_onnx(path)?;
        let Some((model, _, left_out)) = without(&map, path, names, poison) else { return Ok(None) };
        drop(map);
        if !agrees(model)? {
            return Ok(None);
        }
        stand_ins = Some(left_out);
    }
    Ok(stand_ins)
}

/// Consecutive index ranges over `sizes`, each adding up to at most `budget` unless it is one
/// element alone.
fn runs_within(sizes: impl IntoIterator<Item = usize>, budget: usize) -> Vec<Range<usize>> {
    let (mut runs, mut start, mut bytes, mut count) = (vec![], 0, 0, 0);
    for (i, size) in sizes.into_iter().enumerate() {
        if i > start && bytes + size > budget {
            runs.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
        count = i + 1;
    }
    if count > start {
        runs.push(start..count);
    }
    runs
}

/// The initializer names of `origins` (the typed constants the packed weights came from):
/// tract names the constant of initializer `w` `w.0`.
pub(super) fn initializer_names(origins: &HashSet<String>) -> HashSet<String> {
    origins.iter().map(|o| o.strip_suffix(".0").unwrap_or(o).to_string()).chain(origins.iter().cloned()).collect()
}

/// Whether two calls' outputs agree bit for bit.
pub(super) fn same_outputs(a: &[TValue], b: &[TValue]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.datum_type() == b.datum_type() && a.shape() == b.shape() && a.as_bytes() == b.as_bytes())
}

/// Inputs for a proof call: every float input filled with a fixed pattern in [-1, 1], every
/// other one with zeros.
pub(super) fn probe_inputs(model: &TypedModel) -> TractResult<TVec<TValue>> {
    let mut values = tvec![];
    for i in 0..model.input_outlets()?.len() {
        let fact = model.input_fact(i)?;
        let shape = fact.shape.as_concrete().context("a proof call needs concrete input shapes")?;
        let n: usize = shape.iter().product();
        let pattern = |k: usize| ((k * 7919 % 2003) as f32 / 1001.0) - 1.0;
        let tensor = match fact.datum_type {
            DatumType::F32 => Tensor::from_shape(shape, &(0..n).map(pattern).collect::<Vec<_>>())?,
            DatumType::F16 => {
                Tensor::from_shape(shape, &(0..n).map(|k| f16::from_f32(pattern(k))).collect::<Vec<_>>())?
            }
            dt => Tensor::zero_dt(dt, shape)?,
        };
        values.push(tensor.into_tvalue());
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        put_varint(&mut out, (number << 3) | 2);
        put_varint(&mut out, payload.len() as u64);
        out.extend_from_slice(payload);
        out
    }

    fn tensor(name: &str, dims: &[u64], data: &[u8]) -> Vec<u8> {
        let mut t = vec![];
        for &d in dims {
            put_varint(&mut t, 1 << 3);
            put_varint(&mut t, d);
        }
        put_varint(&mut t, 2 << 3);
        put_varint(&mut t, 1);
        t.extend(field(8, name.as_bytes()));
        t.extend(field(9, data));
        t
    }

    #[test]
    fn proof_passes_cover_every_stand_in_once_within_the_budget() {
        let sizes = [40, 30, 50, 200, 10, 10, 10];
        let runs = runs_within(sizes, 80);
        assert_eq!(runs, vec![0..2, 2..3, 3..4, 4..7]);
        assert_eq!(runs_within([], 80), Vec::<Range<usize>>::new());
        assert_eq!(runs_within(sizes, usize::MAX), vec![0..7]);
    }

    #[test]
    fn strip_leaves_out_the_named_initializers_and_keeps_every_other_byte() {
        let (a, b) = (tensor("a", &[2, 3], &[1; 24]), tensor("b", &[4], &[2; 16]));
        let node = field(1, b"a node");
        let graph = [field(1, &node), field(5, &a), field(5, &b)].concat();
        let model = [vec![8, 7], field(7, &graph), field(20, b"tail")].concat();
        let names: HashSet<String> = ["a".to_string()].into();
        let (out, left) = strip(&model, &names).expect("a protobuf");
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].name.as_str(), left[0].data_type, left[0].dims.clone()), ("a", 1, vec![2, 3]));
        let graph_kept = [field(1, &node), field(5, &b)].concat();
        assert_eq!(out, [vec![8, 7], field(7, &graph_kept), field(20, b"tail")].concat());
        let (same, none) = strip(&model, &HashSet::new()).unwrap();
        assert_eq!((same, none.len()), (model.clone(), 0));
        assert!(strip(&model[..model.len() - 2], &names).is_none(), "a cut message is refused");
    }
}
