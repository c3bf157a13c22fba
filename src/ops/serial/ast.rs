//! tract's NNEF syntax tree in a compact binary form. Reading it back costs a walk over the
//! bytes, where parsing the same tree from NNEF text is most of a saved graph's read.
//!
//! Every node is written depth first: a tag byte for each enum, lengths and counts as LEB128,
//! strings as their length and UTF-8 bytes. The reader refuses bytes cut short, invalid UTF-8,
//! unknown tags and nesting deeper than [`MAX_DEPTH`].

use tract_nnef::ast::{
    Argument, Assignment, Comprehension, Document, FragmentDecl, FragmentDef, GraphDef, Identifier, IfThenElse,
    Invocation, LValue, Literal, Parameter, RValue, Result_, Subscript, TypeName, TypeSpec,
};
use tract_nnef::internal::{bail, ensure, TractResult};

/// Deeper nesting than any graph tract writes: a guard against a stack overflow on bytes that
/// were not written by [`Code::put`].
const MAX_DEPTH: usize = 256;

/// The bytes being read, and how deep the reader is in nested values.
pub(super) struct In<'a> {
    bytes: &'a [u8],
    depth: usize,
}

impl<'a> In<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        In { bytes, depth: 0 }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes not read yet.
    pub(super) fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    fn byte(&mut self) -> TractResult<u8> {
        let (&b, rest) =
            self.bytes.split_first().ok_or_else(|| tract_nnef::internal::format_err!("a saved graph cut short"))?;
        self.bytes = rest;
        Ok(b)
    }

    fn count(&mut self) -> TractResult<usize> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return usize::try_from(value)
                    .map_err(|_| tract_nnef::internal::format_err!("a count beyond this target"));
            }
        }
        bail!("a count longer than 64 bits")
    }

    fn take(&mut self, n: usize) -> TractResult<&'a [u8]> {
        ensure!(n <= self.bytes.len(), "a saved graph cut short");
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// `read` one level deeper.
    fn nested<T>(&mut self, read: impl FnOnce(&mut Self) -> TractResult<T>) -> TractResult<T> {
        ensure!(self.depth < MAX_DEPTH, "a saved graph nested deeper than {MAX_DEPTH}");
        self.depth += 1;
        let value = read(self);
        self.depth -= 1;
        value
    }
}

fn put_count(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A part of the syntax tree that writes itself to bytes and reads itself back.
pub(super) trait Code: Sized {
    fn put(&self, out: &mut Vec<u8>);
    fn get(r: &mut In<'_>) -> TractResult<Self>;
}

impl Code for String {
    fn put(&self, out: &mut Vec<u8>) {
        put_count(out, self.len());
        out.extend_from_slice(self.as_bytes());
    }
    fn get(r: &mut In) -> TractResult<Self> {
        let n = r.count()?;
        Ok(std::str::from_utf8(r.take(n)?)?.to_string())
    }
}

impl Code for bool {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn get(r: &mut In) -> TractResult<Self> {
        match r.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            b => bail!("a truth value {b}"),
        }
    }
}

impl<T: Code> Code for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        put_count(out, self.len());
        self.iter().for_each(|v| v.put(out));
    }
    fn get(r: &mut In) -> TractResult<Self> {
        let n = r.count()?;
        // Every element takes at least a byte: a count past the bytes left is refused before
        // anything is allocated for it.
        ensure!(n <= r.bytes.len(), "a saved graph cut short");
        (0..n).map(|_| T::get(r)).collect()
    }
}

impl<T: Code> Code for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.put(out);
            }
        }
    }
    fn get(r: &mut In) -> TractResult<Self> {
        match r.byte()? {
            0 => Ok(None),
            1 => Ok(Some(r.nested(T::get)?)),
            b => bail!("an option tag {b}"),
        }
    }
}

