"""The synthetic scene world of the embedded demo model `sana-tiny-scenes`.

A scene is a background colour and one or two objects; an object has a shape, a colour, a size and a position.
Scenes are drawn from a seeded RNG, rendered at 64x64 and captioned in varied natural phrasings. The pixel checker
(`crates/sana-scenes/src/checker.rs`, mirrored here as `check` for the training script's own evaluation) reads the
attributes back from an image. The constants below are the world's definition: the Rust side has the same table.
"""
import random

SIZE = 64
# name -> sRGB, far apart in RGB so the checker can classify a pixel by its nearest palette colour
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ["circle", "square", "triangle"]
# half extent in pixels
SIZES = {"small": 7, "large": 13}
# position -> centre (x, y)
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "centre": (32, 32)}
# two objects sit at opposite positions, so they never overlap
PAIRS = [("left", "right"), ("top", "bottom")]

SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
POSITION_WORDS = {
    "left": ["on the left", "at the left", "to the left"],
    "right": ["on the right", "at the right", "to the right"],
    "top": ["at the top", "near the top", "on top"],
    "bottom": ["at the bottom", "near the bottom", "on the bottom"],
    "centre": ["in the centre", "in the center", "in the middle"],
}


def sample_scene(rng: random.Random, p_pair: float = 0.5, pair_when_high: bool = False) -> dict:
    """One scene with two objects when a uniform draw is below p_pair (the world's own mix, and the held-out
    prompts', is 0.5), or with pair_when_high when it is at or above 1 - p_pair: the rule the embedded model's
    autoencoder was trained with, kept so that train.py still reproduces it."""
    colors = list(COLORS)
    background = rng.choice(colors)
    draw = rng.random()
    if not (draw >= 1 - p_pair if pair_when_high else draw < p_pair):
        positions = [rng.choice(list(POSITIONS))]
    else:
        positions = list(rng.choice(PAIRS))
        rng.shuffle(positions)
    used = {background}
    objects = []
    for position in positions:
        color = rng.choice([c for c in colors if c not in used])
        used.add(color)
        objects.append(
            dict(shape=rng.choice(SHAPES), color=color, size=rng.choice(list(SIZES)), position=position,
                 jitter=(rng.randint(-2, 2), rng.randint(-2, 2), rng.randint(-1, 1)))
        )
    return dict(background=background, objects=objects)


