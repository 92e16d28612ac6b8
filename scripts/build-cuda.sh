#!/usr/bin/env bash
# Build (or check) the workspace with the `cuda` feature on a machine with no GPU and no CUDA toolkit.
#
#   scripts/build-cuda.sh [cargo subcommand and args]      default: build --release -p sana --features cuda
#
# nvcc, headers and runtime libraries come from NVIDIA's PyPI wheels pinned to CUDA 13.0 (the driver-580
# generation; a newer nvcc would emit PTX a 13.0 driver refuses). The linker gets unversioned .so links and
# a stub libcuda.so (the real one ships with the driver). The binary links the CUDA libraries at load time:
# run it with LD_LIBRARY_PATH pointing at a CUDA 13.0 runtime (e.g. torch's site-packages/nvidia/cu13/lib).
# Env: CUDA_COMPUTE_CAP (default 90 = H100/H200), CUDA_TK (toolkit cache, default ~/.cache/cuda-tk-13.0),
# CARGO_TARGET_DIR (default target-cuda, so CPU builds in target/ are not invalidated).
set -euo pipefail
PROJ=$(cd "$(dirname "$0")/.." && pwd)
TK=${CUDA_TK:-$HOME/.cache/cuda-tk-13.0}
[ $# -gt 0 ] || set -- build --release -p sana --features cuda

# 1. nvcc + headers + runtime libraries from PyPI.
if [ ! -x "$TK/venv/bin/python" ]; then python3 -m venv "$TK/venv"; fi
NV=$("$TK/venv/bin/python" -c 'import sys,os;print(os.path.join(sys.prefix,"lib","python%d.%d"%sys.version_info[:2],"site-packages","nvidia","cu13"))')
if [ ! -x "$NV/bin/nvcc" ]; then
  "$TK/venv/bin/pip" install -q "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,cublas,curand,nvrtc]==13.0.2"
fi

# 2. A CUDA_HOME-shaped folder: unversioned .so links for the linker and a libcuda.so stub (SONAME libcuda.so.1).
ROOT=$TK/root
mkdir -p "$ROOT/lib/stubs"
for d in bin include nvvm; do ln -sfn "$NV/$d" "$ROOT/$d"; done
for n in cudart cublas cublasLt nvrtc; do ln -sf "$NV/lib/lib$n.so.13" "$ROOT/lib/lib$n.so"; done
ln -sf "$NV/lib/libcurand.so.10" "$ROOT/lib/libcurand.so"
if [ ! -f "$ROOT/lib/stubs/libcuda.so" ]; then
  (cd "$PROJ" && cargo fetch -q)
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
  grep -oE "pub unsafe fn cu[A-Za-z0-9_]+\(" "$CUDARC/src/driver/sys/mod.rs" | sed -E 's/pub unsafe fn (.*)\(/\1/' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$ROOT/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$ROOT/lib/stubs/libcuda_stub.c"
fi

# 3. Build.
export CUDA_HOME=$ROOT CUDA_PATH=$ROOT NVCC=$NV/bin/nvcc PATH=$NV/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PROJ/target-cuda}
cd "$PROJ" && cargo "$@"
