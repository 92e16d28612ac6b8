#!/usr/bin/env python3
"""The one-shot GPU check, run by `scripts/gpu-check.sh` on the machine to check (standard library only).

From a packed folder (`scripts/gpu-check.sh pack`: the `sana` binary, the parity test binary, diffusers and what it
needs on PYTHONPATH, compute-sanitizer), in order, within a time budget:

1. the parity tests on the device (f32 at the CPU tolerances, bf16 within 3e-2), counted;
2. `compute-sanitizer --tool memcheck` over one small pipeline run (the embedded model), on a GPU;
3. the real Sana-0.6B and Sana-1.6B configs (random weights), CFG, per size and batch: ours beside diffusers
   `SanaPipeline` on the same device in the same run, per stage (encode, step, decode), end to end, images/s and
   peak GPU memory (the device's used memory sampled by nvidia-smi every 50 ms while a row runs, over the idle
   level before the process started: the same measure for both sides);

and writes `report.md` (and `rows.jsonl`, the raw rows) into --out. Exit status: 0 when every part of ours ran and
passed (parity, sanitizer, timings); the reference missing or failing is reported, not a failure.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODELS = {"Sana_600M": "Sana-0.6B", "Sana_1600M": "Sana-1.6B"}
# Parity tests of the model test binary: each module's parity tests, and the pipelines' end to end.
PARITY_FILTERS = ["transformer::parity", "autoencoder::parity", "autoencoder::trained_parity",
                  "autoencoder::tiled_decode", "text_encoder::gemma", "text_encoder::encode_prompt_parity", "pipeline::"]


def now_s():
    return time.time()


class Budget:
    def __init__(self, seconds):
        self.deadline = now_s() + seconds

    def left(self):
        return max(0.0, self.deadline - now_s())


def run(cmd, timeout, env=None, cwd=ROOT):
    """Runs cmd; returns (status or None on timeout, combined output, seconds)."""
    start = now_s()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=max(1.0, timeout))
        return p.returncode, p.stdout, now_s() - start
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, now_s() - start
    except OSError as e:
        return 127, str(e), now_s() - start


class MemorySampler:
    """nvidia-smi's used memory of one GPU every 50 ms, with the time each sample was read."""

    def __init__(self, index):
        self.samples = []
        self.proc = None
        if shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(index), "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "50"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append((now_s(), float(line.strip())))
            except ValueError:
                pass

    def level(self):
        return self.samples[-1][1] if self.samples else None

    def peak(self, t0, t1):
        inside = [mb for t, mb in self.samples if t0 <= t <= t1 + 0.1]
        return max(inside) if inside else None

    def stop(self):
        if self.proc:
            self.proc.terminate()


def environment(args, binaries):
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "device": args.device}
    if shutil.which("nvidia-smi"):
        _, out, _ = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 30)
        info["gpu"] = out.strip().splitlines()[0] if out.strip() else "?"
    status, out, _ = run([os.path.join(binaries, "sana"), "--version"], 30)
    info["sana"] = out.strip() if status == 0 else f"does not start: {out.strip()[-300:]}"
    return info


def parity(args, binaries, budget, env):
    """Runs the parity tests of the model test binary on the device; returns (ok, lines for the report)."""
    exe = os.path.join(binaries, "tests", "model")
    lines, ok, total = [], True, 0
    for flt in PARITY_FILTERS:
        status, out, secs = run([exe, flt, "--test-threads", "1"], min(240, budget.left()),
                                env={**env, "SANA_TEST_DEVICE": args.device})
        m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", out)
        passed, failed = (int(m.group(2)), int(m.group(3))) if m else (0, 0)
        total += passed + failed
        good = status == 0 and m is not None and passed > 0
        ok &= good
        lines.append(f"| `{flt}` | {passed} | {failed} | {secs:.0f} s | {'ok' if good else 'FAILED'} |")
        if not good:
            failures = [l for l in out.splitlines() if "panicked" in l or "error" in l.lower() or l.startswith("test ")]
            note = "timed out" if status is None else ("no test matched" if m and passed == 0 else "")
            lines.append("|  | " + (note or "; ".join(failures[-4:]).replace("|", "/")[:600]) + " | | | |")
    return ok, total, lines


def sanitizer(args, binaries, budget, env, out_dir):
    tool = os.path.join(binaries, "sanitizer", "compute-sanitizer")
    if not args.device.startswith("cuda"):
        return True, "not run: no GPU (`--cpu`)"
    if not os.path.exists(tool):
        return False, "not run: compute-sanitizer is not in the package"
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "99", "--leak-check", "no",
           os.path.join(binaries, "sana"), "generate", "--device", args.device, "--steps", "2",
           "--prompt", "a small red square at the top on a white background", "--seed", "1",
           "--output", os.path.join(out_dir, "sanitized.png")]
    status, out, secs = run(cmd, min(300, budget.left()), env=env)
    summary = re.findall(r"ERROR SUMMARY: (\d+) errors?", out)
    with open(os.path.join(out_dir, "sanitizer.log"), "w") as f:
        f.write(out)
    if status is None:
        return False, f"timed out after {secs:.0f} s (log: sanitizer.log)"
    errors = int(summary[-1]) if summary else None
    good = status == 0 and errors == 0
    text = f"`compute-sanitizer --tool memcheck` over `sana generate` (the embedded model, 2 steps): " + (
        f"ERROR SUMMARY: {errors} errors" if errors is not None else "no summary") + f", exit {status}, {secs:.0f} s"
    if not good:
        text += "\n\n```\n" + "\n".join(out.strip().splitlines()[-25:]) + "\n```"
    return good, text


