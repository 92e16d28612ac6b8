//! bf16 matmuls on the CPU's matrix units through oneDNN, loaded at run time.
//!
//! candle 0.11.1 multiplies CPU bf16 tensors by widening both operands to f32, running its f32
//! gemm and rounding back: bf16 weights then save memory but no time. oneDNN (the library behind
//! PyTorch's CPU bf16 `linear`) multiplies bf16 × bf16 with f32 accumulation on Intel AMX tiles, or
//! with AVX512-BF16 / AVX-512 where AMX is absent; it picks the kernel from the CPU at run time.
//!
//! The library is opened with `dlopen` (`libdnnl.so.2`, Debian's `libdnnl2`, oneDNN 2.x C API), so
//! the binary runs without it: when it is missing, too old or new, switched off
//! (`SANA_ONEDNN=off`), or has no bf16 kernel for this CPU (oneDNN 2.x needs AVX-512; force a
//! lesser ISA with oneDNN's own `ONEDNN_MAX_CPU_ISA`, e.g. `AVX2`), [`matmul_nt`] takes candle's
//! widening path and gives the same values up to rounding.
//!
//! The model's activations are f32 and oneDNN's kernels take bf16 on both sides: an input is
//! either split in two bf16 terms, `x ≈ hi + lo` with `hi = bf16(x)` and `lo = bf16(x − hi)` (16
//! bits of mantissa, stacked into one matmul of twice the rows whose halves are summed), or
//! rounded to bf16 (what torch's bf16 does; rounded everywhere, `SANA_ONEDNN=fast`, put the tiny
//! pipelines 9/255 off the f32 reference, past the 8/255 bar). Which [`Path`] is fastest depends
//! on the CPU (AMX: bf16 many times f32's rate; Intel's AVX512-BF16 without AMX: slower than f32),
//! so a probe at first use times each path on one matmul of the DiT's size and picks, outside the
//! DiT's blocks, split or widened (both f32-accurate), and inside them ([`in_dit_blocks`]) rounded
//! when that is faster still. [`cpu_bf16`] says which paths run, and why.
//!
//! ISAs with "initial support" in a oneDNN release stay off unless asked for (its dispatcher docs),
//! which may include AMX in 2.x; unless `ONEDNN_MAX_CPU_ISA` is set, we raise the ceiling to
//! `AVX512_CORE_AMX` (`dnnl_set_max_cpu_isa`). Not yet run on an AMX CPU.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

type Status = c_int;
type Handle = *mut c_void;

const SUCCESS: Status = 0;
const DT_BF16: c_int = 2;
const DT_F32: c_int = 3;
const TAG_AB: c_int = 3;
const TAG_BA: c_int = 22;
const ENGINE_CPU: c_int = 1;
const STREAM_IN_ORDER: u32 = 1;
const QUERY_IMPL_INFO_STR: c_int = 8;
const ISA_AVX512_CORE_AMX: c_int = 0x3e7;
const ARG_SRC: c_int = 1;
const ARG_DST: c_int = 17;
const ARG_WEIGHTS: c_int = 33;
/// Primitives kept (one per matmul shape); past it the cache starts again.
const MAX_PRIMITIVES: usize = 1024;

/// `dnnl_memory_desc_t` of oneDNN 2.x is a 696-byte plain struct and `dnnl_matmul_desc_t` 2 800
/// bytes (checked against the 2.6 headers); we only pass them by pointer, so room to spare is
/// enough.
#[repr(C, align(64))]
struct MemoryDesc([u8; 1024]);
#[repr(C, align(64))]
struct MatmulDesc([u8; 4096]);

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

#[repr(C)]
struct Version {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
    cpu_runtime: u32,
    gpu_runtime: u32,
}

struct Api {
    version: unsafe extern "C" fn() -> *const Version,
    set_max_cpu_isa: unsafe extern "C" fn(c_int) -> Status,
    engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, u32) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
    md_init_by_tag:
        unsafe extern "C" fn(*mut MemoryDesc, c_int, *const i64, c_int, c_int) -> Status,
    matmul_desc_init: unsafe extern "C" fn(
        *mut MatmulDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
    ) -> Status,
    pd_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, Handle, Handle) -> Status,
    pd_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    pd_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    primitive_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    memory_create:
        unsafe extern "C" fn(*mut Handle, *const MemoryDesc, Handle, *mut c_void) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
}

/// One matmul primitive: `[M, K] · [K, N]` (weights stored `[N, K]`, PyTorch's layout). Shapes
/// are fixed when it is built: with run-time dimensions oneDNN may fall back to a generic kernel.
struct Primitive {
    primitive: Handle,
    implementation: String,
    /// The descriptors it was built with (source, weights, destination), reused to wrap the
    /// caller's buffers at each execution.
    descs: Box<[MemoryDesc; 3]>,
}

type Key = (usize, usize, usize, c_int, c_int);

struct OneDnn {
    api: Api,
    engine: Handle,
    stream: Handle,
    version: String,
    /// (M, K, N, input dtype, output dtype) → primitive; every call runs under this lock (oneDNN
    /// spreads one matmul over all cores itself).
    primitives: Mutex<HashMap<Key, Primitive>>,
    _lib: libloading::Library,
}

// SAFETY: the engine, stream and primitives are only used under `primitives`' lock.
unsafe impl Send for OneDnn {}
unsafe impl Sync for OneDnn {}

