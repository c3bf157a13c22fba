//! CLIP's byte-level BPE tokenizer, in Rust: the prompt of a Stable Diffusion pipeline to the
//! `input_ids` of its text encoder, with no Python at run time.
//!
//! [`ClipTokenizer::from_folder`] reads a Hugging Face / optimum `tokenizer/` folder:
//! `vocab.json` (token → id), `merges.txt` (the BPE merges, best first) and the special tokens
//! and `model_max_length` from `tokenizer_config.json` and/or `special_tokens_map.json`.
//! [`ClipTokenizer::encode`] gives `max_length` ids: BOS, the text's tokens (cut after
//! `max_length - 2`), EOS, then the pad id, and says whether the text was cut.
//!
//! The ids equal those of transformers' slow `CLIPTokenizer` called with
//! `padding="max_length", truncation=True, max_length=model_max_length`, in its default install,
//! **without ftfy** (with ftfy installed it cleans text with `ftfy.fix_text` instead, which this
//! module does not do). tests/tokenizer.rs checks it on 2000+ strings made by
//! tools/make_tokenizer_fixtures.py (and on demand on 60 000 more). The steps, as transformers
//! 4.57 runs them:
//!
//! 1. The special and added tokens (`<|startoftext|>`, `<|endoftext|>`, SD 2.x's pad `!`, any
//!    entry of `added_tokens_decoder`) are cut out of the raw text first, leftmost and longest
//!    first, and map to their ids as they are; their `lstrip`/`rstrip`/`single_word` flags act on
//!    the text next to them. So under an SD 2.x config every `!` in a prompt is the pad token
//!    (id 0), not the BPE token `!</w>`, exactly as in transformers.
//! 2. Each piece between them goes through transformers' `BasicTokenizer(strip_accents=False,
//!    do_split_on_punc=False)`: NUL, U+FFFD and every character of category C (control, format,
//!    private use, unassigned) except tab, LF and CR are removed; those three and category Zs
//!    become spaces; CJK ideographs get a space on each side; NFC; split on whitespace; each
//!    word lowercased (full case mapping, final sigma); words joined by one space.
//! 3. CLIP's pattern, case-insensitive,
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`,
//!    splits that into words: runs of letters, single digits, runs of other
//!    symbols, a few contractions. Characters no branch matches are dropped: the spaces, and
//!    U+0345, which Python's `regex` module excludes from both classes under IGNORECASE.
//! 4. Each word's UTF-8 bytes map to CLIP's 256 printable stand-ins, the last one with `</w>`,
//!    and the BPE merges the adjacent pair of lowest rank, all its occurrences left to right,
//!    until no pair is a merge. A word that is exactly `<|startoftext|>` or `<|endoftext|>`
//!    skips the BPE (transformers' cache holds them). A piece missing from the vocabulary is the
//!    unk token.
//!
//! Where it differs from transformers, on purpose or by necessity:
//!
//! - Unicode tables: characters are classified with Unicode 16 tables, Python 3.11 uses 14.0
//!   (3.12: 15.0, 3.13: 15.1), so characters assigned since (e.g. the newest emoji) are kept
//!   here and dropped there as "unassigned". The reference itself moves with the Python version.
//! - `merges.txt`: transformers drops its first line whatever it is; here only a first line
//!   starting with `#` (the `#version: 0.2` header) is skipped, and a line that is not two
//!   symbols is an error rather than ignored. As in transformers, merges past the 48 894th are
//!   not read.
//! - Config: special tokens that are neither in `vocab.json` nor in `added_tokens_decoder` are an
//!   error (transformers would append them with new ids the text encoder has no embedding for);
//!   a pad token missing from the config defaults to the EOS token; a missing
//!   `model_max_length` to 77 (transformers: "unlimited").
//! - Only the files above are read: `tokenizer.json` and `added_tokens.json` (which transformers
//!   consults for extra added tokens when `tokenizer_config.json` has no `added_tokens_decoder`)
//!   are not.
//!
//! The library never prints: [`Tokens::truncated`] is for the caller to warn about.
//!
//! ```
//! use edge_diffuse::tokenizer::ClipTokenizer;
//!
//! # fn main() -> edge_diffuse::Result<()> {
//! // A CLIP vocabulary cut to its first 1000 merges (the full one gives 2368 for "cat").
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/small");
//! let tokenizer = ClipTokenizer::from_folder(dir)?;
//! let tokens = tokenizer.encode("A photo of a cat");
//! assert_eq!(tokens.ids.len(), tokenizer.max_length()); // 77
//! assert_eq!(tokens.ids[..tokens.len], [1512, 320, 1125, 539, 320, 66, 536, 1513]);
//! assert!(tokens.ids[tokens.len..].iter().all(|&id| id == tokenizer.pad_id()));
//! assert!(!tokens.truncated);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use unicode_general_category::{get_general_category, GeneralCategory};
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// The text encoder length of every CLIP in Stable Diffusion, used when the config names none.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// transformers reads at most this many merges (`49152 - 256 - 2`): CLIP's 49408 tokens less the
/// 512 byte tokens and the two special tokens.
const MAX_MERGES: usize = 48_894;

