//! The PTX of the project's CUDA kernels, compiled from the `.cu` files beside this module by
//! `build.rs` (nvcc, at build time) and embedded in the binary: nothing is compiled at run time and
//! no CUDA headers are needed on the machine that runs it. candle loads each module once per device.

/// `depthwise.cu`: `dw_*`, `glu_dw_*`, `glu_dw_nhwc_*` for f32, f16 and bf16.
pub(crate) const DEPTHWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/depthwise.ptx"));
