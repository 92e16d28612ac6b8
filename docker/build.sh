#!/usr/bin/env bash
# The build steps of docker/Dockerfile (CUDA) and docker/Dockerfile.cpu, in one script that CI
# also runs outside Docker, so the recipe is tested where no Docker engine exists.
#
#   docker/build.sh cpu  OUT_DIR     release binary without CUDA
#   docker/build.sh cuda OUT_DIR     release binary with the `cuda` feature; needs CUDA_COMPUTE_CAP
#                                    (e.g. 90 for H100/H200, 89 for L4/L40S, 80 for A100). Uses nvcc
#                                    when present (the CUDA devel image), else scripts/build-cuda.sh
#                                    fetches nvcc and headers from NVIDIA's PyPI wheels.
# Writes OUT_DIR/sana and checks that it runs (`sana --version`; the CUDA binary needs the CUDA
# runtime libraries to start, so off a CUDA machine only its linkage is listed).
set -euo pipefail
kind=${1:?usage: docker/build.sh cpu|cuda OUT_DIR}
out=${2:?usage: docker/build.sh cpu|cuda OUT_DIR}
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
case $kind in
  cpu)
    cargo build --release --locked -p sana
    bin=$target/release/sana
    ;;
  cuda)
    : "${CUDA_COMPUTE_CAP:?set CUDA_COMPUTE_CAP, e.g. 90 for H100}"
    if command -v nvcc >/dev/null; then
      cargo build --release --locked -p sana --features cuda
      bin=$target/release/sana
    else
      CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda} scripts/build-cuda.sh build --release --locked -p sana --features cuda
      bin=${CARGO_TARGET_DIR:-target-cuda}/release/sana
    fi
    ;;
  *) echo "docker/build.sh: unknown kind $kind (cpu or cuda)" >&2; exit 2 ;;
esac
mkdir -p "$out"
cp "$bin" "$out/sana"
if [ "$kind" = cpu ]; then
  "$out/sana" --version
  "$out/sana" serve --help >/dev/null
else
  ldd "$out/sana" | grep -E "cuda|cublas|curand|nvrtc" || true
fi
ls -l "$out/sana"
