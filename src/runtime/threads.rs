//! Threads: the executor (tract's rayon pool) a plan runs on, and how a call enters it.

use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

use crate::ops::scratch::drop_spares;

/// The executor for `threads` threads, and how many it runs: at least 1, and no more than the
/// cores the process may use (`available_parallelism`, which follows CPU affinity and cgroup
/// quotas): threads beyond the cores only wait on each other, and a call with far more threads
/// than cores ran many times slower than at the core count.
#[cfg(feature = "multithread")]
pub(super) fn executor_for(threads: usize) -> (usize, Executor) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = threads.clamp(1, cores);
    (threads, if threads > 1 { Executor::multithread(threads) } else { Executor::SingleThread })
}

// Built without tract's rayon executor (a trimmed board build): one thread whatever is asked.
#[cfg(not(feature = "multithread"))]
pub(super) fn executor_for(_threads: usize) -> (usize, Executor) {
    (1, Executor::SingleThread)
}

/// Runs one call of `state`, on a worker of `executor`'s pool when it has one.
///
/// tract hands every threaded matrix product to the pool; from outside it, each hand-off parks
/// the calling thread and wakes a worker, while from inside, the worker runs its share itself
/// and the others steal the rest, which made the 2-thread steps faster.
pub(super) fn run_on(
    executor: &Executor,
    state: &mut TypedSimpleState,
    inputs: TVec<TValue>,
) -> TractResult<TVec<TValue>> {
    let outputs = in_pool(executor, || state.run(inputs));
    drop_spares(state);
    outputs
}

/// Runs `f` as [`run_on`] runs a call: on a worker of `executor`'s pool, the others spinning.
pub(super) fn in_pool<R: Send>(executor: &Executor, f: impl FnOnce() -> R + Send) -> R {
    match executor {
        #[cfg(feature = "multithread")]
        Executor::MultiThread(pool) => pool.install(|| with_spinning_workers(f)),
        _ => f(),
    }
}

/// Runs `f` on this pool worker while the pool's other workers spin, taking its parallel work
/// the moment it is queued, until `f` returns.
///
/// A call forks and joins a hundred times or more (every convolution, group norm and large
/// matrix product), with serial operators in between. Between two forks an idle rayon worker
/// goes to sleep after a few dozen `sched_yield`s, and the next fork then waits for the kernel
/// (and, in a VM, the hypervisor) to wake it. Spinning for the length of one call costs the
/// cores the caller gave us anyway; onnxruntime's pool spins the same way by default.
#[cfg(feature = "multithread")]
pub(super) fn with_spinning_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    let home = rayon::current_thread_index();
    rayon::scope(|s| {
        for _ in 1..rayon::current_num_threads() {
            s.spawn(|_| {
                // `f`'s own thread may pop a spinner while it waits inside a join of `f`:
                // spinning there would wait for `f`, which waits below it on the same stack.
                if rayon::current_thread_index() == home {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if let Some(rayon::Yield::Idle) | None = rayon::yield_now() {
                        // Not a bare spin: with more threads than free cores, a spinner would
                        // take the time slices of the thread running `f`.
                        std::thread::yield_now();
                    }
                }
            });
        }
        // Set on the way out, unwinding included: the scope waits for the spinners, and a
        // panic in `f` would otherwise leave them spinning and the call hanging.
        struct Finish<'a>(&'a AtomicBool);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _finish = Finish(&done);
        f()
    })
}

#[cfg(all(test, feature = "multithread"))]
mod tests {
    use super::*;

    fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        let Executor::MultiThread(pool) = Executor::multithread(threads) else { unreachable!() };
        pool.install(|| with_spinning_workers(f))
    }

    #[test]
    fn forked_work_is_done_while_the_workers_spin() {
        use rayon::prelude::*;
        for threads in [2, 3] {
            let sum: u64 = on_pool(threads, || (0..10_000u64).into_par_iter().map(|i| i * i).sum());
            assert_eq!(sum, (0..10_000u64).map(|i| i * i).sum::<u64>(), "{threads} threads");
        }
    }

    #[test]
    fn a_panic_in_the_call_stops_the_spinners() {
        let caught = std::panic::catch_unwind(|| on_pool(2, || panic!("inside the call")));
        assert!(caught.is_err());
    }
}
