//! Heap use of repeated generation, measured with a counting global allocator (its own test
//! binary, since the allocator is per binary).
//!
//! What is measured: live heap bytes (allocated minus freed, reallocations included) before and
//! after N calls that follow a warm-up call. tract allocates and frees temporaries inside every
//! run (its input tensors and intermediate values), so the number of allocations per call is
//! not zero and is not asserted; what must hold is that nothing is kept: the live bytes after N
//! calls equal those after the warm-up. Run with `--nocapture` to see the numbers.
//!
//! Everything runs in one `#[test]` so that no other test allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use edge_diffuse::pipeline::StepInfo;
use edge_diffuse::{LoadOptions, Pipeline, Request};

struct Counting;

// 64-bit even on 32-bit targets: the test allocates more than 4 GiB in all (≈ 45 MB a call),
// which wrapped a usize counter on armv7.
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static FREED: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as u64, Relaxed);
            CALLS.fetch_add(1, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as u64, Relaxed);
            CALLS.fetch_add(1, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        FREED.fetch_add(layout.size() as u64, Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            FREED.fetch_add(layout.size() as u64, Relaxed);
            ALLOCATED.fetch_add(new_size as u64, Relaxed);
            CALLS.fetch_add(1, Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    ALLOCATED.load(Relaxed) as i64 - FREED.load(Relaxed) as i64
}

fn go(_: &StepInfo) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

const CALLS_MEASURED: usize = 20;

/// Runs `call` `warm_up` times, then `CALLS_MEASURED` times; returns the growth of live bytes
/// over the measured calls and prints what was measured.
fn measure(what: &str, warm_up: u64, mut call: impl FnMut(u64)) -> i64 {
    for seed in 0..warm_up {
        call(1000 + seed);
    }
    let (live0, bytes0, calls0) = (live(), ALLOCATED.load(Relaxed), CALLS.load(Relaxed));
    for seed in 1..=CALLS_MEASURED as u64 {
        call(seed);
    }
    let growth = live() - live0;
    let per_call_bytes = (ALLOCATED.load(Relaxed) - bytes0) / CALLS_MEASURED as u64;
    let per_call_allocs = (CALLS.load(Relaxed) - calls0) / CALLS_MEASURED as u64;
    eprintln!(
        "{what}: live bytes {live0} after warm-up, {:+} after {CALLS_MEASURED} more calls; \
         per call {per_call_allocs} allocations, {per_call_bytes} bytes (all freed again)",
        growth
    );
    growth
}

fn model() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student").to_string()
}

#[test]
fn repeated_generation_keeps_no_heap() {
    let mut pipe = Pipeline::load(model(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let mut req = Request { num_images: 1, classes: Some(vec![7]), ..Default::default() };
    let mut samples = vec![0f32; pipe.output_len(&req)];
    let mut pixels = vec![0u8; samples.len()];

    let mut results = Vec::new();
    results.push(measure("generate_into + pixels_into, lcm 2 steps", 1, |seed| {
        req.seed = seed;
        pipe.generate_into(&req, &mut samples, &mut go).unwrap();
        pipe.pixels_into(&samples, &mut pixels).unwrap();
    }));

    // The allocating API: its result is dropped every call, so nothing may stay either.
    results.push(measure("generate (result dropped)", 1, |seed| {
        req.seed = seed;
        drop(pipe.generate(&req, &mut go).unwrap());
    }));

    // Guidance (two model calls per step) and a stochastic sampler with more steps.
    let mut guided = Request {
        num_images: 2,
        classes: Some(vec![3, 8]),
        guidance: Some(2.0),
        sampler: Some(edge_diffuse::SamplerKind::EulerAncestral),
        steps: Some(3),
        ..Default::default()
    };
    let mut two = vec![0f32; pipe.output_len(&guided)];
    results.push(measure("2 images, euler_ancestral 3 steps, guidance 2", 1, |seed| {
        guided.seed = seed;
        pipe.generate_into(&guided, &mut two, &mut go).unwrap();
    }));

    // Failed requests (a cancel, a short buffer) must not leak either.
    results.push(measure("cancelled at step 1 + short buffer", 1, |seed| {
        req.seed = seed;
        let err = pipe.generate_into(&req, &mut samples, &mut |_| ControlFlow::Break(())).unwrap_err();
        assert!(matches!(err, edge_diffuse::Error::Cancelled { step: 1 }));
        let err = pipe.generate_into(&req, &mut samples[..10], &mut go).unwrap_err();
        assert!(matches!(err, edge_diffuse::Error::BufferTooSmall { needed: 1024, got: 10, .. }));
    }));

    #[cfg(feature = "capi")]
    results.push(capi::measure_c_generate());

    for growth in results {
        assert!(growth <= 0, "live heap grew by {growth} bytes over {CALLS_MEASURED} calls");
    }

    // Two threads: tract's worker threads allocate through the same counter. A worker keeps
    // per-thread caches (matrix-product scratch space) from its first job on, and on a busy
    // machine the warm-up may not reach every worker, so this case allows a bound that covers a
    // worker's first use (one such growth measured: 20 984 bytes) rather than exactly zero.
    drop(pipe);
    let mut pipe2 = Pipeline::load(model(), LoadOptions { threads: 2, ..Default::default() }).unwrap();
    let growth = measure("generate_into, 2 threads", 5, |seed| {
        req.seed = seed;
        pipe2.generate_into(&req, &mut samples, &mut go).unwrap();
    });
    assert!(growth <= 64 * 1024, "live heap grew by {growth} bytes over {CALLS_MEASURED} calls on 2 threads");

    // Guidance on 2 threads runs its branches concurrently, on a thread spawned per step: that
    // thread's allocations, its per-thread caches included, end with it.
    let growth = measure("guided, concurrent branches, 2 threads", 2, |seed| {
        guided.seed = seed;
        pipe2.generate_into(&guided, &mut two, &mut go).unwrap();
    });
    assert!(growth <= 0, "live heap grew by {growth} bytes over {CALLS_MEASURED} calls with concurrent guidance");
}

#[cfg(feature = "capi")]
mod capi {
    use edge_diffuse::capi::*;

    /// The same through the C entry points, pixels only (the handle's own sample buffer).
    pub fn measure_c_generate() -> i64 {
        let dir = std::ffi::CString::new(super::model()).unwrap();
        let mut pipe = std::ptr::null_mut();
        // SAFETY: valid pointers, as the header requires.
        unsafe {
            assert_eq!(ed_pipeline_open(dir.as_ptr(), 1, &mut pipe), EdStatus::Ok);
            let mut req = std::mem::zeroed::<EdRequest>();
            assert_eq!(ed_request_init(&mut req, std::mem::size_of::<EdRequest>()), EdStatus::Ok);
            let label = 7i64;
            req.classes = &label;
            req.num_classes = 1;
            let mut pixels = vec![0u8; 1024];
            let growth = super::measure("C ed_generate, pixels only", 1, |seed| {
                req.seed = seed;
                let st = ed_generate(
                    pipe,
                    &req,
                    std::ptr::null_mut(),
                    0,
                    pixels.as_mut_ptr(),
                    pixels.len(),
                    None,
                    std::ptr::null_mut(),
                );
                assert_eq!(st, EdStatus::Ok);
            });
            ed_pipeline_free(pipe);
            growth
        }
    }
}