/// `model_max_length` above this is not a CLIP text encoder's length (transformers writes 1e30
/// for "unlimited"), and would only make `encode` allocate huge padding.
const MAX_MAX_LENGTH: u64 = 1 << 20;

const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// The ids of one prompt, ready for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly [`ClipTokenizer::max_length`] ids: BOS, the text's tokens, EOS, then the pad id.
    /// A text encoder exported to ONNX takes them as int32 or int64.
    pub ids: Vec<u32>,
    /// How many of `ids` are real (BOS to EOS, at least 2); the rest is padding. This is the sum
    /// of transformers' `attention_mask`.
    pub len: usize,
    /// The text had more than `max_length - 2` tokens, and those past them were dropped.
    pub truncated: bool,
}

/// A loaded CLIP tokenizer (about 1.5 MB for CLIP's vocabulary). `Send + Sync` and `encode`
/// takes `&self`: threads share one by reference or `Arc`.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// BPE merges by symbol pair. Symbols are interned: `b` is byte `b`'s stand-in, `256 + b`
    /// the same with `</w>`, then every merge's parts and result.
    merges: HashMap<(u32, u32), Merge>,
    /// The token id of each interned symbol (the unk id where the vocabulary lacks it).
    symbol_ids: Vec<u32>,
    /// Added and special tokens, longest first, so that the first match is the longest.
    added: Vec<AddedToken>,
    /// Ids of a split-pattern word that is exactly `<|startoftext|>` / `<|endoftext|>`.
    start_word_id: u32,
    end_word_id: u32,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    vocab_size: usize,
}

