"""Fixtures for crates/sana-scenes/tests (run after train.py's export):

  tests/fixtures/scenes/rendered.safetensors + rendered.json
      24 ground-truth renders of world.py scenes (seed 5) and their scenes: the checker must read them back exactly.
  tests/fixtures/autoencoder/tiny_scenes/ (config.json and weights: symlinks to the model's vae/) + io.safetensors
      the trained DC-AE of sana-tiny-scenes, in the layout of tools/fixtures/autoencoder.py: decode and encode of
      rendered scenes and a tiled decode, in f32 and in bf16. Unlike the random-weight fixtures, a trained decoder
      is well conditioned, so bf16 parity is meaningful here.
  tests/fixtures/scenes/diffusers.safetensors + diffusers.json
      diffusers' unmodified SanaPipeline on the exported sana-tiny-scenes folder, 4 held-out prompts at the model's
      defaults with the initial latents given: `latents` [4, 8, 8, 8] f32, `images` [4, 64, 64, 3] uint8; the json
      holds the prompts and what world.check read from each image (the Rust checker must agree).

  ../refenv/bin/python tools/scenes/reference.py
"""
import json
import pathlib
import random
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import world  # noqa: E402
from train import DEFAULTS, REPO  # noqa: E402


def main():
    torch.set_num_threads(2)
    out = REPO / "tests/fixtures/scenes"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    scenes = [world.sample_scene(rng) for _ in range(24)]
    images = np.stack([world.render(s) for s in scenes])
    save_file({"images": torch.from_numpy(images)}, out / "rendered.safetensors")
    for s in scenes:
        for o in s["objects"]:
            o.pop("jitter")
    (out / "rendered.json").write_text(json.dumps(scenes, indent=1) + "\n")

    autoencoder_fixture(images)

    from diffusers import SanaPipeline

    model = REPO / "crates/sana-scenes/model"
    pipe = SanaPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    heldout = json.loads((REPO / "crates/sana-scenes/heldout.json").read_text())[:4]
    prompts = [h["prompt"] for h in heldout]
    latents = torch.randn((4, 8, 8, 8), generator=torch.Generator().manual_seed(7))
    result = pipe(prompts, negative_prompt="", num_inference_steps=DEFAULTS["steps"],
                  guidance_scale=DEFAULTS["guidance_scale"], height=64, width=64, complex_human_instruction=None,
                  use_resolution_binning=False, latents=latents.clone(), output_type="np").images
    images = np.clip(np.round(result * 255), 0, 255).astype(np.uint8)
    save_file({"latents": latents.contiguous(), "images": torch.from_numpy(images).contiguous()},
              out / "diffusers.safetensors")
    found = [world.check(img) for img in images]
    (out / "diffusers.json").write_text(json.dumps(dict(prompts=prompts, found=found), indent=1) + "\n")
    for p, f in zip(prompts, found):
        print(p, "->", f)


def autoencoder_fixture(images):
    import os

    from diffusers import AutoencoderDC

    model = REPO / "crates/sana-scenes/model/vae"
    out = REPO / "tests/fixtures/autoencoder/tiny_scenes"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(model / name, out))
    ae = AutoencoderDC.from_pretrained(model, torch_dtype=torch.float32).eval()
    x = torch.from_numpy(images[:6]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    tiling = dict(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                  tile_sample_stride_width=48)
    with torch.no_grad():
        latents = ae.encode(x).latent  # [6, 8, 8, 8]
        # A 2x3 mosaic of scene latents: a 128x192 image in 3x4 overlapping tiles with ragged edges.
        rows = [torch.cat(list(latents[3 * r : 3 * r + 3]), dim=-1) for r in range(2)]
        tiled_latent = torch.cat(rows, dim=-2)[None]
        io = dict(latent=latents[:2], image=x[:2])
        io["decoded"] = ae.decode(io["latent"]).sample
        io["encoded"] = ae.encode(io["image"]).latent
        ae.enable_tiling(**tiling)
        io["tiled_latent"] = tiled_latent
        io["tiled_decoded"] = ae.decode(tiled_latent).sample
        plain = AutoencoderDC.from_pretrained(model, torch_dtype=torch.float32).eval()
        assert not torch.allclose(plain.decode(tiled_latent).sample, io["tiled_decoded"], atol=1e-3)
        io["tiling"] = torch.tensor([tiling[k] for k in ("tile_sample_min_height", "tile_sample_min_width",
                                                         "tile_sample_stride_height", "tile_sample_stride_width")])
        half = ae.to(torch.bfloat16)
        io["decoded_bf16"] = half.decode(io["latent"].bfloat16()).sample
        io["encoded_bf16"] = half.encode(io["image"].bfloat16()).latent
        io["tiled_decoded_bf16"] = half.decode(tiled_latent.bfloat16()).sample
    rel = (io["decoded_bf16"].float() - io["decoded"]).abs().max() / io["decoded"].abs().max()
    print(f"tiny_scenes DC-AE: diffusers bf16 decode vs f32: {rel:.4f} x max|ref|")
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")


if __name__ == "__main__":
    main()
