"""Deterministic synthetic visual question answering data for pruning benchmarks.

Each image is a small noisy/textured canvas with a handful of coloured shapes,
small printed characters on white tags and grey clutter.  Scenes are laid out on the
model's patch grid: a shape fills a block of 2x2 (small) or 3x3 (large) patches, a tag
exactly one patch, so what each visual token shows is well defined (the difficulty lies in
finding and combining the evidence, which is what pruning affects, not in reassembling
glyphs cut by patch borders).  Every question comes
with the pixel boxes of the objects it is about, so one can check which visual
tokens (patches) an answer depends on and whether a pruning strategy kept them.

Question families (the ``family`` field), each stressing a different kind of
visual evidence:

* ``attribute`` -- colour or shape of one named object ("what colour is the
  triangle?").  The named object is unique in the image and covers only a few
  patches, so the evidence is small and query dependent.
* ``count`` -- "how many red circles are there?".  Needs *every* instance,
  spread over the image; pruning that keeps only the most salient tokens drops
  some instances.
* ``spatial`` -- "is the red circle to the left of the blue square?" (yes/no).
  Needs two objects and their positions.
* ``text`` -- read one small printed digit or letter (a 5x7 bitmap glyph
  inside a single patch).  Fine detail that merged or pooled
  tokens blur.
* ``exist`` -- POPE-style "is there a green star in the image?", exactly half
  yes and half no; absent objects often share colour or shape with present
  ones.  "no" records have empty boxes: the answer depends on the whole image.

Splits are separated by seed: the split name is part of every random seed, so
``train``, ``validation`` and ``test`` never share an image.  Use ``test`` only
for final reporting, never for training or tuning.

CLI: ``python eval/vqa_data.py --split test --n 500 --seed 0 --out eval/data/test``
writes ``<out>/<split>.jsonl`` and ``<out>/images/*.png``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

FAMILIES = ("attribute", "count", "spatial", "text", "exist")
SPLITS = {"train": 1, "validation": 2, "test": 3}

COLOURS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 30),
    "green": (30, 165, 50),
    "blue": (30, 90, 230),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZES = {"small": 2, "large": 3}  # block side in patches (tags are one patch)
RELATIONS = {"left": "to the left of", "right": "to the right of",
             "above": "above", "below": "below"}  # order matters: opposites pair up
MAX_COUNT = 5

# 5x7 bitmap glyphs: rendering is exact and identical on every machine (no fonts).
GLYPHS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    "a": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "c": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "e": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "f": ("11111", "10000", "10000", "11110", "10000", "10000", "10000"),
    "h": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "k": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "l": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "p": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "r": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "t": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "u": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
    "x": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
}
DIGITS = tuple(c for c in GLYPHS if c.isdigit())
LETTERS = tuple(c for c in GLYPHS if c.isalpha())

# Question templates; vocabulary() derives the word list from these.
Q_COLOUR = "what colour is the {shape}?"
Q_COLOUR_SIZED = "what colour is the {size} {shape}?"
Q_SHAPE = "what shape is the {colour} object?"
Q_COUNT_SHAPE = "how many {shapes} are there?"
Q_COUNT_COLOUR_SHAPE = "how many {colour} {shapes} are there?"
Q_COUNT_COLOUR = "how many {colour} objects are there?"
Q_SPATIAL = "is the {a} {relation} the {b}?"
Q_EXIST = "is there a {colour} {shape} in the image?"
Q_TEXT = "what {kind} is printed in the image?"
TEMPLATES = (Q_COLOUR, Q_COLOUR_SIZED, Q_SHAPE, Q_COUNT_SHAPE, Q_COUNT_COLOUR_SHAPE,
             Q_COUNT_COLOUR, Q_SPATIAL, Q_EXIST, Q_TEXT)

WORD_RE = re.compile(r"\w+|[^\w\s]+")  # same split as tokenizers' Whitespace pre-tokenizer
SUPERSAMPLE = 4  # shapes are drawn 4x larger then box-filtered (anti-aliased edges)


class LayoutError(RuntimeError):
    """Raised when objects cannot be placed without overlap; the caller redraws."""


# --------------------------------------------------------------------------- scenes

def _obj(shape: str, colour: str, size: str) -> dict:
    return {"kind": "shape", "shape": shape, "colour": colour, "size": size}


def _tag(char: str) -> dict:
    return {"kind": "tag", "char": char}


def _pick(rng: np.random.Generator, items: Sequence) -> Any:
    return items[int(rng.integers(len(items)))]


def _random_obj(rng, shapes=SHAPES, colours=tuple(COLOURS)) -> dict:
    return _obj(_pick(rng, shapes), _pick(rng, colours), _pick(rng, tuple(SIZES)))


def _cells(item: dict) -> int:
    """Side in patches of an item's square block on the patch grid: a tag is one patch, a small
    shape 2x2 patches and a large one 3x3 (see :data:`SIZES`).  The shape is drawn inside its
    block with a margin, so blocks may touch while the shapes never do."""
    return 1 if item["kind"] == "tag" else SIZES[item["size"]]


def _side(item: dict, patch_size: int) -> tuple[int, int]:
    """(width, height) in pixels of an item's block."""
    return _cells(item) * patch_size, _cells(item) * patch_size


