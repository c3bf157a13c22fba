//! Shared by the integration tests that start the `edge-diffuse` binary.

use std::process::Command;

/// The binary under test. Cross-built tests run under cargo's target runner (qemu-user), which
/// starts the test program but not the programs it spawns: `EDGE_DIFFUSE_TEST_RUNNER` (e.g.
/// `qemu-aarch64 -L /usr/aarch64-linux-gnu`, set by tools/cross-check.sh) is put in front of
/// the binary when set.
pub fn edge_diffuse() -> Command {
    let bin = env!("CARGO_BIN_EXE_edge-diffuse");
    match std::env::var("EDGE_DIFFUSE_TEST_RUNNER").ok().filter(|r| !r.trim().is_empty()) {
        Some(runner) => {
            let mut words = runner.split_whitespace();
            let mut cmd = Command::new(words.next().expect("non-empty"));
            cmd.args(words).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}