#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    result: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AddedToken {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl ClipTokenizer {
    /// Reads `vocab.json`, `merges.txt` and, where present, `tokenizer_config.json` and
    /// `special_tokens_map.json` from `dir`.
    ///
    /// As in transformers: if `tokenizer_config.json` has `added_tokens_decoder` (the current
    /// format), it alone gives the special tokens and `special_tokens_map.json` is not read;
    /// otherwise `special_tokens_map.json`'s entries override `tokenizer_config.json`'s. A token
    /// may be a string or an object with `content` (and `lstrip`, `rstrip`, `single_word`).
    /// Defaults: bos `<|startoftext|>`, eos and unk `<|endoftext|>`, pad = eos, max length 77.
    ///
    /// Errors: [`Error::Io`] for a file that cannot be read (a missing `vocab.json` or
    /// `merges.txt`; the configs are optional), [`Error::Tokenizer`] naming the file for one
    /// that is not what it should be.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let vocab_path = dir.join("vocab.json");
        let vocab = read_vocab(&vocab_path)?;
        let merges = read_merges(&dir.join("merges.txt"))?;
        let config = read_config(dir)?;
        Self::build(&vocab_path, vocab, &merges, config)
    }

    fn build(
        vocab_path: &Path,
        vocab: HashMap<String, u32>,
        merges: &[(String, String)],
        config: Config,
    ) -> Result<Self> {
        let mut added: Vec<AddedToken> = Vec::new();
        for (id, entry) in config.added {
            push_added(&mut added, entry, id);
        }
        let mut special_ids = [0u32; 4];
        for (slot, special) in special_ids.iter_mut().zip(&config.specials) {
            let known = added.iter().find(|a| a.content == special.entry.content).map(|a| a.id);
            let id = match known.or_else(|| vocab.get(&special.entry.content).copied()) {
                Some(id) => id,
                None => {
                    let (path, whence) = match &special.source {
                        Some(path) => (path.clone(), "".to_string()),
                        None => (vocab_path.to_path_buf(), " (the default: no config file names one)".to_string()),
                    };
                    return Err(tokenizer_error(
                        path,
                        format!(
                            "{} {:?}{whence} is neither in vocab.json nor in added_tokens_decoder; \
                             expected a token of the vocabulary",
                            special.key, special.entry.content
                        ),
                    ));
                }
            };
            *slot = id;
            if known.is_none() {
                push_added(&mut added, special.entry.clone(), id);
            }
        }
        let [bos_id, eos_id, unk_added, pad_id] = special_ids;
        // transformers looks the unk token up in the vocabulary proper.
        let unk_id = vocab.get(&config.specials[2].entry.content).copied().unwrap_or(unk_added);
        added.sort_by_key(|a| std::cmp::Reverse(a.content.len()));

        let lookup = |token: &str| -> u32 {
            added
                .iter()
                .find(|a| a.content == token)
                .map(|a| a.id)
                .or_else(|| vocab.get(token).copied())
                .unwrap_or(unk_id)
        };

        let mut interner = Interner::default();
        let byte_chars = byte_chars();
        for c in byte_chars {
            interner.intern(c.to_string());
        }
        for c in byte_chars {
            interner.intern(format!("{c}{END_OF_WORD}"));
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (first, second)) in merges.iter().enumerate() {
            let joined = format!("{first}{second}");
            let pair = (interner.intern(first.clone()), interner.intern(second.clone()));
            let result = interner.intern(joined);
            // A repeated merge keeps its last rank, as transformers' dict does.
            merge_map.insert(pair, Merge { rank: rank as u32, result });
        }
        let symbol_ids = interner.names.iter().map(|name| lookup(name)).collect();

        let max_id = vocab.values().chain(added.iter().map(|a| &a.id)).copied().max().unwrap_or(0);
        Ok(ClipTokenizer {
            merges: merge_map,
            symbol_ids,
            start_word_id: lookup(START_OF_TEXT),
            end_word_id: lookup(END_OF_TEXT),
            added,
            bos_id,
            eos_id,
            pad_id,
            max_length: config.max_length,
            vocab_size: max_id as usize + 1,
        })
    }

    /// The ids of `text` for the text encoder: BOS, its tokens (at most `max_length - 2`), EOS,
    /// padded with the pad id to [`max_length`](Self::max_length).
    pub fn encode(&self, text: &str) -> Tokens {
        let room = self.max_length - 2;
        let mut body = Vec::new();
        // One token past the room is enough to know the text was cut.
        self.tokenize_into(text, &mut body, Some(room + 1));
        let truncated = body.len() > room;
        body.truncate(room);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body);
        ids.push(self.eos_id);
        let len = ids.len();
        ids.resize(self.max_length, self.pad_id);
        Tokens { ids, len, truncated }
    }

    /// The token ids of `text` alone: no BOS/EOS, no truncation, no padding.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.tokenize_into(text, &mut ids, None);
        ids
    }

    /// The sequence length: what [`encode`](Self::encode) pads and truncates to
    /// (`model_max_length` of the config, 77 by default).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id padding fills with: 49407 (`<|endoftext|>`) for SD 1.x, 0 (`!`) for SD 2.x.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of the first token of every sequence (`<|startoftext|>`, 49406 in CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id after the text's last token (`<|endoftext|>`, 49407 in CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// One more than the largest id this tokenizer can produce (49408 for CLIP): the number of
    /// rows the text encoder's token embedding needs.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Appends the ids of `text` to `out`; with a `limit`, stops once `out` holds that many (a
    /// long prompt costs no more than its first words).
    fn tokenize_into(&self, text: &str, out: &mut Vec<u32>, limit: Option<usize>) {
        let full = |out: &Vec<u32>| limit.is_some_and(|n| out.len() >= n);
        for piece in self.split_added(text) {
            if full(out) {
                return;
            }
            match piece {
                Piece::Added(id) => out.push(id),
                Piece::Text(text) => {
                    let words = basic_clean(&text);
                    for word in split_words(&words) {
                        if full(out) {
                            return;
                        }
                        self.bpe(word, out);
                    }
                }
            }
        }
    }

    fn added_token(&self, text: &str) -> Option<&AddedToken> {
        self.added.iter().find(|a| a.content == text)
    }

    /// Step 1 of the module doc: the text cut around added tokens, then their strip flags
    /// applied to the neighbours, in transformers' order (each step sees the previous ones'
    /// edits, and the conditions look at the neighbours as they were before the strips).
    fn split_added(&self, text: &str) -> Vec<Piece> {
        if self.added.is_empty() {
            return vec![Piece::Text(text.to_string())];
        }
        let mut parts: Vec<String> = Vec::new();
        let mut start = 0;
        let mut at = 0;
        while at < text.len() {
            let rest = &text[at..];
            match self.added.iter().find(|a| rest.starts_with(a.content.as_str())) {
                Some(found) => {
                    if start < at {
                        parts.push(text[start..at].to_string());
                    }
                    parts.push(found.content.clone());
                    at += found.content.len();
                    start = at;
                }
                None => at += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            parts.push(text[start..].to_string());
        }

        for i in 0..parts.len() {
            let Some(token) = self.added_token(&parts[i]).cloned() else { continue };
            let left = if i > 0 { parts[i - 1].clone() } else { String::new() };
            let right = parts.get(i + 1).cloned().unwrap_or_default();
            if token.rstrip && !right.is_empty() {
                parts[i + 1] = right.trim_start_matches(is_python_space).to_string();
            }
            if token.lstrip && !left.is_empty() {
                parts[i - 1] = left.trim_end_matches(is_python_space).to_string();
            }
            if token.single_word && !left.is_empty() && !left.ends_with(' ') {
                parts[i - 1].push_str(&token.content);
                parts[i].clear();
            } else if token.single_word && !right.is_empty() && !right.starts_with(' ') {
                parts[i + 1].insert_str(0, &token.content);
                parts[i].clear();
            }
        }

        parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(|p| match self.added_token(&p) {
                Some(token) => Piece::Added(token.id),
                None => Piece::Text(p),
            })
            .collect()
    }

    /// Step 4 of the module doc, for one word of the split pattern.
    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        if word == START_OF_TEXT || word == END_OF_TEXT {
            out.push(if word == START_OF_TEXT { self.start_word_id } else { self.end_word_id });
            return;
        }
        let mut symbols: Vec<u32> = word.bytes().map(u32::from).collect();
        match symbols.last_mut() {
            Some(last) => *last += 256,
            None => return,
        }
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|pair| self.merges.get(&(pair[0], pair[1])).map(|m| (m.rank, pair[0], pair[1], m.result)))
                .min_by_key(|&(rank, ..)| rank);
            let Some((_, first, second, result)) = best else { break };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(result);
                    i += 2;
                } else {
                    merged.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = merged;
        }
        out.extend(symbols.iter().map(|&s| self.symbol_ids[s as usize]));
    }
}