def timings(args, binaries, budget, env, memory, out_dir, reference_python):
    """Ours then the reference, per model, all rows of a model in one process each; returns rows and notes."""
    rows, notes, ok = [], [], True
    jsonl = os.path.join(out_dir, "ours.jsonl")
    open(jsonl, "w").close()
    # One process per model with its 1024px config (the 512px and 2K configs differ only in sample_size and the
    # 2K position embedding); every size is generated as asked (no resolution binning, on both sides).
    cfg = lambda m: f"tests/fixtures/real-configs/transformer/{m}_1024px.json"
    for model in args.models:
        common = ["--transformer-config", cfg(model), "--size", ",".join(map(str, args.sizes)),
                  "--batch", ",".join(map(str, args.batches)), "--steps", str(args.steps),
                  "--warmup-steps", str(args.warmup_steps), "--device", args.device, "--dtype", args.dtype]
        runs = ["--warmup", str(args.warmup), "--repeat", "1"]
        before = len(open(jsonl).read().splitlines())
        level = memory.level()
        status, out, secs = run([os.path.join(binaries, "sana"), "bench", *runs, "pipeline", *common, "--json", jsonl],
                                budget.left() * 0.5, env=env)
        with open(os.path.join(out_dir, f"ours-{model}.log"), "w") as f:
            f.write(out)
        ours = [json.loads(l) for l in open(jsonl).read().splitlines()[before:] if l.strip()]
        for r in ours:
            r["idle_mb"] = level
        if status != 0:
            ok = False
            notes.append(f"ours, {model}: " + ("timed out" if status is None else f"exit {status}") +
                         f" after {secs:.0f} s, {len(ours)} rows done; last lines: " +
                         " / ".join(out.strip().splitlines()[-3:])[:500])
        rows += ours
        if reference_python is None:
            continue
        level = memory.level()
        status, out, secs = run([reference_python, "tools/bench_reference.py", "pipeline",
                                 "--vae-config", "tests/fixtures/real-configs/vae/dc-ae-f32c32-sana-1.0.json",
                                 "--text-encoder-config", "tests/fixtures/real-configs/text_encoder/gemma-2-2b-it.json",
                                 "--tokenizer", "tests/fixtures/text_encoder/pipeline/tokenizer",
                                 "--scheduler-config", "tests/fixtures/scheduler/configs/sana_dpm_shift3.json",
                                 *common, *runs, "--threads", str(os.cpu_count() or 1)],
                                budget.left() * (0.9 if model == args.models[-1] else 0.5), env=env)
        with open(os.path.join(out_dir, f"diffusers-{model}.log"), "w") as f:
            f.write(out)
        theirs = []
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                r.update(impl="diffusers", model=os.path.basename(cfg(model))[:-5], idle_mb=level)
                theirs.append(r)
        if status != 0:
            notes.append(f"diffusers, {model}: " + ("timed out" if status is None else f"exit {status}") +
                         f" after {secs:.0f} s, {len(theirs)} rows done; last lines: " +
                         " / ".join(out.strip().splitlines()[-3:])[:500])
        rows += theirs
    for r in rows:
        peak = memory.peak(r.get("t_start", 0), r.get("t_end", 0))
        r["peak_mb"] = None if peak is None or r.get("idle_mb") is None else peak - r["idle_mb"]
    with open(os.path.join(out_dir, "rows.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return ok, rows, notes


def fmt(v):
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.3f}"


def ratio(a, b):
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}"


