#!/usr/bin/env bash
# Schema fuzzing: Schemathesis (PyPI) against the /openapi.json of a running `sana serve` on the
# embedded model, every operation, valid and invalid inputs, all checks (the default: no 5xx, status codes,
# content types and bodies as documented, auth enforced). Then the server must still be healthy
# and must not have logged a panic. Installs Schemathesis into target/schemathesis-venv on first
# use, builds the release binary if needed.
#
#   tests/schemathesis.sh [EXAMPLES_PER_OPERATION]   (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-200}
venv=target/schemathesis-venv
if ! "$venv/bin/schemathesis" --version >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==4.32.5"
fi
cargo build --release -p sana --quiet

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key=sk-schemathesis
log=$(mktemp)
./target/release/sana serve --host 127.0.0.1 --port "$port" --api-key "$key" \
    --max-n 2 --max-steps 8 >"$log" 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT

base=http://127.0.0.1:$port
for _ in $(seq 1 120); do
    if curl -sf -H "Authorization: Bearer $key" "$base/ready" >/dev/null; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then cat "$log"; echo "sana serve exited" >&2; exit 1; fi
    sleep 0.5
done
curl -sf -H "Authorization: Bearer $key" "$base/ready" >/dev/null || { cat "$log"; echo "not ready" >&2; exit 1; }

# One stored image, named in the config, for the download route.
url=$(curl -sf -H "Authorization: Bearer $key" -H 'content-type: application/json' \
    -d '{"prompt": "a blue square", "size": "64x64", "response_format": "url"}' \
    "$base/v1/images/generations" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["url"])')
export SANA_SCHEMATHESIS_FILE=${url##*/}

rc=0
"$venv/bin/schemathesis" --config-file tests/schemathesis.toml run "$base/openapi.json" \
    -H "Authorization: Bearer $key" --max-examples "$examples" --seed 2 \
    --workers 1 --request-timeout 60 --no-color || rc=$?

# Healthy afterwards: answers, ready, and a generation still works.
healthy=0
curl -sf "$base/health" >/dev/null || healthy=1
curl -sf -H "Authorization: Bearer $key" "$base/ready" >/dev/null || healthy=1
curl -sf -H "Authorization: Bearer $key" -H 'content-type: application/json' \
    -d '{"prompt": "a red circle", "size": "64x64"}' "$base/v1/images/generations" | grep -q b64_json || healthy=1
if grep -q "panicked" "$log"; then
    grep -B2 -A8 "panicked" "$log" | head -40
    healthy=1
fi
if [ "$healthy" -ne 0 ]; then
    echo "the server is not healthy after the fuzzing; its log's tail:" >&2
    tail -30 "$log" >&2
    exit 1
fi
echo "server healthy after the fuzzing (health, ready, a generation; no panic logged)"
exit "$rc"
