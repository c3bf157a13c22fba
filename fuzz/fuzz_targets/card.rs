//! Fuzzes `ModelCard::parse`: it must never panic, and a card it accepts must satisfy the
//! invariants that the rest of the crate relies on.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use edge_diffuse::card::ModelCard;
use libfuzzer_sys::fuzz_target;

/// A private folder the card's relative paths resolve against. It holds a valid
/// `scheduler_config.json`, an invalid `bad.json` and a non-object `list.json`, so that the
/// `model.scheduler_config` merge path and its errors are reached.
fn card_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("edge-diffuse-fuzz-card-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("scheduler_config.json"),
            r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
               "prediction_type": "v_prediction", "clip_sample": false, "set_alpha_to_one": true}"#,
        )
        .unwrap();
        std::fs::write(dir.join("bad.json"), r#"{"beta_schedule": "cosine", "num_train_timesteps": -1}"#).unwrap();
        std::fs::write(dir.join("list.json"), "[1, 2, 3]").unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // `model.scheduler_config` names a file that parse() reads: keep it inside the private folder,
    // away from device and pseudo files (/dev/zero, /dev/stdin), which would block or never end.
    // Text that is not TOML fails in parse() before any file is read.
    if let Ok(table) = text.parse::<toml::Table>() {
        if let Some(rel) = table.get("model").and_then(|m| m.get("scheduler_config")).and_then(|v| v.as_str()) {
            let rel = Path::new(rel);
            if !rel.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
                return;
            }
        }
    }
    let dir = card_dir();
    let file = dir.join("model.toml");
    let Ok(card) = ModelCard::parse(text, dir, &file) else { return };

    let im = &card.image;
    assert!((1..=4).contains(&im.channels), "channels {}", im.channels);
    assert!((1..=8192).contains(&im.height), "height {}", im.height);
    assert!((1..=8192).contains(&im.width), "width {}", im.width);
    let [lo, hi] = im.value_range;
    assert!(lo.is_finite() && hi.is_finite() && lo < hi, "value_range [{lo}, {hi}]");
    if let Some(classes) = &card.classes {
        assert!(!classes.names.is_empty());
        assert!(card.model.inputs.class_labels.is_some());
        assert!(classes.null.is_none_or(|n| n >= 0), "null {:?}", classes.null);
        // Every name resolves to its own label (or an earlier one with the same name), and so
        // does every in-range number.
        for (i, name) in classes.names.iter().enumerate() {
            let label = card.class_label(name).expect("a listed name resolves");
            assert!((0..=i as i64).contains(&label), "{name:?} -> {label}, index {i}");
        }
        let last = classes.names.len() - 1;
        let _ = card.class_label(&last.to_string());
        let _ = card.class_label("no-such-class");
    }
    if let Some(steps) = card.defaults.steps {
        assert!(steps >= 1);
    }
    if let Some(g) = card.defaults.guidance {
        assert!(g.is_finite() && g >= 0.0, "guidance {g}");
    }
    assert_eq!(card.dir, dir);
    assert_eq!(card.file, file);
    let _ = card.onnx_path();
    let _ = card.scheduler.set_keys();
});