/// How a CPU matmul of f32 activations by bf16 weights runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The weight widened to f32 for the call, candle's f32 gemm: f32 arithmetic.
    Widened,
    /// oneDNN, `x ≈ hi + lo` in two bf16 terms (16 bits of mantissa): f32 accuracy, twice the
    /// bf16 multiplications.
    Split,
    /// oneDNN, `x` rounded to bf16 (8 bits of mantissa), as torch's bf16 does.
    Rounded,
}

impl Path {
    /// The oneDNN input form, `None` for the widened path.
    fn inputs(self) -> Option<Inputs> {
        match self {
            Path::Widened => None,
            Path::Split => Some(Inputs::Split),
            Path::Rounded => Some(Inputs::Rounded),
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Widened => "widened to f32",
            Path::Split => "split in two bf16 terms",
            Path::Rounded => "rounded to bf16",
        })
    }
}

/// oneDNN as loaded, with a bf16 kernel for this CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneDnnKernel {
    pub version: String,
    /// The kernel it picked, e.g. `brg:avx512_core_amx`.
    pub implementation: String,
}

/// Which paths CPU bf16 matmuls take, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuBf16 {
    /// oneDNN with a bf16 kernel, or why it is not used (then every path is [`Path::Widened`]).
    pub onednn: Result<OneDnnKernel, String>,
    /// Outside the DiT's transformer blocks: Gemma, the caption projection, the embeddings and
    /// output layer (a [`Path::Widened`] or [`Path::Split`] unless `SANA_ONEDNN=fast`).
    pub exact: Path,
    /// Inside the DiT's transformer blocks ([`in_dit_blocks`]): the bulk of every step.
    pub blocks: Path,
    /// Why these paths: `SANA_ONEDNN=…`, or the start-up probe's timings.
    pub chosen_by: String,
}

impl OneDnnKernel {
    /// Whether the kernel runs on the CPU's matrix units (AMX tiles).
    pub fn on_amx(&self) -> bool {
        self.implementation.contains("amx")
    }
}

impl std::fmt::Display for OneDnnKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oneDNN {} ({})", self.version, self.implementation)
    }
}

impl CpuBf16 {
    /// Whether bf16 matmuls run on the CPU's matrix units (AMX tiles).
    pub fn on_amx(&self) -> bool {
        self.onednn.as_ref().is_ok_and(OneDnnKernel::on_amx)
    }

    fn widened(reason: String) -> Self {
        CpuBf16 {
            onednn: Err(reason.clone()),
            exact: Path::Widened,
            blocks: Path::Widened,
            chosen_by: reason,
        }
    }
}

impl std::fmt::Display for CpuBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.onednn {
            Err(reason) => write!(f, "widened to f32 ({reason})"),
            Ok(k) => {
                write!(f, "{k}; f32 activations ")?;
                if self.exact == self.blocks {
                    write!(f, "{} everywhere", self.exact)?;
                } else {
                    write!(
                        f,
                        "{} in the DiT's blocks, {} elsewhere",
                        self.blocks, self.exact
                    )?;
                }
                write!(f, " ({})", self.chosen_by)
            }
        }
    }
}

/// How f32 activations enter oneDNN's bf16 × bf16 kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inputs {
    /// `x ≈ hi + lo`, two bf16 terms in one matmul of twice the rows.
    Split,
    /// `x` rounded to bf16: half the multiplications, 8 bits of mantissa.
    Rounded,
}

/// `SANA_ONEDNN`: how the paths are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Unset or `auto`: the fastest by a probe at start-up (see [`Probe::choose`]).
    Auto,
    /// `off`: oneDNN is not loaded; everything widens.
    Off,
    /// `split`: split everywhere.
    Split,
    /// `mixed`: rounded in the DiT's blocks, split elsewhere.
    Mixed,
    /// `fast`: rounded everywhere.
    Fast,
}

/// `SANA_ONEDNN`, read (and an unknown value warned of) once.
fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(read_mode)
}

fn read_mode() -> Mode {
    match std::env::var("SANA_ONEDNN").as_deref() {
        Err(_) | Ok("" | "auto") => Mode::Auto,
        Ok("0" | "off" | "false" | "no") => Mode::Off,
        Ok("split") => Mode::Split,
        Ok("mixed") => Mode::Mixed,
        Ok("fast") => Mode::Fast,
        Ok(other) => {
            tracing::warn!(
                "SANA_ONEDNN={other:?} is not one of auto, off, split, mixed, fast: using auto"
            );
            Mode::Auto
        }
    }
}

/// Timings (ms, best of three) of one matmul of the DiT's size by each path.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Probe {
    widened: f64,
    split: f64,
    rounded: f64,
}

/// The probe's matmul: 512 rows (a quarter of a 1024² latent pair) by Sana-0.6B's width.
const PROBE: (usize, usize, usize) = (512, 1152, 1152);

impl Probe {
    /// Outside the blocks, split when it beats the widened path by 10 % (the two are equally
    /// accurate; widened is plain f32 arithmetic); in the blocks, rounded when it beats that by
    /// 10 %. On AMX tiles bf16 runs many times f32's rate: split outside, rounded inside. On
    /// AVX512-BF16 the bf16 kernels may be no faster than f32 (Intel's without AMX: one bf16
    /// dot product per cycle against two f32 FMAs), and everything widens.
    fn choose(&self) -> (Path, Path) {
        let (exact, t) = if self.split < 0.9 * self.widened {
            (Path::Split, self.split)
        } else {
            (Path::Widened, self.widened)
        };
        let blocks = if self.rounded < 0.9 * t {
            Path::Rounded
        } else {
            exact
        };
        (exact, blocks)
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (m, k, n) = PROBE;
        write!(
            f,
            "probe {m}×{k}×{n}: widened {:.1} ms, split {:.1}, rounded {:.1}",
            self.widened, self.split, self.rounded
        )
    }
}

