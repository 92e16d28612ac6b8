#!/usr/bin/env bash
# The web playground in a real headless Chromium (tests/playground.py) against `sana serve` on the
# embedded model. Installs Debian's chromium and chromium-driver when missing (apt-get, as root),
# selenium and numpy into target/playground-venv (PyPI), builds the release binary if needed.
# Writes the README's screenshot to docs/playground.png.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "tests/playground.sh needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
venv=target/playground-venv
if ! "$venv/bin/python" -c "import selenium, numpy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "selenium>=4.20,<5" "numpy>=1.26,<3"
fi
cargo build --release -p sana --quiet
SE_OFFLINE=true "$venv/bin/python" tests/playground.py "$@"
