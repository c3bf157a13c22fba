//! Values of the card's conditioning inputs (`[model.conditioning.NAME]`): a request's values,
//! else the card's `default`; the card's `null` for the unconditional branch of guidance.

use std::collections::BTreeMap;

use ndarray::ArrayD;

use crate::card::{ConditioningSource, ConditioningValue, ModelCard};
use crate::error::{Error, Result};
use crate::runtime::ConditioningInput;

/// One input's values for a run: rows of one image's values each; image `i` takes row
/// `i mod rows`, so one row serves every image and several cycle as `--class` does.
#[derive(Debug, Clone)]
pub(super) struct Rows {
    per: usize,
    data: Vec<f32>,
}

impl Rows {
    /// Values laid out as `dims` (one row for every image) or `[rows, ...dims]`; a flat list
    /// of one or more rows is taken too. `what` names the source in errors.
    pub(super) fn new(what: &str, values: &ArrayD<f32>, input: &ConditioningInput) -> Result<Rows> {
        let per: usize = input.dims.iter().product();
        let shape = values.shape();
        let fits = values.len() == 1
            || shape == input.dims.as_slice()
            || shape.get(1..) == Some(input.dims.as_slice())
            || (shape.len() == 1 && per > 0 && shape[0].is_multiple_of(per));
        if !fits || values.is_empty() {
            return Err(Error::Tensor {
                what: what.to_string(),
                message: format!(
                    "input {:?} takes {per} value(s) per image (shape [batch{}]): expected shape {:?}, [rows, {}] or a list of a multiple of {per} values, found {shape:?}",
                    input.input,
                    input.dims.iter().map(|d| format!(", {d}")).collect::<String>(),
                    input.dims,
                    input.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                ),
            });
        }
        if values.len() == 1 && per != 1 {
            // One number stands for every value of an image (e.g. a zero vector).
            let x = values.iter().next().copied().unwrap_or_default();
            return Rows::new(what, &ArrayD::from_elem(input.dims.clone(), x), input);
        }
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::Tensor {
                what: what.to_string(),
                message: format!("holds {bad}, expected finite values"),
            });
        }
        Ok(Rows { per, data: values.iter().copied().collect() })
    }

    /// A card value (a number, a list, or a `.npy` file relative to the card).
    fn from_card(card: &ModelCard, what: &str, value: &ConditioningValue, input: &ConditioningInput) -> Result<Rows> {
        let array = match value {
            ConditioningValue::Number(x) => ArrayD::from_elem(vec![1], *x as f32),
            ConditioningValue::List(l) => ArrayD::from_shape_vec(vec![l.len()], l.iter().map(|&x| x as f32).collect())
                .expect("a list is one-dimensional"),
            ConditioningValue::File(rel) => crate::files::read_npy(&card.dir.join(rel))?,
        };
        Rows::new(what, &array, input).map_err(|e| match e {
            Error::Tensor { what, message } => {
                Error::Card { path: card.file.clone(), message: format!("{what}: {message}") }
            }
            other => other,
        })
    }

    /// Image `index`'s values.
    pub(super) fn row(&self, index: usize) -> &[f32] {
        let rows = self.data.len() / self.per.max(1);
        let r = index % rows.max(1);
        &self.data[r * self.per..(r + 1) * self.per]
    }
}

/// The card's values of every conditioning input, resolved against the graph at load.
#[derive(Debug, Clone, Default)]
pub(super) struct CardValues {
    defaults: Vec<Option<Rows>>,
    nulls: Vec<Option<Rows>>,
    /// Per input: its value is the guidance-scale embedding (`from = "guidance"`).
    from_guidance: Vec<bool>,
}

impl CardValues {
    pub(super) fn load(card: &ModelCard, inputs: &[ConditioningInput]) -> Result<Self> {
        let mut values = CardValues::default();
        for input in inputs {
            let section = &card.model.conditioning[&input.name];
            let field = |key: &str| format!("model.conditioning.{}.{key}", input.name);
            let rows = |key: &str, v: &Option<ConditioningValue>| {
                v.as_ref().map(|v| Rows::from_card(card, &field(key), v, input)).transpose()
            };
            values.defaults.push(rows("default", &section.default)?);
            values.nulls.push(rows("null", &section.null)?);
            let from_guidance = section.from == Some(ConditioningSource::Guidance);
            if from_guidance && input.dims.len() != 1 {
                return Err(Error::Card {
                    path: card.file.clone(),
                    message: format!(
                        "{}: the guidance embedding is a vector per image, but input {:?} is [batch{}]",
                        field("from"),
                        input.input,
                        input.dims.iter().map(|d| format!(", {d}")).collect::<String>()
                    ),
                });
            }
            values.from_guidance.push(from_guidance);
        }
        Ok(values)
    }

