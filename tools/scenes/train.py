"""Trains `sana-tiny-scenes`, the demo model embedded in the `sana` binary, on the synthetic world of world.py.

  ../refenv/bin/python tools/scenes/train.py [--work DIR] [--out DIR] [--stage ae|dit|export|eval|all]

Stages (each reads the previous one's checkpoint from --work):
  ae      AutoencoderDC f8c8 (64x64 RGB -> 8x8x8 latents), MSE + L1 on rendered scenes
  dit     a 3-layer Gemma-2 text encoder and an 8-layer SanaTransformer2DModel trained jointly with the flow-matching
          objective (v = noise - x0 at x_t = (1 - t) x0 + t noise, uniform t), 10% of captions dropped to "" so
          classifier-free guidance works; EMA weights are kept
  export  the diffusers folder (model_index.json, scheduler/, text_encoder/, tokenizer/, transformer/, vae/ in half
          precision, plus sana_defaults.json) into --out, the held-out prompts, and the loss plot
  eval    the exported folder through diffusers' unmodified SanaPipeline on the 100 held-out prompts, scored by the
          pixel checker
Everything is drawn from fixed seeds with 2 threads: a re-run gives the same weights. The training scenes use seeds
0 (scenes) and 1 (caption phrasings); the held-out prompts use HELDOUT_SEED, which training never touches.
"""
import argparse
import json
import math
import pathlib
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import world  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
HELDOUT_SEED = 20261127
N_SCENES = 20000
AE_STEPS, AE_BATCH, AE_LR = 2400, 32, 2e-3
DIT_STEPS, DIT_BATCH, DIT_LR = 6000, 64, 6e-4
# Training scenes have two objects more often than the world's 50%: which colour goes to which of two positions (the
# binding) is what the first model (4000 logit-normal + 2000 uniform-t steps, a 2-layer width-64 text encoder) got
# wrong most: 62% of positions right in two-object scenes against 96% in one-object ones. t ~ U(0, 1) throughout,
# not logit-normal, because the layout is decided at the high-noise end that logit-normal rarely visits.
P_PAIR = 0.65
DROP_CAPTION = 0.1
EMA = 0.999
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]

AE_CONFIG = dict(
    in_channels=3,
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[16, 32, 64, 64],
    decoder_block_out_channels=[16, 32, 64, 64],
    encoder_layers_per_block=[1, 1, 1, 1],
    decoder_layers_per_block=[1, 1, 1, 1],
    encoder_qkv_multiscales=[[], [], [], [5]],
    decoder_qkv_multiscales=[[], [], [], [5]],
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=1.0,  # replaced by 1 / std of the training latents
)
GEMMA_CONFIG = dict(
    vocab_size=None,  # the tokenizer's
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    query_pre_attn_scalar=32,
    sliding_window=64,
    max_position_embeddings=512,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    hidden_activation="gelu_pytorch_tanh",
)
DIT_CONFIG = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=4,
    attention_head_dim=32,
    num_layers=8,
    num_cross_attention_heads=4,
    cross_attention_head_dim=32,
    cross_attention_dim=128,
    caption_channels=128,
    mlp_ratio=2.5,
    sample_size=8,
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=1.0,  # 2-D sin-cos position embedding: where an object is matters in this world
)
SCHEDULER = dict(algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction",
                 use_flow_sigmas=True, flow_shift=1.0, final_sigmas_type="zero", lower_order_final=True,
                 timestep_spacing="linspace")
# What `sana` uses when a request leaves them out (diffusers' own defaults differ: it adds the complex human
# instruction, which this model was not trained with). Six DPM-Solver++ steps: on the held-out prompts through
# diffusers this model scores the same at 6, 8, 10 and 20 steps (position 95-97%, shape 82-85%, colour 97-98%),
# and an image then takes ~80 ms on the 2-core CPU instead of ~270 ms.
DEFAULTS = dict(steps=6, guidance_scale=4.5, complex_human_instruction=False)


def log(*args):
    print(*args, flush=True)


def dataset(p_pair: float, pair_when_high: bool = False):
    """N_SCENES scenes (seed 0, two objects with probability p_pair) as uint8 [N, 64, 64, 3]."""
    rng = random.Random(0)
    scenes = [world.sample_scene(rng, p_pair, pair_when_high) for _ in range(N_SCENES)]
    images = np.stack([world.render(s) for s in scenes])
    return scenes, images


def to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")


