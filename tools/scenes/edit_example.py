#!/usr/bin/env python3
"""The README's edit picture: a render of one object on the left (tests/fixtures/scenes), its right half masked,
edited by `sana edit` on the embedded model with a caption that adds an object on the right, four seeds.

Usage: python tools/scenes/edit_example.py [--sana target/release/sana] [--out docs/edit-example.png]
Needs numpy, Pillow and safetensors (the fixture environment); the edits themselves are the Rust binary's.
"""
import argparse
import json
import pathlib
import subprocess
import tempfile

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCALE = 4


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sana", default=str(ROOT / "target/release/sana"))
    p.add_argument("--out", default=str(ROOT / "docs/edit-example.png"))
    args = p.parse_args()
    fx = ROOT / "tests/fixtures/scenes"
    scenes = json.loads((fx / "rendered.json").read_text())
    images = load_file(fx / "rendered.safetensors")["images"]
    index = next(i for i, s in enumerate(scenes)
                 if len(s["objects"]) == 1 and s["objects"][0]["position"] == "left")
    scene, image = scenes[index], images[index]
    o = scene["objects"][0]
    prompt = (f"a large {o['color']} {o['shape']} on the left and a large yellow circle on the right, "
              f"{scene['background']} background")
    tiles = [image]
    mask_rgba = np.zeros((64, 64, 4), np.uint8)
    mask_rgba[:, :32, 3] = 255  # opaque = keep; the transparent right half is repainted
    tiles.append(np.repeat(np.where(mask_rgba[:, :, 3:] == 0, 255, 40).astype(np.uint8), 3, axis=2))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        Image.fromarray(image).save(tmp / "in.png")
        Image.fromarray(mask_rgba, "RGBA").save(tmp / "mask.png")
        for seed in range(4):
            out = tmp / f"out-{seed}.png"
            subprocess.run([args.sana, "edit", "--image", tmp / "in.png", "--mask", tmp / "mask.png", "--prompt",
                            prompt, "--seed", str(seed), "--device", "cpu", "--output", out], check=True)
            tiles.append(np.asarray(Image.open(out).convert("RGB")))
    gap = np.full((64, 4, 3), 128, np.uint8)
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    Image.fromarray(row).resize((row.shape[1] * SCALE, row.shape[0] * SCALE), Image.NEAREST).save(args.out)
    print(f"{args.out}: {prompt!r}")


if __name__ == "__main__":
    main()