enum Piece {
    Added(u32),
    Text(String),
}

/// Symbol strings to dense ids, so the BPE compares integers.
#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    fn intern(&mut self, name: String) -> u32 {
        if let Some(&id) = self.ids.get(&name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }
}

fn push_added(added: &mut Vec<AddedToken>, entry: TokenEntry, id: u32) {
    // transformers skips empty tokens; a repeated content keeps the last id.
    if entry.content.is_empty() {
        return;
    }
    added.retain(|a| a.content != entry.content);
    added.push(AddedToken {
        content: entry.content,
        id,
        lstrip: entry.lstrip,
        rstrip: entry.rstrip,
        single_word: entry.single_word,
    });
}

/// CLIP's (GPT-2's) stand-ins for the 256 byte values: printable Latin-1 characters stand for
/// themselves, the rest get U+0100 onwards in byte order, so that no BPE symbol is a space or a
/// control character.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        *slot = if printable {
            char::from(b as u8)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\u{FFFD}')
        };
    }
    table
}

// ---------------------------------------------------------------------------------------------
// Text clean-up and split (steps 2 and 3 of the module doc)

fn category(c: char) -> GeneralCategory {
    get_general_category(c)
}

/// transformers' `_is_control`: category C, except the tab, LF and CR it counts as whitespace.
fn is_removed(c: char) -> bool {
    use GeneralCategory::*;
    c == '\0'
        || c == '\u{FFFD}'
        || (!matches!(c, '\t' | '\n' | '\r')
            && matches!(category(c), Control | Format | Surrogate | PrivateUse | Unassigned))
}

