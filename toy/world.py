"""A tiny generated world of coloured shapes, for the embedded toy Stable Diffusion.

Every 64x64 image is one object (shape, colour, pattern, size, position) on a background (colour,
style), with a plain-English caption:

    rng = np.random.default_rng(0)
    attrs = sample_attributes(rng)            # {"shape": "star", "colour": "red", ...}
    image = render(attrs, rng)                # uint8 [64, 64, 3]
    caption(attrs)                            # "a small red striped star on a blue background, top left"

Why a generated world: the whole method (pretraining, personalisation, evaluation) then runs on a
CPU with nothing to download, and because every image's attributes are known, concept leakage is
measured exactly by `AttributeClassifier`, not guessed. The (shape, colour, pattern) triples in
HELD_OUT never appear in pretraining (each shape, colour and pattern does, in other
combinations): they are the new concepts to personalise.

Patterns are drawn on a 16-pixel lattice whose cells are the VAE's 8x8 latent cells, shifted by a
random multiple of 8 pixels. Why 16 and not 8: SD's decoder (nearest upsampling and convolutions)
turns a latent that is the same in every cell into a flat colour, so a pattern repeating every 8
pixels could never be drawn back; one that alternates between neighbouring cells gives the decoder
the contrast it needs, and staying on the latent grid keeps it exact rather than blurred.
"""
import json
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from safetensors import safe_open

from model.errors import UserError

SIZE = 64
RGB = {"red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (50, 170, 60),
       "blue": (40, 80, 220), "purple": (140, 60, 190), "white": (245, 245, 245), "grey": (128, 128, 128),
       "black": (25, 25, 25)}
ATTRIBUTES = {
    "shape": ("circle", "square", "triangle", "star", "heart", "cross"),
    "colour": ("red", "orange", "yellow", "green", "blue", "purple"),
    "pattern": ("plain", "striped", "dotted", "checkered"),
    "size": ("small", "large"),
    "position": ("center", "top left", "top right", "bottom left", "bottom right"),
    "background": tuple(RGB),  # the object colours plus white, grey, black; never the object's own
    "background_style": ("plain", "gradient", "cloudy"),
}
# (shape, colour, pattern) objects that pretraining never sees: the concepts to personalise.
HELD_OUT = (("heart", "purple", "dotted"), ("star", "orange", "checkered"), ("triangle", "green", "striped"),
            ("circle", "blue", "checkered"), ("cross", "yellow", "dotted"))
DIAMETER = {"small": 22, "large": 38}  # pixels, before a +-10% jitter
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: smooth edges


def concept_name(concept):
    """("heart", "purple", "dotted") -> "purple dotted heart" (the words a caption uses)."""
    shape, colour, pattern = concept
    return " ".join([colour] + ([pattern] if pattern != "plain" else []) + [shape])


# -------------------------------------------------------------------------------------------------
# attributes and captions

def sample_attributes(rng, held_out=HELD_OUT, concept=None):
    """Uniform attributes, never an object in `held_out` (pass () for the whole world) and never an
    object on a background of its own colour. `concept` fixes (shape, colour, pattern)."""
    while True:
        attrs = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
        if concept is not None:
            attrs.update(zip(("shape", "colour", "pattern"), concept))
        elif (attrs["shape"], attrs["colour"], attrs["pattern"]) in held_out:
            continue
        if attrs["background"] != attrs["colour"]:
            return attrs


def _with_article(words):
    return ("an " if words[0] in "aeiou" else "a ") + words


def background_words(colour, style="plain"):
    """("orange", "gradient") -> "an orange gradient background" (what a caption says of it)."""
    ground = {"plain": colour, "gradient": f"{colour} gradient", "cloudy": f"cloudy {colour}"}[style]
    return f"{_with_article(ground)} background"


def caption(attrs):
    obj = concept_name((attrs["shape"], attrs["colour"], attrs["pattern"]))
    ground = background_words(attrs["background"], attrs["background_style"])
    return f"a {attrs['size']} {obj} on {ground}, {attrs['position']}"


def scene_caption(attrs):
    """What a caption says of the photo's setting alone: "an orange gradient background, top left"."""
    return f"{background_words(attrs['background'], attrs['background_style'])}, {attrs['position']}"


