#!/usr/bin/env bash
# The OpenAI Python SDK against `sana serve` (tests/openai_sdk.py). Installs the SDK into
# target/openai-venv on first use (needs PyPI), builds the release binary if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/openai-venv
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "openai>=1.99,<3"
fi
cargo build --release -p sana --quiet
"$venv/bin/python" tests/openai_sdk.py
