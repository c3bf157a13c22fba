//! Plan files of packed weights (`LoadOptions::plan_cache`): the first load writes one, later
//! loads map it, and the samples stay bit-identical to the heap path's. A damaged or stale file
//! is rebuilt, a file deleted while mapped keeps serving the running pipeline, an unwritable
//! place leaves the weights on the heap, and two processes building at once leave one whole
//! file.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use edge_diffuse::pipeline::{LoadOptions, Pipeline, Request, StepInfo};
use edge_diffuse::runtime::{PlanCache, PlanFile, WeightPrecision};
use ndarray::Array4;

fn model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name)
}

/// The cache folder of this test binary: `PlanCache::Auto` also reads plan files there, and
/// other tests (a model loaded from bytes) write the shipped models' plan files to the user's.
fn cache() -> PathBuf {
    static SET: std::sync::Once = std::sync::Once::new();
    let dir = std::env::temp_dir().join(format!("ed-plan-cache-{}", std::process::id()));
    SET.call_once(|| std::env::set_var("XDG_CACHE_HOME", &dir));
    dir
}

/// A copy of a shipped model in a fresh folder of its own.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    cache();
    let dir = std::env::temp_dir().join(format!("ed-plan-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(model(name)).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if !file.ends_with(".edplan") {
            std::fs::copy(&path, dir.join(file)).unwrap();
        }
    }
    dir
}

fn plan_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".edplan"))
        .collect();
    out.sort();
    out
}

fn load(dir: &Path, plan_cache: PlanCache) -> Pipeline {
    Pipeline::load(dir, LoadOptions { threads: 1, plan_cache, ..Default::default() }).expect("load")
}

fn sample(pipe: &mut Pipeline) -> Array4<f32> {
    let req = Request { seed: 7, num_images: 2, ..Default::default() };
    pipe.generate(&req, &mut |_: &StepInfo| ControlFlow::Continue(())).expect("generate").samples
}

/// [`sample`] in 4 steps: enough to carry a weight's rounding into the images.
fn few_steps(pipe: &mut Pipeline) -> Array4<f32> {
    let req = Request { seed: 7, num_images: 2, steps: Some(4), ..Default::default() };
    pipe.generate(&req, &mut |_: &StepInfo| ControlFlow::Continue(())).expect("generate").samples
}

fn assert_bit_identical(a: &Array4<f32>, b: &Array4<f32>, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}");
    let differing = a.iter().zip(b.iter()).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{what}: {differing} of {} values differ", a.len());
}

fn denoiser_file(pipe: &Pipeline) -> PlanFile {
    pipe.plan_files()[0].1.clone()
}