impl<T: Code> Code for Box<T> {
    fn put(&self, out: &mut Vec<u8>) {
        (**self).put(out)
    }
    fn get(r: &mut In) -> TractResult<Self> {
        Ok(Box::new(r.nested(T::get)?))
    }
}

impl<A: Code, B: Code> Code for (A, B) {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
    }
    fn get(r: &mut In) -> TractResult<Self> {
        Ok((A::get(r)?, B::get(r)?))
    }
}

impl Code for Identifier {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out)
    }
    fn get(r: &mut In) -> TractResult<Self> {
        Ok(Identifier(String::get(r)?))
    }
}

/// Structs: their fields in order.
macro_rules! fields {
    ($($ty:ident { $($field:ident),* })*) => {$(
        impl Code for $ty {
            fn put(&self, out: &mut Vec<u8>) {
                $(self.$field.put(out);)*
            }
            fn get(r: &mut In) -> TractResult<Self> {
                Ok($ty { $($field: Code::get(r)?),* })
            }
        }
    )*};
}

fields! {
    Document { version, extension, fragments, graph_def }
    GraphDef { id, parameters, results, body }
    FragmentDef { decl, body }
    FragmentDecl { id, generic_decl, parameters, results }
    Parameter { id, spec, lit, doc }
    Result_ { id, spec }
    Assignment { left, right }
    Invocation { id, generic_type_name, arguments }
    Argument { id, rvalue }
    Comprehension { loop_iters, filter, yields }
    IfThenElse { cond, then, otherwise }
}

/// Enums: a tag byte per variant, then the variant's values in order.
macro_rules! variants {
    ($($ty:ident { $($tag:literal => $variant:ident $(($($v:ident),*))?),* })*) => {$(
        impl Code for $ty {
            fn put(&self, out: &mut Vec<u8>) {
                match self {
                    $($ty::$variant $(($($v),*))? => {
                        out.push($tag);
                        $($($v.put(out);)*)?
                    })*
                }
            }
            fn get(r: &mut In) -> TractResult<Self> {
                r.nested(|r| match r.byte()? {
                    $($tag => Ok($ty::$variant $(($({ let $v = Code::get(r)?; $v }),*))?),)*
                    tag => bail!("{} tag {tag}", stringify!($ty)),
                })
            }
        }
    )*};
}

