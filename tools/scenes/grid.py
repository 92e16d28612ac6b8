"""The README's sample grid: `sana generate` (the embedded model, its defaults) on the first 12 held-out prompts,
seed 0, upscaled 2x (nearest) into a 6x2 grid at docs/tiny-scenes-samples.png; prints the README table.

  ../refenv/bin/python tools/scenes/grid.py [path/to/sana]
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]


def main():
    sana = sys.argv[1] if len(sys.argv) > 1 else str(REPO / "target/release/sana")
    heldout = json.loads((REPO / "crates/sana-scenes/heldout.json").read_text())[:12]
    tiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, h in enumerate(heldout):
            out = pathlib.Path(tmp) / f"{i}.png"
            subprocess.run([sana, "generate", "--prompt", h["prompt"], "--seed", "0", "--output", str(out)],
                           check=True, capture_output=True)
            img = np.asarray(Image.open(out).convert("RGB"))
            tiles.append(img.repeat(2, axis=0).repeat(2, axis=1))
    pad = 4
    h, w, _ = tiles[0].shape
    grid = np.full((2 * h + 3 * pad, 6 * w + 7 * pad, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, 6)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = tile
    path = REPO / "docs/tiny-scenes-samples.png"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(grid).save(path, optimize=True)
    print(f"wrote {path.relative_to(REPO)}\n")
    print("| # | prompt |\n|---|---|")
    for i, h in enumerate(heldout):
        print(f"| {i + 1} | {h['prompt']} |")


if __name__ == "__main__":
    main()
