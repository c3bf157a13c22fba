//! How `edge-diffuse sample` writes its outputs: through devices, FIFOs and symlinks rather than
//! over them, keeping permissions, to standard output, one file per image as each is done, and
//! what an interrupt, a write error or an oversized grid leaves behind. Everything happens in
//! temporary folders; no real device node is touched.
#![cfg(unix)]

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::edge_diffuse;

/// `sample` on the bundled student, quiet, with these further flags.
fn sample(args: &[&str]) -> Command {
    let mut cmd = edge_diffuse();
    cmd.args(["sample", "--quiet", "--threads", "1"]).args(args);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("edge-diffuse runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Decodes a PNG, failing the test on anything else.
fn png(bytes: &[u8]) -> image::DynamicImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png).expect("a complete PNG")
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", p.display());
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_fifo_is_written_in_place_and_its_reader_gets_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.png");
    mkfifo(&fifo);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let out = run(sample(&["--out", s(&fifo)]));
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = reader.join().unwrap();
    assert_eq!((png(&bytes).width(), png(&bytes).height()), (32, 32));
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "still a FIFO");
    assert_eq!(names(dir.path()), ["pipe.png"], "no temporary file left");
}

#[test]
fn a_symlink_stays_and_the_file_it_points_to_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let real_dir = dir.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("target.png");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.path().join("link.png");
    // Relative, as `ln -s real/target.png link.png` makes it: resolved from the link's folder.
    std::os::unix::fs::symlink("real/target.png", &link).unwrap();
    let out = run(sample(&["--out", s(&link)]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("real/target.png"));
    assert_eq!(png(&std::fs::read(&real).unwrap()).width(), 32, "the target holds the new image");
    assert_eq!(names(&real_dir), ["target.png"], "no temporary file left");

    // A dangling link gets its target created.
    let dangling = dir.path().join("dangling.npy");
    std::os::unix::fs::symlink("real/new.npy", &dangling).unwrap();
    let out = run(sample(&["--out", s(&dir.path().join("x.png")), "--save-tensor", s(&dangling)]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
    let t = edge_diffuse::files::read_npy4(&real_dir.join("new.npy")).unwrap();
    assert_eq!(t.shape(), [1, 1, 32, 32]);
}

#[test]
fn a_replaced_file_keeps_its_permission_bits() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for (name, mode) in [("private.png", 0o600), ("shared.npy", 0o664)] {
        let p = dir.path().join(name);
        std::fs::write(&p, b"old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        outs.push((p, mode));
    }
    let out = run(sample(&["--out", s(&outs[0].0), "--save-tensor", s(&outs[1].0)]));
    assert!(out.status.success(), "{}", stderr(&out));
    for (p, mode) in &outs {
        let meta = std::fs::metadata(p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{}", p.display());
        assert_ne!(std::fs::read(p).unwrap(), b"old", "{} rewritten", p.display());
    }
}

#[test]
fn dash_is_standard_output_for_the_png_or_the_tensor() {
    let out = run(sample(&["--out", "-", "--num-images", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!((png(&out.stdout).width(), png(&out.stdout).height()), (65, 32));

    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.png");
    let out = run(sample(&["--out", s(&grid), "--num-images", "3", "--save-tensor", "-"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let t = edge_diffuse::files::read_npy4_from(&out.stdout[..], "stdout").unwrap();
    assert_eq!(t.shape(), [3, 1, 32, 32]);
    assert!(grid.is_file());

    for (args, want) in [
        (&["--out", "-", "--separate"][..], "--separate writes numbered files"),
        (&["--out", "-", "--save-tensor", "-"][..], "--out already writes to standard output"),
    ] {
        let out = run(sample(args));
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
}

/// Starts a `--separate` run of `total` images writing `out-N.png` into `dir`, waits until
/// `wait_for` images are on disk, and sends `signal`.
fn interrupt_run(dir: &Path, total: usize, wait_for: usize, extra: &[&str], signal: i32) -> Output {
    let out = dir.join("out.png");
    let n = total.to_string();
    let mut cmd = sample(&["--separate", "--out", s(&out), "--num-images", &n, "--seed", "5", "--class", "all"]);
    cmd.args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("edge-diffuse starts");
    let pid = child.id() as i32;
    let start = Instant::now();
    while !dir.join(format!("out-{}.png", wait_for - 1)).exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no images after 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    child.wait_with_output().unwrap()
}

/// The `--start-index` that an interrupted run's last line names.
fn resume_index(err: &str) -> usize {
    let at = err.find("--start-index ").unwrap_or_else(|| panic!("no resume hint in {err:?}"));
    err[at + 14..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn sigterm_keeps_every_finished_image_and_a_resumed_run_gives_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = interrupt_run(dir.path(), 5000, 3, &[], libc::SIGTERM);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");
    let done = resume_index(&err);
    assert!((3..5000).contains(&done), "{err}");
    // Exactly the finished images, each a complete PNG; no temporary file.
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..done).map(|i| format!("out-{i}.png")).collect();
        v.sort();
        v
    };
    assert_eq!(names(dir.path()), want, "{err}");
    for name in &want {
        assert_eq!(png(&std::fs::read(dir.path().join(name)).unwrap()).width(), 32, "{name}");
    }

    // Resumed with --start-index (a shorter total keeps the test short), the files are those
    // of one uninterrupted run.
    let total = (done + 2).to_string();
    let seeded = ["--num-images", &total, "--seed", "5", "--class", "all"];
    let resumed = dir.path().join("out.png");
    let mut cmd = sample(&["--separate", "--out", s(&resumed), "--start-index", &done.to_string()]);
    let r = run({
        cmd.args(seeded);
        cmd
    });
    assert!(r.status.success(), "{}", stderr(&r));
    let whole = tempfile::tempdir().unwrap();
    let mut cmd = sample(&["--separate", "--out", s(&whole.path().join("out.png"))]);
    let r = run({
        cmd.args(seeded);
        cmd
    });
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(names(dir.path()), names(whole.path()));
    for name in names(whole.path()) {
        let (a, b) = (std::fs::read(dir.path().join(&name)).unwrap(), std::fs::read(whole.path().join(&name)).unwrap());
        assert!(a == b, "{name} differs from the uninterrupted run's");
    }
}

#[test]
fn sigint_keeps_the_finished_rows_of_the_tensor_file() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("t.npy");
    std::fs::write(&npy, b"old").unwrap();
    let out = interrupt_run(dir.path(), 5000, 2, &["--save-tensor", s(&npy)], libc::SIGINT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let done = resume_index(&err);
    assert!(err.contains(&format!("holds {done} images")), "{err}");
    let t = edge_diffuse::files::read_npy4(&npy).unwrap();
    assert_eq!(t.shape(), [done, 1, 32, 32]);
    // The same rows as an uninterrupted run's.
    let whole = dir.path().join("whole.npy");
    let total = done.to_string();
    let r = run(sample(&[
        "--out",
        s(&dir.path().join("g.png")),
        "--num-images",
        &total,
        "--seed",
        "5",
        "--class",
        "all",
        "--save-tensor",
        s(&whole),
    ]));
    assert!(r.status.success(), "{}", stderr(&r));
    let w = edge_diffuse::files::read_npy4(&whole).unwrap();
    assert!(t.iter().zip(w.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "rows differ");
    assert!(names(dir.path()).iter().all(|n| !n.ends_with(".tmp")), "{:?}", names(dir.path()));
}

/// A child whose files may grow to `bytes` at most: a write past that fails (EFBIG), as on a
/// full disk, rather than killing the process (SIGXFSZ ignored).
fn with_file_limit(mut cmd: Command, bytes: u64) -> Command {
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0
                || libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn a_write_error_names_the_file_and_keeps_earlier_files() {
    let dir = tempfile::tempdir().unwrap();
    // The tensor file outgrows the limit at its 4th image (4 KiB each), while the PNGs fit.
    let npy = dir.path().join("t.npy");
    std::fs::write(&npy, b"previous").unwrap();
    let png_out = dir.path().join("img.png");
    let cmd = sample(&["--separate", "--out", s(&png_out), "--num-images", "6", "--save-tensor", s(&npy)]);
    let out = run(with_file_limit(cmd, 3 * 4096 + 1024));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: ") && err.contains("t.npy"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&npy).unwrap(), b"previous", "the earlier tensor file is intact");
    // The images finished before the error, each complete, and no temporary file.
    let left = names(dir.path());
    let images = left.len() - 1;
    assert!(images >= 3, "{left:?}");
    let mut want: Vec<String> = (0..images).map(|i| format!("img-{i}.png")).chain(["t.npy".to_string()]).collect();
    want.sort();
    assert_eq!(left, want);
    for n in left.iter().filter(|n| n.ends_with(".png")) {
        png(&std::fs::read(dir.path().join(n)).unwrap());
    }

    // A grid whose PNG outgrows the limit leaves the earlier grid as it was.
    let grid = dir.path().join("grid.png");
    std::fs::write(&grid, b"earlier grid").unwrap();
    let out = run(with_file_limit(sample(&["--out", s(&grid), "--num-images", "64"]), 2048));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("grid.png"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&grid).unwrap(), b"earlier grid");
    assert!(names(dir.path()).iter().all(|n| !n.ends_with(".tmp")));
}

#[test]
fn a_grid_over_the_maximum_is_refused_before_any_image() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.png");
    let start = Instant::now();
    let out = run(sample(&["--out", s(&grid), "--num-images", "100000"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("grid") && err.contains("maximum of 64 MiB") && err.contains("100000 images"), "{err}");
    assert!(names(dir.path()).is_empty());
    // Refused up front: 100 000 images would take minutes.
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn threads_beyond_the_cores_are_clamped_with_a_notice() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = edge_diffuse();
    cmd.args(["sample", "--quiet", "--threads", "1024", "--out", s(&dir.path().join("a.png"))]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("--threads 1024: this machine runs {cores} threads at once")),
        "{}",
        stderr(&out)
    );

    let dirm: PathBuf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-student");
    let opts = edge_diffuse::LoadOptions { threads: 1024, ..Default::default() };
    let pipe = edge_diffuse::Pipeline::load(dirm, opts).unwrap();
    assert_eq!(pipe.denoiser().threads(), cores);
}