/// transformers' `_is_whitespace`.
fn is_bert_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || category(c) == GeneralCategory::SpaceSeparator
}

/// Python's `str.isspace` (what `str.split()` and `str.strip()` cut at): category Zs or bidi
/// class WS, B or S. After the clean-up only the space, U+2028 and U+2029 are left of these.
fn is_python_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1C}'..='\u{20}'
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

/// The CJK blocks transformers puts spaces around (`_is_chinese_char`).
fn is_cjk(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B820..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// `BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize`, joined by spaces.
fn basic_clean(text: &str) -> String {
    let mut spaced = String::with_capacity(text.len());
    for c in text.chars() {
        if is_removed(c) {
            continue;
        }
        if is_bert_whitespace(c) {
            spaced.push(' ');
        } else if is_cjk(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    let normalized: String = spaced.nfc().collect();
    let mut out = String::with_capacity(normalized.len());
    for word in normalized.split(is_python_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        // Per word, as transformers does: the final-sigma rule sees one word at a time.
        out.push_str(&word.to_lowercase());
    }
    out
}

fn is_letter(c: char) -> bool {
    use GeneralCategory::*;
    matches!(category(c), UppercaseLetter | LowercaseLetter | TitlecaseLetter | ModifierLetter | OtherLetter)
}

fn is_number(c: char) -> bool {
    use GeneralCategory::*;
    matches!(category(c), DecimalNumber | LetterNumber | OtherNumber)
}

/// `[^\s\p{L}\p{N}]` as Python's `regex` matches it under IGNORECASE: U+0345 (combining
/// ypogegrammeni) folds to a Greek letter there, so neither this class nor `\p{L}` takes it.
fn is_other_symbol(c: char) -> bool {
    !c.is_whitespace() && c != '\u{345}' && !is_letter(c) && !is_number(c)
}

/// `pattern` (ASCII) at the start of `text`, case-insensitively as Python's `regex` compares: by
/// simple case folding, where `ſ` (U+017F) is an `s` and the Kelvin sign a `k`.
fn starts_with_folded(text: &str, pattern: &str) -> Option<usize> {
    let mut chars = text.char_indices();
    for p in pattern.chars() {
        let (_, c) = chars.next()?;
        let same = c.to_ascii_lowercase() == p || (p == 's' && c == 'ſ') || (p == 'k' && c == '\u{212A}');
        if !same {
            return None;
        }
    }
    Some(chars.next().map_or(text.len(), |(i, _)| i))
}

const LITERALS: [&str; 9] = [START_OF_TEXT, END_OF_TEXT, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];

/// CLIP's split pattern over cleaned text, its branches tried in order at each position as a
/// backtracking regex does (so `'sun` is `'s` + `un`).
fn split_words(text: &str) -> impl Iterator<Item = &str> {
    let mut at = 0;
    std::iter::from_fn(move || loop {
        let rest = &text[at..];
        let c = rest.chars().next()?;
        let len = if let Some(len) = LITERALS.iter().find_map(|lit| starts_with_folded(rest, lit)) {
            len
        } else if is_letter(c) {
            rest.find(|c| !is_letter(c)).unwrap_or(rest.len())
        } else if is_number(c) {
            c.len_utf8()
        } else if is_other_symbol(c) {
            rest.find(|c| !is_other_symbol(c)).unwrap_or(rest.len())
        } else {
            at += c.len_utf8();
            continue;
        };
        at += len;
        return Some(&rest[..len]);
    })
}

// ---------------------------------------------------------------------------------------------
// Files

fn tokenizer_error(path: impl Into<PathBuf>, message: impl Into<String>) -> Error {
    Error::Tokenizer { path: path.into(), message: message.into() }
}

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| tokenizer_error(path, format!("not UTF-8 text: {e}")))
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    let text = read_utf8(path)?;
    serde_json::from_str(&text).map_err(|e| {
        tokenizer_error(path, format!("expected a JSON object mapping each token to its id (an integer >= 0): {e}"))
    })
}

/// The merges of `merges.txt`, best first.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = read_utf8(path)?;
    let mut lines = text.trim_end().lines().enumerate().peekable();
    if lines.peek().is_some_and(|(_, line)| line.trim_start_matches('\u{FEFF}').starts_with('#')) {
        lines.next();
    }
    let mut merges = Vec::new();
    for (index, line) in lines.take(MAX_MERGES) {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(first), Some(second), None) => merges.push((first.to_string(), second.to_string())),
            _ => {
                return Err(tokenizer_error(
                    path,
                    format!(
                        "line {}: expected a merge, two symbols separated by a space (like \"t h\"), found {line:?}",
                        index + 1
                    ),
                ))
            }
        }
    }
    Ok(merges)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenEntry {
    content: String,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl TokenEntry {
    fn plain(content: &str) -> Self {
        TokenEntry { content: content.to_string(), lstrip: false, rstrip: false, single_word: false }
    }
}

#[derive(Debug)]
struct Special {
    key: &'static str,
    entry: TokenEntry,
    /// The file that named it; `None` for a default.
    source: Option<PathBuf>,
}

#[derive(Debug)]
struct Config {
    /// bos, eos, unk, pad.
    specials: [Special; 4],
    /// `added_tokens_decoder`: id and token.
    added: Vec<(u32, TokenEntry)>,
    max_length: usize,
}

/// A JSON object file, or `None` if there is no such file.
fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| tokenizer_error(path, format!("not UTF-8 text: {e}")))?,
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(tokenizer_error(path, "expected a JSON object")),
        Err(e) => Err(tokenizer_error(path, format!("expected a JSON object: {e}"))),
    }
}

