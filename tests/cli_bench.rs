//! `edge-diffuse bench --json` reports every field with sane values.

mod common;

#[test]
fn bench_json_reports_latency_and_memory() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student");
    let out = common::edge_diffuse()
        .args(["bench", "--model", model, "--runs", "2", "--threads", "1", "--steps", "2", "--json"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in
        ["load_s", "first_step_ms", "step_ms_median", "step_ms_p90", "image_s_median", "images_per_s", "peak_rss_mib"]
    {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    assert!(v["step_ms_p90"].as_f64() >= v["step_ms_median"].as_f64());
    assert_eq!(v["steps"], 2);
    assert_eq!(v["threads"], 1);
    assert_eq!(v["model"], "fmnist-student");
}

#[test]
fn bench_times_an_img2img_request_with_previews() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-teacher");
    #[rustfmt::skip]
    let out = common::edge_diffuse()
        .args([
            "bench", "--model", model, "--runs", "1", "--threads", "1", "--steps", "6", "--strength", "0.5",
            "--sampler", "ddim", "--preview-every", "1", "--json",
        ])
        .output()
        .expect("runs");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    // int(6 × 0.5) steps of the 6 run.
    assert_eq!((v["steps"].as_u64(), v["timesteps"].as_u64()), (Some(6), Some(3)), "{v}");
    assert_eq!((v["strength"].as_f64(), v["preview_every"].as_u64()), (Some(0.5), Some(1)));
}

#[test]
fn bench_rejects_zero_runs() {
    let out = common::edge_diffuse().args(["bench", "--runs", "0"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("--runs"), "{err}");
    // Zero threads too, with or without --compare, before any model is loaded.
    for extra in [&[][..], &["--compare"][..]] {
        let out = common::edge_diffuse().args(["bench", "--threads", "0"]).args(extra).output().expect("runs");
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: ") && err.contains("--threads"), "{extra:?}: {err}");
    }
}

#[test]
fn bench_takes_sampler_and_guidance() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-teacher");
    let run = |extra: &[&str]| {
        let out = common::edge_diffuse()
            .args(["bench", "--model", model, "--runs", "1", "--threads", "1", "--steps", "2", "--json"])
            .args(extra)
            .output()
            .expect("runs");
        assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("one JSON object")
    };
    let v = run(&["--sampler", "euler", "--guidance", "1"]);
    assert_eq!(v["sampler"], "euler");
    assert_eq!(v["guidance"], 1.0);
    // The card's defaults when not given: ddim with guidance 2.
    let v = run(&[]);
    assert_eq!(v["sampler"], "ddim");
    assert_eq!(v["guidance"], 2.0);
    let out = common::edge_diffuse().args(["bench", "--model", model, "--sampler", "nope"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown sampler"));
}

#[test]
fn profile_prints_where_a_call_spends_its_time() {
    let out = common::edge_diffuse().args(["profile", "--runs", "1"]).output().expect("runs");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("fmnist-student"), "{text}");
    // One line per operator kind with its share; our Winograd operator runs the 3x3 convolutions.
    let shares: Vec<f64> =
        text.lines().filter_map(|l| l.trim_end().strip_suffix('%')?.rsplit(' ').next()?.parse().ok()).collect();
    assert!(shares.len() > 5, "{text}");
    let total: f64 = shares.iter().sum();
    assert!((total - 100.0).abs() < 1.0, "shares add up to {total}: {text}");
    assert!(text.lines().any(|l| l.starts_with("Winograd3x3")), "{text}");

    let out = common::edge_diffuse().args(["profile", "--runs", "0"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("runs"), "{err}");
}

/// `bench --compare` measures each path this CPU runs, with its ratio to tract's im2col path at
/// the same threads (1 and 2 here: four paths without float16 arithmetic).
#[test]
fn bench_compare_reports_every_path_and_its_ratio() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student");
    #[rustfmt::skip]
    let out = common::edge_diffuse()
        .args(["bench", "--model", model, "--runs", "1", "--threads", "2", "--steps", "1", "--compare", "--json",
               "--plan-cache", "off"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let paths = v["paths"].as_array().expect("paths");
    let f16 = v["f16_arithmetic"].as_bool().expect("f16_arithmetic");
    assert_eq!(paths.len(), if f16 { 8 } else { 4 }, "{v}");
    for threads in [1, 2] {
        for convolution in ["im2col", "winograd"] {
            let p = paths
                .iter()
                .find(|p| p["threads"] == threads && p["convolution"] == convolution && p["precision"] == "f32")
                .unwrap_or_else(|| panic!("no {convolution} f32 path at {threads} threads in {v}"));
            let (ms, ratio) = (p["step_ms_median"].as_f64().unwrap(), p["vs_im2col_f32"].as_f64().unwrap());
            assert!(ms > 0.0 && ratio > 0.0 && ratio.is_finite(), "{p}");
            if convolution == "im2col" {
                assert_eq!(ratio, 1.0);
            }
            // 3 rounds of 1 image of 1 step.
            assert_eq!(p["steps_measured"], 3);
        }
    }
    // A path flag cannot go with --compare.
    let out = common::edge_diffuse().args(["bench", "--compare", "--convolution", "im2col"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
}