def table(rows, steps):
    """One line per (model, size, batch): each stage ours | diffusers | ratio."""
    out = ["| model | size | batch | encode ms | step ms (+ caption/steps) | decode ms | end to end ms | images/s "
           "| peak GPU MiB |", "|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["model"], r["size"], r["batch"]), {})[r["impl"]] = r
    for (model, size, batch), pair in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        o, d = pair.get("ours"), pair.get("diffusers")

        def cell(ours, theirs):
            return f"{fmt(ours)} / {fmt(theirs)} ({ratio(ours, theirs)})" if theirs is not None else fmt(ours)

        get = lambda r, k: None if r is None else r.get(k)
        step = None if o is None else o["step_ms_mean"] + o.get("caption_ms", 0.0) / max(1, steps)
        ips = lambda r: None if r is None else r["batch"] * 1e3 / r["ms_mean"]
        out.append(f"| {model} | {size}² | {batch} | {cell(get(o, 'encode_ms'), get(d, 'encode_ms'))} | "
                   f"{cell(step, get(d, 'step_ms_mean'))} | {cell(get(o, 'decode_ms'), get(d, 'decode_ms'))} | "
                   f"{cell(get(o, 'ms_mean'), get(d, 'ms_mean'))} | {cell(ips(o), ips(d))} | "
                   f"{cell(get(o, 'peak_mb'), get(d, 'peak_mb'))} |")
    return out


def find_reference(args, binaries):
    """A python with torch and diffusers (diffusers and its needs from the package's py/ when not installed)."""
    if args.no_reference:
        return None, "not run (--no-reference)"
    py = args.reference_python or sys.executable
    probe = "import torch, diffusers; print(torch.__version__, diffusers.__version__)"
    status, out, _ = run([py, "-c", probe], 120, env=os.environ.copy())
    if status == 0:
        return py, out.strip()
    return None, "no python with torch and diffusers: " + (out.strip().splitlines() or ["?"])[-1][:200]


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", default="dist/gpu-check", help="the packed folder")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--quick", action="store_true", help="Sana-0.6B at 512², batch 1, 2 steps, no warm-up")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check")
    p.add_argument("--reference-python", default=None)
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args(argv)
    args.dtype = "f32" if args.device == "cpu" else "bf16"
    if args.quick:
        args.models, args.sizes, args.batches, args.steps, args.warmup, args.warmup_steps = \
            ["Sana_600M"], [512], [1], 2, 0, 2
    else:
        args.models, args.sizes, args.batches, args.steps, args.warmup, args.warmup_steps = \
            ["Sana_600M", "Sana_1600M"], [512, 1024, 2048], [1, 8], 20, 1, 2
    budget = Budget(args.budget)
    os.makedirs(args.out, exist_ok=True)
    binaries = os.path.abspath(args.bin)
    env = os.environ.copy()
    env.pop("SANA_REFERENCE_PYTHON", None)  # our bench must not run the reference itself: this script does
    env["SANA_FIXTURES"] = os.path.join(ROOT, "tests", "fixtures")
    py_dir = os.path.join(binaries, "py")
    if os.path.isdir(py_dir):
        tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
        extra = [py_dir] + [os.path.join(binaries, f"py-{tag}")] * os.path.isdir(os.path.join(binaries, f"py-{tag}"))
        env["PYTHONPATH"] = os.pathsep.join(extra + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    info = environment(args, binaries)
    memory = MemorySampler(int(args.device.split(":")[1]) if args.device.startswith("cuda:") else 0)
    report = [f"# GPU check, {info['date']}", "",
              f"- device: `{args.device}`" + (f", {info['gpu']}" if "gpu" in info else ""),
              f"- binary: {info['sana']}", f"- package: {args.bin}"]
    t0 = now_s()
    par_ok, count, par_lines = parity(args, binaries, budget, env)
    report += ["", f"## Parity on `{args.device}` ({count} tests, {now_s() - t0:.0f} s)", "",
               "| filter | passed | failed | time | |", "|---|---|---|---|---|", *par_lines]
    t0 = now_s()
    san_ok, san_text = sanitizer(args, binaries, budget, env, args.out)
    report += ["", "## compute-sanitizer", "", san_text]
    reference_python, ref_text = find_reference(args, binaries)
    report += ["", f"## Timings: {args.dtype}, {args.steps} steps, CFG (guidance 4.5), random weights", "",
               f"Reference: {ref_text}.", "",
               "Configs: each model's released 1024px transformer config (the 512px and 2K ones differ only in "
               "`sample_size` and the 2K position embedding), Gemma-2-2B, the DC-AE f32c32; every size generated as "
               "asked (resolution binning off on both sides).", "",
               "Each cell: ours / diffusers (ratio ours/diffusers). The step column is our mean step plus our caption "
               "work (once per generation) divided by the steps, beside diffusers' mean step, which does that work "
               "inside every step. Peak GPU memory: nvidia-smi's used memory while the row ran, minus the level "
               "before the process started (weights included).", ""]
    t0 = now_s()
    tim_ok, rows, notes = timings(args, binaries, budget, env, memory, args.out, reference_python)
    memory.stop()
    report += table(rows, args.steps)
    report += [""] + [f"- {n}" for n in notes]
    report += ["", f"Timings took {now_s() - t0:.0f} s; the whole check {args.budget - budget.left():.0f} s."]
    ok = par_ok and san_ok and tim_ok and count > 0 and any(r["impl"] == "ours" for r in rows)
    report += ["", f"**Result: {'PASS' if ok else 'FAIL'}** (parity {'ok' if par_ok else 'failed'}, sanitizer "
               f"{'ok' if san_ok else 'failed'}, timings {'ok' if tim_ok else 'failed'})"]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