/// A token entry: a string, or an object with a string `content` and optional boolean flags
/// (`{"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": false, ...}`).
fn token_entry(value: &Value, key: &str, path: &Path) -> Result<Option<TokenEntry>> {
    let bad = || {
        tokenizer_error(path, format!("{key}: expected a string or an object with a string \"content\", found {value}"))
    };
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TokenEntry::plain(s))),
        Value::Object(map) => {
            let content = map.get("content").and_then(Value::as_str).ok_or_else(bad)?;
            let flag = |name: &str| -> Result<bool> {
                match map.get(name) {
                    None | Some(Value::Null) => Ok(false),
                    Some(Value::Bool(b)) => Ok(*b),
                    Some(other) => {
                        Err(tokenizer_error(path, format!("{key}.{name}: expected true or false, found {other}")))
                    }
                }
            };
            Ok(Some(TokenEntry {
                content: content.to_string(),
                lstrip: flag("lstrip")?,
                rstrip: flag("rstrip")?,
                single_word: flag("single_word")?,
            }))
        }
        _ => Err(bad()),
    }
}

fn read_config(dir: &Path) -> Result<Config> {
    let config_path = dir.join("tokenizer_config.json");
    let map_path = dir.join("special_tokens_map.json");
    let config = read_json_object(&config_path)?.unwrap_or_default();

    let mut added = Vec::new();
    let modern = config.get("added_tokens_decoder").filter(|v| !v.is_null());
    if let Some(decoder) = modern {
        let decoder = decoder
            .as_object()
            .ok_or_else(|| tokenizer_error(&config_path, "added_tokens_decoder: expected an object of id -> token"))?;
        for (id, value) in decoder {
            let key = format!("added_tokens_decoder.{id}");
            let id = id.parse::<u32>().map_err(|_| {
                tokenizer_error(&config_path, format!("{key}: expected a token id (an integer >= 0) as the key"))
            })?;
            if let Some(entry) = token_entry(value, &key, &config_path)? {
                added.push((id, entry));
            }
        }
    }
    // The legacy layout: special_tokens_map.json overrides tokenizer_config.json.
    let special_map = if modern.is_none() { read_json_object(&map_path)? } else { None };

    let mut specials = Vec::with_capacity(4);
    for (key, default) in [("bos_token", START_OF_TEXT), ("eos_token", END_OF_TEXT), ("unk_token", END_OF_TEXT)] {
        specials.push(special(key, default, &special_map, &map_path, &config, &config_path)?);
    }
    let eos_default = specials[1].entry.content.clone();
    specials.push(special("pad_token", &eos_default, &special_map, &map_path, &config, &config_path)?);
    let specials: [Special; 4] = specials.try_into().expect("four special tokens");

    let max_length = match config.get("model_max_length") {
        None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
        Some(value) => match value.as_u64() {
            Some(n) if (2..=MAX_MAX_LENGTH).contains(&n) => n as usize,
            _ => {
                return Err(tokenizer_error(
                    &config_path,
                    format!(
                        "model_max_length: expected an integer from 2 to {MAX_MAX_LENGTH} (a CLIP text encoder takes \
                         77), found {value}"
                    ),
                ))
            }
        },
    };
    Ok(Config { specials, added, max_length })
}

