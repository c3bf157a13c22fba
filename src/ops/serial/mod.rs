//! Our operators in tract's NNEF form, so that a rewritten graph (tract's operators and ours,
//! before tract's optimization) can be kept in a plan file and read back: a later load then
//! skips the ONNX decode, typing, declutter and our passes, which are most of a load.
//!
//! The graph is tract's NNEF syntax tree, kept in binary form ([`ast`]) rather than as NNEF
//! text: tract's parser reads a few MB/s, and parsing the text was most of a read. Its constant
//! tensors are in tract's `.dat` form.
//!
//! Each operator of ours is one invocation `edge_diffuse_op(inputs = [...], op = N)`: its
//! inputs, and its place in a table of our operators kept beside the tree. The table is JSON for
//! the settings and raw float32 for the constant tensors (biases, norms' scales), which the
//! JSON names by their place. Packed weights are written as their [`Packer`] key alone and read
//! back through the packer of the plan file: a graph read back holds no weight of ours on the
//! heap.
//!
//! Layout of [`write`]'s bytes (little-endian): the tree's length (u64) and the tree; the count
//! of tract's tensors (u64), then each one's name ([`ast`]'s string form), length (u64) and
//! `.dat` bytes; the table's length (u64) and the table (JSON); the count of our tensors (u64),
//! then each one's rank (u64), dimensions (u64 each) and values (f32 each).

mod ast;

use std::cell::RefCell;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tract_nnef::internal::*;
use tract_onnx::WithOnnx;

use self::ast::Code;
use super::packed::{Packed, Packer};

/// One of our operators, as saved.
#[derive(Serialize, Deserialize)]
enum Saved {
    #[cfg(target_arch = "x86_64")]
    Attention(super::attention::Attention),
    #[cfg(own_gemm)]
    Pointwise(super::direct_conv::Pointwise),
    Embedding(super::embedding::Embedding),
    #[cfg(target_arch = "x86_64")]
    Gelu(super::gelu::Gelu),
    GroupNorm(super::group_norm::GroupNorm),
    LayerNorm(super::layer_norm::LayerNorm),
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    Linear(super::linear::Linear),
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    RowSoftmax(super::softmax::RowSoftmax),
    Winograd3x3(super::winograd3x3::Winograd3x3),
}

/// Registers `$op`'s dumper, and converts between it and [`Saved`].
macro_rules! saved {
    ($($(#[$cfg:meta])* $op:ident: $ty:ty;)*) => {
        impl Saved {
            fn into_op(self) -> Box<dyn TypedOp> {
                match self {
                    $($(#[$cfg])* Saved::$op(op) => Box::new(op),)*
                }
            }
        }

        fn register_dumpers(registry: &mut Registry) {
            $($(#[$cfg])* registry.register_dumper::<$ty>(|ast, node, op| dump(ast, node, Saved::$op(op.clone())));)*
        }
    };
}

saved! {
    #[cfg(target_arch = "x86_64")] Attention: super::attention::Attention;
    #[cfg(own_gemm)] Pointwise: super::direct_conv::Pointwise;
    Embedding: super::embedding::Embedding;
    #[cfg(target_arch = "x86_64")] Gelu: super::gelu::Gelu;
    GroupNorm: super::group_norm::GroupNorm;
    LayerNorm: super::layer_norm::LayerNorm;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))] Linear: super::linear::Linear;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))] RowSoftmax: super::softmax::RowSoftmax;
    Winograd3x3: super::winograd3x3::Winograd3x3;
}

const INVOCATION: &str = "edge_diffuse_op";

fn dump(ast: &mut IntoAst, node: &TypedNode, op: Saved) -> TractResult<Option<Arc<RValue>>> {
    let inputs: Vec<RValue> = node.inputs.iter().map(|i| (*ast.mapping[i]).clone()).collect();
    let value = serde_json::to_value(&op).map_err(|e| anyhow::anyhow!("saving {}: {e}", node.name))?;
    let place = SIDE.with(|side| {
        let mut side = side.borrow_mut();
        side.ops.push(value);
        side.ops.len() - 1
    });
    let args = [("inputs", tract_nnef::ser::array(inputs)), ("op", tract_nnef::ser::numeric(place))];
    Ok(Some(invocation(INVOCATION, &[], &args)))
}