/// Times [`PROBE`] by each path on this CPU, as [`matmul_nt`] runs them.
fn probe(dnn: &OneDnn) -> candle_core::Result<Probe> {
    let (m, k, n) = PROBE;
    let dev = candle_core::Device::Cpu;
    // Deterministic values of the scale of normalised activations and trained weights.
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let w: Vec<half::bf16> = (0..n * k)
        .map(|i| half::bf16::from_f32(((i * 104_729) % 2001) as f32 / 40_000.0 - 0.025))
        .collect();
    let xt = Tensor::from_slice(&x, (m, k), &dev)?;
    let wt = Tensor::from_slice(&w, (n, k), &dev)?;
    let best = |run: &mut dyn FnMut() -> candle_core::Result<()>| {
        run()?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            run()?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok::<_, candle_core::Error>(best)
    };
    Ok(Probe {
        widened: best(&mut || widened_matmul_nt(&xt, &wt).map(drop))?,
        split: best(&mut || f32_by_bf16(dnn, &x, &w, (m, k, n), Inputs::Split).map(drop))?,
        rounded: best(&mut || f32_by_bf16(dnn, &x, &w, (m, k, n), Inputs::Rounded).map(drop))?,
    })
}

static LIB: OnceLock<(Option<OneDnn>, Result<OneDnnKernel, String>)> = OnceLock::new();

/// oneDNN loaded, and its bf16 kernel for this CPU or why there is none (no timing).
fn lib() -> &'static (Option<OneDnn>, Result<OneDnnKernel, String>) {
    LIB.get_or_init(|| {
        if mode() == Mode::Off {
            return (None, Err("SANA_ONEDNN=off".into()));
        }
        let dnn = match load() {
            Ok(dnn) => dnn,
            Err(reason) => return (None, Err(reason)),
        };
        // Both kinds in use: bf16 → f32 (f32 activations) and bf16 → bf16.
        let kernel = dnn
            .probe(DT_BF16, DT_BF16)
            .and_then(|_| dnn.probe(DT_BF16, DT_F32))
            .map(|implementation| OneDnnKernel {
                version: dnn.version.clone(),
                implementation,
            })
            .map_err(|e| {
                format!(
                    "oneDNN {} has no bf16 matmul for this CPU: {e}",
                    dnn.version
                )
            });
        (Some(dnn), kernel)
    })
}

/// oneDNN's bf16 kernel for this CPU, or why CPU bf16 matmuls widen; loads oneDNN on first use
/// but does not run the probe (for `--dtype auto`, which only asks whether it is on AMX).
pub fn onednn_kernel() -> &'static Result<OneDnnKernel, String> {
    &lib().1
}

static STATUS: OnceLock<CpuBf16> = OnceLock::new();

/// The paths CPU bf16 matmuls take: loads oneDNN and, unless `SANA_ONEDNN` names the paths,
/// runs the probe, on first use (the first matmul of bf16 weights on the CPU, or a caller
/// that reports it).
pub fn cpu_bf16() -> &'static CpuBf16 {
    STATUS.get_or_init(|| {
        let (dnn, kernel) = match lib() {
            (Some(dnn), Ok(kernel)) => (dnn, kernel),
            (_, Err(reason)) => return CpuBf16::widened(reason.clone()),
            // `lib` finds a kernel only in a loaded oneDNN.
            (None, Ok(_)) => return CpuBf16::widened("oneDNN not loaded".into()),
        };
        let (exact, blocks, chosen_by) = match mode() {
            Mode::Split => (Path::Split, Path::Split, "SANA_ONEDNN=split".into()),
            Mode::Mixed => (Path::Split, Path::Rounded, "SANA_ONEDNN=mixed".into()),
            Mode::Fast => (Path::Rounded, Path::Rounded, "SANA_ONEDNN=fast".into()),
            Mode::Auto | Mode::Off => match probe(dnn) {
                Ok(p) => {
                    let (exact, blocks) = p.choose();
                    (exact, blocks, p.to_string())
                }
                Err(e) => (Path::Split, Path::Split, format!("probe failed: {e}")),
            },
        };
        CpuBf16 {
            onednn: Ok(kernel.clone()),
            exact,
            blocks,
            chosen_by,
        }
    })
}

#[derive(Debug, Clone, Copy)]
struct Scope {
    in_blocks: bool,
    forced: Option<(Path, Path)>,
}

thread_local! {
    static SCOPE: std::cell::Cell<Scope> = const {
        std::cell::Cell::new(Scope { in_blocks: false, forced: None })
    };
}

/// Puts the thread's scope back, also when `f` unwinds.
struct Restore(Scope);

impl Drop for Restore {
    fn drop(&mut self) {
        SCOPE.with(|s| s.set(self.0));
    }
}

fn scoped<R>(change: impl FnOnce(Scope) -> Scope, f: impl FnOnce() -> R) -> R {
    let prev = SCOPE.with(|s| {
        let prev = s.get();
        s.set(change(prev));
        prev
    });
    let _restore = Restore(prev);
    f()
}

/// Runs `f` as the DiT's transformer blocks: its CPU bf16 matmuls (on this thread) take
/// [`CpuBf16::blocks`]' path.
pub fn in_dit_blocks<R>(f: impl FnOnce() -> R) -> R {
    scoped(
        |s| Scope {
            in_blocks: true,
            ..s
        },
        f,
    )
}

