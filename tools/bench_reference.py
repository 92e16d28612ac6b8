#!/usr/bin/env python3
"""Time the Python reference implementation of one Sana part, as a baseline for the Rust numbers.

Usage: python tools/bench_reference.py PART [options]     (python tools/bench_reference.py PART --help)

    python tools/bench_reference.py transformer --config tests/fixtures/real-configs/transformer/Sana_600M_512px.json \
        --latent 16 16 --batch 2 --text-len 300 --warmup 1 --repeat 3 --threads 2

Prints one JSON line to stdout:
    {"impl": "diffusers" | "torch", "part": ..., "ms_mean": ..., "ms_min": ..., "repeat": ..., "torch": ..., "threads": ...}
Weights are random (the timing does not depend on them), f32, on the CPU. Each part is a subcommand: a function
that adds its arguments and a function that builds the model and returns a zero-argument callable to time.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch


def transformer_args(parser: argparse.ArgumentParser):
    parser.add_argument("--config", required=True, help="a SanaTransformer2DModel config.json")
    parser.add_argument("--latent", nargs=2, type=int, required=True, metavar=("H", "W"), help="latent grid size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=300)
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])


def transformer_setup(args: argparse.Namespace):
    from diffusers import SanaTransformer2DModel

    with open(args.config) as f:
        model = SanaTransformer2DModel.from_config(json.load(f)).eval()
    dtype = DTYPES[args.dtype]
    model = model.to(dtype)
    cfg = model.config
    height, width = args.latent
    inputs = dict(
        hidden_states=torch.randn(args.batch, cfg.in_channels, height, width, dtype=dtype),
        encoder_hidden_states=torch.randn(args.batch, args.text_len, cfg.caption_channels, dtype=dtype),
        encoder_attention_mask=torch.ones(args.batch, args.text_len),
        timestep=torch.full((args.batch,), 0.5 if cfg.guidance_embeds else 500.0),
        guidance=torch.full((args.batch,), 0.45) if cfg.guidance_embeds else None,
        return_dict=False,
    )
    return lambda: model(**inputs)


def vae_args(parser: argparse.ArgumentParser):
    parser.add_argument("--config", required=True, help="an AutoencoderDC config.json")
    parser.add_argument("--latent", nargs=2, type=int, required=True, metavar=("H", "W"), help="latent grid size")
    parser.add_argument("--batch", type=int, default=1)


def vae_setup(args: argparse.Namespace):
    from diffusers import AutoencoderDC

    with open(args.config) as f:
        model = AutoencoderDC.from_config(json.load(f)).eval()
    z = torch.randn(args.batch, model.config.latent_channels, *args.latent)
    return lambda: model.decode(z, return_dict=False)


def depthwise_args(parser: argparse.ArgumentParser):
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--size", nargs=2, type=int, required=True, metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kernel", type=int, default=3)


def depthwise_setup(args: argparse.Namespace):
    import torch.nn.functional as F

    c, k = args.channels, args.kernel
    x = torch.randn(args.batch, c, *args.size)
    w = torch.randn(c, 1, k, k)
    b = torch.randn(c)
    return lambda: F.conv2d(x, w, b, padding=k // 2, groups=c)


def text_encoder_args(parser: argparse.ArgumentParser):
    parser.add_argument("--config", required=True, help="a Gemma-2 config.json (text_encoder/)")
    parser.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (tokenizer/)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--max-sequence-length", type=int, default=300)


def text_encoder_setup(args: argparse.Namespace):
    """SanaPipeline.encode_prompt with the default complex human instruction and CFG (the negative prompt too)."""
    import inspect

    from diffusers import SanaPipeline
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    with open(args.config) as f:
        config = Gemma2Config(**json.load(f), attn_implementation="eager")
    text_encoder = Gemma2Model(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)
    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return lambda: pipe.encode_prompt(
        args.prompt,
        do_classifier_free_guidance=True,
        negative_prompt=args.negative_prompt,
        max_sequence_length=args.max_sequence_length,
        complex_human_instruction=chi,
    )


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def pipeline_args(parser: argparse.ArgumentParser):
    parser.add_argument("--transformer-config", required=True)
    parser.add_argument("--vae-config", required=True)
    parser.add_argument("--text-encoder-config", required=True)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder")
    parser.add_argument("--scheduler-config", required=True)
    parser.add_argument("--size", type=int_list, default=[512], help="image sizes (square), comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps of each warm-up run (default: --steps)")
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--prompt", default="a cyberpunk cat with a neon sign that says sana on a rainy night street")
    parser.add_argument("--batch", type=int_list, default=[1], help="images per run, comma-separated")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"],
                        help="the transformer's; Gemma and the DC-AE stay bf16 under f16")


def instrument(pipe, device: str):
    """Times the pipeline's stages (prompt encoding, each transformer forward, decoding), synchronising the
    device around each; returns a callable giving the last run's totals, with `.clear()` to start a run."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stages = {}

    def synced(name, fn):
        def wrapper(*a, **k):
            sync()
            start = time.perf_counter()
            out = fn(*a, **k)
            sync()
            stages.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
            return out
        return wrapper

    pipe.encode_prompt = synced("encode", pipe.encode_prompt)
    pipe.transformer.forward = synced("step", pipe.transformer.forward)
    # Decoding and the postprocess to 8-bit images, as our decode stage counts them.
    pipe.vae.decode = synced("decode", pipe.vae.decode)
    pipe.image_processor.postprocess = synced("decode", pipe.image_processor.postprocess)
    pipe.image_processor.resize_and_crop_tensor = synced("decode", pipe.image_processor.resize_and_crop_tensor)

    def report():
        out = dict(encode_ms=round(sum(stages["encode"]), 3), step_ms_mean=round(statistics.mean(stages["step"]), 3),
                   decode_ms=round(sum(stages["decode"]), 3))
        if "image_encode" in stages:
            out["_extra"] = {"image_encode": stages["image_encode"]}
        return out

    report.clear = stages.clear
    report.stages = stages
    return report


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def pipeline_setup(args: argparse.Namespace):
    """SanaPipeline end to end (default instruction, CFG; each size as asked, no resolution binning), with the time
    of each stage of the last run."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    def load(path):
        with open(path) as f:
            return json.load(f)

    device = "cuda:0" if args.device == "cuda" else args.device
    dtype = DTYPES[args.dtype]
    other = torch.bfloat16 if dtype == torch.float16 else dtype
    # Built directly on the device in its dtype (random init of 2.6B parameters on the CPU is slow).
    with torch.device(device):
        text_encoder = Gemma2Model(Gemma2Config(**load(args.text_encoder_config),
                                                attn_implementation="eager")).to(other).eval()
        vae = AutoencoderDC.from_config(load(args.vae_config)).to(other).eval()
        transformer = SanaTransformer2DModel.from_config(load(args.transformer_config)).to(dtype).eval()
    pipe = SanaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(args.tokenizer),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler.from_config(load(args.scheduler_config)),
    )
    pipe.set_progress_bar_config(disable=True)
    report = instrument(pipe, device)
    row = {}

    def run(steps=None):
        report.clear()
        pipe([args.prompt] * row["batch"], height=row["size"], width=row["size"],
             num_inference_steps=steps or args.steps, guidance_scale=args.guidance_scale,
             use_resolution_binning=False, output_type="pil")

    def rows():
        """Each size with each batch, smallest work first; `run` then generates that row."""
        for size, batch in sorted(((s, b) for s in args.size for b in args.batch), key=lambda r: (r[0] ** 2 * r[1], r[0])):
            row.update(size=size, batch=batch)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            yield dict(row)

    def memory():
        if not device.startswith("cuda"):
            # the process's peak resident set (KiB on Linux): weights, activations, allocator
            return dict(peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        mib = 1 << 20
        return dict(max_memory_allocated_mb=round(torch.cuda.max_memory_allocated() / mib, 1),
                    max_memory_reserved_mb=round(torch.cuda.max_memory_reserved() / mib, 1))

    run.report = report
    run.rows = rows
    run.memory = memory
    run.warmup_steps = args.warmup_steps
    return run


def edit_args(parser: argparse.ArgumentParser):
    pipeline_args(parser)
    parser.add_argument("--sprint-config", required=True, help="a SANA-Sprint transformer config")
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--sprint-strength", type=float, default=0.5)


def edit_setup(args: argparse.Namespace):
    """Image-to-image and inpainting with SanaPipeline's own loop and SD3's two additions (the schedule started at
    get_timesteps' step with the image latents noised by the scheduler's add_noise; the inpainting blend after every
    step as a callback), as tools/fixtures/edits.py builds the parity references; and SanaSprintImg2ImgPipeline.
    Rows: kind = img2img, inpaint, sprint_img2img; stages as `pipeline`, plus the image encode."""
    import PIL.Image
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaSprintImg2ImgPipeline
    from diffusers import SanaTransformer2DModel, SCMScheduler
    from diffusers.pipelines.sana import pipeline_sana
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    def load(path):
        with open(path) as f:
            return json.load(f)

    size = args.size[0]
    text_encoder = Gemma2Model(Gemma2Config(**load(args.text_encoder_config), attn_implementation="eager")).eval()
    vae = AutoencoderDC.from_config(load(args.vae_config)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    sana = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                        transformer=SanaTransformer2DModel.from_config(load(args.transformer_config)).eval(),
                        scheduler=DPMSolverMultistepScheduler.from_config(load(args.scheduler_config)))
    sprint = SanaSprintImg2ImgPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                       transformer=SanaTransformer2DModel.from_config(load(args.sprint_config)).eval(),
                                       scheduler=SCMScheduler(sigma_data=0.5))
    reports = {}
    for name, pipe in [("sana", sana), ("sprint", sprint)]:
        pipe.set_progress_bar_config(disable=True)
        reports[name] = instrument(pipe, "cpu")
        pipe.vae.encode = _synced_into(reports[name], "image_encode", pipe.vae.encode)
    x = np.linspace(0, 255, size, dtype=np.float32)
    picture = np.stack([np.tile(x, (size, 1)), np.tile(x[:, None], (1, size)), np.full((size, size), 96.0)], -1)
    image = PIL.Image.fromarray(picture.astype(np.uint8))
    mask = np.zeros((size // 32, size // 32), np.float32)
    mask[:, size // 64:] = 1.0
    mask = torch.from_numpy(mask)[None, None]
    row = {}
    original = pipeline_sana.retrieve_timesteps

    def run(steps=None):
        kind = row["kind"]
        if kind == "sprint_img2img":
            reports["sprint"].clear()
            sprint(args.prompt, image=image, strength=args.sprint_strength, num_inference_steps=2, height=size,
                   width=size, use_resolution_binning=False, guidance_scale=4.5, output_type="pil")
            return
        report = reports["sana"]
        report.clear()
        steps = steps or args.steps
        t_start = int(max(steps - min(steps * args.strength, steps), 0))
        sched = sana.scheduler
        with torch.no_grad():
            pixels = sana.image_processor.preprocess(image, height=size, width=size)
            z = sana.vae.encode(pixels).latent * sana.vae.config.scaling_factor
        noise = torch.randn(z.shape)
        sched.set_timesteps(steps)
        sched.set_begin_index(t_start)
        start = sched.add_noise(z, noise, sched.timesteps[t_start:t_start + 1])

        def sliced(s, n, device, timesteps=None, sigmas=None, **kwargs):
            full, _ = original(s, n, device, timesteps, sigmas, **kwargs)
            s.set_begin_index(t_start)
            return full[t_start:], len(full) - t_start

        def blend(p, i, t, kwargs):
            ts = p.scheduler.timesteps[t_start:]
            proper = z if i == len(ts) - 1 else p.scheduler.add_noise(z, noise, torch.tensor([ts[i + 1]]))
            return {"latents": (1 - mask) * proper + mask * kwargs["latents"]}

        pipeline_sana.retrieve_timesteps = sliced
        try:
            sana(args.prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=4.5,
                 use_resolution_binning=False, latents=start, output_type="pil",
                 callback_on_step_end=blend if kind == "inpaint" else None)
        finally:
            pipeline_sana.retrieve_timesteps = original

    def rows():
        for kind in ["img2img", "inpaint", "sprint_img2img"]:
            row.update(kind=kind)
            yield dict(row)

    def report():
        r = reports["sprint" if row["kind"] == "sprint_img2img" else "sana"]()
        r["image_encode_ms"] = round(sum(r.pop("_extra", {}).get("image_encode", [])), 3)
        return r

    run.report = report
    run.rows = rows
    return run


def _synced_into(report, name, fn):
    """Adds fn's time to `report`'s stages under `name` (CPU: no device to synchronise)."""
    def wrapper(*a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        report.stages.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out
    return wrapper


def model_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", required=True, help="a diffusers SanaPipeline folder")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance-scale", type=float, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--complex-human-instruction", choices=["true", "false"], default="true")


def model_setup(args: argparse.Namespace):
    """SanaPipeline.from_pretrained on a folder (f32), timed the same way as `pipeline`."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    report = instrument(pipe, "cpu")
    extra = {} if args.complex_human_instruction == "true" else {"complex_human_instruction": None}
    binning = pipe.transformer.config.sample_size in (16, 32, 64, 128)

    def run():
        report.clear()
        pipe([args.prompt] * args.batch, height=args.size, width=args.size, num_inference_steps=args.steps,
             guidance_scale=args.guidance_scale, use_resolution_binning=binning, output_type="pil", **extra)

    run.report = report
    return run


