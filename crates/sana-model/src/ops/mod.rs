//! Custom tensor ops that candle lacks or runs too slowly for Sana.
//!
//! candle's grouped `conv2d` runs one convolution per group (hundreds of ms at Sana size on CPU,
//! tens of thousands of kernel launches on CUDA), and every elementwise op is a separate pass
//! over memory. These ops are one rayon loop over channel planes on CPU and one kernel on CUDA
//! (`depthwise.cu`, compiled to PTX at build time by `build.rs` and embedded in the binary). Sums
//! are f32 for every dtype.
//!
//! * [`depthwise_conv2d`]: stride-1 depthwise convolution (`groups == channels`); the DC-AE's
//!   multiscale attention aggregation (5×5).
//! * [`glu_depthwise_conv2d`]: the middle of a `GLUMBConv` (DC-AE) in one pass: bias + SiLU after
//!   the 1×1 expansion, the 3×3 depthwise conv with its bias, and the GLU gate. NCHW.
//! * [`glu_depthwise_conv2d_nhwc`]: the same on channels-last maps, for the DiT, whose tokens are
//!   `[B, N, C]` rows: the 1×1 convs around it stay plain matmuls with no transposes.
//! * [`linear_attention`]: the ReLU linear attention core on CPU in one pass over q, k, v.
//!
//! * [`matmul_nt`]: `x · wᵀ` (PyTorch's `linear`); bf16 on the CPU through oneDNN's AMX /
//!   AVX512-BF16 kernels when it is installed and faster here (see `onednn.rs`), candle's matmul
//!   otherwise.
//! * [`softmax_last_dim`], [`gelu_tanh`]: f32 on the CPU with `vmath`'s vectorised `exp` (which
//!   the SiLUs of the depthwise ops use too), candle's ops elsewhere.
//!
//! And the DC-AE's CPU-only algorithms (used when the tensors are f32 on the CPU; other devices
//! and dtypes use candle's ops): `im2col` (banded im2col + gemm convolutions), `winograd`
//! (3×3 convolutions by Winograd F(2×2, 3×3)) and `rms_norm` (channel RMSNorm fused with its
//! residual).

mod depthwise;
mod im2col;
mod linear_attention;
mod onednn;
mod rms_norm;
mod vmath;
mod winograd;

#[cfg(feature = "cuda")]
mod cuda;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result};

pub use depthwise::{depthwise_conv2d, glu_depthwise_conv2d, glu_depthwise_conv2d_nhwc};
pub(crate) use im2col::CpuConv;
pub use linear_attention::{linear_attention, linear_attention_tensor_ops};
pub use onednn::{
    cpu_bf16 as cpu_bf16_status, current_path as cpu_bf16_path, in_dit_blocks, matmul_nt,
    matmul_nt_on_onednn, onednn_kernel, onednn_loaded, onednn_matmul_nt, with_cpu_bf16_paths,
    CpuBf16, Inputs as CpuBf16Inputs, OneDnnKernel, Path as CpuBf16Path,
};
pub(crate) use rms_norm::CpuRmsNorm;
pub use vmath::{gelu_tanh, softmax_last_dim};
pub(crate) use winograd::WINOGRAD_BAND_VALUES;

fn contiguous_range(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("depthwise conv: non-contiguous input".into()))
}

/// The storage as f32: borrowed for f32, widened for half types.
fn as_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    let (start, end) = contiguous_range(l)?;
    Ok(match s {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("depthwise conv: unsupported dtype {:?}", other.dtype()),
    })
}

/// `out` (f32) in the dtype of `like`.
fn store_like(like: &CpuStorage, out: Vec<f32>) -> Result<CpuStorage> {
    Ok(match like.dtype() {
        DType::F32 => CpuStorage::F32(out),
        DType::BF16 => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
        other => candle_core::bail!("unsupported dtype {other:?}"),
    })
}
