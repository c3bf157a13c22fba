//! The CLIP tokenizer against transformers' slow `CLIPTokenizer` (4.57.1, without ftfy,
//! `padding="max_length", truncation=True`): every id of the fixtures that
//! tools/make_tokenizer_fixtures.py wrote to tests/fixtures/tokenizer/.
//!
//! - `clip/`: the full CLIP vocabulary (gzipped; unpacked here into a temporary folder) with
//!   the SD 1.x config (pads with `<|endoftext|>`) and the SD 2.x one (pads with `!`, which is
//!   then also a special token inside the text), over `clip_cases.json.gz` (2000+ strings).
//! - `small/`, `small-sd2/`: 1000 merges only, and `small_cases.json.gz`: their ids under seven
//!   configs (the two folders, the legacy SD2 layout, `special_tokens_map.json` alone, strip
//!   flags, tokens missing from the vocabulary, a max length of 16).
//! - The flag for a cut prompt, the empty prompt, and the errors for a broken folder.

use std::io::Read;
use std::path::{Path, PathBuf};

use edge_diffuse::tokenizer::{ClipTokenizer, Tokens};
use edge_diffuse::Error;
use serde_json::Value;

const MAX_LENGTH: usize = 77;
const BOS: u32 = 49406;
const EOS: u32 = 49407;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn gunzip(path: &Path) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file).read_to_end(&mut bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
}

fn json_gz(path: &Path) -> Value {
    serde_json::from_slice(&gunzip(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The full CLIP folder, unpacked, with `config` (a file of `clip/`) as `tokenizer_config.json`.
fn clip_folder(config: &str) -> tempfile::TempDir {
    let src = fixtures().join("clip");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vocab.json"), gunzip(&src.join("vocab.json.gz"))).unwrap();
    std::fs::write(dir.path().join("merges.txt"), gunzip(&src.join("merges.txt.gz"))).unwrap();
    std::fs::copy(src.join(config), dir.path().join("tokenizer_config.json")).unwrap();
    dir
}

fn clip(config: &str) -> ClipTokenizer {
    let dir = clip_folder(config);
    ClipTokenizer::from_folder(dir.path()).unwrap_or_else(|e| panic!("loading the CLIP fixture: {e}"))
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("an id list").iter().map(|v| v.as_u64().expect("an id") as u32).collect()
}

/// One expected encoding: the real ids (BOS .. EOS) and whether transformers cut the text.
struct Expected<'a> {
    label: &'a str,
    text: &'a str,
    ids: Vec<u32>,
    truncated: bool,
}

/// Checks every case, prints each mismatch (text, expected, got) and fails with their count.
fn check_all<'a>(tok: &ClipTokenizer, what: &str, cases: impl IntoIterator<Item = Expected<'a>>) -> usize {
    let mut mismatches = 0;
    let mut total = 0;
    for case in cases {
        total += 1;
        let mut want = case.ids;
        let len = want.len();
        want.resize(tok.max_length(), tok.pad_id());
        let want = Tokens { ids: want, len, truncated: case.truncated };
        let got = tok.encode(case.text);
        if got != want {
            mismatches += 1;
            if mismatches <= 40 {
                eprintln!(
                    "{what} [{}] {:?}\n  expected {:?} (truncated: {})\n  got      {:?} (truncated: {})",
                    case.label,
                    case.text,
                    &want.ids[..want.len],
                    want.truncated,
                    &got.ids[..got.len.min(got.ids.len())],
                    got.truncated
                );
                if got.ids[got.len.min(got.ids.len())..].iter().any(|&id| id != tok.pad_id())
                    || got.ids.len() != want.ids.len()
                {
                    eprintln!("  padding: got {:?}", got.ids);
                }
            }
        }
    }
    assert_eq!(mismatches, 0, "{what}: {mismatches} of {total} strings differ from transformers");
    total
}

fn clip_cases() -> Vec<Value> {
    let cases = json_gz(&fixtures().join("clip_cases.json.gz"));
    assert_eq!(cases["max_length"], MAX_LENGTH);
    cases["cases"].as_array().expect("cases").clone()
}

/// The expected encodings of `clip_cases.json.gz`-style cases, under the SD1 or the SD2 config.
fn clip_expected(cases: &[Value], sd2: bool) -> impl Iterator<Item = Expected<'_>> {
    cases.iter().map(move |c| {
        let (ids_key, truncated_key) = match c.get("sd2") {
            Some(_) if sd2 => ("sd2", "sd2_truncated"),
            _ => ("ids", "truncated"),
        };
        Expected {
            label: c["cat"].as_str().unwrap(),
            text: c["text"].as_str().unwrap(),
            ids: ids(&c[ids_key]),
            truncated: c[truncated_key].as_bool().unwrap(),
        }
    })
}

