#!/usr/bin/env python3
"""Regenerate the committed parity fixtures under tests/fixtures/ from the Python reference.

Usage: python tools/gen_fixtures.py [PART ...]   (default: every part)

Each part lives in tools/fixtures/<part>.py and exposes `generate(root: pathlib.Path)`.
Everything is drawn from fixed seeds, so running this twice gives identical files.
Needs torch, diffusers, transformers and safetensors (a dev tool: the product and CI never run it).
"""
import importlib
import pathlib
import sys

PARTS = ["transformer", "scheduler", "autoencoder", "text_encoder", "image", "sampling", "pipeline", "nvlabs", "edits", "adapters", "controlnet"]


def main(argv):
    root = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    parts = argv or PARTS
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}; choose from {PARTS}")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    for part in parts:
        print(f"== {part}", flush=True)
        importlib.import_module(f"fixtures.{part}").generate(root)


if __name__ == "__main__":
    main(sys.argv[1:])