#[test]
fn the_first_load_writes_the_plan_file_and_later_loads_map_it_with_identical_samples() {
    for name in ["fmnist-student", "fmnist-teacher"] {
        let dir = copy_of(name, &format!("roundtrip-{name}"));
        let heap = sample(&mut load(&dir, PlanCache::Off));
        assert!(plan_files(&dir).is_empty(), "{name}: Off wrote a plan file");

        let mut first = load(&dir, PlanCache::Auto);
        let written = match denoiser_file(&first) {
            PlanFile::Written { path, stale: None, mapped: true, .. } => path,
            other => panic!("{name}: the first load should write the plan file and map it, got {other:?}"),
        };
        assert_eq!(plan_files(&dir), vec![written.clone()], "{name}");
        assert_bit_identical(&sample(&mut first), &heap, &format!("{name}: building load against the heap"));

        let mut second = load(&dir, PlanCache::Auto);
        let left_out = match denoiser_file(&second) {
            PlanFile::Mapped { path, left_out, saved_graph: true } if path == written => left_out,
            other => panic!("{name}: the second load should map {written:?} and its saved graph, got {other:?}"),
        };
        assert!(left_out > 0, "{name}: the second load read every weight from the ONNX file");
        assert_bit_identical(&sample(&mut second), &heap, &format!("{name}: mapped against the heap"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn a_damaged_plan_file_is_rebuilt_with_a_notice_and_the_same_samples() {
    let dir = copy_of("fmnist-student", "damaged");
    let heap = sample(&mut load(&dir, PlanCache::Off));
    drop(load(&dir, PlanCache::Auto));
    let path = plan_files(&dir).pop().expect("a plan file");
    let good = std::fs::read(&path).unwrap();
    let damages: [(&str, Vec<u8>); 3] = [
        ("bad magic", [b"XXXXXXXX".as_slice(), &good[8..]].concat()),
        ("short", good[..good.len() / 2].to_vec()),
        ("empty", vec![]),
    ];
    for (what, bytes) in damages {
        std::fs::write(&path, &bytes).unwrap();
        let mut pipe = load(&dir, PlanCache::Auto);
        let file = denoiser_file(&pipe);
        assert!(matches!(&file, PlanFile::Written { stale: Some(_), .. }), "{what}: {file:?}");
        assert!(file.notice().is_some_and(|n| n.contains("rebuilt")), "{what}: {:?}", file.notice());
        assert_bit_identical(&sample(&mut pipe), &heap, what);
        assert_eq!(std::fs::read(&path).unwrap(), good, "{what}: the rebuilt file differs from the first");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_onnx_file_rewritten_in_place_is_detected_and_a_copied_folder_keeps_its_plan_file() {
    let dir = copy_of("fmnist-student", "rewritten");
    drop(load(&dir, PlanCache::Auto));
    let plan = plan_files(&dir).pop().expect("a plan file");

    // A copy of the folder: other inodes and times, the same bytes. The stat the plan file
    // recorded no longer vouches for the ONNX file, so its bytes are hashed, and they match.
    let copy = dir.with_file_name(format!("{}-copy", dir.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    let copied = load(&copy, PlanCache::Auto);
    assert!(
        matches!(denoiser_file(&copied), PlanFile::Mapped { saved_graph: true, .. }),
        "the copied folder: {:?}",
        denoiser_file(&copied)
    );
    std::fs::remove_dir_all(&copy).unwrap();

    // The ONNX file rewritten in place (same inode, same length, one weight's byte changed):
    // its status-change time moves, so its bytes are hashed, and they differ.
    let onnx = dir.join("denoiser.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::thread::sleep(std::time::Duration::from_millis(50));
    std::fs::write(&onnx, &bytes).unwrap();
    let pipe = load(&dir, PlanCache::Auto);
    match denoiser_file(&pipe) {
        PlanFile::Written { path, stale: Some(why), .. } => {
            assert_eq!(path, plan);
            assert!(why.contains("ONNX file changed"), "{why}");
        }
        other => panic!("the rewritten ONNX file: expected a rebuilt plan file, got {other:?}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_plan_file_deleted_while_mapped_keeps_serving_the_pipeline() {
    let dir = copy_of("fmnist-student", "deleted");
    let heap = sample(&mut load(&dir, PlanCache::Off));
    drop(load(&dir, PlanCache::Auto));
    let mut pipe = load(&dir, PlanCache::Auto);
    assert!(matches!(denoiser_file(&pipe), PlanFile::Mapped { .. }));
    for path in plan_files(&dir) {
        std::fs::remove_file(path).unwrap();
    }
    assert_bit_identical(&sample(&mut pipe), &heap, "after the deletion");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unwritable_place_leaves_the_weights_on_the_heap_with_a_notice() {
    let dir = copy_of("fmnist-student", "unwritable");
    let heap = sample(&mut load(&dir, PlanCache::Off));
    // Below a regular file no folder can be made, whoever runs the test (root included).
    let blocked = dir.join("model.toml").join("plans");
    let mut pipe = load(&dir, PlanCache::Dir(blocked));
    let file = denoiser_file(&pipe);
    assert!(matches!(file, PlanFile::Unwritten(_)), "{file:?}");
    assert!(file.notice().is_some_and(|n| n.contains("heap")));
    assert_bit_identical(&sample(&mut pipe), &heap, "heap fallback");
    assert!(plan_files(&dir).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_plan_cache_folder_holds_the_file_and_serves_a_second_load() {
    let dir = copy_of("fmnist-student", "folder");
    let cache = dir.join("cache");
    let first = load(&dir, PlanCache::Dir(cache.clone()));
    assert!(matches!(denoiser_file(&first), PlanFile::Written { .. }));
    assert_eq!(plan_files(&cache).len(), 1);
    assert!(plan_files(&dir).is_empty(), "Dir(…) wrote beside the model");
    let second = load(&dir, PlanCache::Dir(cache.clone()));
    assert!(matches!(denoiser_file(&second), PlanFile::Mapped { path, .. } if path.starts_with(&cache)));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn two_processes_building_at_once_leave_one_whole_plan_file() {
    let dir = copy_of("fmnist-student", "race");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let run = |i: usize| {
        std::process::Command::new(env!("CARGO_BIN_EXE_edge-diffuse"))
            .args(["sample", "--threads", "1", "--seed", "3", "--model"])
            .arg(&dir)
            .arg("--out")
            .arg(out.join(format!("{i}.png")))
            .env("XDG_CACHE_HOME", cache())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let children: Vec<_> = (0..4).map(run).collect();
    for child in children {
        let done = child.wait_with_output().unwrap();
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert!(!stderr.contains("rebuilt"), "a racing process saw a damaged file: {stderr}");
    }
    assert_eq!(plan_files(&dir).len(), 1, "one plan file, no temporary files left");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let pipe = load(&dir, PlanCache::Auto);
    assert!(matches!(denoiser_file(&pipe), PlanFile::Mapped { .. }));
    let pngs: Vec<Vec<u8>> = (0..4).map(|i| std::fs::read(out.join(format!("{i}.png"))).unwrap()).collect();
    assert!(pngs.windows(2).all(|w| w[0] == w[1]), "the four runs' images differ");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_plan_the_proof_does_not_cover_reads_the_whole_onnx_file_first() {
    use edge_diffuse::runtime::Denoiser;
    use edge_diffuse::ModelCard;
    let dir = copy_of("fmnist-student", "unproven");
    // The pipeline builds and proves batch 1 only (the student's guidance is built in).
    drop(load(&dir, PlanCache::Auto));
    let card = ModelCard::load(&dir).unwrap();
    let x = Array4::from_shape_fn((3, 1, 32, 32), |(i, _, h, w)| ((i * 31 + h * 7 + w) % 17) as f32 / 8.0 - 1.0);
    let predict = |denoiser: &mut Denoiser| {
        let mut out = Array4::zeros((3, 1, 32, 32));
        denoiser.predict(&x, 500.0, Some(&[1, 4, 7]), None, &mut out).expect("predict");
        out
    };
    let heap = predict(&mut Denoiser::load(&card, 1).unwrap());
    let mut mapped = Denoiser::load_with(&card, 1, PlanCache::Auto, WeightPrecision::F32).unwrap();
    assert_bit_identical(&predict(&mut mapped), &heap, "batch 3 from a load that left weights out");
    // Read whole: mapped with nothing left out, or written again when batch 3 packs weights
    // that batch 1 did not (the strided convolutions run on our kernel from batch 2 on).
    let whole = matches!(mapped.plan_file(), PlanFile::Mapped { left_out: 0, .. } | PlanFile::Written { .. });
    assert!(whole, "{:?}", mapped.plan_file());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn float16_weights_get_a_plan_file_of_their_own_and_stay_near_float32() {
    let dir = copy_of("fmnist-teacher", "half");
    let half = |plan_cache| {
        let options = LoadOptions { threads: 1, plan_cache, weights: WeightPrecision::F16, ..Default::default() };
        Pipeline::load(&dir, options).expect("load")
    };
    let f32_heap = few_steps(&mut load(&dir, PlanCache::Off));
    let f16_heap = few_steps(&mut half(PlanCache::Off));
    let worst = f32_heap.iter().zip(f16_heap.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst > 0.0, "float16 weights changed nothing");
    assert!(worst < 2e-2, "float16 weights moved a value by {worst}");

    let mut first = half(PlanCache::Auto);
    assert!(matches!(denoiser_file(&first), PlanFile::Written { mapped: true, .. }), "{:?}", denoiser_file(&first));
    assert_bit_identical(&few_steps(&mut first), &f16_heap, "f16, the writing load");
    drop(first);
    let mut later = half(PlanCache::Auto);
    let PlanFile::Mapped { path, left_out, .. } = denoiser_file(&later) else {
        panic!("not mapped: {:?}", denoiser_file(&later))
    };
    assert!(left_out > 0 && path.to_string_lossy().ends_with(".f16.edplan"), "{path:?}, {left_out} left out");
    assert_bit_identical(&few_steps(&mut later), &f16_heap, "f16, mapped");

    // The float32 file sits beside it; each load takes its own.
    drop(load(&dir, PlanCache::Auto));
    let files = plan_files(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let size = |p: &PathBuf| std::fs::metadata(p).unwrap().len() as f64;
    let (f16_file, f32_file) = if files[0] == path { (&files[0], &files[1]) } else { (&files[1], &files[0]) };
    assert!(size(f16_file) < 0.6 * size(f32_file), "{} against {} bytes", size(f16_file), size(f32_file));
    assert!(matches!(denoiser_file(&half(PlanCache::Auto)), PlanFile::Mapped { .. }));
    std::fs::remove_dir_all(dir).unwrap();
}

/// This process's `VmLck` (memory locked), in KiB.
fn locked_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmLck:")).expect("a VmLck line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn lock_weights_locks_the_start_of_the_plan_file_on_the_load_that_writes_it_and_on_later_ones() {
    let dir = copy_of("fmnist-teacher", "lock");
    let opts = |bytes: u64| LoadOptions {
        threads: 1,
        plan_cache: PlanCache::Auto,
        lock_weights: Some(bytes),
        ..Default::default()
    };
    // A first load without a lock writes the plan file, to learn its length.
    drop(Pipeline::load(&dir, opts(0)).expect("load"));
    let file_len = std::fs::metadata(&plan_files(&dir)[0]).unwrap().len();
    let want = (256u64 << 10).min(file_len);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a plain query into a local struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) }, 0);
    // The load that writes the plan file maps it once proven, and locks it as a later load does.
    for round in ["writing", "mapping"] {
        if round == "writing" {
            std::fs::remove_file(&plan_files(&dir)[0]).unwrap();
        }
        let before = locked_kib();
        let pipe = match Pipeline::load(&dir, opts(want)) {
            Ok(pipe) => pipe,
            // Unprivileged, with a lock limit below the request: a clear error naming the flag.
            Err(e) => {
                let message = e.to_string();
                #[allow(clippy::useless_conversion)] // rlim_t has 32 bits on 32-bit targets
                let soft = u64::from(limit.rlim_cur);
                assert!(soft < want, "{round}: locking {want} bytes under a limit of {soft} failed: {message}");
                assert!(message.contains("lock-weights") && message.contains("RLIMIT_MEMLOCK"), "{message}");
                continue;
            }
        };
        match (round, denoiser_file(&pipe)) {
            ("writing", PlanFile::Written { mapped: true, .. }) | ("mapping", PlanFile::Mapped { .. }) => {}
            (_, other) => panic!("{round} load: {other:?}"),
        }
        assert_eq!(pipe.denoiser().locked_weights(), want, "{round}");
        let during = locked_kib();
        assert!(
            during >= before + want / 1024,
            "{round}: VmLck {before} KiB before, {during} KiB with {want} bytes locked"
        );
        drop(pipe);
        assert!(locked_kib() < during, "{round}: dropping the pipeline unlocks");
    }
}