def _place(rng, items: list[dict], image_size: int, patch_size: int, tries: int = 200) -> None:
    """Give every item a ``box`` of whole patches inside the image, no two boxes sharing a patch."""
    grid = image_size // patch_size
    taken = np.zeros((grid, grid), dtype=bool)
    for item in items:
        cells = _cells(item)
        if cells > grid:
            raise LayoutError("object larger than the image")
        for _ in range(tries):
            col, row = (int(v) for v in rng.integers(0, grid - cells + 1, size=2))
            if not taken[row: row + cells, col: col + cells].any():
                break
        else:
            raise LayoutError("no room for object")
        taken[row: row + cells, col: col + cells] = True
        x0, y0 = col * patch_size, row * patch_size
        item["box"] = [x0, y0, x0 + cells * patch_size, y0 + cells * patch_size]


def _clutter_tags(rng, exclude: str = "") -> list[dict]:
    """0-2 distractor tags (characters nobody asks about)."""
    chars = [c for c in GLYPHS if c not in exclude]
    return [_tag(_pick(rng, chars)) for _ in range(int(rng.integers(0, 3)))]


def _name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


# ------------------------------------------------------------------ question families

def _attribute(rng, image_size: int, k: int, patch_size: int = 8) -> tuple[list[dict], dict]:
    """Colour or shape of one uniquely described object (query-dependent, small evidence).

    Variants: colour of the only <shape>; shape of the only <colour> object; colour of the
    <size> <shape> when a second same-shape object of the other size is present.
    """
    variant = _pick(rng, ("colour", "shape", "sized"))
    target = _random_obj(rng)
    n_other = int(rng.integers(2, 5))
    if variant == "shape":
        others = [c for c in COLOURS if c != target["colour"]]
        distractors = [_random_obj(rng, colours=others) for _ in range(n_other)]
        question, answer = Q_SHAPE.format(colour=target["colour"]), target["shape"]
    else:
        others = [s for s in SHAPES if s != target["shape"]]
        distractors = [_random_obj(rng, shapes=others) for _ in range(n_other)]
        question, answer = Q_COLOUR.format(shape=target["shape"]), target["colour"]
        if variant == "sized":
            twin_size = "small" if target["size"] == "large" else "large"
            twin_colour = _pick(rng, [c for c in COLOURS if c != target["colour"]])
            distractors.append(_obj(target["shape"], twin_colour, twin_size))
            question = Q_COLOUR_SIZED.format(size=target["size"], shape=target["shape"])
    items = [target] + distractors + _clutter_tags(rng)
    _place(rng, items, image_size, patch_size)
    return items, {"question": question, "answer": answer, "targets": [target],
                   "subtype": variant}


