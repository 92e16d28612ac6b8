//! With the `cuda` feature: compiles every CUDA kernel family (`src/ops/*.cu`) to PTX with nvcc,
//! into `OUT_DIR/<name>.ptx`, which `src/ops/cuda.rs` embeds in the binary. A kernel that does
//! not compile fails the build, so nothing is compiled at run time and no CUDA headers are needed
//! where the binary runs.
//!
//! The PTX targets `compute_<CUDA_COMPUTE_CAP>` (the variable candle's own kernels require; 80
//! when unset, the lowest with native bf16), which the driver JIT-compiles for that GPU and newer.
//! When `ptxas` sits beside nvcc, each PTX file is also assembled for sm_90 (H100/H200) with
//! `ptxas -v`; its report goes to `OUT_DIR/ptxas-sm_90.txt` and any register spill fails the
//! build: these kernels run inside every denoising step.
//!
//! nvcc is `$NVCC`, else `nvcc` on `PATH`, else `$CUDA_HOME/bin/nvcc` (or `CUDA_PATH`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let ops = Path::new("src/ops");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(ops)
        .expect("src/ops exists")
        .map(|e| e.expect("readable src/ops entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let nvcc = nvcc();
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().trim_end_matches(['a', 'f']).to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "80".into());
    let mut reports = String::new();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src
            .file_stem()
            .expect("a .cu file has a stem")
            .to_string_lossy();
        let ptx = out.join(format!("{stem}.ptx"));
        run(
            Command::new(&nvcc)
                .args(["--ptx", "-O3", "-std=c++17"])
                .arg(format!("--gpu-architecture=compute_{cap}"))
                .arg("-o")
                .arg(&ptx)
                .arg(src),
            &format!("nvcc could not compile {}", src.display()),
        );
        if let Some(ptxas) = nvcc
            .parent()
            .map(|d| d.join("ptxas"))
            .filter(|p| p.is_file())
        {
            let report = run(
                Command::new(ptxas)
                    .args(["-v", "--gpu-name", "sm_90", "-o", "/dev/null"])
                    .arg(&ptx),
                &format!("ptxas could not assemble {}", ptx.display()),
            );
            let spills: Vec<&str> = report
                .lines()
                .filter(|l| {
                    l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
                })
                .collect();
            if !spills.is_empty() {
                panic!(
                    "{}: kernels spill registers on sm_90 (they run in every denoising step):\n{}\n\nfull ptxas report:\n{report}",
                    src.display(),
                    spills.join("\n")
                );
            }
            reports.push_str(&format!("== {}\n{report}", src.display()));
        }
    }
    if !reports.is_empty() {
        std::fs::write(out.join("ptxas-sm_90.txt"), reports).expect("OUT_DIR is writable");
    }
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return p;
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let p = PathBuf::from(root).join("bin/nvcc");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "the `cuda` feature needs nvcc to compile src/ops/*.cu: set NVCC, put nvcc on PATH or set \
         CUDA_HOME (scripts/build-cuda.sh gets one from NVIDIA's PyPI wheels)"
    )
}

/// Runs `cmd`, failing the build with its output when it fails; returns stdout and stderr.
fn run(cmd: &mut Command, what: &str) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {:?}: {e}", cmd.get_program()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        panic!("{what} ({}):\n{text}", output.status);
    }
    text
}