/// Runs `f` with these paths (outside and inside the DiT's blocks) instead of the chosen ones,
/// on this thread: for tests and benchmarks. Without oneDNN's bf16 kernel every path widens.
pub fn with_cpu_bf16_paths<R>(exact: Path, blocks: Path, f: impl FnOnce() -> R) -> R {
    scoped(
        |s| Scope {
            forced: Some((exact, blocks)),
            ..s
        },
        f,
    )
}

/// The path of a CPU matmul of f32 activations by bf16 weights here, on this thread.
pub fn current_path() -> Path {
    let s = SCOPE.with(|s| s.get());
    let status = cpu_bf16();
    if status.onednn.is_err() {
        return Path::Widened;
    }
    let (exact, blocks) = s.forced.unwrap_or((status.exact, status.blocks));
    if s.in_blocks {
        blocks
    } else {
        exact
    }
}

fn load() -> Result<OneDnn, String> {
    let names = ["libdnnl.so.2", "libdnnl.so"];
    let lib = names
        .iter()
        .find_map(|n| unsafe { libloading::Library::new(*n) }.ok())
        .ok_or_else(|| "libdnnl.so.2 not found (install libdnnl2)".to_string())?;
    macro_rules! sym {
        ($name:literal) => {
            *unsafe { lib.get($name) }
                .map_err(|e| format!("oneDNN lacks {}: {e}", String::from_utf8_lossy($name)))?
        };
    }
    let api = Api {
        version: sym!(b"dnnl_version"),
        set_max_cpu_isa: sym!(b"dnnl_set_max_cpu_isa"),
        engine_create: sym!(b"dnnl_engine_create"),
        stream_create: sym!(b"dnnl_stream_create"),
        stream_wait: sym!(b"dnnl_stream_wait"),
        md_init_by_tag: sym!(b"dnnl_memory_desc_init_by_tag"),
        matmul_desc_init: sym!(b"dnnl_matmul_desc_init"),
        pd_create: sym!(b"dnnl_primitive_desc_create"),
        pd_query: sym!(b"dnnl_primitive_desc_query"),
        pd_destroy: sym!(b"dnnl_primitive_desc_destroy"),
        primitive_create: sym!(b"dnnl_primitive_create"),
        primitive_destroy: sym!(b"dnnl_primitive_destroy"),
        primitive_execute: sym!(b"dnnl_primitive_execute"),
        memory_create: sym!(b"dnnl_memory_create"),
        memory_destroy: sym!(b"dnnl_memory_destroy"),
    };
    // SAFETY: dnnl_version returns a pointer to a static struct.
    let v = unsafe { &*(api.version)() };
    let version = format!("{}.{}.{}", v.major, v.minor, v.patch);
    if v.major != 2 {
        return Err(format!(
            "oneDNN {version} found; this build speaks the 2.x C API (libdnnl.so.2)"
        ));
    }
    if std::env::var_os("ONEDNN_MAX_CPU_ISA").is_none()
        && std::env::var_os("DNNL_MAX_CPU_ISA").is_none()
    {
        // Only allowed before the first primitive; a failure leaves oneDNN's own default.
        let _ = unsafe { (api.set_max_cpu_isa)(ISA_AVX512_CORE_AMX) };
    }
    let mut engine: Handle = std::ptr::null_mut();
    let mut stream: Handle = std::ptr::null_mut();
    // SAFETY: out-pointers to locals; the engine outlives the stream (both live in `OneDnn`,
    // which is never dropped: it is a static).
    unsafe {
        check((api.engine_create)(&mut engine, ENGINE_CPU, 0), "engine")?;
        check(
            (api.stream_create)(&mut stream, engine, STREAM_IN_ORDER),
            "stream",
        )?;
    }
    Ok(OneDnn {
        api,
        engine,
        stream,
        version,
        primitives: Mutex::new(HashMap::new()),
        _lib: lib,
    })
}

fn check(status: Status, what: &str) -> Result<(), String> {
    match status {
        SUCCESS => Ok(()),
        3 => Err(format!("{what}: unimplemented")),
        s => Err(format!("{what}: oneDNN status {s}")),
    }
}

fn dtype_code(dtype: DType) -> Option<c_int> {
    match dtype {
        DType::BF16 => Some(DT_BF16),
        DType::F32 => Some(DT_F32),
        _ => None,
    }
}

impl OneDnn {
    fn md(&self, rows: i64, cols: i64, dt: c_int, tag: c_int) -> Result<MemoryDesc, String> {
        let mut md = MemoryDesc([0; 1024]);
        let dims = [rows, cols, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        // SAFETY: dims has DNNL_MAX_NDIMS (12) entries; md is larger than dnnl_memory_desc_t.
        check(
            unsafe { (self.api.md_init_by_tag)(&mut md, 2, dims.as_ptr(), dt, tag) },
            "memory descriptor",
        )?;
        Ok(md)
    }

    fn build(&self, (m, k, n, src, dst): Key) -> Result<Primitive, String> {
        let (m, k, n) = (m as i64, k as i64, n as i64);
        let a = self.md(m, k, src, TAG_AB)?;
        let w = self.md(k, n, src, TAG_BA)?;
        let c = self.md(m, n, dst, TAG_AB)?;
        let mut desc = MatmulDesc([0; 4096]);
        let mut pd: Handle = std::ptr::null_mut();
        let mut primitive: Handle = std::ptr::null_mut();
        let mut implementation: *const c_char = std::ptr::null();
        // SAFETY: descriptors are initialised above; out-pointers to locals.
        unsafe {
            check(
                (self.api.matmul_desc_init)(&mut desc, &a, &w, std::ptr::null(), &c),
                "matmul descriptor",
            )?;
            check(
                (self.api.pd_create)(
                    &mut pd,
                    (&desc as *const MatmulDesc).cast(),
                    std::ptr::null_mut(),
                    self.engine,
                    std::ptr::null_mut(),
                ),
                "matmul",
            )?;
            let _ = (self.api.pd_query)(
                pd,
                QUERY_IMPL_INFO_STR,
                0,
                (&mut implementation as *mut *const c_char).cast(),
            );
            let implementation = if implementation.is_null() {
                "?".to_string()
            } else {
                CStr::from_ptr(implementation)
                    .to_string_lossy()
                    .into_owned()
            };
            let made = check((self.api.primitive_create)(&mut primitive, pd), "primitive");
            (self.api.pd_destroy)(pd);
            made?;
            Ok(Primitive {
                primitive,
                implementation,
                descs: Box::new([a, w, c]),
            })
        }
    }

    /// Builds (and caches) a small primitive: whether this oneDNN has the kernel, and its name.
    fn probe(&self, src: c_int, dst: c_int) -> Result<String, String> {
        let mut cache = self.primitives.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self
            .cached(&mut cache, (64, 64, 64, src, dst))?
            .implementation
            .clone())
    }

