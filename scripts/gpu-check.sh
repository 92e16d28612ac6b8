#!/usr/bin/env bash
# The GPU check: parity fixtures on a device, then the real Sana-0.6B and 1.6B configs (random weights) timed
# beside diffusers on the same device in the same run.
#
#   scripts/gpu-check.sh build [--cpu]
#       Here (with Rust): builds `sana` and the parity test binaries (with the `cuda` feature through
#       scripts/build-cuda.sh unless --cpu) and packs them into dist/gpu-check.tar.xz (small enough to carry to a
#       GPU machine that has no Rust).
#   scripts/gpu-check.sh run [--device cuda:0|cpu] [--quick] [--sizes "512 1024"] [--batches "1 16"] [--steps 20]
#       On the machine to check, from the repository root (it reads tests/fixtures and the real configs):
#       unpacks dist/gpu-check.tar.xz when present, runs the parity tests on the device (f32 within the CPU
#       tolerances, bf16 within 3e-2: the same tests and tolerances as `cargo test`), then `sana bench pipeline` for
#       Sana_600M and Sana_1600M at each size and batch, with diffusers timed in the same run when python3 has
#       torch and diffusers (SANA_REFERENCE_PYTHON to choose another). --quick: 512 only, batch 1, 2 steps, one
#       timed run without warm-up (what a CPU can finish in minutes). The CUDA binary needs the CUDA 13 runtime libraries: LD_LIBRARY_PATH is pointed
#       at torch's bundled ones when they are found.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: scripts/gpu-check.sh build [--cpu] | run [--device D] [--quick] [--sizes S] [--batches B] [--steps N]}
shift
TESTS="transformer autoencoder text_encoder pipeline"

if [ "$mode" = build ]; then
  features=(--features cuda); build=(scripts/build-cuda.sh); target=${CARGO_TARGET_DIR:-target-cuda}
  if [ "${1:-}" = --cpu ]; then features=(); build=(cargo); target=${CARGO_TARGET_DIR:-target}; fi
  out=dist/gpu-check; rm -rf "$out"; mkdir -p "$out/tests"
  "${build[@]}" build --release -p sana "${features[@]}"
  cp "$target/release/sana" "$out/sana"
  json=$("${build[@]}" test --release -p sana-model "${features[@]}" --no-run --message-format=json \
    $(for t in $TESTS; do printf -- '--test %s ' "$t"; done))
  for t in $TESTS; do
    exe=$(printf '%s\n' "$json" | grep "\"name\":\"$t\"" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -1)
    cp "$exe" "$out/tests/$t"
  done
  strip "$out/sana" "$out"/tests/* 2>/dev/null || true
  tar -C dist -cJf dist/gpu-check.tar.xz gpu-check
  ls -l dist/gpu-check.tar.xz
  exit 0
fi

[ "$mode" = run ] || { echo "unknown mode $mode" >&2; exit 2; }
device=cuda:0; sizes="512 1024"; batches="1 16"; steps=20; dtype=bf16; runs=(--warmup 1 --repeat 2)
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --quick) sizes=512; batches=1; steps=2; runs=(--warmup 0 --repeat 1); shift ;;
    --sizes) sizes=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$device" = cpu ] && dtype=f32
if [ -f dist/gpu-check.tar.xz ] && [ ! -x dist/gpu-check/sana ]; then tar -C dist -xJf dist/gpu-check.tar.xz; fi
bin=dist/gpu-check
[ -x "$bin/sana" ] || { echo "no $bin/sana: run scripts/gpu-check.sh build first" >&2; exit 1; }
py=${SANA_REFERENCE_PYTHON:-python3}
if "$py" -c "import torch, diffusers" 2>/dev/null; then
  ref=(--reference-python "$py")
  torchlib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "lib"))')
  [ -d "$torchlib" ] && export LD_LIBRARY_PATH="$torchlib:${LD_LIBRARY_PATH:-}"
else
  ref=(); echo "(no python with torch and diffusers: timing ours only)"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== parity on $device"
status=0
for t in $TESTS; do
  # Parity tests only (their names say so); one thread so GPU memory is not shared between tests.
  filter=parity; [ "$t" = pipeline ] && filter=equals_diffusers
  out=$(SANA_TEST_DEVICE=$device "$bin/tests/$t" "$filter" --test-threads 1 2>&1) || status=1
  printf '%s\n' "$out" | grep -E "^test |test result"
  printf '%s\n' "$out" | grep -q "test result: ok. 0 passed" && { echo "no $filter tests ran in $t" >&2; status=1; }
done
echo "== timings on $device ($dtype), $steps steps"
for model in Sana_600M Sana_1600M; do
  for size in $sizes; do
    for batch in $batches; do
      "$bin/sana" bench "${ref[@]}" "${runs[@]}" pipeline \
        --transformer-config "tests/fixtures/real-configs/transformer/${model}_${size}px.json" \
        --size "$size" --batch "$batch" --steps "$steps" --device "$device" --dtype "$dtype" || status=1
    done
  done
done
exit $status