def _count(rng, image_size: int, k: int, patch_size: int = 8) -> tuple[list[dict], dict]:
    """How many objects match a description (1..5); needs every instance.

    Distractors share the colour or the shape of the description but not both, so a
    model must bind colour to shape per instance.
    """
    variant = _pick(rng, ("shape", "colour_shape", "colour"))
    shape, colour = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS))
    n = int(rng.integers(1, MAX_COUNT + 1))
    other_shapes = [s for s in SHAPES if s != shape]
    other_colours = [c for c in COLOURS if c != colour]
    if variant == "shape":
        targets = [_random_obj(rng, shapes=[shape]) for _ in range(n)]
        make_distractor = lambda: _random_obj(rng, shapes=other_shapes)
        question = Q_COUNT_SHAPE.format(shapes=PLURALS[shape])
    elif variant == "colour":
        targets = [_random_obj(rng, colours=[colour]) for _ in range(n)]
        make_distractor = lambda: _random_obj(rng, colours=other_colours)
        question = Q_COUNT_COLOUR.format(colour=colour)
    else:
        targets = [_random_obj(rng, shapes=[shape], colours=[colour]) for _ in range(n)]
        make_distractor = lambda: (_random_obj(rng, shapes=[shape], colours=other_colours)
                                   if rng.random() < 0.5 else
                                   _random_obj(rng, shapes=other_shapes, colours=[colour]))
        question = Q_COUNT_COLOUR_SHAPE.format(colour=colour, shapes=PLURALS[shape])
    distractors = [make_distractor() for _ in range(int(rng.integers(1, 4)))]
    items = targets + distractors + _clutter_tags(rng)
    _place(rng, items, image_size, patch_size)
    return items, {"question": question, "answer": str(n), "targets": targets,
                   "subtype": variant}


def _spatial(rng, image_size: int, k: int, patch_size: int = 8) -> tuple[list[dict], dict]:
    """Is object A left of / right of / above / below object B (yes/no, alternating).

    All objects have distinct colour+shape so both are uniquely named; the two objects
    do not overlap along the asked axis, so the answer is unambiguous.  The 'no'
    question asks the opposite relation of the true one.
    """
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    order = rng.permutation(len(combos))[: int(rng.integers(3, 6))]
    objs = [_obj(*combos[i], _pick(rng, tuple(SIZES))) for i in order]
    items = objs + _clutter_tags(rng)
    _place(rng, items, image_size, patch_size)
    a, b = objs[0], objs[1]
    centre = lambda o, axis: (o["box"][axis] + o["box"][axis + 2]) / 2
    axis = int(rng.integers(2))  # 0: horizontal, 1: vertical
    gap = centre(a, axis) - centre(b, axis)
    if abs(gap) < (_side(a, patch_size)[0] + _side(b, patch_size)[0]) / 2:
        raise LayoutError("objects overlap along the asked axis")
    true_rel = 2 * axis + int(gap > 0)  # index into RELATIONS
    want_yes = k % 2 == 0
    relation = tuple(RELATIONS)[true_rel if want_yes else true_rel ^ 1]
    question = Q_SPATIAL.format(a=_name(a), relation=RELATIONS[relation], b=_name(b))
    return items, {"question": question, "answer": "yes" if want_yes else "no",
                   "targets": [a, b], "subtype": relation}


def _text(rng, image_size: int, k: int, patch_size: int = 8) -> tuple[list[dict], dict]:
    """Read the one printed digit (or letter): a glyph inside one patch, fine detail.

    The image also holds one character of the other kind, so the model must read
    the characters rather than just find a tag.
    """
    kind = _pick(rng, ("digit", "letter"))
    chars, other = (DIGITS, LETTERS) if kind == "digit" else (LETTERS, DIGITS)
    target = _tag(_pick(rng, chars))
    items = [target, _tag(_pick(rng, other))]
    items += [_random_obj(rng) for _ in range(int(rng.integers(2, 5)))]
    _place(rng, items, image_size, patch_size)
    return items, {"question": Q_TEXT.format(kind=kind), "answer": target["char"],
                   "targets": [target], "subtype": kind}


