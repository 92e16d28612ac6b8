"""Soak test of `sana serve` on the embedded model (run by tests/soak.sh). Python standard library only.

Starts `sana serve` on a free loopback port (a random `--api-key`, `--max-steps 8`, `--max-n 2`), waits for
`/ready`, then runs `--concurrency` client threads for `--minutes`, each drawing its next request from a bounded
mix: b64 generations, `url` generations (each url downloaded), streams (partial images, progress), clients that
hang up mid-stream, multipart edits, and bad requests (malformed JSON, unknown field, `n`/steps/size out of range,
missing or wrong key, wrong content type, oversized body, unknown image file). Every answer is checked (exactly
`n` PNGs of the asked size, seeds, the SSE events, the error envelope with its four keys, `Retry-After` on 429 and
503) and classified `answered`, `refused` (an expected 4xx/429/503 with a well-formed envelope) or `failed`.
Every 10 s the server's resident memory (VmRSS) and open descriptors are sampled. Before the clock starts, a
warm-up runs full batches at the largest size, so the allocator's high-water mark (the biggest batch's
activations) is reached before the memory baseline; then `--warmup-minutes` (3) of the same mixed load, every
answer checked like the rest: quiet resident memory rises for 1.5 to 2.5 minutes of mixed load before it levels off (the
allocator's and the thread pools' working set), so minute one of the bar is the first minute after it. Growth
after it is what the bar looks at.

The bar (exit 0 only if all hold; prints `SOAK PASSED` or `SOAK FAILED: reasons`):
1. no request `failed`;
2. after warm-up, resident memory stays within 10% and descriptors within max(10%, +3) of their level at minute
   one: every 15 s the clients pause until nothing is in flight (a quiet sample), a minute's resident memory is
   the floor of its quiet samples, and every later whole minute is compared with minute one (see memory_bar; on
   runs under 2 minutes a "minute" is a third of the run); the server runs as shipped: it keeps freed memory
   while batches run and hands it back once its queue has been empty for a second (crates/sana/src/memory.rs), so a quiet
   sample is what the idle server holds;
3. the server is still healthy at the end (`/health` and `/ready` 200, no request left queued, a generation works);
4. with `--sigterm`: a burst of slow requests is admitted, then SIGTERM; every admitted request completes
   normally, requests after the signal are refused (connection refused/reset or 503 with `Retry-After`), and the
   server exits 0 within `--shutdown-grace`.

The server keeps `url` images for `--url-ttl`; the soak sets it to 20 s so that this bounded cache is full
before the memory baseline is taken and its growth does not read as a leak.
"""
import argparse
import base64
import binascii
import http.client
import json
import math
import os
import pathlib
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
REQUEST_TIMEOUT = 60.0  # seconds a client waits on one request before calling it hung
SAMPLE_EVERY = 10.0
# Every QUIET_EVERY seconds the clients pause: once nothing is in flight and QUIET_SETTLE seconds have passed, a
# quiet sample is taken, then the clients resume. The memory bar compares quiet samples only (see memory_bar):
# under load, resident memory swings with whatever happens to be in flight at the instant of the sample.
QUIET_EVERY = 15.0
QUIET_SETTLE = 1.5
# Environment the server needs beyond the soak's own (none: it runs with its defaults).
SERVER_ENV: dict[str, str] = {}
SHUTDOWN_GRACE = 30.0
URL_TTL = "20s"
MAX_STEPS = 8
MAX_N = 2
KEEP_FAILURES = 20
# Error types of a stream's `error` event that mean "refused, come back later" rather than "broken".
REFUSAL_TYPES = {"overloaded", "rate_limited", "shutting_down", "unhealthy"}
PROMPTS = [
    "a red circle on the left on a blue background",
    "a large green square in the middle on a white background",
    "a small yellow triangle on the right on a black background",
    "two blue circles on a grey background",
    "a purple star, top left, orange background",
    "un cercle rouge sur fond bleu — ünïcödé ✓",
    "a tiny red square",
]
# The kinds of request and their weights in the mix.
MIX = {
    "generate_b64": 28,
    "generate_url": 14,
    "stream": 24,
    "disconnect": 8,
    "edit": 8,
    "bad_request": 18,
}
BAD_KINDS = ["malformed_json", "unknown_field", "n_too_large", "steps_too_large", "bad_size", "missing_key",
             "wrong_key", "wrong_content_type", "body_too_large", "unknown_file", "blank_prompt"]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers: PNG, HTTP, SSE, error envelopes