fn load(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let inputs: TVec<OutletId> = invocation.named_arg_as(builder, "inputs")?;
    let place: usize = invocation.named_arg_as(builder, "op")?;
    let value = SIDE.with(|side| side.borrow().ops.get(place).cloned());
    let value = value.with_context(|| format!("edge_diffuse_op: no operator {place} in the table"))?;
    let saved = serde_json::from_value::<Saved>(value).map_err(|e| anyhow::anyhow!("edge_diffuse_op {place}: {e}"))?;
    builder.wire(saved.into_op(), &inputs)
}

fn registry() -> Registry {
    let mut registry = Registry::new("edge_diffuse");
    register_dumpers(&mut registry);
    registry.register_primitive(
        INVOCATION,
        &[TypeName::Scalar.tensor().array().named("inputs"), TypeName::Integer.named("op")],
        &[("output", TypeName::Scalar.tensor())],
        load,
    );
    registry
}

fn framework() -> Nnef {
    // tract's default parses its standard library into a field that reading and writing never
    // use (its registry parses it again for the declarations): a few ms of every read.
    let framework = Nnef {
        stdlib: vec![],
        registries: vec![tract_nnef::ops::tract_nnef(), tract_nnef::ops::tract_core()],
        resource_loaders: vec![
            GraphNnefLoader.into_boxed(),
            DatLoader.into_boxed(),
            GraphQuantLoader.into_boxed(),
            TypedModelLoader::new(false).into_boxed(),
        ],
        allow_extended_identifier_syntax: false,
        extern_all_constants: false,
    };
    framework.with_onnx().with_registry(registry())
}

/// The table of our operators beside an archive: their settings, and their constant tensors.
#[derive(Default)]
struct Side {
    ops: Vec<serde_json::Value>,
    tensors: Vec<Arc<Tensor>>,
    /// The packer that [`read`] takes weights from.
    packer: Option<Arc<Packer>>,
}

thread_local! {
    /// The table of the graph being written or read on this thread.
    static SIDE: RefCell<Side> = RefCell::new(Side::default());
}

/// Empties [`SIDE`] when dropped, however the write or read ends.
struct Clear;

impl Drop for Clear {
    fn drop(&mut self) {
        SIDE.with(|side| *side.borrow_mut() = Side::default());
    }
}

/// `model` in NNEF form with our operators' table (see the module docs); an error when an
/// operator has no NNEF form, or weights of ours that no key names.
pub(crate) fn write(model: &TypedModel) -> TractResult<Vec<u8>> {
    let _clear = Clear;
    SIDE.with(|side| *side.borrow_mut() = Side::default());
    // Short names: the text is a third as long, and parsing it is most of a read. The inputs
    // keep theirs, which the bindings name.
    let mut model = model.clone();
    let sources: Vec<usize> = model.input_outlets()?.iter().map(|o| o.node).collect();
    for node in model.nodes.iter_mut().filter(|n| !sources.contains(&n.id)) {
        node.name = format!("n{}", node.id);
    }
    let proto = tract_nnef::ser::to_proto_model(&framework(), &model)?;
    ensure!(
        proto.quantization.as_ref().is_none_or(|q| q.is_empty()) && proto.resources.is_empty(),
        "a graph with quantization or resources, which a saved graph does not hold"
    );
    let side = SIDE.with(|side| std::mem::take(&mut *side.borrow_mut()));
    let mut tree = vec![];
    proto.doc.put(&mut tree);
    let mut out = Vec::with_capacity(tree.len() + 1024);
    let part = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    part(&mut out, &tree);
    // Sorted by name: a graph written again has the same bytes.
    let mut names: Vec<&Identifier> = proto.tensors.keys().collect();
    names.sort();
    out.extend_from_slice(&(names.len() as u64).to_le_bytes());
    for name in names {
        name.put(&mut out);
        let mut dat = vec![];
        tract_nnef::tensors::write_tensor(&mut dat, &proto.tensors[name])?;
        part(&mut out, &dat);
    }
    part(&mut out, &serde_json::to_vec(&side.ops)?);
    out.extend_from_slice(&(side.tensors.len() as u64).to_le_bytes());
    for t in &side.tensors {
        out.extend_from_slice(&(t.rank() as u64).to_le_bytes());
        t.shape().iter().for_each(|&d| out.extend_from_slice(&(d as u64).to_le_bytes()));
        let values = t.try_as_plain_ram()?;
        values.as_slice::<f32>()?.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    }
    Ok(out)
}