#[test]
fn full_vocabulary_matches_transformers_sd1() {
    let tok = clip("tokenizer_config.json");
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length(), tok.vocab_size()),
        (BOS, EOS, EOS, 77, 49408)
    );
    let cases = clip_cases();
    let total = check_all(&tok, "SD1", clip_expected(&cases, false));
    assert!(total >= 2000, "only {total} fixture strings");

    let categories: std::collections::BTreeSet<&str> = cases.iter().map(|c| c["cat"].as_str().unwrap()).collect();
    for wanted in [
        "ascii",
        "punctuation",
        "digits",
        "accents",
        "emoji",
        "cjk",
        "whitespace",
        "control",
        "special",
        "long",
        "edge",
        "prompt",
    ] {
        assert!(categories.contains(wanted), "no {wanted} strings in the fixtures");
    }
}

#[test]
fn full_vocabulary_matches_transformers_sd2() {
    let tok = clip("tokenizer_config.sd2.json");
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()), (BOS, EOS, 0, 77));
    let cases = clip_cases();
    let differ = cases.iter().filter(|c| c.get("sd2").is_some()).count();
    assert!(differ > 10, "only {differ} strings where `!` as a special token matters");
    check_all(&tok, "SD2", clip_expected(&cases, true));
}

/// More strings than the committed ones, made on demand:
/// `python3 tools/make_tokenizer_fixtures.py --extra 40000` writes /tmp/clip_extra_cases.json.gz, then
/// `TOKENIZER_EXTRA_CASES=/tmp/clip_extra_cases.json.gz cargo test --test tokenizer -- --ignored`.
#[test]
#[ignore = "needs TOKENIZER_EXTRA_CASES, a file of tools/make_tokenizer_fixtures.py --extra"]
fn extra_cases_match_transformers() {
    let path = std::env::var_os("TOKENIZER_EXTRA_CASES").expect("set TOKENIZER_EXTRA_CASES (see the doc comment)");
    let cases = json_gz(Path::new(&path));
    let cases = cases["cases"].as_array().expect("cases");
    let n = check_all(&clip("tokenizer_config.json"), "SD1", clip_expected(cases, false));
    check_all(&clip("tokenizer_config.sd2.json"), "SD2", clip_expected(cases, true));
    eprintln!("{n} extra strings match");
}

#[test]
fn well_known_prompts() {
    let tok = clip("tokenizer_config.json");
    let cat = tok.encode("a photo of a cat");
    assert_eq!(&cat.ids[..8], [BOS, 320, 1125, 539, 320, 2368, EOS, EOS]);
    assert_eq!((cat.ids.len(), cat.len, cat.truncated), (77, 7, false));
    assert_eq!(tok.tokenize("A photo of a dog"), [320, 1125, 539, 320, 1929]);
    assert_eq!(tok.tokenize("hello world"), [3306, 1002]);
}

#[test]
fn empty_prompt_is_bos_eos_then_padding() {
    for (config, pad) in [("tokenizer_config.json", EOS), ("tokenizer_config.sd2.json", 0)] {
        let tok = clip(config);
        for text in ["", "   ", "\n\t", "\u{0}\u{FFFD}\u{200B}"] {
            let tokens = tok.encode(text);
            let mut want = vec![BOS, EOS];
            want.resize(MAX_LENGTH, pad);
            assert_eq!(tokens, Tokens { ids: want, len: 2, truncated: false }, "{config} {text:?}");
        }
    }
}

#[test]
fn truncation_flag_on_long_prompts() {
    let tok = clip("tokenizer_config.json");
    // "cat" is one token: 75 fit between BOS and EOS, the 76th is cut.
    let fits = tok.encode(&["cat"; 75].join(" "));
    assert_eq!((fits.len, fits.truncated, fits.ids[76]), (77, false, EOS));
    let cut = tok.encode(&["cat"; 76].join(" "));
    assert_eq!((cut.len, cut.truncated, cut.ids[75], cut.ids[76]), (77, true, 2368, EOS));
    assert_eq!(tok.tokenize(&["cat"; 76].join(" ")).len(), 76);

    let long = tok.encode(&"a very long prompt, ".repeat(2000));
    assert!(long.truncated && long.len == 77 && long.ids.len() == 77);

    let cases = clip_cases();
    let truncated = cases.iter().filter(|c| c["truncated"].as_bool().unwrap()).count();
    assert!(truncated >= 50, "only {truncated} fixture strings over 77 tokens");
}

