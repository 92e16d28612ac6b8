#!/usr/bin/env bash
# The one-shot GPU check: parity on the device, compute-sanitizer over a small pipeline run, and the real Sana-0.6B
# and 1.6B configs timed beside diffusers on the same GPU in the same run; a markdown report in --out.
#
#   scripts/gpu-check.sh pack [--cpu]
#       Here (Rust, network to PyPI): builds `sana` and the model test binary (with the `cuda` feature through
#       scripts/build-cuda.sh unless --cpu), and for a GPU package also diffusers and what it needs (for PYTHONPATH,
#       Pillow for CPython 3.11 and 3.12) and compute-sanitizer, into dist/gpu-check/, packed as
#       dist/gpu-check.tar.xz (refused over 64 MiB). Carry the .tar.xz to the GPU machine.
#   scripts/gpu-check.sh [--out DIR] [--device cuda:0] [--quick] [--budget SECONDS]
#       On the GPU machine, from the repository root (it reads tests/fixtures and the real configs): unpacks
#       dist/gpu-check.tar.xz if needed and runs tools/gpu_check.py (default --out gpu-check-report, budget 450 s,
#       which with unpacking keeps the whole check under 8 minutes). Needs python3; PyTorch on it for the reference.
#   scripts/gpu-check.sh --cpu --quick [--out DIR]
#       The same end to end on the CPU (what CI runs): packs a CPU build first when needed, f32, Sana-0.6B at 512²,
#       batch 1, 2 steps; no sanitizer; the reference when python3 has torch and diffusers.
set -euo pipefail
cd "$(dirname "$0")/.."
dist=dist/gpu-check

pack() {
  local cpu=0
  [ "${1:-}" = --cpu ] && cpu=1
  local build=(scripts/build-cuda.sh) features=(--features cuda) target=${CARGO_TARGET_DIR:-target-cuda}
  if [ $cpu = 1 ]; then build=(cargo); features=(); target=${CARGO_TARGET_DIR:-target}; fi
  rm -rf "$dist" dist/gpu-check.tar.xz
  mkdir -p "$dist/tests"
  "${build[@]}" build --release -p sana "${features[@]}"
  cp "$target/release/sana" "$dist/sana"
  local json exe
  json=$("${build[@]}" test --release --workspace "${features[@]}" --test model --no-run --message-format=json)
  exe=$(printf '%s\n' "$json" | grep '"name":"model"' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -1)
  [ -n "$exe" ] || { echo "gpu-check pack: no model test binary in the build output" >&2; exit 1; }
  cp "$exe" "$dist/tests/model"
  strip "$dist/sana" "$dist/tests/model"
  if [ $cpu = 1 ]; then
    echo cpu > "$dist/KIND"
  else
    echo cuda > "$dist/KIND"
    python_deps
    sanitizer
  fi
  tar -C dist -cJf dist/gpu-check.tar.xz gpu-check
  local bytes
  bytes=$(stat -c %s dist/gpu-check.tar.xz)
  du -sh "$dist"/* | sed 's/^/  /'
  echo "dist/gpu-check.tar.xz: $((bytes / 1048576)) MiB ($bytes bytes)"
  [ "$bytes" -le $((64 * 1048576)) ] || { echo "gpu-check pack: over the 64 MiB a device run can carry" >&2; exit 1; }
}

# diffusers and what it needs beyond torch and transformers, unpacked for PYTHONPATH (all pure Python but Pillow,
# which goes to py-cp3XX/ per CPython version).
python_deps() {
  local wheels=target/gpu-check-wheels
  mkdir -p "$wheels" "$dist/py"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
    "diffusers==0.42.1" "requests==2.34.2" "urllib3==2.8.0" "certifi==2026.10.19.post1" "idna>=3.7,<4" \
    "charset_normalizer==3.5.3" "importlib_metadata==10.2.0" "zipp==4.1.2" --python-version 3.11 --platform any
  for w in "$wheels"/*.whl; do
    case $(basename "$w") in pillow-*) ;; *) python3 -m zipfile -e "$w" "$dist/py" ;; esac
  done
  for v in 311 312; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels/cp$v" "pillow==13.0.0" \
      --python-version "3.${v#3}" --implementation cp --abi "cp$v" --platform manylinux_2_28_x86_64
    mkdir -p "$dist/py-cp$v"
    python3 -m zipfile -e "$wheels/cp$v"/pillow-*.whl "$dist/py-cp$v"
  done
}

# compute-sanitizer: the 13.4.92 wheel is the first with its TreeLauncher helpers (earlier ones cannot launch a
# target); one folder with the tool, its helpers and libraries.
sanitizer() {
  local wheels=target/gpu-check-wheels/sanitizer tmp
  mkdir -p "$wheels" "$dist/sanitizer"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "nvidia-cuda-sanitizer-api==13.4.92"
  tmp=$(mktemp -d)
  python3 -m zipfile -e "$wheels"/nvidia_cuda_sanitizer_api-*.whl "$tmp"
  local root
  root=$(dirname "$(find "$tmp" -name compute-sanitizer -type f | head -1)")
  cp "$root"/compute-sanitizer "$root"/TreeLauncherSubreaper "$root"/TreeLauncherTargetLdPreloadHelper "$dist/sanitizer/"
  cp "$root"/../lib/lib*.so* "$dist/sanitizer/" 2>/dev/null || true
  cp "$root"/*.so* "$dist/sanitizer/" 2>/dev/null || true
  chmod +x "$dist/sanitizer/compute-sanitizer" "$dist/sanitizer/TreeLauncher"*
  rm -rf "$tmp"
}

if [ "${1:-}" = pack ]; then
  shift
  pack "$@"
  exit 0
fi

out=gpu-check-report; device=cuda:0; cpu=0; extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --cpu) cpu=1; device=cpu; shift ;;
    --quick) extra+=(--quick); shift ;;
    --budget) extra+=(--budget "$2"); shift 2 ;;
    --no-reference) extra+=(--no-reference); shift ;;
    *) echo "gpu-check: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ ! -x "$dist/sana" ] && [ -f dist/gpu-check.tar.xz ]; then tar -C dist -xJf dist/gpu-check.tar.xz; fi
if [ $cpu = 1 ] && [ "$(cat "$dist/KIND" 2>/dev/null)" != cpu ]; then pack --cpu; fi
[ -x "$dist/sana" ] || { echo "gpu-check: no $dist/sana: run 'scripts/gpu-check.sh pack' first" >&2; exit 1; }
if [ "$(cat "$dist/KIND")" = cuda ]; then
  # The CUDA binary links the CUDA 13 runtime libraries: torch's wheels carry them.
  lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "lib"))' 2>/dev/null || true)
  if [ -n "$lib" ] && [ -d "$lib" ]; then export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"; fi
fi
exec python3 tools/gpu_check.py --bin "$dist" --out "$out" --device "$device" "${extra[@]}"