    /// The primitive for `key`, built on first use.
    fn cached<'a>(
        &self,
        cache: &'a mut HashMap<Key, Primitive>,
        key: Key,
    ) -> Result<&'a Primitive, String> {
        if !cache.contains_key(&key) {
            if cache.len() >= MAX_PRIMITIVES {
                for (_, p) in cache.drain() {
                    // SAFETY: built by us, not executing (we hold the lock).
                    unsafe { (self.api.primitive_destroy)(p.primitive) };
                }
            }
            let p = self.build(key)?;
            cache.insert(key, p);
        }
        Ok(&cache[&key])
    }

    /// `out[M, N] = a[M, K] · w[N, K]ᵀ`, f32 accumulation.
    ///
    /// # Safety
    /// `a` holds M·K and `w` N·K elements of the `src` dtype, `out` M·N of the `dst` dtype.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul(
        &self,
        a: *const c_void,
        w: *const c_void,
        out: *mut c_void,
        (m, k, n): (usize, usize, usize),
        src: c_int,
        dst: c_int,
    ) -> Result<(), String> {
        let mut cache = self.primitives.lock().unwrap_or_else(|e| e.into_inner());
        let p = self.cached(&mut cache, (m, k, n, src, dst))?;
        let (primitive, [a_md, w_md, c_md]) = (p.primitive, &*p.descs);
        let mut mems: [Handle; 3] = [std::ptr::null_mut(); 3];
        let mut result = Ok(());
        for (slot, (md, ptr)) in mems.iter_mut().zip([
            (a_md, a as *mut c_void),
            (w_md, w as *mut c_void),
            (c_md, out),
        ]) {
            // SAFETY: oneDNN wraps the caller's buffers (it never frees them).
            result = check(
                unsafe { (self.api.memory_create)(slot, md, self.engine, ptr) },
                "memory",
            );
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            let args = [
                ExecArg {
                    arg: ARG_SRC,
                    memory: mems[0],
                },
                ExecArg {
                    arg: ARG_WEIGHTS,
                    memory: mems[1],
                },
                ExecArg {
                    arg: ARG_DST,
                    memory: mems[2],
                },
            ];
            // SAFETY: the primitive takes exactly these three arguments.
            result = unsafe {
                check(
                    (self.api.primitive_execute)(primitive, self.stream, 3, args.as_ptr()),
                    "execute",
                )
                .and_then(|()| check((self.api.stream_wait)(self.stream), "wait"))
            };
        }
        for m in mems.into_iter().filter(|m| !m.is_null()) {
            // SAFETY: created above; destroying a memory object leaves the user's buffer alone.
            unsafe { (self.api.memory_destroy)(m) };
        }
        result
    }
}

/// `x[M, K] · w[N, K]ᵀ` through oneDNN, in `out_dtype`; f32 `x` with bf16 `w` enters as
/// `inputs` says.
struct OneDnnMatmul {
    out_dtype: DType,
    inputs: Inputs,
}

/// Rows per rayon task in the conversions around a matmul (they run on one thread otherwise).
const ROWS_PER_TASK: usize = 64;

/// `x` as bf16 rows: rounded (`[M, K]`), or split (`[2M, K]`: `hi = bf16(x)` above
/// `lo = bf16(x − hi)`).
fn to_bf16_rows(x: &[f32], k: usize, inputs: Inputs) -> Vec<half::bf16> {
    use half::bf16;
    use rayon::prelude::*;
    let len = x.len();
    let terms = if inputs == Inputs::Split { 2 } else { 1 };
    let mut out = vec![bf16::ZERO; terms * len];
    let (hi, lo) = out.split_at_mut(len);
    let chunk = ROWS_PER_TASK * k.max(1);
    hi.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(h, x)| {
            for (h, &x) in h.iter_mut().zip(x) {
                *h = bf16::from_f32(x);
            }
        });
    if terms == 2 {
        lo.par_chunks_mut(chunk)
            .zip(hi.par_chunks(chunk))
            .zip(x.par_chunks(chunk))
            .for_each(|((l, h), x)| {
                for ((l, h), &x) in l.iter_mut().zip(h).zip(x) {
                    *l = bf16::from_f32(x - h.to_f32());
                }
            });
    }
    out
}