def controlnet_args(parser: argparse.ArgumentParser):
    parser.add_argument("--config", required=True, help="a SanaTransformer2DModel config.json")
    parser.add_argument("--controlnet-config", required=True, help="a SanaControlNetModel config.json")
    parser.add_argument("--latent", nargs=2, type=int, required=True, metavar=("H", "W"), help="latent grid size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=300)


def controlnet_setup(args: argparse.Namespace):
    """One denoising step of SanaControlNetPipeline's loop: the ControlNet, then the transformer with its residuals
    (as the pipeline calls them; the control latents are made before the loop)."""
    from diffusers import SanaControlNetModel, SanaTransformer2DModel

    with open(args.config) as f:
        model = SanaTransformer2DModel.from_config(json.load(f)).eval()
    with open(args.controlnet_config) as f:
        controlnet = SanaControlNetModel.from_config(json.load(f)).eval()
    cfg = model.config
    height, width = args.latent
    x = torch.randn(args.batch, cfg.in_channels, height, width)
    text = dict(encoder_hidden_states=torch.randn(args.batch, args.text_len, cfg.caption_channels),
                encoder_attention_mask=torch.ones(args.batch, args.text_len))
    t = torch.full((args.batch,), 500.0)
    cond = torch.randn(args.batch, cfg.in_channels, height, width)

    def run():
        samples = controlnet(x, timestep=t, controlnet_cond=cond, conditioning_scale=1.0, return_dict=False,
                             **text)[0]
        return model(x, timestep=t, controlnet_block_samples=tuple(samples), return_dict=False, **text)

    return run


# part name -> (add its arguments, build a callable to time, what is being timed)
PARTS = {
    "transformer": (transformer_args, transformer_setup, "diffusers"),
    "depthwise": (depthwise_args, depthwise_setup, "torch"),
    "vae": (vae_args, vae_setup, "diffusers"),
    "text-encoder": (text_encoder_args, text_encoder_setup, "diffusers"),
    "pipeline": (pipeline_args, pipeline_setup, "diffusers"),
    "edit": (edit_args, edit_setup, "diffusers"),
    "model": (model_args, model_setup, "diffusers"),
    "controlnet": (controlnet_args, controlnet_setup, "diffusers"),
}


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="part", required=True)
    for name, (add_args, _, _) in PARTS.items():
        sub = subparsers.add_parser(name)
        add_args(sub)
        sub.add_argument("--warmup", type=int, default=1)
        sub.add_argument("--repeat", type=int, default=3)
        sub.add_argument("--threads", type=int, default=torch.get_num_threads())
        sub.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = PARTS[args.part][1](args)
    # Parts with rows (pipeline: sizes × batches) print one JSON line per row; the others one line.
    for row in run.rows() if hasattr(run, "rows") else [{}]:
        with torch.inference_mode():
            for _ in range(args.warmup):
                run(getattr(run, "warmup_steps", None)) if row else run()
            times_ms = []
            t_start = time.time()
            for _ in range(args.repeat):
                start = time.perf_counter()
                run()
                times_ms.append((time.perf_counter() - start) * 1e3)
            t_end = time.time()
        print(
            json.dumps(
                {
                    "impl": PARTS[args.part][2],
                    "part": args.part,
                    **row,
                    "ms_mean": round(statistics.mean(times_ms), 3),
                    "ms_min": round(min(times_ms), 3),
                    "repeat": args.repeat,
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "t_start": t_start,
                    "t_end": t_end,
                    # parts that time their stages report them (from the last run)
                    **(run.report() if hasattr(run, "report") else {}),
                    **(run.memory() if hasattr(run, "memory") else {}),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
