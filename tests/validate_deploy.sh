#!/usr/bin/env bash
# Validates deploy/k8s and docker/compose.yaml (tests/validate_deploy.py); installs the validators
# into target/deploy-venv on first use (needs PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-venv
if ! "$venv/bin/python" -c "import kubernetes_validate, check_jsonschema" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "kubernetes-validate>=1.33" "check-jsonschema>=0.33"
fi
"$venv/bin/python" tests/validate_deploy.py