/// Reads [`write`]'s bytes, in order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> TractResult<&'a [u8]> {
        ensure!(n <= self.0.len(), "a saved graph cut short");
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// Reads one [`ast::Code`] value from the front.
    fn with_in<T>(&mut self, read: impl FnOnce(&mut ast::In<'a>) -> TractResult<T>) -> TractResult<T> {
        let mut r = ast::In::new(self.0);
        let value = read(&mut r)?;
        self.0 = r.rest();
        Ok(value)
    }

    fn word(&mut self) -> TractResult<usize> {
        let bytes = self.take(8)?.try_into().expect("8 bytes");
        usize::try_from(u64::from_le_bytes(bytes)).context("a saved graph's length beyond this target")
    }

    fn tensor(&mut self) -> TractResult<Arc<Tensor>> {
        let rank = self.word()?;
        ensure!(rank <= 8, "a saved tensor of rank {rank}");
        let shape = (0..rank).map(|_| self.word()).collect::<TractResult<Vec<usize>>>()?;
        let len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).context("a saved tensor too large")?;
        let bytes = self.take(len.checked_mul(4).context("a saved tensor too large")?)?;
        let values: Vec<f32> =
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        Ok(Arc::new(Tensor::from_shape(&shape, &values)?))
    }
}

/// The graph [`write`] wrote, its packed weights taken from `packer` by key.
pub(crate) fn read(bytes: &[u8], packer: &Arc<Packer>) -> TractResult<TypedModel> {
    let mut r = Reader(bytes);
    let n = r.word()?;
    let mut tree = ast::In::new(r.take(n)?);
    let doc = tract_nnef::ast::Document::get(&mut tree)?;
    ensure!(tree.is_empty(), "a saved graph's tree with bytes after its end");
    let mut nnef_tensors = HashMap::new();
    for _ in 0..r.word()? {
        let name = r.with_in(Identifier::get)?;
        let n = r.word()?;
        let tensor = tract_nnef::tensors::read_tensor(r.take(n)?)?;
        nnef_tensors.insert(name, Arc::new(tensor));
    }
    let n = r.word()?;
    let ops: Vec<serde_json::Value> = serde_json::from_slice(r.take(n)?)?;
    let tensors = (0..r.word()?).map(|_| r.tensor()).collect::<TractResult<Vec<_>>>()?;
    ensure!(r.0.is_empty(), "a saved graph with bytes after its end");
    let _clear = Clear;
    SIDE.with(|side| *side.borrow_mut() = Side { ops, tensors, packer: Some(packer.clone()) });
    let proto = tract_nnef::ProtoModel { doc, tensors: nnef_tensors, quantization: None, resources: HashMap::new() };
    proto.validate()?;
    framework().model_for_proto_model(&proto)
}

impl Serialize for Packed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.key().ok_or_else(|| serde::ser::Error::custom("packed weights without a key"))?.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Packed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let key = String::deserialize(d)?;
        SIDE.with(|side| side.borrow().packer.as_ref().and_then(|p| p.stored(&key)))
            .ok_or_else(|| serde::de::Error::custom(format!("no weights {key:?} in the plan file")))
    }
}

/// serde for `TVec`s, as sequences.
pub(crate) mod tvec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use tract_onnx::prelude::TVec;

    pub(crate) fn serialize<T: Serialize, S: Serializer>(v: &TVec<T>, s: S) -> Result<S::Ok, S::Error> {
        v.as_slice().serialize(s)
    }

    pub(crate) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<TVec<T>, D::Error> {
        Ok(Vec::<T>::deserialize(d)?.into_iter().collect())
    }
}

/// serde for our operators' constant tensors: each is saved apart, and the JSON holds its
/// place in the table.
pub(crate) mod tensor {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use tract_onnx::prelude::*;

    use super::SIDE;

    fn save(t: &Arc<Tensor>) -> usize {
        SIDE.with(|side| {
            let list = &mut side.borrow_mut().tensors;
            list.push(t.clone());
            list.len() - 1
        })
    }

    fn restore<E: serde::de::Error>(place: usize) -> Result<Arc<Tensor>, E> {
        SIDE.with(|side| side.borrow().tensors.get(place).cloned())
            .ok_or_else(|| E::custom(format!("no tensor {place} beside the operator")))
    }