def _exist(rng, image_size: int, k: int, patch_size: int = 8) -> tuple[list[dict], dict]:
    """POPE-style existence: "is there a <colour> <shape>?" -- yes/no alternating.

    'yes' names a present object (boxes: every instance).  'no' names an absent
    colour+shape; in the adversarial variant it shares the colour or the shape of a
    present object, so a model must bind attributes.  'no' records have no boxes.
    """
    objs = [_random_obj(rng) for _ in range(int(rng.integers(3, 7)))]
    present = {(o["colour"], o["shape"]) for o in objs}
    want_yes = k % 2 == 0
    if want_yes:
        colour, shape, subtype = objs[0]["colour"], objs[0]["shape"], "present"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent
                if any(c == pc or s == ps for pc, ps in present)]
        subtype = "adversarial" if near and rng.random() < 0.5 else "random"
        colour, shape = _pick(rng, near if subtype == "adversarial" else absent)
    targets = [o for o in objs if (o["colour"], o["shape"]) == (colour, shape)]
    items = objs + _clutter_tags(rng)
    _place(rng, items, image_size, patch_size)
    return items, {"question": Q_EXIST.format(colour=colour, shape=shape),
                   "answer": "yes" if want_yes else "no", "targets": targets,
                   "subtype": subtype}


BUILDERS = {"attribute": _attribute, "count": _count, "spatial": _spatial,
            "text": _text, "exist": _exist}


# -------------------------------------------------------------------------- rendering

