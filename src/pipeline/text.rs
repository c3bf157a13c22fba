//! Prompts to `encoder_hidden_states`: the CLIP tokenizer, then the text encoder graph, as
//! diffusers' `encode_prompt` runs them (padded to the tokenizer's length, the first output).

use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::card::ModelCard;
use crate::error::{Error, Result};
use crate::runtime::{Graph, PlanCache, PlanFile, WeightPrecision};
use crate::tokenizer::{ClipTokenizer, Tokens};

/// Distinct prompts whose embeddings are kept: a run's prompt and negative prompt, and a few
/// more for callers that alternate between prompts.
const KEPT: usize = 4;

pub(super) struct TextEncoder {
    tokenizer: ClipTokenizer,
    graph: Graph,
    /// `[tokens, dim]` of one prompt's hidden states.
    shape: [usize; 2],
    /// The most recently used prompts' embeddings, latest last.
    kept: Vec<(String, ArrayD<f32>)>,
}

impl TextEncoder {
    /// What became of the plan file of the graph's packed weights.
    pub(super) fn plan_file(&self) -> &PlanFile {
        self.graph.plan_file()
    }

    pub(super) fn load(
        card: &ModelCard,
        threads: usize,
        plan_cache: &PlanCache,
        weights: WeightPrecision,
    ) -> Result<Option<Self>> {
        let Some(section) = &card.text_encoder else { return Ok(None) };
        let tokenizer = ClipTokenizer::from_folder(card.dir.join(&section.tokenizer))?;
        let path = card.dir.join(&section.onnx);
        let graph = Graph::load_with(&path, &[vec![1, tokenizer.max_length()]], threads, plan_cache.clone(), weights)?;
        let shape = match graph.output_shape(0) {
            &[1, tokens, dim] => [tokens, dim],
            other => return Err(bad_output(&path, other)),
        };
        Ok(Some(TextEncoder { tokenizer, graph, shape, kept: Vec::new() }))
    }

    /// `[tokens, dim]` of one prompt's embedding.
    pub(super) fn shape(&self) -> [usize; 2] {
        self.shape
    }

    pub(super) fn tokenize(&self, text: &str) -> Tokens {
        self.tokenizer.encode(text)
    }

    /// The prompt's hidden states, `[1, tokens, dim]`.
    pub(super) fn encode(&mut self, text: &str) -> Result<ArrayD<f32>> {
        if let Some(i) = self.kept.iter().position(|(t, _)| t == text) {
            let hit = self.kept.remove(i);
            self.kept.push(hit);
            return Ok(self.kept.last().expect("pushed").1.clone());
        }
        let ids = self.tokenizer.encode(text).ids;
        let ids = ArrayD::from_shape_vec(IxDyn(&[1, ids.len()]), ids.iter().map(|&i| i as f32).collect())
            .expect("one row of ids");
        let hidden = self.graph.run(&[ids])?.swap_remove(0);
        if self.kept.len() == KEPT {
            self.kept.remove(0);
        }
        self.kept.push((text.to_string(), hidden.clone()));
        Ok(hidden)
    }
}

fn bad_output(path: &Path, shape: &[usize]) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        message: format!("the first output is {shape:?}, expected the hidden states [1, tokens, dim]"),
    }
}