def loose_caption(attrs, rng):
    """A partial description of the same image, as people write them: some of the object's words
    (size, colour, pattern, shape; at least one), maybe the background, maybe the place, in any
    order: "dotted heart", "on a blue background, a purple heart", "top left, a small star".

    Why: SD's text encoder met every kind of phrasing, so a prompt of learned tokens alone ("<v>",
    "<v> <r_1> ... <r_8>") still means something to it. A text encoder that only ever read the one
    caption template means nothing by a word outside its slot, and personalisation fails there."""
    words = [attrs["size"], attrs["colour"], attrs["pattern"], attrs["shape"]]
    if attrs["pattern"] == "plain":
        words[2] = None  # captions never name the plain pattern
    keep = rng.random(4) < 0.6
    words = [w for w, k in zip(words, keep) if w and k] or [attrs["shape"]]
    phrases = [_with_article(" ".join(words)) if rng.random() < 0.5 else " ".join(words)]
    if rng.random() < 0.5:
        phrases.append("on " + background_words(attrs["background"], attrs["background_style"]))
    if rng.random() < 0.5:
        phrases.append(attrs["position"])
    order = rng.permutation(len(phrases))
    return ", ".join(phrases[k] for k in order)


# -------------------------------------------------------------------------------------------------
# rendering

def _outline(shape, cx, cy, r):
    """Polygon points (or an ellipse box for the circle) of a shape of radius r centred at cx, cy."""
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        s = 0.85 * r  # a full-radius square looks much bigger than the circle
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        angles = np.radians([-90, 30, 150])
        return [(cx + r * np.cos(a), cy + 0.15 * r + r * np.sin(a)) for a in angles]
    if shape == "star":
        angles = np.radians(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return [(cx + r * u / 17, cy - r * (v + 2.5) / 17) for u, v in zip(x, y)]
    if shape == "cross":
        a, w = r, 0.36 * r
        corners = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a),
                   (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)]
        return [(cx + u, cy + v) for u, v in corners]
    raise ValueError(f"unknown shape {shape}")


def _mask(shape, cx, cy, r):
    """Coverage in [0, 1], float32 [SIZE, SIZE], antialiased by supersampling."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (SIZE * k, SIZE * k), 0)
    draw = ImageDraw.Draw(canvas)
    points = [(k * x, k * y) for x, y in _outline(shape, cx, cy, r)]
    if shape == "circle":
        draw.ellipse(points, fill=255)
    else:
        draw.polygon(points, fill=255)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255


# One lattice a tile larger than the image (a tile is 16 pixels, 2x2 latent cells); render cuts it at
# a random multiple of 8 pixels, so both phases occur and every cell stays on the latent grid.
_Y, _X = np.mgrid[0:SIZE + 16, 0:SIZE + 16]
_DOT = np.hypot(_X % 8 - 3.5, _Y % 8 - 3.5)
PATTERNS = {  # how much of the darker second colour each pixel gets
    "plain": np.zeros(_X.shape, np.float32),
    "striped": ((_X + _Y) % 16 < 8).astype(np.float32),
    # a round dot in every other 8x8 cell, antialiased
    "dotted": (np.clip(3.6 - _DOT, 0, 1) * ((_X // 8 + _Y // 8) % 2 == 0)).astype(np.float32),
    "checkered": ((_X // 8 + _Y // 8) % 2 == 0).astype(np.float32),
}


def _contrast(rgb):
    """White for dark colours, black for light ones: what a background's shading moves towards."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.full(3, 0.0 if luminance > 110 else 255.0, np.float32)


def _background(colour, style, rng):
    base = np.array(RGB[colour], np.float32)
    if style == "plain":
        amount = np.zeros((SIZE, SIZE), np.float32)
    elif style == "gradient":  # top to bottom, towards the contrast colour
        amount = np.repeat(np.linspace(0, 0.6, SIZE, dtype=np.float32)[:, None], SIZE, 1)
    else:  # cloudy: smooth random blotches, low-frequency so a factor-8 VAE keeps them
        coarse = Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8))
        amount = 0.5 * np.asarray(coarse.resize((SIZE, SIZE), Image.BICUBIC), np.float32) / 255
    return base + amount[..., None] * (_contrast(base) - base)


def render(attrs, rng):
    """uint8 [SIZE, SIZE, 3]. `rng` jitters the object's size and position a little and draws the
    clouds; the attributes alone decide everything a caption or the classifier can name."""
    r = DIAMETER[attrs["size"]] / 2 * rng.uniform(0.9, 1.1)
    near, far = DIAMETER[attrs["size"]] / 2 + 4, SIZE - DIAMETER[attrs["size"]] / 2 - 4
    cx = {"left": near, "right": far}.get(attrs["position"].split()[-1], SIZE / 2) + rng.uniform(-2, 2)
    cy = {"top": near, "bottom": far}.get(attrs["position"].split()[0], SIZE / 2) + rng.uniform(-2, 2)
    colour = np.array(RGB[attrs["colour"]], np.float32)
    dx, dy = 8 * rng.integers(2, size=2)
    obj = colour * (1 - 0.6 * PATTERNS[attrs["pattern"]][dy:dy + SIZE, dx:dx + SIZE, None])
    alpha = _mask(attrs["shape"], cx, cy, r)[..., None]
    image = alpha * obj + (1 - alpha) * _background(attrs["background"], attrs["background_style"], rng)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------------