    /// Some input takes the guidance scale as an embedding: the model has guidance distilled
    /// in, and runs no classifier-free guidance.
    pub(super) fn embeds_guidance(&self) -> bool {
        self.from_guidance.contains(&true)
    }

    /// Every input has a null value (the unconditional branch of guidance can run).
    pub(super) fn nulls(&self) -> Option<Vec<Rows>> {
        self.nulls.iter().cloned().collect()
    }

    /// The first input without a null value.
    pub(super) fn missing_null<'a>(&self, inputs: &'a [ConditioningInput]) -> Option<&'a str> {
        inputs.iter().zip(&self.nulls).find(|(_, n)| n.is_none()).map(|(i, _)| i.name.as_str())
    }

    /// A request's values for every input: its own, else the card's default, or the embedding
    /// of `guidance` for an input whose values come from it.
    pub(super) fn for_request(
        &self,
        inputs: &[ConditioningInput],
        given: &BTreeMap<String, ArrayD<f32>>,
        guidance: f32,
    ) -> Result<Vec<Rows>> {
        if let Some(unknown) = given.keys().find(|k| !inputs.iter().any(|i| &i.name == *k)) {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::config(
                "conditioning",
                match names.is_empty() {
                    true => format!("unknown input {unknown:?}: this model takes no conditioning inputs"),
                    false => format!("unknown input {unknown:?}; this model takes: {}", names.join(", ")),
                },
            ));
        }
        inputs
            .iter()
            .zip(&self.defaults)
            .zip(&self.from_guidance)
            .map(|((input, default), &from_guidance)| match (given.get(&input.name), default) {
                (Some(_), _) if from_guidance => Err(Error::config(
                    format!("conditioning {}", input.name),
                    "its value is the guidance scale's embedding: set the guidance instead",
                )),
                (None, _) if from_guidance => {
                    let values = guidance_embedding(guidance, input.dims[0]);
                    Rows::new(
                        &format!("conditioning {}", input.name),
                        &ArrayD::from_shape_vec(vec![values.len()], values).expect("a vector"),
                        input,
                    )
                }
                (Some(v), _) => Rows::new(&format!("conditioning {}", input.name), v, input),
                (None, Some(d)) => Ok(d.clone()),
                (None, None) => Err(Error::config(
                    format!("conditioning {}", input.name),
                    "no value: give one (--cond NAME=...) or a default in the card's [model.conditioning] table",
                )),
            })
            .collect()
    }
}

/// diffusers' `get_guidance_scale_embedding` of `w = guidance − 1` for `dim` values: sines then
/// cosines of `1000·w` at `dim/2` geometric frequencies from 1 down to 1/10000, and a zero
/// appended when `dim` is odd.
pub(super) fn guidance_embedding(guidance: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let w = (guidance - 1.0) * 1000.0;
    // float32 throughout, as diffusers computes it.
    let step = 10000f32.ln() / (half as f32 - 1.0).max(1.0);
    let args: Vec<f32> = (0..half).map(|k| w * (k as f32 * -step).exp()).collect();
    let mut out: Vec<f32> = args.iter().map(|a| a.sin()).chain(args.iter().map(|a| a.cos())).collect();
    out.resize(dim, 0.0);
    out
}

/// Fills `out` (`[batch, ...dims]` arrays, one per input) with image `index`'s rows at batch
/// position `at`.
pub(super) fn fill(out: &mut [ArrayD<f32>], rows: &[Rows], index: usize, at: usize) {
    for (arr, r) in out.iter_mut().zip(rows) {
        let per = r.per;
        let dst = arr.as_slice_mut().expect("contiguous");
        dst[at * per..(at + 1) * per].copy_from_slice(r.row(index));
    }
}