/// Runs `fill` on an output buffer of `len` elements that it must write in full (no zero-filling
/// first: oneDNN overwrites it).
fn filled<T>(
    len: usize,
    fill: impl FnOnce(*mut c_void) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<T>> {
    let mut out = Vec::<T>::with_capacity(len);
    fill(out.as_mut_ptr().cast())?;
    // SAFETY: `fill` succeeded, so the matmul wrote all `len` elements.
    unsafe { out.set_len(len) };
    Ok(out)
}

impl CustomOp2 for OneDnnMatmul {
    fn name(&self) -> &'static str {
        "onednn-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dnn = lib()
            .0
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("onednn-matmul: {}", cpu_bf16())))?;
        let ((m, k), (n, k2)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        if k != k2 || !xl.is_contiguous() || !wl.is_contiguous() {
            candle_core::bail!(
                "onednn-matmul: contiguous [M, K] · [N, K] needed, got {:?} and {:?}",
                xl.shape(),
                wl.shape()
            )
        }
        if k == 0 {
            candle_core::bail!("onednn-matmul: empty inner dimension");
        }
        let (xo, wo) = (xl.start_offset(), wl.start_offset());
        let (a, w, src): (*const c_void, *const c_void, c_int) = match (xs, ws) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => (
                x[xo..][..m * k].as_ptr().cast(),
                w[wo..][..n * k].as_ptr().cast(),
                DT_BF16,
            ),
            (CpuStorage::F32(x), CpuStorage::BF16(w)) => {
                // f32 activations against bf16 weights: converted as `inputs` says.
                if self.out_dtype != DType::F32 {
                    candle_core::bail!("onednn-matmul: f32 by bf16 writes f32")
                }
                let y = f32_by_bf16(
                    dnn,
                    &x[xo..][..m * k],
                    &w[wo..][..n * k],
                    (m, k, n),
                    self.inputs,
                )?;
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
            }
            (CpuStorage::F32(x), CpuStorage::F32(w)) => (
                x[xo..][..m * k].as_ptr().cast(),
                w[wo..][..n * k].as_ptr().cast(),
                DT_F32,
            ),
            _ => candle_core::bail!("onednn-matmul: bf16 or f32 activations, bf16 or f32 weights"),
        };
        let dst = dtype_code(self.out_dtype)
            .ok_or_else(|| candle_core::Error::Msg("onednn-matmul: bf16 or f32 output".into()))?;
        let run = |out: *mut c_void| {
            // SAFETY: `a` holds m·k and `w` n·k elements of `src`; `out` has room for m·n of the
            // output dtype.
            unsafe { dnn.matmul(a, w, out, (m, k, n), src, dst) }
                .map_err(|e| candle_core::Error::Msg(format!("onednn-matmul: {e}")))
        };
        let out = match self.out_dtype {
            DType::BF16 => CpuStorage::BF16(filled(m * n, run)?),
            _ => CpuStorage::F32(filled(m * n, run)?),
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// `x[M, K] · w[N, K]ᵀ` in f32 for f32 `x` and bf16 `w`: `x` converted to bf16 rows as
/// `inputs` says; when split, one matmul of `[hi; lo]` (2M rows) whose halves are summed.
fn f32_by_bf16(
    dnn: &OneDnn,
    x: &[f32],
    w: &[half::bf16],
    (m, k, n): (usize, usize, usize),
    inputs: Inputs,
) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    if k == 0 {
        candle_core::bail!("onednn-matmul: empty inner dimension");
    }
    let converted = to_bf16_rows(&x[..m * k], k, inputs);
    let rows = if inputs == Inputs::Split { 2 * m } else { m };
    let mut y: Vec<f32> = filled(rows * n, |out| {
        // SAFETY: `converted` holds rows·k and `w` n·k bf16 values; `out` room for rows·n f32.
        unsafe {
            dnn.matmul(
                converted.as_ptr().cast(),
                w[..n * k].as_ptr().cast(),
                out,
                (rows, k, n),
                DT_BF16,
                DT_F32,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("onednn-matmul: {e}")))
    })?;
    if inputs == Inputs::Split {
        // hi·wᵀ above lo·wᵀ: their sum is x·wᵀ.
        let (hi, lo) = y.split_at_mut(m * n);
        let chunk = ROWS_PER_TASK * n;
        hi.par_chunks_mut(chunk)
            .zip(lo.par_chunks(chunk))
            .for_each(|(h, l)| h.iter_mut().zip(l).for_each(|(h, l)| *h += l));
        y.truncate(m * n);
    }
    Ok(y)
}

/// `x[M, K] · w[N, K]ᵀ` (PyTorch's `linear` without bias) in x's dtype. CPU bf16 goes through
/// oneDNN when [`cpu_bf16`] says so; everything else through candle's matmul.
///
/// Mixed precision (f32 `x`, bf16 `w`, the CPU's bf16 mode): oneDNN takes `x` as [`Inputs`] says
/// and writes f32; without it the weight is widened to f32 for the call. The result is f32.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(inputs) = onednn_inputs(x, w) {
        let op = OneDnnMatmul {
            out_dtype: x.dtype(),
            inputs,
        };
        match x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op) {
            Ok(y) => return Ok(y),
            // A shape oneDNN refuses takes the widened path (logged once).
            Err(e) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| tracing::warn!("oneDNN matmul failed, widening instead: {e}"));
            }
        }
    }
    widened_matmul_nt(x, w)
}

/// candle's path: a bf16 weight under f32 activations is widened to f32 for the call.
fn widened_matmul_nt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() != w.dtype() {
        let dtype = if x.dtype() == DType::F32 {
            DType::F32
        } else {
            w.dtype()
        };
        return x.to_dtype(dtype)?.matmul(&w.to_dtype(dtype)?.t()?);
    }
    x.matmul(&w.t()?)
}

