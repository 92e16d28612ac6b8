//! Helpers shared by the parity tests: fixture paths, safetensors I/O, and the tolerance checks of
//! `sana-testing`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `tests/fixtures/` at the workspace root, or `SANA_FIXTURES` (a test binary carried to another
/// machine, as `scripts/gpu-check.sh` does, finds the fixtures of the checkout it runs in).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("SANA_FIXTURES") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

/// The device the parity tests run on: `SANA_TEST_DEVICE` (`cpu`, the default, or `cuda:N`), so
/// the GPU check (`scripts/gpu-check.sh`) runs the same tests and tolerances on a GPU.
/// The activations' dtype of a model loaded in `dtype` on the test device: bf16 on the CPU is
/// mixed precision (bf16 weight matrices, f32 activations; `sana_model::weights::var_builder_for`).
pub fn activation_dtype(dtype: candle_core::DType) -> candle_core::DType {
    if device().is_cpu() && dtype == candle_core::DType::BF16 {
        candle_core::DType::F32
    } else {
        dtype
    }
}

pub fn device() -> Device {
    match std::env::var("SANA_TEST_DEVICE").as_deref() {
        Err(_) | Ok("" | "cpu") => Device::Cpu,
        Ok(other) => {
            let n = other
                .strip_prefix("cuda")
                .map(|r| r.trim_start_matches(':'))
                .map(|r| {
                    if r.is_empty() {
                        Ok(0)
                    } else {
                        r.parse::<usize>()
                    }
                })
                .and_then(Result::ok)
                .unwrap_or_else(|| panic!("SANA_TEST_DEVICE={other}: expected cpu or cuda:N"));
            Device::new_cuda(n).unwrap_or_else(|e| panic!("SANA_TEST_DEVICE={other}: {e}"))
        }
    }
}

/// All tensors of a safetensors file, on [`device`], in their stored dtype.
pub fn load(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &device())
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// The workspace's one comparison (fails on a NaN or ±inf anywhere in either tensor).
#[allow(unused_imports)]
pub use sana_testing::{assert_close, max_abs_diff};