fn special(
    key: &'static str,
    default: &str,
    special_map: &Option<Map<String, Value>>,
    map_path: &Path,
    config: &Map<String, Value>,
    config_path: &Path,
) -> Result<Special> {
    if let Some(value) = special_map.as_ref().and_then(|m| m.get(key)) {
        if let Some(entry) = token_entry(value, key, map_path)? {
            return Ok(Special { key, entry, source: Some(map_path.to_path_buf()) });
        }
    }
    if let Some(value) = config.get(key) {
        if let Some(entry) = token_entry(value, key, config_path)? {
            return Ok(Special { key, entry, source: Some(config_path.to_path_buf()) });
        }
    }
    Ok(Special { key, entry: TokenEntry::plain(default), source: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<&str> {
        split_words(text).collect()
    }

    #[test]
    fn byte_table_is_clip_s() {
        let table = byte_chars();
        assert_eq!(table[b'!' as usize], '!');
        assert_eq!(table[b' ' as usize], 'Ġ'); // U+0120: the 33rd stand-in, as in GPT-2
        assert_eq!(table[0], 'Ā');
        assert_eq!(table[0xAD], 'Ń');
        let mut sorted = table.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
        assert!(table.iter().all(|c| !c.is_whitespace() && !c.is_control()));
    }

    #[test]
    fn clean_up_follows_basic_tokenizer() {
        assert_eq!(basic_clean("  A\tPhoto\u{3000}of\u{00A0}a\r\nCAT  "), "a photo of a cat");
        assert_eq!(basic_clean("ca\u{0}t\u{FFFD}\u{200D}s\u{AD}"), "cats");
        assert_eq!(basic_clean("e\u{301}COLE"), "\u{E9}cole"); // NFC, then lowercase
        assert_eq!(basic_clean("猫がいる"), "猫 がいる");
        assert_eq!(basic_clean("ΟΔΟΣ ΣΑΣ"), "οδος σας"); // final sigma per word
        assert_eq!(basic_clean("a\u{2028}b"), "a b");
        assert_eq!(basic_clean("\u{7}\u{85}\u{E000}"), "");
    }

    #[test]
    fn split_pattern_branches_in_order() {
        assert_eq!(words("it's a 'sun, 1999!!"), ["it", "'s", "a", "'s", "un", ",", "1", "9", "9", "9", "!!"]);
        assert_eq!(words("<|endoftext|>x<|startoftext|>"), ["<|endoftext|>", "x", "<|startoftext|>"]);
        assert_eq!(words("<|ſtartoftext|> 'ſ"), ["<|ſtartoftext|>", "'ſ"]);
        assert_eq!(words("a\u{345}b \u{345}"), ["a", "b"]);
        assert_eq!(words("👍🏽 ﬁne"), ["👍🏽", "ﬁne"]);
        assert_eq!(words(""), Vec::<&str>::new());
    }

    #[test]
    fn python_space_matches_str_isspace() {
        // The 29 characters Python 3.11's str.isspace() accepts.
        let all: Vec<char> = (0..=0x10FFFFu32).filter_map(char::from_u32).filter(|&c| is_python_space(c)).collect();
        assert_eq!(all.len(), 29);
        assert!(all.iter().all(|&c| c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)));
    }

    /// A folder with the given files.
    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    /// The bytes of "a", "b", "c" with and without `</w>`, three merges and the special tokens.
    fn toy_vocab(extra: &str) -> String {
        format!(
            r#"{{"a": 65, "b": 66, "c": 67, "!": 0, "a</w>": 321, "b</w>": 322, "c</w>": 323, "ab": 400,
               "abc</w>": 401, "cc</w>": 402, "<|startoftext|>": 500, "<|endoftext|>": 501{extra}}}"#
        )
    }

    #[test]
    fn bpe_merges_by_rank_and_maps_unknown_pieces_to_unk() {
        let dir =
            folder(&[("vocab.json", &toy_vocab("")), ("merges.txt", "#version: 0.2\na b\nab c</w>\nc c</w>\nb b\n")]);
        let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()), (500, 501, 501, 77));
        assert_eq!(tok.tokenize("abc ccc AB"), [401, 67, 402, 65, 322]);
        // "bb" merges but the vocabulary lacks it: the unk token (<|endoftext|>).
        assert_eq!(tok.tokenize("bbc"), [501, 323]);
        assert_eq!(tok.vocab_size(), 502);
        let tokens = tok.encode("abc");
        assert_eq!(&tokens.ids[..4], [500, 401, 501, 501]);
        assert_eq!((tokens.ids.len(), tokens.len, tokens.truncated), (77, 3, false));
    }

    #[test]
    fn added_tokens_are_cut_out_first_and_their_flags_strip() {
        let config = r#"{"pad_token": "!", "model_max_length": 5, "added_tokens_decoder": {
            "0": {"content": "!", "rstrip": true},
            "500": {"content": "<|startoftext|>"},
            "501": {"content": "<|endoftext|>", "lstrip": true}}}"#;
        let dir = folder(&[
            ("vocab.json", &toy_vocab("")),
            ("merges.txt", "#version: 0.2\na b\n"),
            ("tokenizer_config.json", config),
        ]);
        let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
        assert_eq!(tok.pad_id(), 0);
        // "!" is cut out (and strips the space after it); "a b" does not merge "a" with "b</w>".
        assert_eq!(tok.tokenize("ab! c"), [65, 322, 0, 323]);
        assert_eq!(tok.tokenize("a <|endoftext|>"), [321, 501]);
        let tokens = tok.encode("a a a a");
        assert_eq!(tokens.ids, [500, 321, 321, 321, 501]);
        assert_eq!((tokens.len, tokens.truncated), (5, true));
        let tokens = tok.encode("a a a");
        assert_eq!((tokens.len, tokens.truncated), (5, false));
    }

    #[test]
    fn legacy_special_tokens_map_overrides_the_config() {
        let dir = folder(&[
            ("vocab.json", &toy_vocab("")),
            ("merges.txt", ""),
            ("tokenizer_config.json", r#"{"pad_token": "<|endoftext|>", "model_max_length": 77}"#),
            ("special_tokens_map.json", r#"{"pad_token": {"content": "!", "lstrip": false}}"#),
        ]);
        let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
        assert_eq!(tok.pad_id(), 0);
    }

    #[test]
    fn config_errors_name_the_file_and_key() {
        let dir = folder(&[
            ("vocab.json", &toy_vocab("")),
            ("merges.txt", ""),
            ("tokenizer_config.json", r#"{"model_max_length": 1000000000000000019884624838656}"#),
        ]);
        let err = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("model_max_length"), "{err}");

        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": 3}"#).unwrap();
        let err = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("bos_token"), "{err}");
    }
}
