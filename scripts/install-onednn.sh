#!/usr/bin/env bash
# Installs oneDNN's runtime library (Debian's libdnnl2, oneDNN 2.x) when it is missing: `sana` opens
# it at run time for bf16 matmuls on the CPU (AMX / AVX512-BF16 kernels); without it CPU bf16
# widens to f32. The tests then exercise the binding (crates/sana-model/src/ops/onednn.rs).
set -euo pipefail
if ldconfig -p | grep -q 'libdnnl\.so\.2 '; then
    echo "oneDNN: $(ldconfig -p | grep 'libdnnl\.so\.2 ' | head -1 | sed 's/.*=> //') present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "scripts/install-onednn.sh: install oneDNN 2.x's runtime (Debian/Ubuntu: apt-get install libdnnl2)" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libdnnl2 >/dev/null
ldconfig -p | grep 'libdnnl\.so\.2 '
