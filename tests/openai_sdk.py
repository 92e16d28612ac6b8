"""The official OpenAI Python SDK against a running `sana serve` (the embedded model, CPU).

Run by tests/openai_sdk.sh (which installs the SDK into a virtual environment); exits non-zero on any failure.
Checks: `client.images.generate` with `b64_json` and with `url` gives decodable PNGs of the requested size and count;
`extra_body` reaches the server (`seed`: the same seed gives the same image); streaming with partial images through
the SDK's event iterator; a bad request raises the SDK's `BadRequestError` with the server's message.
`client.images.edit` with an image and an alpha mask (multipart) gives decodable PNGs, streams `image_edit.*`
events, and a mask of another size raises `BadRequestError` naming the mask.
"""
import base64
import os
import zlib
import pathlib
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

ROOT = pathlib.Path(__file__).resolve().parents[1]
SANA = pathlib.Path(os.environ.get("SANA_BIN", ROOT / "target/release/sana"))


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def rgba_png(width: int, height: int, pixel) -> bytes:
    """A PNG (8-bit RGBA) of pixel(x, y) -> (r, g, b, a), written with the standard library only."""
    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="sana-sdk-")
    log = open(os.path.join(tmp, "serve.log"), "w")
    env = dict(os.environ, SANA_CACHE_DIR=os.path.join(tmp, "cache"))
    env.pop("SANA_MODEL", None)
    server = subprocess.Popen([str(SANA), "serve", "--host", "127.0.0.1", "--port", str(port), "--devices", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/ready", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not become ready; log:\n{open(log.name).read()}")
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        prompt = "a large green triangle at the bottom on a white background"

        r = client.images.generate(model="sana-tiny-scenes", prompt=prompt, size="64x64", n=2,
                                   response_format="b64_json", extra_body={"seed": 11})
        assert len(r.data) == 2, r
        images = [base64.b64decode(d.b64_json) for d in r.data]
        for img in images:
            assert png_size(img) == (64, 64)
        print(f"b64_json: {len(images)} PNGs, 64x64")

        again = client.images.generate(model="sana-tiny-scenes", prompt=prompt, size="64x64", n=1,
                                       response_format="b64_json", extra_body={"seed": 11})
        assert base64.b64decode(again.data[0].b64_json) == images[0], "the same seed gives the same image"
        print("seed via extra_body: same image")

        r = client.images.generate(prompt=prompt, size="96x64", response_format="url")
        with urllib.request.urlopen(r.data[0].url) as f:
            assert png_size(f.read()) == (96, 64)
        print(f"url: {r.data[0].url} -> PNG 96x64")

        stream = client.images.generate(model="sana-tiny-scenes", prompt=prompt, size="64x64", stream=True,
                                        partial_images=2)
        kinds = [event.type for event in stream]
        assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
        print(f"stream: {kinds}")

        # Edits: the first image, its right half transparent in the mask (= repaint).
        mask = rgba_png(64, 64, lambda x, y: (0, 0, 0, 0 if x >= 32 else 255))
        r = client.images.edit(image=("in.png", images[0], "image/png"), mask=("mask.png", mask, "image/png"),
                               prompt="a small red circle on the right", n=2, size="64x64",
                               response_format="b64_json", extra_body={"seed": 3})
        assert len(r.data) == 2 and all(png_size(base64.b64decode(d.b64_json)) == (64, 64) for d in r.data), r
        print("edit with mask: 2 PNGs, 64x64")
        stream = client.images.edit(image=("in.png", images[0], "image/png"), prompt="a blue background",
                                    stream=True, partial_images=1, extra_body={"strength": 0.9})
        kinds = [event.type for event in stream]
        assert kinds == ["image_edit.partial_image", "image_edit.completed"], kinds
        print(f"edit stream: {kinds}")
        try:
            client.images.edit(image=("in.png", images[0], "image/png"),
                               mask=("mask.png", rgba_png(32, 32, lambda x, y: (0, 0, 0, 0)), "image/png"),
                               prompt="a fox")
            raise SystemExit("a mask of another size was accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400 and "mask" in str(e), e
            print(f"bad edit: {e.status_code} (mask of another size)")

        try:
            client.images.generate(prompt="", size="64x64")
            raise SystemExit("an empty prompt was accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400 and "prompt" in str(e), e
            print(f"bad request: {e.status_code} {e.body.get('message') if isinstance(e.body, dict) else e.body}")
        print("openai SDK", openai.__version__, "ok")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