/// Builds a small variant folder as the generator did: the base folder, files written over or
/// deleted, vocabulary entries dropped.
fn small_variant(variant: &Value) -> tempfile::TempDir {
    let base = fixtures().join(variant["base"].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(base.join(name), dir.path().join(name)).unwrap();
    }
    for (name, content) in variant["files"].as_object().unwrap() {
        let path = dir.path().join(name);
        if content.is_null() {
            std::fs::remove_file(&path).unwrap();
        } else {
            std::fs::write(&path, serde_json::to_string_pretty(content).unwrap()).unwrap();
        }
    }
    let drop: Vec<&str> = variant["drop_from_vocab"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    if !drop.is_empty() {
        let path = dir.path().join("vocab.json");
        let mut vocab: serde_json::Map<String, Value> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        vocab.retain(|token, _| !drop.contains(&token.as_str()));
        std::fs::write(&path, serde_json::to_string(&vocab).unwrap()).unwrap();
    }
    dir
}

#[test]
fn small_vocabulary_variants_match_transformers() {
    let fixture = json_gz(&fixtures().join("small_cases.json.gz"));
    let variants = fixture["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 7);
    for variant in variants {
        let name = variant["name"].as_str().unwrap();
        let dir = small_variant(variant);
        let tok = ClipTokenizer::from_folder(dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = (&variant["bos_id"], &variant["eos_id"], &variant["pad_id"], &variant["max_length"]);
        assert_eq!(
            (tok.bos_id() as u64, tok.eos_id() as u64, tok.pad_id() as u64, tok.max_length() as u64),
            (want.0.as_u64().unwrap(), want.1.as_u64().unwrap(), want.2.as_u64().unwrap(), want.3.as_u64().unwrap()),
            "{name}: special ids and max length"
        );
        let rows = variant["cases"].as_array().unwrap();
        let expected = rows.iter().map(|row| Expected {
            label: name,
            text: row[0].as_str().unwrap(),
            ids: ids(&row[1]),
            truncated: row[2].as_bool().unwrap(),
        });
        let total = check_all(&tok, name, expected);
        assert!(total >= 300, "{name}: only {total} strings");
    }
}

#[test]
fn committed_small_folders_load() {
    let small = ClipTokenizer::from_folder(fixtures().join("small")).unwrap();
    let sd2 = ClipTokenizer::from_folder(fixtures().join("small-sd2")).unwrap();
    for tok in [&small, &sd2] {
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.vocab_size(), tok.max_length()), (1512, 1513, 1514, 77));
    }
    assert_eq!((small.pad_id(), sd2.pad_id()), (1513, 0));
    let a = small.encode("a photo of a cat!");
    let b = sd2.encode("a photo of a cat!");
    assert_eq!(a.ids[..a.len - 2], b.ids[..b.len - 2], "the same up to the `!`");
    assert_eq!(b.ids[b.len - 2..b.len + 1], [0, 1513, 0], "`!` is SD2's pad token, also inside the text");
}

#[test]
fn tokenizer_is_shareable() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<ClipTokenizer>();
}

// ---------------------------------------------------------------------------------------------
// Errors

/// The small folder, copied so a test can break one file.
fn small_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("small").join(name), dir.path().join(name)).unwrap();
    }
    dir
}

/// Loads `dir`, expecting a `Tokenizer` error on `file` whose message holds every one of `words`.
fn expect_tokenizer_error(dir: &Path, file: &str, words: &[&str]) -> String {
    match ClipTokenizer::from_folder(dir) {
        Ok(_) => panic!("{file}: loaded a broken folder"),
        Err(Error::Tokenizer { path, message }) => {
            assert_eq!(path, dir.join(file), "{message}");
            for word in words {
                assert!(message.contains(word), "{file}: {message:?} lacks {word:?}");
            }
            let text = Error::Tokenizer { path: path.clone(), message: message.clone() }.to_string();
            assert!(text.contains(file), "{text}");
            message
        }
        Err(other) => panic!("{file}: expected Error::Tokenizer, got {other:?}"),
    }
}