def ema_update(ema, model):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(EMA).add_(p, alpha=1 - EMA)


def lr_at(step, total, peak, warmup=100):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_ae(work: pathlib.Path, images):
    from diffusers import AutoencoderDC

    torch.manual_seed(10)
    ae = AutoencoderDC(**AE_CONFIG)
    log(f"autoencoder: {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(ae.parameters(), lr=AE_LR, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(11)
    losses, t0 = [], time.time()
    for step in range(AE_STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, AE_STEPS, AE_LR)
        idx = torch.randint(0, len(images), (AE_BATCH,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        y = ae.decode(ae.encode(x).latent).sample
        mse = F.mse_loss(y, x)
        loss = mse + 0.1 * F.l1_loss(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))
        losses.append((step, loss.item(), psnr))
        if step % 100 == 0 or step == AE_STEPS - 1:
            log(f"ae step {step:5d} loss {loss.item():.5f} psnr {psnr:.2f} dB  {time.time() - t0:.0f}s")
    ae.eval()
    with torch.no_grad():
        lat = torch.cat([ae.encode(to_tensor(images[i : i + 256])).latent for i in range(0, 4096, 256)])
        rec = ae.decode(lat[:256]).sample
    psnr = 10 * math.log10(4.0 / F.mse_loss(rec, to_tensor(images[:256])).item())
    scale = 1.0 / lat.std().item()
    ae.register_to_config(scaling_factor=round(scale, 5))
    log(f"autoencoder: PSNR {psnr:.2f} dB on 256 training images, latent std {lat.std().item():.4f}, "
        f"scaling_factor {scale:.5f}")
    ae.save_pretrained(work / "vae")
    (work / "ae_losses.json").write_text(json.dumps(losses))


def tokenize(tokenizer, captions):
    enc = tokenizer(captions, padding="longest", add_special_tokens=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def train_dit(work: pathlib.Path, scenes, images):
    import copy

    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    steps, peak, warmup = DIT_STEPS, DIT_LR, 200

    vae = AutoencoderDC.from_pretrained(work / "vae").eval()
    sf = vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_tensor(images[i : i + 500])).latent for i in range(0, len(images), 500)])
    latents = latents * sf
    log(f"latents {tuple(latents.shape)}, std after scaling {latents.std().item():.3f}")
    tokenizer = make_tokenizer()
    torch.manual_seed(20)
    te = Gemma2Model(Gemma2Config(**{**GEMMA_CONFIG, "vocab_size": len(tokenizer)}, attn_implementation="eager"))
    dit = SanaTransformer2DModel(**DIT_CONFIG)
    log(f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.2f} M, transformer "
        f"{sum(p.numel() for p in dit.parameters()) / 1e6:.2f} M parameters")
    params = list(te.parameters()) + list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.01, betas=(0.9, 0.99))
    ema_te, ema_dit = copy.deepcopy(te).eval(), copy.deepcopy(dit).eval()
    gen = torch.Generator().manual_seed(21)
    caption_rng = random.Random(1)
    losses, t0 = [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak, warmup=warmup)
        idx = torch.randint(0, len(scenes), (DIT_BATCH,), generator=gen)
        drop = torch.rand(DIT_BATCH, generator=gen) < DROP_CAPTION
        captions = ["" if d else world.caption(scenes[i], caption_rng) for i, d in zip(idx.tolist(), drop.tolist())]
        ids, mask = tokenize(tokenizer, [c.lower().strip() for c in captions])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(DIT_BATCH, generator=gen)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        text = te(input_ids=ids, attention_mask=mask).last_hidden_state
        v = dit(xt, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t * 1000).sample
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_te, te)
        ema_update(ema_dit, dit)
        losses.append((step, loss.item()))
        if step % 100 == 0 or step == steps - 1:
            recent = np.mean([l for _, l in losses[-100:]])
            log(f"dit step {step:5d} loss {recent:.4f}  {time.time() - t0:.0f}s")
    ema_te.save_pretrained(work / "text_encoder")
    ema_dit.save_pretrained(work / "transformer")
    tokenizer.save_pretrained(work / "tokenizer")
    (work / "dit_losses.json").write_text(json.dumps(losses))