    pub(crate) fn serialize<S: Serializer>(t: &Arc<Tensor>, s: S) -> Result<S::Ok, S::Error> {
        save(t).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Tensor>, D::Error> {
        restore(usize::deserialize(d)?)
    }

    /// The same for a `Vec<f32>`, as a tensor of one axis.
    pub(crate) mod floats {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
            save(&Arc::new(tensor1(v))).serialize(s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
            let t = restore::<D::Error>(usize::deserialize(d)?)?;
            let values = t.try_as_plain_ram().and_then(|r| r.as_slice::<f32>().map(|s| s.to_vec()));
            values.map_err(|e| serde::de::Error::custom(format!("not float32: {e}")))
        }
    }

    /// The same for `Option<Arc<Tensor>>`.
    pub(crate) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(t: &Option<Arc<Tensor>>, s: S) -> Result<S::Ok, S::Error> {
            t.as_ref().map(save).serialize(s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<Tensor>>, D::Error> {
            Option::<usize>::deserialize(d)?.map(restore).transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::group_norm::GroupNorm;
    use crate::ops::packed::Site;

    /// A graph of tract's operators and ours: a GroupNorm (tensors in the table) and a token
    /// embedding (weights by key).
    fn graph(packer: &Packer) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 4, 2, 2])).unwrap();
        let norm = GroupNorm {
            groups: 2,
            recip: 0.125,
            eps: 1e-5,
            gamma: vec![1.0, -2.0, 0.5, f32::from_bits(0x3f80_0001)],
            beta: vec![0.25, 0.0, -1.0, 3.0],
            silu: true,
        };
        let y = model.wire_node("norm", norm, &[x]).unwrap();
        let y = model.wire_node("twice", tract_onnx::tract_core::ops::math::mul(), &[y[0], y[0]]).unwrap();
        let ids = model.add_source("ids", i64::fact([3])).unwrap();
        let table: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let site = Site { packer, node: "table", origin: None };
        let rows =
            model.wire_node("rows", super::super::embedding::Embedding::new_in(site, &table, [4, 3]), &[ids]).unwrap();
        model.select_output_outlets(&[y[0], rows[0]]).unwrap();
        model
    }

    #[test]
    fn a_graph_reads_back_with_the_same_operators_and_its_weights_by_key() {
        let packer = Packer::default();
        let model = graph(&packer);
        let bytes = write(&model).unwrap();
        assert_eq!(write(&model).unwrap(), bytes, "two writes of one graph differ");
        let saved = Arc::new(Packer::over_held(packer.held()));
        let read = read(&bytes, &saved).unwrap();
        let ours = |m: &TypedModel, name: &str| -> Vec<String> {
            m.nodes.iter().filter(|n| n.op.name() == name).map(|n| format!("{:?}", n.op)).collect()
        };
        for name in ["GroupNorm", "Embedding"] {
            assert_eq!(ours(&read, name), ours(&model, name), "{name}");
            assert_eq!(ours(&read, name).len(), 1, "{name}");
        }
        let norm = |m: &TypedModel| m.nodes.iter().find_map(|n| n.op_as::<GroupNorm>().cloned()).unwrap();
        let gamma_bits = |m: &TypedModel| norm(m).gamma.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(gamma_bits(&read), gamma_bits(&model));
        assert_eq!(norm(&read), norm(&model));
        // The embedding's table is the one the packer held, not a copy.
        let plan = |m: TypedModel| {
            let plan = TypedSimplePlan::new(m.into_optimized().unwrap()).unwrap();
            let x = Tensor::from_shape(&[1, 4, 2, 2], &(0..16).map(|v| v as f32 * 0.3).collect::<Vec<_>>()).unwrap();
            let ids = Tensor::from_shape(&[3], &[3i64, 0, 2]).unwrap();
            plan.run(tvec![x.into(), ids.into()]).unwrap()
        };
        let (a, b) = (plan(model), plan(read));
        assert_eq!(a.len(), 2);
        let bits =
            |t: &TValue| -> Vec<u32> { crate::ops::f32s(t, "test").unwrap().iter().map(|v| v.to_bits()).collect() };
        for (a, b) in a.iter().zip(b.iter()) {
            assert_eq!(bits(a), bits(b));
        }
    }

    #[test]
    fn a_read_fails_without_the_weights_or_on_damaged_bytes() {
        let packer = Packer::default();
        let bytes = write(&graph(&packer)).unwrap();
        let empty = Arc::new(Packer::default());
        let why = format!("{:#}", read(&bytes, &empty).expect_err("no weights"));
        assert!(why.contains("embedding/table"), "{why}");
        let saved = Arc::new(Packer::over_held(packer.held()));
        assert!(read(&bytes[..bytes.len() - 3], &saved).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read(&longer, &saved).is_err());
    }
}