/// How oneDNN takes `x` in [`matmul_nt`] here (on this thread, see [`in_dit_blocks`]); `None`
/// for candle's path.
fn onednn_inputs(x: &Tensor, w: &Tensor) -> Option<Inputs> {
    if !x.device().is_cpu() || w.dtype() != DType::BF16 || cpu_bf16().onednn.is_err() {
        return None;
    }
    match x.dtype() {
        // Already bf16: nothing to split or round.
        DType::BF16 => Some(Inputs::Rounded),
        DType::F32 => current_path().inputs(),
        _ => None,
    }
}

/// Whether [`matmul_nt`] of these operands runs on oneDNN (CPU, bf16 weights, a oneDNN bf16
/// kernel, and for f32 activations a oneDNN path here).
pub fn matmul_nt_on_onednn(x: &Tensor, w: &Tensor) -> bool {
    onednn_inputs(x, w).is_some()
}

/// [`matmul_nt`] forced through oneDNN (any dtype it takes: f32, bf16) with `out_dtype`, for
/// tests and benchmarks; an error when oneDNN is not loaded or lacks the kernel.
pub fn onednn_matmul_nt(
    x: &Tensor,
    w: &Tensor,
    out_dtype: DType,
    inputs: Inputs,
) -> candle_core::Result<Tensor> {
    // The op refuses what oneDNN cannot take (not loaded, other dtypes, a missing kernel).
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &OneDnnMatmul { out_dtype, inputs })
}