def export(work: pathlib.Path, out: pathlib.Path):
    import shutil

    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Model

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    AutoencoderDC.from_pretrained(work / "vae").half().save_pretrained(out / "vae")
    SanaTransformer2DModel.from_pretrained(work / "transformer").half().save_pretrained(out / "transformer")
    Gemma2Model.from_pretrained(work / "text_encoder").half().save_pretrained(out / "text_encoder")
    make_tokenizer().save_pretrained(out / "tokenizer")
    DPMSolverMultistepScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "SanaPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "sana_defaults.json").write_text(json.dumps(DEFAULTS, indent=2) + "\n")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            log(f"{p.relative_to(out)}  {p.stat().st_size} bytes")
    heldout = [dict(prompt=c, scene=s) for s, c in world.draw(HELDOUT_SEED, 100)]
    for h in heldout:
        for o in h["scene"]["objects"]:
            o.pop("jitter")
    (REPO / "crates/sana-scenes/heldout.json").write_text(json.dumps(heldout, indent=1) + "\n")
    plot(work, REPO / "docs/tiny-scenes-loss.svg")


def plot(work: pathlib.Path, path: pathlib.Path):
    """Both loss curves (100-step means, log scale) as a small hand-written SVG."""
    curves = [("autoencoder (MSE + 0.1 L1)", json.loads((work / "ae_losses.json").read_text()), "#d62728"),
              ("text encoder + DiT (flow matching)", json.loads((work / "dit_losses.json").read_text()), "#1f77b4")]
    w, h, pad = 560, 260, 40
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11"><rect width="{w}" height="{h}" fill="white"/>']
    series = []
    for k, (name, points, color) in enumerate(curves):
        ys = [p[1] for p in points]
        means = [(i + 50, float(np.mean(ys[i : i + 100]))) for i in range(0, len(ys), 100)]
        series.append((name, means, color))
    lo = math.log10(min(v for _, m, _ in series for _, v in m))
    hi = math.log10(max(v for _, m, _ in series for _, v in m))
    steps = max(s for _, m, _ in series for s, _ in m)
    for k, (name, means, color) in enumerate(series):
        pts = " ".join(f"{pad + (s / steps) * (w - 2 * pad):.1f},"
                       f"{h - pad - (math.log10(v) - lo) / (hi - lo) * (h - 2 * pad):.1f}" for s, v in means)
        lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        lines.append(f'<text x="{w - pad - 200}" y="{pad + 14 * k}" fill="{color}">{name}</text>')
    lines.append(f'<text x="{pad}" y="{h - 10}">training step (0 to {steps + 50}); loss on a log scale, '
                 f'{10 ** lo:.3g} to {10 ** hi:.3g}</text>')
    lines.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>')
    lines.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>')
    lines.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def evaluate(out: pathlib.Path, n=100):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    heldout = json.loads((REPO / "crates/sana-scenes/heldout.json").read_text())[:n]
    totals, t0 = {}, time.time()
    for i, h in enumerate(heldout):
        image = pipe(h["prompt"], negative_prompt="", num_inference_steps=DEFAULTS["steps"],
                     guidance_scale=DEFAULTS["guidance_scale"], height=64, width=64, complex_human_instruction=None,
                     use_resolution_binning=False, generator=torch.Generator().manual_seed(i),
                     output_type="np").images[0]
        img = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
        for k, v in world.score(h["scene"], world.check(img)).items():
            totals[k] = totals.get(k, 0) + v
    objects = totals["objects"]
    log(f"diffusers, {n} held-out prompts, {(time.time() - t0) / n:.3f} s/image: background "
        f"{totals['background'] / n:.0%}, colour {totals['color'] / objects:.0%}, position "
        f"{totals['position'] / objects:.0%}, shape {totals['shape'] / objects:.0%}, size {totals['size'] / objects:.0%}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=pathlib.Path, default=REPO.parent / "tiny-scenes-work")
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "crates/sana-scenes/model")
    ap.add_argument("--stage", default="all", choices=["ae", "dit", "export", "eval", "all"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.stage in ("ae", "all"):
        # the autoencoder learns the world's own mix of one- and two-object scenes
        scenes, images = dataset(0.5, pair_when_high=True)
        log(f"{len(images)} scenes rendered in {time.time() - t0:.0f}s")
        train_ae(args.work, images)
    if args.stage in ("dit", "all"):
        scenes, images = dataset(P_PAIR)
        log(f"{len(images)} scenes rendered in {time.time() - t0:.0f}s")
        train_dit(args.work, scenes, images)
    if args.stage in ("export", "all"):
        export(args.work, args.out)
    if args.stage in ("eval", "all"):
        evaluate(args.out)
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