#[test]
fn missing_files_are_io_errors_naming_the_file() {
    for name in ["vocab.json", "merges.txt"] {
        let dir = small_copy();
        std::fs::remove_file(dir.path().join(name)).unwrap();
        match ClipTokenizer::from_folder(dir.path()) {
            Err(e @ Error::Io { .. }) => {
                let Error::Io { path, .. } = &e else { unreachable!() };
                assert_eq!(path, &dir.path().join(name));
                assert!(e.to_string().contains(name), "{e}");
            }
            other => panic!("missing {name}: expected Error::Io, got {other:?}"),
        }
    }
    // The configs are optional: the defaults are CLIP's.
    let dir = small_copy();
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()), (1512, 1513, 1513, 77));
}

#[test]
fn broken_vocab_json() {
    let dir = small_copy();
    std::fs::write(dir.path().join("vocab.json"), r#"{"a": 1, "b": "#).unwrap();
    expect_tokenizer_error(dir.path(), "vocab.json", &["JSON object"]);
    std::fs::write(dir.path().join("vocab.json"), r#"{"a": -1}"#).unwrap();
    expect_tokenizer_error(dir.path(), "vocab.json", &["JSON object", "-1"]);
    std::fs::write(dir.path().join("vocab.json"), "[1, 2]").unwrap();
    expect_tokenizer_error(dir.path(), "vocab.json", &["JSON object"]);
    std::fs::write(dir.path().join("vocab.json"), b"{\"\xff\": 1}").unwrap();
    expect_tokenizer_error(dir.path(), "vocab.json", &["UTF-8"]);
}

#[test]
fn malformed_merges_line() {
    let dir = small_copy();
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\ni n\nt h e\nt h\n").unwrap();
    expect_tokenizer_error(dir.path(), "merges.txt", &["line 3", "\"t h e\"", "two symbols"]);
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\ni n\n\nt h\n").unwrap();
    expect_tokenizer_error(dir.path(), "merges.txt", &["line 3"]);
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nsingle\n").unwrap();
    expect_tokenizer_error(dir.path(), "merges.txt", &["line 2"]);
}

#[test]
fn special_token_not_in_the_vocabulary() {
    let dir = small_copy();
    let config = dir.path().join("tokenizer_config.json");
    let mut value: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    value["pad_token"] = Value::from("<pad>");
    std::fs::write(&config, value.to_string()).unwrap();
    expect_tokenizer_error(dir.path(), "tokenizer_config.json", &["pad_token", "\"<pad>\"", "vocab.json"]);

    // The legacy layout names the file the token came from.
    let dir = small_copy();
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"model_max_length": 77}"#).unwrap();
    std::fs::write(dir.path().join("special_tokens_map.json"), r#"{"bos_token": {"content": "<s>"}}"#).unwrap();
    expect_tokenizer_error(dir.path(), "special_tokens_map.json", &["bos_token", "\"<s>\""]);

    // No config and a vocabulary without CLIP's tokens: the defaults are missing from vocab.json.
    let dir = small_copy();
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0}"#).unwrap();
    expect_tokenizer_error(dir.path(), "vocab.json", &["bos_token", "<|startoftext|>", "default"]);
}

#[test]
fn broken_configs() {
    let dir = small_copy();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"pad_token\": ").unwrap();
    expect_tokenizer_error(dir.path(), "tokenizer_config.json", &["JSON object"]);
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"model_max_length": "77"}"#).unwrap();
    expect_tokenizer_error(dir.path(), "tokenizer_config.json", &["model_max_length", "integer"]);
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"model_max_length": 1}"#).unwrap();
    expect_tokenizer_error(dir.path(), "tokenizer_config.json", &["model_max_length"]);
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"pad_token": {"lstrip": true}}"#).unwrap();
    expect_tokenizer_error(dir.path(), "tokenizer_config.json", &["pad_token", "content"]);
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"added_tokens_decoder": {"x": {"content": "!"}}}"#)
        .unwrap();
    expect_tokenizer_error(dir.path(), "tokenizer_config.json", &["added_tokens_decoder.x", "id"]);
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"added_tokens_decoder": {"0": {"content": "!", "rstrip": "yes"}}}"#,
    )
    .unwrap();
    expect_tokenizer_error(dir.path(), "tokenizer_config.json", &["added_tokens_decoder.0.rstrip"]);

    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"model_max_length": 77}"#).unwrap();
    std::fs::write(dir.path().join("special_tokens_map.json"), "[]").unwrap();
    expect_tokenizer_error(dir.path(), "special_tokens_map.json", &["JSON object"]);
}