# batches

def batch(rng, n, held_out=HELD_OUT, concept=None):
    """n fresh examples: (images uint8 [n, SIZE, SIZE, 3], captions, attribute dicts)."""
    attrs = [sample_attributes(rng, held_out, concept) for _ in range(n)]
    return np.stack([render(a, rng) for a in attrs]), [caption(a) for a in attrs], attrs


REFERENCE_SCENARIOS = ("distinct", "shared")


def reference_set(concept, n, rng, scenario="distinct"):
    """n photos of one concept to personalise from, as a user would bring them, size and style random.
    scenario "distinct": each photo on a background colour and in a corner of its own (corners cycle
    past four), so what the photos share is exactly the concept (ConceptPrism's case). "shared": every
    photo on the same background colour and in the same corner, a context that comes with the subject
    in every photo (ACCORD's case; with one corner the position leak is measurable too: four distinct
    corners are all the corners there are). Either way the backgrounds and corners must not leak.
    Returns (images uint8 [n, SIZE, SIZE, 3], captions, attribute dicts)."""
    if scenario not in REFERENCE_SCENARIOS:
        raise ValueError(f"scenario must be one of {REFERENCE_SCENARIOS}, not {scenario!r}")
    grounds = [c for c in RGB if c != concept[1]]
    grounds = [grounds[k] for k in rng.permutation(len(grounds))[:n]]
    if scenario == "shared":  # the first of the same draw: the rng stream stays that of "distinct"
        grounds = [grounds[0]] * n
    corners = [p for p in ATTRIBUTES["position"] if p != "center"]
    order = rng.permutation(len(corners))
    corners = [corners[order[k % len(corners)]] for k in range(n)]
    if scenario == "shared":
        corners = [corners[0]] * n
    attrs = []
    for ground, corner in zip(grounds, corners):
        a = sample_attributes(rng, concept=concept)
        a.update(background=ground, position=corner)
        attrs.append(a)
    return np.stack([render(a, rng) for a in attrs]), [caption(a) for a in attrs], attrs


def write_folder(folder, images, captions):
    """A reference folder in the kohya layout the scripts read: 01.png with its caption in 01.txt.
    Returns the image file names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for k, (image, text) in enumerate(zip(images, captions), 1):
        names.append(f"{k:02d}.png")
        Image.fromarray(image).save(os.path.join(folder, names[-1]))
        with open(os.path.join(folder, f"{k:02d}.txt"), "w") as f:
            f.write(text + "\n")
    return names


def to_tensor(images):
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [-1, 1], the VAE's range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def labels(attrs):
    """Attribute dicts -> {attribute: int64 [n] class indices into ATTRIBUTES[attribute]}."""
    return {name: torch.tensor([values.index(a[name]) for a in attrs]) for name, values in ATTRIBUTES.items()}


# -------------------------------------------------------------------------------------------------
# the attribute classifier (measurement only: it never trains or steers a generator)

class AttributeClassifier(nn.Module):
    """Image [B, 3, 64, 64] in [-1, 1] -> {attribute: logits [B, n_values]}, one head per attribute.

    One cheap full-resolution conv sees the 4-pixel pattern cells; four poolings bring the image to
    4x4, and the heads read that flattened map rather than a global average because position is
    one of the attributes."""

    def __init__(self, width=16):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 4 * width]
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(), nn.MaxPool2d(2)]
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2)]
        self.width = width
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(chans[-1] * (SIZE // 16) ** 2, 128), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, x):
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x):
        """{attribute: predicted value names}, for reading results."""
        return {name: [ATTRIBUTES[name][i] for i in logits.argmax(1).tolist()] for name, logits in self(x).items()}


def load_classifier(path, device="cpu"):
    """The classifier train_classifier.py wrote; refuses one trained on other attribute values."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if json.loads(meta.get("attributes", "null")) != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise UserError(f"{path} was trained on a different toy world; retrain it with python toy/train_classifier.py")
    classifier = AttributeClassifier(int(meta["width"]))
    classifier.load_state_dict(state)
    return classifier.to(device).eval().requires_grad_(False)