/// Whether oneDNN is loaded at all (whatever its bf16 support).
pub fn onednn_loaded() -> bool {
    lib().0.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The binding itself, on any CPU where libdnnl2 is installed: f32 through oneDNN equals
    /// candle's f32 matmul, for several shapes (one cached primitive each).
    #[test]
    fn onednn_f32_matmul_equals_candle() -> candle_core::Result<()> {
        if !onednn_loaded() {
            // Only acceptable when the library is absent (or switched off): an installed
            // libdnnl.so.2 that does not load is a bug (scripts/install-onednn.sh installs it).
            let installed = [
                "/usr/lib/x86_64-linux-gnu",
                "/usr/lib64",
                "/usr/lib",
                "/usr/local/lib",
            ]
            .iter()
            .any(|d| std::path::Path::new(d).join("libdnnl.so.2").exists());
            let off = std::env::var("SANA_ONEDNN").is_ok_and(|v| v == "off" || v == "0");
            assert!(
                !installed || off,
                "libdnnl.so.2 is installed but did not load: {}",
                cpu_bf16()
            );
            eprintln!("oneDNN not loaded ({}): binding not exercised", cpu_bf16());
            return Ok(());
        }
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 8, 3), (37, 64, 96), (5, 64, 96), (300, 130, 17)] {
            let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let want = x.matmul(&w.t()?)?;
            let got = onednn_matmul_nt(&x, &w, DType::F32, Inputs::Split)?;
            let (d, _) = sana_testing::max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{m}x{k}x{n}: diff {d}");
        }
        Ok(())
    }

    /// bf16 × bf16: oneDNN's f32 accumulation equals the widened path up to the final rounding
    /// (one bf16 ulp); when oneDNN has no bf16 kernel here, `matmul_nt` takes the widened path.
    #[test]
    fn bf16_matmul_equals_the_widened_path() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        eprintln!("CPU bf16 matmuls: {}", cpu_bf16());
        for (m, k, n) in [(7, 64, 96), (256, 1152, 72)] {
            let x = Tensor::randn(0f32, 1., (m, k), &dev)?.to_dtype(DType::BF16)?;
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?.to_dtype(DType::BF16)?;
            let want = x
                .to_dtype(DType::F32)?
                .matmul(&w.to_dtype(DType::F32)?.t()?)?;
            let got = matmul_nt(&x, &w)?;
            assert_eq!(got.dtype(), DType::BF16);
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let (d, _) = sana_testing::max_abs_diff(&got.to_dtype(DType::F32)?, &want);
            assert!(d <= scale / 128.0, "{m}x{k}x{n}: diff {d} of max {scale}");
            // oneDNN's own bf16 kernels, wherever this CPU has them (whatever SANA_ONEDNN says).
            if has_bf16_kernel() {
                let f32_out = onednn_matmul_nt(&x, &w, DType::F32, Inputs::Split)?;
                let (d, _) = sana_testing::max_abs_diff(&f32_out, &want);
                assert!(d <= scale * 1e-5, "{m}x{k}x{n}: f32 output diff {d}");
            }
        }
        Ok(())
    }

    /// Whether oneDNN is loaded with a bf16 kernel for this CPU.
    fn has_bf16_kernel() -> bool {
        cpu_bf16().onednn.is_ok()
    }

    /// f32 activations × bf16 weights (the CPU's bf16 mode): split into two bf16 terms, oneDNN
    /// matches the widened path (f32 arithmetic on the same weights) to f32 rounding, some 100×
    /// closer than with the inputs rounded to bf16; the sum of the two halves is the product
    /// (NaN and inf pass through).
    #[test]
    fn split_f32_inputs_match_the_widened_path() -> candle_core::Result<()> {
        if !has_bf16_kernel() {
            eprintln!(
                "no oneDNN bf16 kernel here ({}): nothing to compare",
                cpu_bf16()
            );
            return Ok(());
        }
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 8, 3), (7, 64, 96), (300, 1152, 72), (129, 130, 17)] {
            // Activations of mixed scale, as after a norm and a gate.
            let x = (Tensor::randn(0f32, 1., (m, k), &dev)?
                * Tensor::randn(0f32, 3., (m, 1), &dev)?
                    .exp()?
                    .broadcast_as((m, k))?)?;
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?.to_dtype(DType::BF16)?;
            let want = x.matmul(&w.to_dtype(DType::F32)?.t()?)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let split = onednn_matmul_nt(&x, &w, DType::F32, Inputs::Split)?;
            let rounded = onednn_matmul_nt(&x, &w, DType::F32, Inputs::Rounded)?;
            assert_eq!((split.dims2()?, split.dtype()), ((m, n), DType::F32));
            let (d_split, _) = sana_testing::max_abs_diff(&split, &want);
            let (d_rounded, _) = sana_testing::max_abs_diff(&rounded, &want);
            assert!(
                d_split <= scale * 2e-5,
                "{m}x{k}x{n}: split diff {d_split} of max {scale}"
            );
            if k >= 64 {
                assert!(
                    d_split * 20.0 < d_rounded,
                    "{m}x{k}x{n}: split {d_split} not well below rounded {d_rounded}"
                );
            }
        }
        // Non-finite inputs stay non-finite in their rows.
        let x = Tensor::new(&[[1f32, f32::NAN], [2., 3.], [f32::INFINITY, 0.]], &dev)?;
        let w = Tensor::new(&[[1f32, 1.]], &dev)?.to_dtype(DType::BF16)?;
        let y: Vec<f32> = onednn_matmul_nt(&x, &w, DType::F32, Inputs::Split)?
            .flatten_all()?
            .to_vec1()?;
        assert!(y[0].is_nan() && y[1] == 5.0 && !y[2].is_finite(), "{y:?}");
        Ok(())
    }

    /// The probe's rule on the three kinds of CPU it was written for.
    #[test]
    fn probe_choices() {
        let p = |widened, split, rounded| Probe {
            widened,
            split,
            rounded,
        };
        // AMX tiles: bf16 many times f32's rate.
        assert_eq!(p(10.0, 3.0, 1.6).choose(), (Path::Split, Path::Rounded));
        // AVX512-BF16 at twice f32's rate (AMD Zen 4): split about f32's speed, rounded faster.
        assert_eq!(p(10.0, 10.5, 5.5).choose(), (Path::Widened, Path::Rounded));
        // AVX512-BF16 no faster than f32 (Intel without AMX): everything widens.
        assert_eq!(p(4.6, 10.7, 5.2).choose(), (Path::Widened, Path::Widened));
        // Within 10 %: the more accurate path.
        assert_eq!(p(10.0, 9.5, 9.2).choose(), (Path::Widened, Path::Widened));
    }

    /// The blocks' scope and forced paths apply on this thread only, nest, and are undone on
    /// return and on unwinding.
    #[test]
    fn paths_follow_the_scope() {
        let widen_all = cpu_bf16().onednn.is_err();
        let path = |p: Path| if widen_all { Path::Widened } else { p };
        with_cpu_bf16_paths(Path::Split, Path::Rounded, || {
            assert_eq!(current_path(), path(Path::Split));
            in_dit_blocks(|| {
                assert_eq!(current_path(), path(Path::Rounded));
                with_cpu_bf16_paths(Path::Widened, Path::Split, || {
                    assert_eq!(current_path(), path(Path::Split))
                });
                assert_eq!(current_path(), path(Path::Rounded));
                // Another thread has its own scope.
                let other = std::thread::spawn(current_path).join().unwrap();
                assert_eq!(other, cpu_bf16().exact);
            });
            let unwound = std::panic::catch_unwind(|| in_dit_blocks(|| panic!("unwinds")));
            assert!(unwound.is_err());
            assert_eq!(current_path(), path(Path::Split));
        });
        assert_eq!(current_path(), cpu_bf16().exact);
    }

    /// `matmul_nt` of f32 by bf16 takes the path in scope: the same values as the op forced
    /// to that form, and the widened path's values when widened.
    #[test]
    fn matmul_nt_takes_the_path_in_scope() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (70, 256), &dev)?;
        let w = Tensor::randn(0f32, 1., (48, 256), &dev)?.to_dtype(DType::BF16)?;
        let widened = x.matmul(&w.to_dtype(DType::F32)?.t()?)?;
        for path in [Path::Widened, Path::Split, Path::Rounded] {
            let got = with_cpu_bf16_paths(Path::Widened, path, || {
                assert!(!matmul_nt_on_onednn(&x, &w));
                in_dit_blocks(|| matmul_nt(&x, &w))
            })?;
            let want = match path.inputs() {
                Some(inputs) if has_bf16_kernel() => onednn_matmul_nt(&x, &w, DType::F32, inputs)?,
                _ => widened.clone(),
            };
            let (d, _) = sana_testing::max_abs_diff(&got, &want);
            assert_eq!(d, 0.0, "{path}: differs from its own path by {d}");
        }
        Ok(())
    }

    /// The status says which paths run and why.
    #[test]
    fn status_names_the_paths() {
        let s = cpu_bf16().to_string();
        match &cpu_bf16().onednn {
            Err(reason) => assert!(s.contains(reason.as_str()), "{s}"),
            Ok(k) => {
                assert!(s.contains(&k.implementation), "{s}");
                assert!(s.contains(&cpu_bf16().chosen_by), "{s}");
                assert!(s.contains(&cpu_bf16().blocks.to_string()), "{s}");
            }
        }
        eprintln!("CPU bf16 matmuls: {s}");
    }
}
