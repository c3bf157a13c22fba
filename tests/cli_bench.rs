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
fn bench_rejects_zero_runs() {
    let out = common::edge_diffuse().args(["bench", "--runs", "0"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("--runs"), "{err}");
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