def _background(rng, image_size: int) -> np.ndarray:
    """Low-saturation grey texture (noise, stripes, checker or blotches) plus pixel noise."""
    s = image_size
    base = rng.uniform(70, 170) + rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    texture = _pick(rng, ("noise", "stripes", "checker", "blotches"))
    if texture == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12) * s / 96
        field = 14 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif texture == "checker":
        cell = int(rng.integers(3, 9)) * max(1, s // 96)
        field = 12 * np.where(((xx // cell) + (yy // cell)) % 2 == 0, 1.0, -1.0)
    elif texture == "blotches":
        coarse = rng.normal(0, 1, size=(6, 6))
        img = Image.fromarray(coarse.astype(np.float32)).resize((s, s), Image.Resampling.BICUBIC)
        field = 18 * np.asarray(img, dtype=np.float64)
    else:
        field = np.zeros((s, s))
    pixels = base + field[..., None] + rng.normal(0, 8, size=(s, s, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _draw_clutter(rng, draw: ImageDraw.ImageDraw, image_size: int) -> None:
    """Thin grey lines and specks under the objects: non-object distractors."""
    s = image_size
    for _ in range(int(rng.integers(2, 6))):
        grey = int(rng.integers(20, 236))
        pts = [tuple(int(v) for v in rng.integers(0, s, size=2)) for _ in range(2)]
        draw.line(pts, fill=(grey, grey, grey), width=max(1, s // 96))
    for _ in range(int(rng.integers(3, 9))):
        grey = int(rng.integers(20, 236))
        x, y = (int(v) for v in rng.integers(0, s - 1, size=2))
        draw.rectangle([x, y, x + max(1, s // 96), y + max(1, s // 96)], fill=(grey,) * 3)


def _shape_outline(shape: str, box: Sequence[float]) -> tuple[str, Any]:
    """('ellipse'|'polygon', geometry) for a shape filling ``box``."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        return "ellipse", [x0, y0, x1, y1]
    if shape == "square":
        return "polygon", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return "polygon", [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return "polygon", [(cx + q * np.cos(a), cy + 0.08 * r + q * np.sin(a))
                           for q, a in zip(radii, angles)]
    if shape == "cross":
        t = r / 3
        return "polygon", [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t),
                           (x1, cy + t), (cx + t, cy + t), (cx + t, y1), (cx - t, y1),
                           (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shapes(rng, shapes: list[dict], image_size: int, patch_size: int) -> Image.Image:
    """Anti-aliased RGBA layer with the coloured shapes (slight colour jitter), each inset in
    its block by an eighth of a patch so that shapes in touching blocks stay apart."""
    ss, inset = SUPERSAMPLE, patch_size / 8
    layer = Image.new("RGBA", (image_size * ss, image_size * ss), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for obj in shapes:
        rgb = np.clip(np.array(COLOURS[obj["colour"]]) + rng.integers(-12, 13, size=3), 0, 255)
        fill = tuple(int(v) for v in rgb) + (255,)
        x0, y0, x1, y1 = obj["box"]
        box = [(x0 + inset) * ss, (y0 + inset) * ss, (x1 - inset) * ss, (y1 - inset) * ss]
        kind, geom = _shape_outline(obj["shape"], box)
        if kind == "ellipse":
            draw.ellipse(geom, fill=fill)
        else:
            draw.polygon(geom, fill=fill)
    return layer.resize((image_size, image_size), Image.Resampling.BOX)


def _draw_tag(draw: ImageDraw.ImageDraw, tag: dict, patch_size: int) -> None:
    """White one-patch tag with a black 5x7 glyph; one glyph pixel = patch_size / 8 pixels, so
    the glyph sits inside a single visual token (the finest detail the model can see)."""
    unit = max(1, patch_size // 8)
    x0, y0, x1, y1 = tag["box"]
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(245, 245, 245))
    for r, row in enumerate(GLYPHS[tag["char"]]):
        for c, bit in enumerate(row):
            if bit == "1":
                px, py = x0 + (c + 1) * unit, y0 + r * unit + unit // 2
                draw.rectangle([px, py, px + unit - 1, py + unit - 1], fill=(10, 10, 10))


def render(rng, items: list[dict], image_size: int, patch_size: int = 8) -> Image.Image:
    """Draw background, clutter, shapes and tags of a placed scene into an RGB image."""
    image = Image.fromarray(_background(rng, image_size))
    _draw_clutter(rng, ImageDraw.Draw(image), image_size)
    shapes = [it for it in items if it["kind"] == "shape"]
    image = Image.alpha_composite(image.convert("RGBA"),
                                  _draw_shapes(rng, shapes, image_size, patch_size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for tag in (it for it in items if it["kind"] == "tag"):
        _draw_tag(draw, tag, patch_size)
    return image


# --------------------------------------------------------------------------- records

def _record_rng(split: str, seed: int, index: int) -> np.random.Generator:
    # Fixed-length entropy: [split, seed, stream, index]; stream 0 = records, 1 = plan.
    return np.random.default_rng([SPLITS[split], seed, 0, index])


def _family_plan(split: str, n: int, seed: int, families: Sequence[str]) -> list[str]:
    """Families in shuffled blocks of one each: equal shares, and the plan for ``n``
    records is a prefix of the plan for more (a smaller set is a subset of a larger)."""
    plan: list[str] = []
    for block in range(-(-n // len(families))):
        order = np.random.default_rng([SPLITS[split], seed, 1, block]).permutation(len(families))
        plan.extend(families[i] for i in order)
    return plan[:n]


def make_scene(split: str, seed: int, index: int, family: str, k: int,
               image_size: int = 96, patch_size: int = 8) -> tuple[Image.Image, list[dict], dict]:
    """The scene behind record ``index``: (image, placed items, question fields). Training code
    that needs the objects of a scene (not just the record) uses this."""
    rng = _record_rng(split, seed, index)
    for _ in range(100):
        try:
            items, q = BUILDERS[family](rng, image_size, k, patch_size)
            break
        except LayoutError:
            continue
    else:
        raise RuntimeError(f"could not lay out {family} example {index}; image too small?")
    return render(rng, items, image_size, patch_size), items, q


def make_example(split: str, seed: int, index: int, family: str, k: int,
                 image_size: int = 96, patch_size: int = 8) -> dict:
    """One record (with its PIL image under ``"pil"``); ``k`` = index within the family."""
    image, _, q = make_scene(split, seed, index, family, k, image_size, patch_size)
    grid = image_size // patch_size
    return {
        "image": f"images/{split}_{seed}_{index:05d}.png",
        "question": q["question"],
        "answer": q["answer"],
        "family": family,
        "boxes": [list(t["box"]) for t in q["targets"]],
        "id": f"{split}-{seed}-{index:05d}",
        "subtype": q["subtype"],
        "image_size": [image_size, image_size],
        "patch_size": patch_size,
        "grid": [grid, grid],
        "pil": image,
    }


def generate(split: str, n: int, seed: int = 0, image_size: int = 96, patch_size: int = 8,
             out_dir: str | Path | None = None,
             families: Sequence[str] = FAMILIES) -> list[dict]:
    """Generate ``n`` records of ``split`` ('train', 'validation' or 'test').

    Families get equal shares (shuffled order); the first ``m`` records do not depend
    on ``n``, so a smaller set is a prefix of a larger one.  Without ``out_dir`` every record
    carries its PIL image under ``"pil"``.  With ``out_dir`` the images are written to
    ``out_dir/images/`` and the records to ``out_dir/<split>.jsonl``; the returned
    records then equal the JSONL lines (``image`` relative to ``out_dir``, no ``"pil"``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    for name, value in (("n", n), ("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "n" else 1):
            raise ValueError(f"{name} must be a whole number >= {0 if name == 'n' else 1}, got {value!r}")
    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    if isinstance(families, str) or not families:  # ('count' would be read letter by letter)
        raise ValueError(f"families must be a non-empty list of family names ({', '.join(FAMILIES)}), got {families!r}")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}")
    seen: Counter = Counter()
    records = []
    for index, family in enumerate(_family_plan(split, n, seed, tuple(families))):
        records.append(make_example(split, seed, index, family, seen[family],
                                    image_size, patch_size))
        seen[family] += 1
    if out_dir is not None:
        records = _write(records, Path(out_dir), split)
    return records


def _write(records: list[dict], out_dir: Path, split: str) -> list[dict]:
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines, plain = [], []
    for rec in records:
        rec = dict(rec)
        rec.pop("pil").save(out_dir / rec["image"], format="PNG", compress_level=6)
        plain.append(rec)
        lines.append(json.dumps(rec) + "\n")
    (out_dir / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return plain


# ---------------------------------------------------------------- loading and patches

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record_types(rec: dict, where: str) -> None:
    """Each field of a record has its type (``where``: ``FILE:LINE`` for the message)."""
    # image, question and answer are there (required); family and id are optional, but named in the
    # tables and kept apart by value
    for key in ("image", "question", "answer", "family", "id"):
        if key in rec and not isinstance(rec[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {json.dumps(rec[key])}")
    boxes = rec.get("boxes", [])
    if not isinstance(boxes, list) or not all(
        isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box) for box in boxes
    ):
        raise ValueError(f"{where}: boxes must be a list of [x0, y0, x1, y1] number lists, got {json.dumps(boxes)}")
    size = rec.get("image_size", [1, 1])
    if not (isinstance(size, list) and len(size) == 2 and all(_is_number(v) and v > 0 for v in size)):
        raise ValueError(f"{where}: image_size must be [width, height] in pixels, got {json.dumps(size)}")


def load_jsonl(path: str | Path) -> list[dict]:
    """Read records in the generator's JSONL format (also for a user's own data).

    Required keys: ``image`` (path relative to the JSONL's folder, or absolute),
    ``question``, ``answer``.  Optional: ``boxes`` (default ``[]``), ``family``
    (default ``"all"``), ``id`` (default ``"<file stem>-<line>"``).  ``image`` is
    returned as an absolute path and ``image_size`` ([width, height]) is filled in
    from the file when missing.
    """
    path = Path(path)
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}); give a JSONL file of records, one JSON "
                         "object per line") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({error.msg} at column {error.colno}); "
                             "each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{line_no}: a record must be a JSON object with image, question, answer")
        missing = {"image", "question", "answer"} - rec.keys()
        if missing:
            raise ValueError(f"{path}:{line_no}: missing keys {sorted(missing)}")
        _check_record_types(rec, f"{path}:{line_no}")
        image = Path(rec["image"])
        image = image if image.is_absolute() else (path.parent / image)
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{line_no}: no image at {image}")
        rec["image"] = str(image.resolve())
        rec.setdefault("boxes", [])
        rec.setdefault("family", "all")
        rec.setdefault("id", f"{path.stem}-{line_no}")
        try:  # opened even where the record gives its size: a corrupt image is named with its line now
            with Image.open(image) as im:  # (the header only: the pixels are read when the image is used)
                rec.setdefault("image_size", list(im.size))
        except OSError as error:
            raise ValueError(f"{path}:{line_no}: cannot read the image {image} ({error})") from None
        records.append(rec)
    return records


def load_image(record: dict, root: str | Path | None = None) -> Image.Image:
    """The record's RGB image: the in-memory ``"pil"`` if present, else from ``image``
    (resolved against ``root`` when relative)."""
    if record.get("pil") is not None:
        return record["pil"]
    path = Path(record["image"])
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    with Image.open(path) as im:
        return im.convert("RGB")


def relevant_patches(record: dict, image_size: int | Sequence[int], patch_size: int,
                     min_frac: float = 0.25) -> list[int]:
    """Sorted flat (row-major) indices of the patches the record's boxes cover.

    ``image_size`` (int or (width, height)) is the model's input size; boxes are scaled
    from the record's own ``image_size`` when it differs.  A patch counts when one box
    covers more than ``min_frac`` of its area; a box that covers no patch that much
    (e.g. a glyph straddling four patches) contributes its best-covered patch.
    """
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    src_w, src_h = record.get("image_size") or (width, height)
    sx, sy = width / src_w, height / src_h
    cols, rows = width // patch_size, height // patch_size
    area = float(patch_size * patch_size)
    edges_x = np.arange(cols + 1) * patch_size
    edges_y = np.arange(rows + 1) * patch_size
    hits: set[int] = set()
    for x0, y0, x1, y1 in record.get("boxes", []):
        ox = np.clip(np.minimum(edges_x[1:], x1 * sx) - np.maximum(edges_x[:-1], x0 * sx), 0, None)
        oy = np.clip(np.minimum(edges_y[1:], y1 * sy) - np.maximum(edges_y[:-1], y0 * sy), 0, None)
        frac = np.outer(oy, ox) / area  # rows x cols
        if frac.max() <= 0:
            continue
        chosen = np.flatnonzero(frac > min_frac)
        hits.update(chosen.tolist() if chosen.size else [int(frac.argmax())])
    return sorted(hits)


# ------------------------------------------------------------------------ vocabulary

def words(text: str) -> list[str]:
    """Split text the way the benchmark tokenizer does (lowercased)."""
    return WORD_RE.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word the generator can emit in a question or an answer, sorted."""
    fillers: Iterable[str] = [*COLOURS, *SHAPES, *PLURALS.values(), *SIZES, *RELATIONS.values(),
                              "digit", "letter", "yes", "no", *GLYPHS,
                              *(str(i) for i in range(MAX_COUNT + 1))]
    vocab = {w for t in TEMPLATES for w in words(re.sub(r"\{\w+\}", " ", t))}
    vocab.update(w for f in fillers for w in words(f))
    return sorted(vocab)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=tuple(SPLITS), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    records = generate(args.split, args.n, seed=args.seed, image_size=args.image_size,
                       patch_size=args.patch_size, out_dir=args.out)
    counts = Counter(r["family"] for r in records)
    print(f"wrote {len(records)} records to {Path(args.out) / (args.split + '.jsonl')}: "
          + ", ".join(f"{f}={counts[f]}" for f in FAMILIES if counts[f]))


if __name__ == "__main__":
    _main()
