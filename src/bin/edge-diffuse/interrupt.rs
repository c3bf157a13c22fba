//! SIGINT and SIGTERM stop a run at the next step boundary; a second one ends the process at
//! once, as it would without this.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The signal that stopped the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    /// 128 + the signal's number.
    pub fn exit_code(self) -> i32 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// Set by the handlers: 0 until a signal, then that signal's exit code.
pub struct Flag(Arc<AtomicUsize>);

impl Flag {
    pub fn signal(&self) -> Option<Signal> {
        match self.0.load(Ordering::Relaxed) {
            130 => Some(Signal::Interrupt),
            143 => Some(Signal::Terminate),
            _ => None,
        }
    }
}

#[cfg(unix)]
pub fn install() -> Flag {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let code = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicBool::new(false));
    for (sig, exit) in [(SIGINT, 130), (SIGTERM, 143)] {
        // The default action (the end of the process) once `seen` is set, i.e. at a second
        // signal: registered first, so that the first signal still finds `seen` false.
        let installed = flag::register_conditional_default(sig, Arc::clone(&seen))
            .and_then(|_| flag::register(sig, Arc::clone(&seen)))
            .and_then(|_| flag::register_usize(sig, Arc::clone(&code), exit));
        // Without handlers, a signal ends the process as it always did.
        drop(installed);
    }
    Flag(code)
}

#[cfg(not(unix))]
pub fn install() -> Flag {
    Flag(Arc::new(AtomicUsize::new(0)))
}