class Fail(Exception):
    """A request whose answer is wrong (the request is `failed`)."""


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG from its IHDR; raises Fail unless it is a whole PNG."""
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n":
        raise Fail(f"not a PNG ({len(data)} bytes, starts {data[:8]!r})")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise Fail(f"PNG without IHDR first ({kind!r}, {length})")
    width, height = struct.unpack(">II", data[16:24])
    if not data.endswith(b"IEND\xaeB`\x82"):
        raise Fail(f"PNG truncated ({len(data)} bytes, no IEND at the end)")
    return width, height


def check_png_b64(b64, width: int, height: int, what: str) -> int:
    if not isinstance(b64, str) or not b64:
        raise Fail(f"{what}: b64_json is {type(b64).__name__}, not a non-empty string")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Fail(f"{what}: b64_json is not base64: {e}") from None
    check_png(data, width, height, what)
    return len(data)


def check_png(data: bytes, width: int, height: int, what: str):
    size = png_size(data)
    if size != (width, height):
        raise Fail(f"{what}: PNG is {size[0]}x{size[1]}, asked {width}x{height}")


def make_png(width: int, height: int, pixel) -> bytes:
    """A PNG (RGB, or RGBA when pixel returns 4 values) with pixel(x, y) -> tuple of bytes."""
    channels = len(pixel(0, 0))
    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6 if channels == 4 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self, what="body"):
        try:
            return json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Fail(f"{what} is not JSON ({e}): {self.body[:200]!r}") from None

    def brief(self) -> str:
        return f"HTTP {self.status} {self.headers.get('content-type', '')} {self.body[:300]!r}"


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = REQUEST_TIMEOUT) -> Response:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def check_envelope(resp: Response) -> dict:
    """The error envelope `{"error": {"message", "type", "param", "code"}}`, or Fail."""
    if not resp.headers.get("content-type", "").startswith("application/json"):
        raise Fail(f"error answer is not JSON: {resp.brief()}")
    return check_error_object(resp.json("error body"), resp.brief())


def check_error_object(doc, context: str) -> dict:
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        raise Fail(f"no `error` object in the envelope: {context}")
    missing = {"message", "type", "param", "code"} - err.keys()
    if missing:
        raise Fail(f"error envelope lacks {sorted(missing)}: {context}")
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        raise Fail(f"error envelope with a bad message/type: {context}")
    for key in ("param", "code"):
        if err[key] is not None and not isinstance(err[key], str):
            raise Fail(f"error envelope `{key}` is neither string nor null: {context}")
    return err


def refusal(resp: Response, expected: set[int]) -> str:
    """`refused` for an expected status (or 429/503 with Retry-After) carrying the envelope; Fail otherwise."""
    if resp.status in (429, 503):
        check_envelope(resp)
        retry = resp.headers.get("retry-after", "")
        if not retry.strip().isdigit():
            raise Fail(f"{resp.status} without a valid Retry-After ({retry!r}): {resp.brief()}")
        return "refused"
    if resp.status not in expected:
        raise Fail(f"unexpected status: {resp.brief()}")
    check_envelope(resp)
    return "refused"


def parse_sse(body: bytes) -> list[tuple[str, str]]:
    """The (event, data) pairs of an event stream; comments and blank blocks are skipped."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Fail(f"event stream is not UTF-8: {e}") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    events = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field in ("id", "retry"):
                pass
            else:
                raise Fail(f"unknown SSE field {field!r} in block {block[:200]!r}")
        if name is None and not data:
            continue
        events.append((name or "message", "\n".join(data)))
    return events


