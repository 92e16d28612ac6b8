//! Helpers shared by the parity tests: fixture paths, safetensors I/O, tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The device the parity tests run on: `SANA_TEST_DEVICE` (`cpu`, the default, or `cuda:N`), so
/// the GPU check (`scripts/gpu-check.sh`) runs the same tests and tolerances on a GPU.
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

/// max |a − b| and max |reference|, both in f32.
pub fn max_abs_diff(got: &Tensor, reference: &Tensor) -> (f32, f32) {
    assert_eq!(
        got.dims(),
        reference.dims(),
        "shape differs from the reference"
    );
    let got = got.to_dtype(DType::F32).unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    let diff = (&got - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff.is_finite(), "non-finite output");
    (diff, scale)
}

/// Asserts max |got − reference| ≤ `rel` × max |reference|, naming the case and the tolerance.
pub fn assert_close(case: &str, got: &Tensor, reference: &Tensor, rel: f32, what: &str) {
    let (diff, scale) = max_abs_diff(got, reference);
    assert!(
        scale > 0.0,
        "{case}: reference is all zeros; the fixture is useless"
    );
    assert!(
        diff <= rel * scale,
        "{case}: max abs error {diff:.3e} > {rel:e} × max|ref| ({scale:.3e}) [{what}]"
    );
    eprintln!(
        "{case}: max abs error {diff:.3e}, max|ref| {scale:.3e}, ratio {:.2e} [{what}]",
        diff / scale
    );
}