def render(scene: dict):
    """uint8 [SIZE, SIZE, 3] numpy array; shapes are drawn at 4x and averaged (anti-aliased edges)."""
    import numpy as np

    k = 4
    ys, xs = np.mgrid[0 : SIZE * k, 0 : SIZE * k]
    xs = (xs + 0.5) / k
    ys = (ys + 0.5) / k
    img = np.empty((SIZE * k, SIZE * k, 3), np.float32)
    img[:] = COLORS[scene["background"]]
    for obj in scene["objects"]:
        cx, cy = POSITIONS[obj["position"]]
        jx, jy, jr = obj.get("jitter", (0, 0, 0))
        cx, cy, r = cx + jx, cy + jy, SIZES[obj["size"]] + jr
        dx, dy = xs - cx, ys - cy
        if obj["shape"] == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif obj["shape"] == "square":
            inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        else:  # apex up, base at the bottom: |dx| <= r * (dy + r) / (2 r)
            inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        img[inside] = COLORS[obj["color"]]
    img = img.reshape(SIZE, k, SIZE, k, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _object_phrase(rng, obj, article=True):
    words = [rng.choice(SIZE_WORDS[obj["size"]]), obj["color"], obj["shape"]]
    if rng.random() < 0.3:
        words[0], words[1] = words[1], words[0]  # "red large circle"
    phrase = " ".join(words)
    if not article:
        return phrase
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def caption(scene: dict, rng: random.Random) -> str:
    bg = scene["background"]
    parts = [f"{_object_phrase(rng, o)} {rng.choice(POSITION_WORDS[o['position']])}" for o in scene["objects"]]
    objects = " and ".join(parts)
    template = rng.randrange(5)
    if template == 0:
        return f"{objects} on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"
    if template == 1:
        return f"{bg} background, {objects}"
    if template == 2:
        return f"{objects}, {bg} background"
    if template == 3:
        return f"{'an' if bg[0] in 'aeiou' else 'a'} {bg} background with {objects}"
    return f"{objects}. the background is {bg}"


def vocabulary() -> list:
    words = set()
    for values in [COLORS, SHAPES, *SIZE_WORDS.values(), *POSITION_WORDS.values()]:
        for v in values:
            words.update(v.split())
    words.update("a an and on with the background is . ,".split())
    return sorted(words)


def draw(seed: int, n: int):
    """n (scene, caption) pairs from one seed: the same seed always gives the same list."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append((scene, caption(scene, rng)))
    return out


# ---- the pixel checker (the Rust checker in crates/sana-scenes is the one the tests use; same rules) ----
MIN_PIXELS = 20  # smaller components are noise
CENTRE_RADIUS = 8  # a centroid within this many pixels of the image centre (in x and y) is "centre"
LARGE_EXTENT = 20  # bounding-box side above which an object is "large" (small: 12-16 px, large: 24-28 px)


def check(img) -> dict:
    """Reads a scene back from a uint8 [64, 64, 3] image: background and objects (largest first)."""
    import numpy as np
    from collections import deque

    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], np.float32)
    d = ((img[:, :, None, :].astype(np.float32) - palette[None, None]) ** 2).sum(-1)
    cls = d.argmin(-1)
    counts = np.bincount(cls.ravel(), minlength=len(names))
    bg = int(counts.argmax())
    fg = cls != bg
    seen = np.zeros_like(fg)
    objects = []
    for y0 in range(SIZE):
        for x0 in range(SIZE):
            if not fg[y0, x0] or seen[y0, x0]:
                continue
            queue, pixels = deque([(y0, x0)]), []
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                pixels.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < SIZE and 0 <= nx < SIZE and fg[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if len(pixels) >= MIN_PIXELS:
                objects.append(_describe(np.array(pixels), cls, names))
    objects.sort(key=lambda o: -o["pixels"])
    return dict(background=names[bg], objects=objects)


def _describe(pixels, cls, names) -> dict:
    import numpy as np

    ys, xs = pixels[:, 0], pixels[:, 1]
    color = names[int(np.bincount(cls[ys, xs], minlength=len(names)).argmax())]
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    dx, dy = cx - SIZE / 2, cy - SIZE / 2
    if abs(dx) < CENTRE_RADIUS and abs(dy) < CENTRE_RADIUS:
        position = "centre"
    elif abs(dx) > abs(dy):
        position = "right" if dx > 0 else "left"
    else:
        position = "bottom" if dy > 0 else "top"
    fill = len(pixels) / float(h * w)
    # a triangle (apex up) is narrow in its top third and wide in its bottom third
    top = xs[ys < ys.min() + h / 3]
    bottom = xs[ys >= ys.max() + 1 - h / 3]
    narrow = (top.max() - top.min() + 1) < 0.6 * (bottom.max() - bottom.min() + 1)
    if narrow and fill < 0.7:
        shape = "triangle"
    elif fill > 0.88:
        shape = "square"
    else:
        shape = "circle"
    size = "large" if max(h, w) > LARGE_EXTENT else "small"
    return dict(color=color, position=position, shape=shape, size=size, pixels=len(pixels))


def score(scene: dict, found: dict) -> dict:
    """Per-attribute hits for one scene: each expected object is compared with the found object whose centroid
    class matches its position, else the largest one left."""
    hits = dict(background=int(found["background"] == scene["background"]), objects=0, color=0, position=0,
                shape=0, size=0)
    left = list(found["objects"])
    for obj in scene["objects"]:
        hits["objects"] += 1
        if not left:
            continue
        match = next((o for o in left if o["color"] == obj["color"]), None) or left[0]
        left.remove(match)
        for key in ("color", "position", "shape", "size"):
            hits[key] += int(match[key] == obj[key])
    return hits
