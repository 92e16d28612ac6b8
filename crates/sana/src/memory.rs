//! What the process keeps of the memory it frees (mimalloc, the global allocator).
//!
//! While a batch runs, keep everything: candle allocates a fresh tensor per op, and mimalloc's
//! default (hand freed memory back 10 ms after a free, 100 ms for its arenas) makes the large
//! tensors of the next op fault their pages in again while the kernel zeroes them: 56 000 page
//! faults per 512² DC-AE decode on CPU, ≈20% of its time (`perf stat`); with a 10 s delay still
//! 10 000, with none 500. Once the server's queue has been empty for a second, hand it all back
//! ([`ReleaseWhenIdle`], [`on_runtime_park`], [`on_thread_stop`]): an idle server holds what it
//! needs idle rather than its last batch's peak. The blocking pool's threads (image encoding,
//! file writes) have no park hook: they leave after [`BLOCKING_KEEP_ALIVE`] idle, before the
//! queue's second is up, and hand back what they freed as they go ([`on_thread_stop`]). And
//! without transparent huge pages ([`keep_freed_pages`]), what is handed back stays handed back.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use sana_backend::{Backend, BackendError, Batch, Control, Image, ModelInfo, Progress};

/// `mi_option_purge_delay` in mimalloc.h (v2), which libmimalloc-sys exports as no constant.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Ten minutes: longer than a batch runs, so nothing is handed back meanwhile, but unlike
/// "never" (a negative delay) mimalloc still records what is free, which a forced collection
/// (`mi_collect(true)`, when the server goes idle) then hands back at once.
const PURGE_DELAY_MS: std::os::raw::c_long = 600_000;

/// How long an idle blocking-pool thread waits for work before it leaves (tokio's default:
/// 10 s). Shorter than the engine's idle second, so that by the time the worker's forced
/// collection runs, the threads that encoded the last batch's images have left and their heaps
/// are trimmed or abandoned (which that collection purges). Starting a thread costs tens of
/// microseconds; an encode, milliseconds.
pub const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(500);

/// `mi_option_allow_thp` in mimalloc.h (v2).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 37;

/// Whether [`keep_freed_pages`] turned transparent huge pages off for this process.
static THP_DISABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the purge delay before any allocation of note, unless `MIMALLOC_PURGE_DELAY`
/// (milliseconds) in the environment says otherwise; and turns transparent huge pages off for
/// the process unless `MIMALLOC_ALLOW_THP` says otherwise.
///
/// Huge pages: mimalloc asks for them on its arenas (`MADV_HUGEPAGE`), so a first touch of a
/// 2 MiB range can make all of it resident, and the kernel's khugepaged may fill whole ranges
/// again after parts were handed back (which mimalloc then counts as purged; the cause was not
/// pinned down further). An idle server's memory crept up by 2 MiB steps over a soak (84 → 98 MiB in
/// 30 minutes, `tests/soak.py --minutes 30 --seed 30`) although everything freed was returned;
/// without them the same soak held 66–69 MiB. The DiT's CPU forward took the same time within
/// the noise (Sana-0.6B 1024², batch 2, f32, `sana bench transformer` on 2 AVX-512 cores: 16.6 s
/// with them; 14.9 and 16.5 s without, in two runs).
pub fn keep_freed_pages() {
    // SAFETY: plain option stores, done in main before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above; no later mapping of mimalloc's is marked for huge pages.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
        // The mappings made before main (mimalloc's first arena) as well; inherited by children
        // (see `allow_huge_pages_in_child`).
        #[cfg(target_os = "linux")]
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } == 0 {
            THP_DISABLED.store(true, Ordering::Relaxed);
        }
    }
}

/// Gives a program `sana` runs (the Python reference of `sana bench`) the system's huge-page
/// setting back: the prctl of [`keep_freed_pages`] is inherited across fork and exec.
pub fn allow_huge_pages_in_child(command: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    if THP_DISABLED.load(Ordering::Relaxed) {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook only calls prctl, which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Times the engine's queue ran dry; each runtime thread trims its heap once per count, at its
/// next park ([`on_runtime_park`]).
static IDLE_EPOCH: AtomicU64 = AtomicU64::new(0);
/// Batches running now (one per busy worker): no runtime thread trims meanwhile, since trimming
/// also hands back the arenas, where a batch's freed tensors wait for the next op.
static BUSY: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRIMMED_AT: Cell<u64> = const { Cell::new(0) };
}

/// Hands this thread's freed memory back to the OS now, then mimalloc's arenas'.
fn collect() {
    // Twice: pages found empty by the first pass are freed after their segment was visited,
    // which only schedules their purge; the second pass carries it out.
    // SAFETY: mi_collect only walks and trims the calling thread's heap and the shared arenas
    // (under their own locks).
    unsafe {
        libmimalloc_sys::mi_collect(true);
        libmimalloc_sys::mi_collect(true);
    }
}

/// The async runtime's `on_thread_park`: the first park of each runtime thread after the
/// engine went idle trims that thread's heap (request bodies, responses, encoded images).
pub fn on_runtime_park() {
    if BUSY.load(Ordering::Acquire) > 0 {
        return;
    }
    let epoch = IDLE_EPOCH.load(Ordering::Acquire);
    if TRIMMED_AT.with(|at| at.replace(epoch)) != epoch {
        collect();
    }
}

/// The async runtime's `on_thread_stop` (blocking-pool threads leave after
/// [`BLOCKING_KEEP_ALIVE`] idle): hand back what the thread freed before mimalloc abandons its
/// heap. Not while a batch runs (a forced collection also empties the arenas the batch reuses):
/// then the heap is only abandoned, and the worker's collection at idle purges what it left.
pub fn on_thread_stop() {
    if BUSY.load(Ordering::Acquire) == 0 {
        collect();
    }
}

/// A backend that hands freed memory back when the worker says it is idle ([`Backend::idle`]):
/// the worker thread's heap, rayon's pool's (`pool`: the model runs on the CPU, so candle's
/// kernels allocate there; on a GPU the pool may never have started, and broadcasting would
/// start it), and, at their next park, the async runtime's threads' (`runtime`, which is woken
/// for it).
pub struct ReleaseWhenIdle<B> {
    inner: B,
    pool: bool,
    runtime: Option<tokio::runtime::Handle>,
}

impl<B: Backend> ReleaseWhenIdle<B> {
    pub fn new(inner: B, pool: bool, runtime: Option<tokio::runtime::Handle>) -> Self {
        Self {
            inner,
            pool,
            runtime,
        }
    }
}

/// Counts a running batch in [`BUSY`] until dropped (a panicking batch included).
struct Busy;

impl Busy {
    fn start() -> Self {
        BUSY.fetch_add(1, Ordering::AcqRel);
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<B: Backend> Backend for ReleaseWhenIdle<B> {
    fn info(&self) -> ModelInfo {
        self.inner.info()
    }

    fn health(&self) -> Result<(), BackendError> {
        self.inner.health()
    }

    fn generate(
        &mut self,
        batch: &Batch,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Vec<Image>, BackendError> {
        let _busy = Busy::start();
        self.inner.generate(batch, progress)
    }

    fn idle(&mut self) {
        self.inner.idle();
        if self.pool {
            rayon::broadcast(|_| collect());
        }
        collect();
        IDLE_EPOCH.fetch_add(1, Ordering::AcqRel);
        if let Some(runtime) = &self.runtime {
            // Parked runtime threads trim at their next park: wake them (best effort: one
            // empty task each).
            for _ in 0..runtime.metrics().num_workers() {
                drop(runtime.spawn(async {}));
            }
        }
    }
}