# ---------------------------------------------------------------------------------------------------------------
# The soak


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}
        self.latency: dict[str, list[float]] = {}
        self.sub_counts: dict[str, int] = {}
        self.failures: list[dict] = []
        self.failed = 0
        self.total = 0

    def record(self, kind: str, outcome: str, seconds: float, detail: str | None = None, sub: str | None = None):
        with self.lock:
            self.total += 1
            self.counts.setdefault(kind, {"answered": 0, "refused": 0, "failed": 0})[outcome] += 1
            self.latency.setdefault(kind, []).append(seconds)
            if sub:
                self.sub_counts[f"{kind}/{sub}/{outcome}"] = self.sub_counts.get(f"{kind}/{sub}/{outcome}", 0) + 1
            if outcome == "failed":
                self.failed += 1
                if len(self.failures) < KEEP_FAILURES:
                    self.failures.append({"kind": kind, "sub": sub, "detail": detail, "at_s": round(seconds, 3),
                                          "time": time.strftime("%H:%M:%S")})
                print(f"  FAILED {kind}{'/' + sub if sub else ''}: {detail}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    idx = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[idx]


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.key = secrets.token_hex(16)
        self.stats = Stats()
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.mix = MIX
        if args.mix:
            self.mix = {k: int(w) for k, w in (part.split("=") for part in args.mix.split(","))}
            unknown = set(self.mix) - set(MIX)
            if unknown:
                sys.exit(f"soak: unknown kinds in --mix: {sorted(unknown)}; known: {sorted(MIX)}")
        self.running = threading.Event()  # cleared while a quiet sample is taken
        self.running.set()
        self.busy = 0  # client requests in flight
        self.busy_lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.limits: dict = {}
        self.sizes: list[int] = []
        self.log_path = ""
        self.t0 = 0.0
        self.warmup_sample: dict | None = None

    # --- server -----------------------------------------------------------------------------------------------

    def auth(self, extra: dict | None = None) -> dict:
        headers = {"Authorization": f"Bearer {self.key}"}
        headers.update(extra or {})
        return headers

    def start_server(self):
        binary = pathlib.Path(self.args.binary)
        if not binary.is_absolute():
            binary = ROOT / binary
        deadline = time.time() + 180
        while not os.access(binary, os.X_OK):  # a rebuild may be replacing it
            if time.time() > deadline:
                sys.exit(f"soak: {binary} is missing or not executable")
            print(f"soak: waiting for {binary} to appear", flush=True)
            time.sleep(10)
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANA_")}  # flags only
        for k, v in SERVER_ENV.items():
            env.setdefault(k, v)
        tmp = tempfile.mkdtemp(prefix="sana-soak-")
        self.log_path = os.path.join(tmp, "server.log")
        cmd = [str(binary), "serve", "--host", HOST, "--port", str(self.port), "--api-key", self.key,
               "--max-steps", str(MAX_STEPS), "--max-n", str(MAX_N), "--shutdown-grace", f"{SHUTDOWN_GRACE:g}s",
               "--url-ttl", URL_TTL, "--no-playground"]
        print("soak: " + " ".join(c if c != self.key else "<key>" for c in cmd), flush=True)
        print(f"soak: server log {self.log_path}", flush=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=tmp)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                self.dump_log()
                sys.exit(f"soak: the server exited with {self.proc.returncode} before it was ready")
            try:
                r = http_request(self.port, "GET", "/ready", headers=self.auth(), timeout=5)
                if r.status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.dump_log()
                self.proc.kill()
                sys.exit("soak: the server was not ready within 180 s")
            time.sleep(0.2)
        info = http_request(self.port, "GET", "/info", headers=self.auth(), timeout=10).json("/info")
        self.limits = info["limits"]
        step = self.limits["size_multiple"]
        lo = max(32, self.limits["min_width"], self.limits["min_height"])
        hi = min(256, self.limits["max_width"], self.limits["max_height"])
        self.sizes = [s for s in range(lo, hi + 1) if s % step == 0]
        print(f"soak: ready on port {self.port}: model {info['model_id']} on {info['device']}, sizes "
              f"{self.sizes[0]}..{self.sizes[-1]} step {step}, max_n {self.limits['max_n']}, "
              f"max_steps {self.limits['max_steps']}", flush=True)

    def dump_log(self, lines=40):
        try:
            tail = pathlib.Path(self.log_path).read_text(errors="replace").splitlines()[-lines:]
            print("---- server log tail ----\n" + "\n".join(tail) + "\n-------------------------", flush=True)
        except OSError:
            pass

    def sample(self, label: str | None = None, keep=True) -> dict:
        pid = self.proc.pid
        rss = fds = threads = None
        try:
            for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, ValueError):
            pass
        # Of the RSS, how much is in transparent huge pages (2 MiB each, resident as a whole).
        huge = None
        try:
            for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("AnonHugePages:"):
                    huge = int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        s = {"elapsed_s": round(time.time() - self.t0, 1), "requests": self.stats.total,
             "rss_mib": None if rss is None else round(rss, 1), "fds": fds, "threads": threads,
             "huge_mib": None if huge is None else round(huge, 1), "label": label}
        if keep:
            self.samples.append(s)
        print(f"[{s['elapsed_s']:7.1f}s] requests={s['requests']:6d} rss={s['rss_mib']} MiB (huge pages {s['huge_mib']})"
              f" fds={fds} threads={threads}" + (f" ({label})" if label else ""), flush=True)
        return s

    def metrics(self) -> dict[str, float]:
        r = http_request(self.port, "GET", "/metrics", headers=self.auth(), timeout=10)
        out = {}
        for line in r.body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    # --- request kinds -----------------------------------------------------------------------------------------

    def gen_body(self, rng: random.Random, *, n=None, steps=None, size=None, **extra) -> dict:
        w, h = size or (rng.choice(self.sizes), rng.choice(self.sizes))
        body = {"prompt": rng.choice(PROMPTS), "size": f"{w}x{h}", "n": n or rng.randint(1, MAX_N),
                "num_inference_steps": steps or rng.randint(2, MAX_STEPS)}
        if rng.random() < 0.7:
            body["seed"] = rng.randrange(2**32)
        body.update(extra)
        return body

    def post_json(self, body: dict, timeout=REQUEST_TIMEOUT) -> Response:
        return http_request(self.port, "POST", "/v1/images/generations", json.dumps(body).encode(),
                            self.auth({"Content-Type": "application/json"}), timeout)

    @staticmethod
    def size_of(body: dict) -> tuple[int, int]:
        w, h = body["size"].split("x")
        return int(w), int(h)

    def check_images(self, resp: Response, body: dict, fmt: str) -> list:
        """The `data` of a 200 images answer, checked: n entries, the seeds, the format's key only."""
        if not resp.headers.get("content-type", "").startswith("application/json"):
            raise Fail(f"200 that is not JSON: {resp.brief()}")
        doc = resp.json()
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list) or len(data) != body["n"]:
            raise Fail(f"asked {body['n']} images, got {None if data is None else len(data)}: {resp.body[:300]!r}")
        if not isinstance(doc.get("created"), int):
            raise Fail(f"no integer `created`: {resp.body[:300]!r}")
        if doc.get("size") != body["size"]:
            raise Fail(f"answer size {doc.get('size')!r}, asked {body['size']}")
        for i, item in enumerate(data):
            other = "url" if fmt == "b64_json" else "b64_json"
            if not isinstance(item, dict) or fmt not in item or item.get(other) is not None:
                raise Fail(f"image {i} is not a `{fmt}`-only entry: {str(item)[:200]}")
            if "seed" in body and item.get("seed") != body["seed"] + i:
                raise Fail(f"image {i} seed {item.get('seed')}, expected {body['seed'] + i}")
            if not isinstance(item.get("seed"), int):
                raise Fail(f"image {i} without an integer seed")
        return data

    def generate_b64(self, rng):
        body = self.gen_body(rng)
        if rng.random() < 0.5:
            body["response_format"] = "b64_json"
        resp = self.post_json(body)
        if resp.status != 200:
            return refusal(resp, set())
        w, h = self.size_of(body)
        for i, item in enumerate(self.check_images(resp, body, "b64_json")):
            check_png_b64(item["b64_json"], w, h, f"image {i}")
        return "answered"

    def generate_url(self, rng):
        body = self.gen_body(rng, response_format="url")
        resp = self.post_json(body)
        if resp.status != 200:
            return refusal(resp, set())
        w, h = self.size_of(body)
        for i, item in enumerate(self.check_images(resp, body, "url")):
            url = urllib.parse.urlsplit(item["url"])
            if url.scheme != "http" or url.port != self.port or not url.path.startswith("/v1/images/files/"):
                raise Fail(f"image {i} url {item['url']!r} is not http://host:{self.port}/v1/images/files/...")
            got = http_request(self.port, "GET", url.path, headers=self.auth())
            if got.status != 200:
                raise Fail(f"download of image {i} ({url.path}): {got.brief()}")
            if got.headers.get("content-type") != "image/png":
                raise Fail(f"download of image {i}: content type {got.headers.get('content-type')!r}")
            check_png(got.body, w, h, f"downloaded image {i}")
        return "answered"

    def stream(self, rng, body: dict | None = None):
        if body is None:
            extra = {"stream": True, "partial_images": rng.randint(0, 2)}
            if rng.random() < 0.5:
                extra["progress"] = True
            body = self.gen_body(rng, **extra)
        resp = self.post_json(body)
        if resp.status != 200:
            return refusal(resp, set())
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            raise Fail(f"stream answered with {resp.brief()}")
        return self.check_stream(resp.body, body)

    def check_stream(self, raw: bytes, body: dict, prefix="image_generation") -> str:
        events = parse_sse(raw)
        if not events:
            raise Fail("empty event stream")
        n, (w, h) = body["n"], self.size_of(body)
        partials = {i: 0 for i in range(n)}
        completed: list[int] = []
        steps_seen = []
        for idx, (name, data) in enumerate(events):
            try:
                doc = json.loads(data)
            except json.JSONDecodeError as e:
                raise Fail(f"event {idx} `{name}` data is not JSON ({e}): {data[:200]!r}") from None
            if not isinstance(doc, dict) or doc.get("type") != name:
                raise Fail(f"event {idx} `{name}` has type {doc.get('type') if isinstance(doc, dict) else doc!r}")
            if name == "error":
                err = check_error_object(doc, data[:300])
                if idx != len(events) - 1:
                    raise Fail(f"`error` event is not the last ({len(events) - idx - 1} follow): {data[:300]}")
                if completed:
                    raise Fail(f"`error` event after {len(completed)} completed images: {data[:300]}")
                if err["type"] in REFUSAL_TYPES:
                    return "refused"
                raise Fail(f"stream ended with an error event: {data[:300]}")
            if name == f"{prefix}.partial_image":
                i = doc.get("image_index")
                if i not in partials or i in completed:
                    raise Fail(f"partial image of image_index {i!r} (n {n}, completed {completed})")
                if doc.get("partial_image_index") != partials[i]:
                    raise Fail(f"partial_image_index {doc.get('partial_image_index')}, expected {partials[i]}")
                partials[i] += 1
                check_png_b64(doc.get("b64_json"), w, h, f"partial {partials[i] - 1} of image {i}")
            elif name == f"{prefix}.progress":
                step, steps = doc.get("step"), doc.get("steps")
                if not body.get("progress"):
                    raise Fail("progress event without `progress: true`")
                if not isinstance(step, int) or not isinstance(steps, int) or not 1 <= step <= steps:
                    raise Fail(f"bad progress event {data[:200]}")
                steps_seen.append((step, steps))
            elif name == f"{prefix}.completed":
                i = doc.get("image_index")
                if i not in partials or i in completed:
                    raise Fail(f"completed event of image_index {i!r} (n {n}, already {completed})")
                if doc.get("size") != body["size"]:
                    raise Fail(f"completed image size {doc.get('size')!r}, asked {body['size']}")
                if "seed" in body and doc.get("seed") != body["seed"] + i:
                    raise Fail(f"completed image {i} seed {doc.get('seed')}, expected {body['seed'] + i}")
                completed.append(i)
                check_png_b64(doc.get("b64_json"), w, h, f"completed image {i}")
            else:
                raise Fail(f"unexpected event `{name}`: {data[:200]!r}")
        if sorted(completed) != list(range(n)):
            raise Fail(f"stream ended with completed images {completed}, asked n={n} "
                       f"(last event `{events[-1][0]}`)")
        if events[-1][0] != f"{prefix}.completed":
            raise Fail(f"stream does not end with a completed event (last `{events[-1][0]}`)")
        for i, count in partials.items():
            if count > body.get("partial_images", 0):
                raise Fail(f"image {i}: {count} partial images, asked at most {body.get('partial_images', 0)}")
        if body.get("progress"):
            if not steps_seen:
                raise Fail("`progress: true` but no progress event")
            if "num_inference_steps" in body and prefix == "image_generation" and \
                    any(s != body["num_inference_steps"] for _, s in steps_seen):
                raise Fail(f"progress `steps` {steps_seen[0][1]}, asked {body['num_inference_steps']}")
        return "answered"

    def disconnect(self, rng):
        """Opens a slow stream, reads its first event (or a few bytes), then hangs up (FIN or RST)."""
        size = self.sizes[-1]
        body = self.gen_body(rng, n=MAX_N, steps=MAX_STEPS, size=(size, size), stream=True,
                             progress=rng.random() < 0.7, partial_images=rng.randint(0, 2))
        payload = json.dumps(body).encode()
        head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        sock = socket.create_connection((HOST, self.port), timeout=REQUEST_TIMEOUT)
        abort = rng.random() < 0.5
        try:
            sock.sendall(head + payload)
            buf = b""
            want_event = rng.random() < 0.7
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    raise Fail(f"connection closed before the first event: {buf[:300]!r}")
                buf += chunk
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                status_line = buf.split(b"\r\n", 1)[0]
                parts = status_line.split()
                if len(parts) < 2 or not parts[1].isdigit():
                    raise Fail(f"bad status line {status_line!r}")
                status = int(parts[1])
                if status != 200:
                    # Read the rest for the envelope, then judge it like any other refusal.
                    headers, _ = parse_raw_response(buf)
                    sock.settimeout(10)
                    while not raw_response_complete(buf, headers):
                        more = sock.recv(65536)
                        if not more:
                            break
                        buf += more
                    headers, body_bytes = parse_raw_response(buf)
                    return refusal(Response(status, headers, body_bytes), set())
                if b"text/event-stream" not in buf[:end].lower():
                    raise Fail(f"stream answered without text/event-stream: {buf[:end]!r}")
                rest = buf[end + 4:]
                if not want_event and len(rest) > 0:
                    break
                if b"\n\n" in rest and b"event:" in rest:
                    break
        finally:
            if abort:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        return "answered"

    def edit(self, rng):
        w, h = rng.choice(self.sizes), rng.choice(self.sizes)
        r, g, b = rng.randrange(256), rng.randrange(256), rng.randrange(256)
        image = make_png(w, h, lambda x, y: (r, (g + x) % 256, (b + y) % 256))
        n, steps = rng.randint(1, MAX_N), rng.randint(2, MAX_STEPS)
        fields = {"prompt": rng.choice(PROMPTS), "size": f"{w}x{h}", "n": str(n),
                  "num_inference_steps": str(steps)}
        seed = None
        if rng.random() < 0.5:
            seed = rng.randrange(2**32)
            fields["seed"] = str(seed)
        files = {"image": ("image.png", image)}
        if rng.random() < 0.5:
            files["mask"] = ("mask.png", make_png(w, h, lambda x, y: (0, 0, 0, 0 if x < w // 2 else 255)))
        boundary = "soak" + secrets.token_hex(8)
        parts = []
        for k, v in fields.items():
            parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode())
        for k, (fname, data) in files.items():
            parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{fname}\"\r\n"
                         f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
        payload = b"".join(parts) + f"--{boundary}--\r\n".encode()
        resp = http_request(self.port, "POST", "/v1/images/edits", payload,
                            self.auth({"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        if resp.status != 200:
            return refusal(resp, set())
        body = {"n": n, "size": f"{w}x{h}"}
        if seed is not None:
            body["seed"] = seed
        for i, item in enumerate(self.check_images(resp, body, "b64_json")):
            check_png_b64(item["b64_json"], w, h, f"edited image {i}")
        return "answered"

    def bad_request(self, rng, sub: str):
        json_ct = {"Content-Type": "application/json"}
        path, method, payload, headers, expect = "/v1/images/generations", "POST", None, self.auth(json_ct), {400}
        good = {"prompt": rng.choice(PROMPTS), "size": "32x32", "num_inference_steps": 2}
        if sub == "malformed_json":
            payload = rng.choice([b'{"prompt": "x",', b"{prompt: x}", b"", b"[1, 2", b'{"prompt": "\xff\xfe"}'])
        elif sub == "unknown_field":
            payload = json.dumps({**good, rng.choice(["foo", "steps", "width", "Prompt"]): 1}).encode()
        elif sub == "n_too_large":
            payload = json.dumps({**good, "n": self.limits["max_n"] + rng.randint(1, 5)}).encode()
        elif sub == "steps_too_large":
            payload = json.dumps({**good, "num_inference_steps": self.limits["max_steps"] + 1}).encode()
        elif sub == "bad_size":
            bad = rng.choice(["33x33", f"{self.limits['max_width'] + 8}x32", "abc", "0x0", "32", "-32x32", "32x32x2"])
            payload = json.dumps({**good, "size": bad}).encode()
        elif sub == "blank_prompt":
            payload = json.dumps({**good, "prompt": rng.choice(["", "   ", "\n"])}).encode()
        elif sub == "missing_key":
            payload, headers, expect = json.dumps(good).encode(), dict(json_ct), {401}
        elif sub == "wrong_key":
            payload, expect = json.dumps(good).encode(), {401}
            headers = {**json_ct, "Authorization": "Bearer " + secrets.token_hex(16)}
        elif sub == "wrong_content_type":
            payload, expect = json.dumps(good).encode(), {415}
            headers = self.auth({"Content-Type": rng.choice(["text/plain", "application/x-www-form-urlencoded"])})
        elif sub == "body_too_large":
            payload, expect = b'{"prompt": "' + b"x" * (self.limits["max_body_bytes"] + 1024) + b'"}', {413}
        elif sub == "unknown_file":
            method, path, expect = "GET", f"/v1/images/files/{secrets.token_hex(16)}.png", {404}
        else:
            raise AssertionError(sub)
        resp = http_request(self.port, method, path, payload, headers)
        if resp.status == 401 and 401 in expect and "www-authenticate" not in resp.headers:
            raise Fail(f"401 without WWW-Authenticate: {resp.brief()}")
        return refusal(resp, expect)

    # --- client threads ----------------------------------------------------------------------------------------

    def run_one(self, rng, kind: str):
        sub = rng.choice(BAD_KINDS) if kind == "bad_request" else None
        start = time.monotonic()
        try:
            if kind == "bad_request":
                outcome = self.bad_request(rng, sub)
            else:
                outcome = getattr(self, kind)(rng)
            detail = None
        except Fail as e:
            outcome, detail = "failed", str(e)
        except (OSError, http.client.HTTPException) as e:
            outcome, detail = "failed", f"{type(e).__name__}: {e}"
        except Exception as e:  # a bug of this script must not read as a pass
            outcome, detail = "failed", f"soak exception {type(e).__name__}: {e}"
        self.stats.record(kind, outcome, time.monotonic() - start, detail, sub)

    def client(self, index: int, deadline: float):
        rng = random.Random(self.rng.randrange(2**63) + index)
        kinds, weights = list(self.mix), list(self.mix.values())
        while time.time() < deadline and not self.stop.is_set():
            self.running.wait()
            with self.busy_lock:
                self.busy += 1
            try:
                self.run_one(rng, rng.choices(kinds, weights)[0])
            finally:
                with self.busy_lock:
                    self.busy -= 1

    def sampler(self, deadline: float):
        nxt = self.t0 + SAMPLE_EVERY
        quiet = self.t0 + QUIET_EVERY
        while not self.stop.wait(max(0.0, nxt - time.time())):
            if time.time() >= deadline - 1:
                return
            self.sample()
            if time.time() >= quiet - 0.5:
                self.quiet_sample()
                quiet += QUIET_EVERY
            nxt += SAMPLE_EVERY

    def quiet_sample(self):
        """Pauses the clients, waits until nothing is in flight and QUIET_SETTLE more seconds, samples, resumes."""
        self.running.clear()
        try:
            wait_until = time.time() + REQUEST_TIMEOUT + 10
            while time.time() < wait_until:
                with self.busy_lock:
                    if self.busy == 0:
                        break
                time.sleep(0.05)
            time.sleep(QUIET_SETTLE)
            self.sample("quiet")
        finally:
            self.running.set()

    # --- end-of-run checks -------------------------------------------------------------------------------------

    def memory_bar(self) -> dict:
        """Minute one is the first minute after the warm-up. Resident memory of a minute is its floor: the least
        of its quiet samples, what the server holds when idle that minute. A leak raises it; the allocator's
        fragmentation (which small objects happen to pin which pages when the clients pause) moves single samples
        by ±15% without a trend, and the floor of four samples a minute smooths that out. Every later whole
        minute's floor must be within 10% of minute one's, and descriptors within max(10%, +3) in every quiet
        sample."""
        warm = self.args.warmup_minutes * 60
        minute = 60.0 if self.args.minutes * 60 >= 120 else self.args.minutes * 20
        quiet = [s for s in self.samples
                 if s["rss_mib"] is not None and s["fds"] is not None and s["label"] == "quiet"
                 and s["elapsed_s"] >= warm]
        windows: dict[int, list] = {}
        for s in quiet:
            windows.setdefault(int((s["elapsed_s"] - warm) // minute), []).append(s)
        last_whole = int((self.args.minutes * 60) // minute) - 1
        floors = [{"minute": k + 1, "samples": len(v), "floor_mib": min(x["rss_mib"] for x in v),
                   "max_mib": max(x["rss_mib"] for x in v), "fds_max": max(x["fds"] for x in v),
                   "threads_max": max((x["threads"] or 0) for x in v)}
                  for k, v in sorted(windows.items()) if k <= last_whole]
        out = {"minute_s": minute, "floors": floors, "ok": True, "reasons": []}
        if len(floors) < 2 or floors[0]["minute"] != 1:
            out.update(ok=False, reasons=["fewer than two minutes with quiet samples (run longer)"])
            return out
        base = floors[0]
        later = floors[1:]
        rss_ratio = max(f["floor_mib"] / base["floor_mib"] for f in later)
        base_fds = min(x["fds"] for x in windows[0])
        fd_limit = max(base_fds * 1.10, base_fds + 3)
        fd_max = max(f["fds_max"] for f in later)
        out.update(baseline=base, later_minutes=len(later), rss_max_ratio=round(rss_ratio, 4), rss_limit_ratio=1.10,
                   fds_base=base_fds, fds_max=fd_max, fds_limit=round(fd_limit, 1),
                   rss_min_mib=min(s["rss_mib"] for s in quiet), rss_max_mib=max(s["rss_mib"] for s in quiet),
                   quiet_samples=len(quiet),
                   raw_max_ratio=round(max(s["rss_mib"] for s in quiet) / base["floor_mib"], 4))
        if rss_ratio > 1.10:
            worst = max(later, key=lambda f: f["floor_mib"])
            out["reasons"].append(f"resident memory grew to {rss_ratio:.3f}x minute one's ({base['floor_mib']} MiB "
                                  f"-> {worst['floor_mib']} MiB in minute {worst['minute']})")
            out["ok"] = False
        if fd_max > fd_limit:
            out["reasons"].append(f"open descriptors grew from {base_fds} to {fd_max} (limit {fd_limit:.1f})")
            out["ok"] = False
        return out

    def health(self) -> dict:
        out = {"ok": True, "reasons": []}

        def bad(reason):
            out["ok"] = False
            out["reasons"].append(reason)
        try:
            r = http_request(self.port, "GET", "/health", timeout=10)
            out["health"] = r.status
            if r.status != 200:
                bad(f"/health {r.brief()}")
            r = http_request(self.port, "GET", "/ready", headers=self.auth(), timeout=10)
            out["ready"] = r.status
            if r.status != 200:
                bad(f"/ready {r.brief()}")
            deadline = time.time() + 10
            while True:  # requests cut off by disconnects may take a moment to leave the queue
                m = self.metrics()
                queued = int(m.get("sana_queue_size", -1))
                # Every admitted request ends once, as a success or a failure after admission.
                ended = m.get("sana_request_success", 0) + sum(
                    v for k, v in m.items() if k.startswith("sana_request_failure{") and
                    any(f'err="{t}"' in k for t in ("cancelled", "timeout", "backend", "unhealthy")))
                unresolved = int(m.get("sana_request_count", 0) - ended)
                if (queued == 0 and unresolved == 0) or time.time() > deadline:
                    break
                time.sleep(0.5)
            out["queue_size"], out["unresolved"] = queued, unresolved
            out["metrics"] = {k: v for k, v in m.items() if k.startswith(("sana_request_count", "sana_request_success",
                                                                         "sana_request_failure", "sana_http_failure",
                                                                         "sana_worker_restart", "sana_queue_size"))}
            if queued != 0:
                bad(f"sana_queue_size is {queued} with no client running")
            if unresolved != 0:
                bad(f"{unresolved} admitted requests neither succeeded nor failed (sana_request_count "
                    f"{m.get('sana_request_count')}, ended {ended}) with no client running")
            body = {"prompt": PROMPTS[0], "size": "64x64", "n": 1, "num_inference_steps": 4, "seed": 7}
            r = self.post_json(body, timeout=30)
            out["generation"] = r.status
            if r.status != 200:
                bad(f"final generation: {r.brief()}")
            else:
                check_png_b64(self.check_images(r, body, "b64_json")[0]["b64_json"], 64, 64, "final image")
        except Fail as e:
            bad(f"final generation: {e}")
        except (OSError, http.client.HTTPException) as e:
            bad(f"health check: {type(e).__name__}: {e}")
        return out

    def sigterm_phase(self) -> dict:
        """A burst of slow requests, SIGTERM once all are admitted, late requests while it drains."""
        out = {"ok": True, "reasons": [], "burst": [], "late": {}}

        def bad(reason):
            out["ok"] = False
            out["reasons"].append(reason)
            print(f"  SIGTERM FAILED: {reason}", flush=True)
        size = self.sizes[len(self.sizes) * 2 // 3]  # slow enough to still be running at the signal
        burst = 8
        before = self.metrics().get("sana_request_count", 0)
        results: list[dict] = [None] * burst  # type: ignore[list-item]
        rng = random.Random(self.rng.randrange(2**63))

        def slow(i: int, body: dict):
            start = time.monotonic()
            try:
                if body.get("stream"):
                    outcome = self.stream(rng, body)
                else:
                    resp = self.post_json(body)
                    if resp.status != 200:
                        raise Fail(f"admitted request answered {resp.brief()}")
                    for j, item in enumerate(self.check_images(resp, body, "b64_json")):
                        check_png_b64(item["b64_json"], size, size, f"image {j}")
                    outcome = "answered"
                detail = None if outcome == "answered" else "refused (error event) though admitted"
            except Fail as e:
                detail = str(e)
            except (OSError, http.client.HTTPException) as e:
                detail = f"{type(e).__name__}: {e}"
            results[i] = {"stream": bool(body.get("stream")), "ok": detail is None, "detail": detail,
                          "seconds": round(time.monotonic() - start, 3)}

        threads = []
        for i in range(burst):
            extra = {"stream": True, "progress": True, "partial_images": 1} if i % 3 == 2 else {}
            body = self.gen_body(rng, n=MAX_N, steps=MAX_STEPS, size=(size, size), seed=1000 * i, **extra)
            t = threading.Thread(target=slow, args=(i, body), daemon=True)
            t.start()
            threads.append(t)
        deadline = time.time() + 15
        admitted = 0
        while time.time() < deadline:
            admitted = self.metrics().get("sana_request_count", 0) - before
            if admitted >= burst:
                break
            time.sleep(0.05)
        admitted = int(admitted)
        out["admitted_before_signal"] = admitted
        if admitted < burst:
            bad(f"only {admitted} of {burst} burst requests admitted within 15 s")
        queued = int(self.metrics().get("sana_queue_size", -1))
        out["queued_at_signal"] = queued
        signalled = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        print(f"soak: SIGTERM sent with {admitted} requests admitted ({queued} still queued)", flush=True)

        late = out["late"]
        late_lock = threading.Lock()

        def late_client():
            lrng = random.Random(threading.get_ident())
            time.sleep(0.2)
            while self.proc.poll() is None and time.monotonic() - signalled < SHUTDOWN_GRACE + 5:
                kind = lrng.choice(["generate", "stream"])
                body = self.gen_body(lrng, n=1, steps=2, size=(32, 32), **({"stream": True} if kind == "stream"
                                                                               else {}))
                try:
                    resp = self.post_json(body, timeout=SHUTDOWN_GRACE + 10)
                    if resp.status == 503:
                        try:
                            refusal(resp, set())
                            key = "503_retry_after"
                        except Fail as e:
                            key = "bad"
                            bad(f"late request after SIGTERM: {e}")
                    else:
                        key = "bad"
                        bad(f"late request after SIGTERM was answered: {resp.brief()}")
                except ConnectionRefusedError:
                    key = "connection_refused"
                except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
                    key = "connection_reset"
                except (OSError, http.client.HTTPException) as e:
                    key = "bad"
                    bad(f"late request after SIGTERM: {type(e).__name__}: {e}")
                with late_lock:
                    late[key] = late.get(key, 0) + 1
                time.sleep(0.1)

        late_threads = [threading.Thread(target=late_client, daemon=True) for _ in range(2)]
        for t in late_threads:
            t.start()
        try:
            rc = self.proc.wait(timeout=SHUTDOWN_GRACE + 15)
        except subprocess.TimeoutExpired:
            rc = None
        exit_s = time.monotonic() - signalled
        out["exit_code"] = rc
        out["exit_after_s"] = round(exit_s, 2)
        if rc is None:
            bad(f"the server did not exit within {SHUTDOWN_GRACE + 15:.0f} s of SIGTERM; killed")
            self.proc.kill()
            self.proc.wait()
        elif rc != 0:
            bad(f"the server exited with status {rc} after SIGTERM")
        elif exit_s > SHUTDOWN_GRACE + 1:
            bad(f"the server took {exit_s:.1f} s to exit, past its {SHUTDOWN_GRACE:g} s grace")
        for t in threads + late_threads:
            t.join(timeout=REQUEST_TIMEOUT)
        for i, r in enumerate(results):
            if r is None:
                bad(f"burst request {i} never finished")
            elif not r["ok"]:
                bad(f"admitted burst request {i} ({'stream' if r['stream'] else 'b64'}): {r['detail']}")
        out["burst"] = results
        if not late:
            out["late_note"] = "the server exited before any late request was sent"
        print(f"soak: server exited with {rc} {exit_s:.1f} s after SIGTERM; burst "
              f"{sum(1 for r in results if r and r['ok'])}/{burst} completed; late requests {late}", flush=True)
        return out

    # --- main --------------------------------------------------------------------------------------------------

    def warm_up(self):
        """Rounds of full batches at the largest size: the allocator's high-water mark (activations of the
        biggest batch) is reached before the clock starts, so that it does not read as growth later."""
        size = self.sizes[-1]
        rng = random.Random(self.rng.randrange(2**63))
        self.t0 = time.time()
        for _ in range(3):
            # Twice a batch's worth: the rest queue up while the first runs and then fill whole batches.
            batch = max(1, self.limits["max_batch_images"] // MAX_N)
            bodies = [self.gen_body(rng, n=MAX_N, steps=2, size=(size, size)) for _ in range(2 * batch)]

            def one(body):
                start = time.monotonic()
                try:
                    resp = self.post_json(body)
                    if resp.status != 200:
                        outcome, detail = refusal(resp, set()), None
                    else:
                        for i, item in enumerate(self.check_images(resp, body, "b64_json")):
                            check_png_b64(item["b64_json"], size, size, f"image {i}")
                        outcome, detail = "answered", None
                except Fail as e:
                    outcome, detail = "failed", str(e)
                except (OSError, http.client.HTTPException) as e:
                    outcome, detail = "failed", f"{type(e).__name__}: {e}"
                self.stats.record("warmup", outcome, time.monotonic() - start, detail)
            threads = [threading.Thread(target=one, args=(b,), daemon=True) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.warmup_sample = self.sample("after warm-up", keep=False)

    def run(self) -> int:
        self.start_server()
        self.warm_up()
        self.t0 = time.time()
        deadline = self.t0 + (self.args.warmup_minutes + self.args.minutes) * 60
        self.sample("start")
        sampler = threading.Thread(target=self.sampler, args=(deadline,), daemon=True)
        sampler.start()
        clients = [threading.Thread(target=self.client, args=(i, deadline), daemon=True)
                   for i in range(self.args.concurrency)]
        for t in clients:
            t.start()
        hung = 0
        for t in clients:
            t.join(timeout=max(0.0, deadline - time.time()) + REQUEST_TIMEOUT + 30)
            hung += t.is_alive()
        client_s = time.time() - self.t0
        self.stop.set()
        sampler.join()
        self.sample("end")
        health = self.health()
        if self.proc.poll() is not None:
            health["ok"] = False
            health["reasons"].append(f"the server exited with {self.proc.returncode} during the run")
        mem = self.memory_bar()
        sig = None
        if self.args.sigterm and self.proc.poll() is None:
            sig = self.sigterm_phase()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=SHUTDOWN_GRACE + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

        reasons = []
        if self.stats.failed:
            reasons.append(f"{self.stats.failed} failed requests")
        if hung:
            reasons.append(f"{hung} client threads still hung at the end")
        reasons += mem["reasons"] + health["reasons"]
        if sig is not None:
            reasons += [f"sigterm: {r}" for r in sig["reasons"]]
        elif self.args.sigterm:
            reasons.append("sigterm: not run (the server was gone)")
        self.print_report(client_s, mem, health, sig)
        if self.args.report:
            report = {
                "passed": not reasons, "reasons": reasons, "config": {
                    "minutes": self.args.minutes, "warmup_minutes": self.args.warmup_minutes, "concurrency": self.args.concurrency, "seed": self.args.seed,
                    "binary": str(self.args.binary), "max_steps": MAX_STEPS, "max_n": MAX_N,
                    "sizes": [self.sizes[0], self.sizes[-1]], "mix": self.mix, "url_ttl": URL_TTL,
                    "shutdown_grace_s": SHUTDOWN_GRACE},
                "client_seconds": round(client_s, 1), "requests": self.stats.total,
                "requests_per_s": round((self.stats.total - sum(self.stats.counts.get("warmup", {}).values())) / client_s, 2), "counts": self.stats.counts,
                "bad_request_counts": self.stats.sub_counts, "latency_s": self.latency_table(),
                "failed": self.stats.failed, "failures": self.stats.failures, "samples": self.samples,
                "warmup_sample": self.warmup_sample,
                "memory": mem, "health": health, "sigterm": sig, "server_log": self.log_path}
            pathlib.Path(self.args.report).write_text(json.dumps(report, indent=2) + "\n")
            print(f"report written to {self.args.report}")
        if reasons:
            self.dump_log(20)
            print("SOAK FAILED: " + "; ".join(reasons))
            return 1
        print("SOAK PASSED")
        return 0

    def latency_table(self) -> dict:
        return {kind: {"n": len(v), "p50": round(percentile(v, 50), 4), "p90": round(percentile(v, 90), 4),
                       "p99": round(percentile(v, 99), 4), "max": round(max(v), 4)}
                for kind, v in sorted(self.stats.latency.items())}

    def print_report(self, client_s: float, mem: dict, health: dict, sig: dict | None):
        st = self.stats
        print("\n==== soak report ====")
        warm = sum(st.counts.get("warmup", {}).values())
        print(f"{st.total - warm} requests in {client_s:.1f} s ({(st.total - warm) / client_s:.2f}/s), "
              f"{self.args.concurrency} clients (and {warm} warm-up requests before)")
        print(f"{'kind':<14}{'answered':>9}{'refused':>9}{'failed':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
              f"{'max ms':>9}")
        lat = self.latency_table()
        for kind in sorted(st.counts):
            c, l = st.counts[kind], lat[kind]
            print(f"{kind:<14}{c['answered']:>9}{c['refused']:>9}{c['failed']:>8}{l['p50'] * 1e3:>9.0f}"
                  f"{l['p90'] * 1e3:>9.0f}{l['p99'] * 1e3:>9.0f}{l['max'] * 1e3:>9.0f}")
        if st.sub_counts:
            print("bad requests: " + ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in sorted(st.sub_counts.items())))
        if st.failures:
            print(f"failures ({st.failed}, first {len(st.failures)}):")
            for f in st.failures:
                print(f"  [{f['time']}] {f['kind']}{'/' + f['sub'] if f['sub'] else ''}: {f['detail']}")
        base = mem.get("baseline")
        if base:
            floors = " ".join(f"{f['floor_mib']:.0f}" for f in mem["floors"])
            threads = " ".join(str(f["threads_max"]) for f in mem["floors"])
            print(f"memory: quiet RSS {mem['rss_min_mib']}..{mem['rss_max_mib']} MiB over {mem['quiet_samples']} quiet "
                  f"samples; per-minute floors (MiB): {floors}; server threads (per-minute max): {threads}; minute one {base['floor_mib']} MiB, later max "
                  f"{mem['rss_max_ratio']}x (limit 1.10; highest single sample {mem['raw_max_ratio']}x); fds "
                  f"{mem['fds_base']} -> max {mem['fds_max']} (limit {mem['fds_limit']}) -> "
                  f"{'ok' if mem['ok'] else 'FAIL'}")
        else:
            print(f"memory: {mem['reasons']}")
        m = health.get("metrics", {})
        cancelled = int(m.get('sana_request_failure{err="cancelled"}', 0))
        print(f"server metrics: {int(m.get('sana_request_count', 0))} admitted, "
              f"{int(m.get('sana_request_success', 0))} succeeded, {cancelled} cancelled (client gone; "
              f"{st.counts.get('disconnect', {}).get('answered', 0)} disconnects), "
              f"{int(m.get('sana_worker_restart', 0))} worker restarts")
        print(f"health at the end: /health {health.get('health')}, /ready {health.get('ready')}, queue "
              f"{health.get('queue_size')}, unresolved {health.get('unresolved')}, generation "
              f"{health.get('generation')} -> {'ok' if health['ok'] else 'FAIL'}")
        if sig is not None:
            done = sum(1 for r in sig["burst"] if r and r["ok"])
            print(f"sigterm: {sig.get('admitted_before_signal')} admitted, {done}/{len(sig['burst'])} completed "
                  f"normally, late requests {sig['late']}, exit status {sig.get('exit_code')} after "
                  f"{sig.get('exit_after_s')} s (grace {SHUTDOWN_GRACE:g} s) -> {'ok' if sig['ok'] else 'FAIL'}")


def raw_response_complete(buf: bytes, headers: dict) -> bool:
    body = buf.partition(b"\r\n\r\n")[2]
    if headers.get("content-length", "").isdigit():
        return len(body) >= int(headers["content-length"])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return body.endswith(b"0\r\n\r\n")
    return False


def parse_raw_response(buf: bytes) -> tuple[dict, bytes]:
    head, _, body = buf.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return headers, body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="how long the clients run (default 3)")
    ap.add_argument("--binary", default="target/release/sana", help="the sana binary (default target/release/sana)")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--sigterm", action="store_true", help="end with SIGTERM under load and check the drain")
    ap.add_argument("--report", help="write a JSON report to this file")
    ap.add_argument("--warmup-minutes", type=float, default=3.0,
                    help="minutes of the same mixed load before the measured run (default 3): every answer is "
                         "checked, but the memory bar's minute one comes after it")
    ap.add_argument("--mix", help="the request mix as kind=weight,... (default: " +
                    ",".join(f"{k}={w}" for k, w in MIX.items()) + ")")
    ap.add_argument("--seed", type=int, default=None, help="seed of the request mix (default: random)")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.randrange(2**31)
    print(f"soak: {args.warmup_minutes:g} min warm-up + {args.minutes:g} min, {args.concurrency} clients, seed {args.seed}"
          + (", SIGTERM at the end" if args.sigterm else ""), flush=True)
    soak = Soak(args)
    try:
        return soak.run()
    finally:  # never leave a server behind (an exception, Ctrl+C)
        if soak.proc is not None and soak.proc.poll() is None:
            soak.proc.kill()
            soak.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
