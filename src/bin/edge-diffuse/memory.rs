//! This process's memory as Linux reports it (`/proc/self`), for `bench`: resident anonymous
//! and file-backed memory, their peak, and major page faults. `None` elsewhere.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A field of `/proc/self/status` given in kB, in MiB.
pub fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: f64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// Major page faults so far (pages read from a file, e.g. weights through the plan file's map).
pub fn major_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, majflt field 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(9)?.parse().ok()
}

/// Samples `RssAnon` every millisecond on a thread of its own, keeping the largest value:
/// Linux keeps the peak of the whole resident set (`VmHWM`) but not of its anonymous part.
pub struct PeakAnon {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl PeakAnon {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_kib.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(mib) = status_mib("RssAnon") {
                    p.fetch_max((mib * 1024.0) as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        PeakAnon { stop, peak_kib, thread: Some(thread) }
    }

    /// The peak in MiB so far, this moment's value included.
    pub fn peak_mib(&self) -> Option<f64> {
        let now = status_mib("RssAnon")?;
        Some((self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0).max(now))
    }
}

impl Drop for PeakAnon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