variants! {
    TypeName { 0 => Integer, 1 => Scalar, 2 => Logical, 3 => String, 4 => Any }
    TypeSpec { 0 => Single(a), 1 => Tensor(a), 2 => Array(a), 3 => Tuple(a) }
    Literal { 0 => Numeric(a), 1 => String(a), 2 => Logical(a), 3 => Array(a), 4 => Tuple(a) }
    LValue { 0 => Identifier(a), 1 => Array(a), 2 => Tuple(a) }
    Subscript { 0 => Single(a), 1 => Range(a, b) }
    RValue {
        0 => Identifier(a), 1 => Literal(a), 2 => Binary(a, b, c), 3 => Unary(a, b), 4 => Tuple(a),
        5 => Array(a), 6 => Subscript(a, b), 7 => Comprehension(a), 8 => IfThenElse(a), 9 => Invocation(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Code + PartialEq + std::fmt::Debug>(value: &T) {
        let mut bytes = vec![];
        value.put(&mut bytes);
        let mut r = In::new(&bytes);
        assert_eq!(&T::get(&mut r).unwrap(), value);
        assert!(r.is_empty());
        // Every strict prefix is refused.
        for end in 0..bytes.len() {
            assert!(T::get(&mut In::new(&bytes[..end])).is_err(), "{end} of {} bytes accepted", bytes.len());
        }
    }

    #[test]
    fn every_kind_of_node_reads_back_equal() {
        let id = |s: &str| Identifier(s.to_string());
        let call = Invocation {
            id: id("conv"),
            generic_type_name: Some(TypeName::Scalar),
            arguments: vec![
                Argument { id: None, rvalue: RValue::Identifier(id("x")) },
                Argument {
                    id: Some(id("stride")),
                    rvalue: RValue::Literal(Literal::Array(vec![
                        Literal::Numeric("2".into()),
                        Literal::Numeric("-1.5e-3".into()),
                    ])),
                },
                Argument { id: Some(id("border")), rvalue: RValue::Literal(Literal::String("constant ✓".into())) },
                Argument {
                    id: Some(id("flag")),
                    rvalue: RValue::Literal(Literal::Tuple(vec![Literal::Logical(true), Literal::Logical(false)])),
                },
            ],
        };
        let rvalues = vec![
            RValue::Binary(
                Box::new(RValue::Identifier(id("a"))),
                "+".into(),
                Box::new(RValue::Literal(Literal::Numeric("1".into()))),
            ),
            RValue::Unary("-".into(), Box::new(RValue::Identifier(id("b")))),
            RValue::Tuple(vec![RValue::Identifier(id("c"))]),
            RValue::Subscript(
                Box::new(RValue::Identifier(id("d"))),
                Box::new(Subscript::Range(None, Some(RValue::Literal(Literal::Numeric("3".into()))))),
            ),
            RValue::Subscript(
                Box::new(RValue::Identifier(id("d"))),
                Box::new(Subscript::Single(RValue::Identifier(id("i")))),
            ),
            RValue::Comprehension(Box::new(Comprehension {
                loop_iters: vec![(id("i"), RValue::Identifier(id("xs")))],
                filter: Some(RValue::Identifier(id("keep"))),
                yields: RValue::Identifier(id("i")),
            })),
            RValue::IfThenElse(Box::new(IfThenElse {
                cond: RValue::Literal(Literal::Logical(true)),
                then: RValue::Identifier(id("t")),
                otherwise: RValue::Invocation(call.clone()),
            })),
        ];
        let body = vec![
            Assignment { left: LValue::Identifier(id("y")), right: RValue::Invocation(call.clone()) },
            Assignment {
                left: LValue::Tuple(vec![
                    LValue::Identifier(id("p")),
                    LValue::Array(vec![LValue::Identifier(id("q"))]),
                ]),
                right: RValue::Array(rvalues),
            },
        ];
        let spec = TypeSpec::Tuple(vec![
            TypeSpec::Array(Box::new(TypeSpec::Tensor(TypeName::Integer))),
            TypeSpec::Single(TypeName::Logical),
            TypeSpec::Single(TypeName::String),
            TypeSpec::Single(TypeName::Any),
        ]);
        let doc = Document {
            version: "1.0".into(),
            extension: vec![(id("tract_registry"), "edge_diffuse".into())],
            fragments: vec![FragmentDef {
                decl: FragmentDecl {
                    id: id("frag"),
                    generic_decl: Some(None),
                    parameters: vec![Parameter {
                        id: id("x"),
                        spec: spec.clone(),
                        lit: Some(Literal::Numeric("0".into())),
                        doc: Some("why".into()),
                    }],
                    results: vec![Result_ { id: id("out"), spec }],
                },
                body: Some(body.clone()),
            }],
            graph_def: GraphDef { id: id("network"), parameters: vec![id("x")], results: vec![id("y")], body },
        };
        round_trip(&doc);
    }

    #[test]
    fn bad_bytes_are_refused() {
        // An unknown tag, a count past the end, invalid UTF-8, and nesting past the limit.
        assert!(RValue::get(&mut In::new(&[10])).is_err());
        assert!(Vec::<Identifier>::get(&mut In::new(&[5, 0])).is_err());
        assert!(String::get(&mut In::new(&[2, 0xff, 0xfe])).is_err());
        let deep: Vec<u8> = std::iter::repeat_n([4u8, 1], MAX_DEPTH + 1).flatten().collect();
        let err = RValue::get(&mut In::new(&deep)).unwrap_err();
        assert!(format!("{err}").contains("deeper"), "{err}");
    }
}
