"""Image/caption pairs and a zero-shot classification task for the tiny CLIP (vision-only family).

Images are drawn with the synthetic VQA benchmark's own machinery (``vtoken.vqa.data``: textured
grey canvas, grey clutter, anti-aliased coloured shapes and white tags with 5x7 glyphs, laid out on
the 8 px patch grid of a 96 px image: 12x12 = 144 patch tokens), and every caption is written from
the scene's objects, never from pixels.

Two kinds of scene:

* **subject scenes** (:func:`scene`, the CLIP data proper): exactly one *large* shape (a 3x3 block
  of patches, the subject), 2 to 4 *small* shapes (2x2 patches each, random colour and shape, so
  they share the subject's colour or shape by chance) and 0 to 2 tags.  The same scene can be
  built for any (split, seed, index).
* **benchmark scenes** (:func:`benchmark_scene`): the exact images of the VQA benchmark's records
  (``vtoken.vqa.data.generate(split, n, seed)``, record ``index``), captioned the same way.  They
  hold any number of large shapes, so they take part in training and retrieval, not in the
  classification task.

Caption (:func:`caption`): every object, shapes in reading order (top-left first) then tags, e.g.
``"a small blue square, a large red circle and a small green star, tags reading 7 and k"``.
Training captions (:func:`training_caption`) mention a random non-empty subset of the objects in a
random order (a quarter of them the full caption, a quarter the subject alone), so short
descriptions such as the class prompts are in the caption distribution.  A caption is *true* of a
scene when the multiset of its mentions (size, colour, shape / tag character) is contained in the
scene's (:func:`caption_true`); training uses that to avoid false negatives.

**Zero-shot task** (:data:`CLASSES`, :func:`label`): *the colour and shape of the one large shape
in a subject scene*; 6 colours x 5 shapes = 30 classes (chance 1/30 = 3.3%), prompt
``"a large red circle"`` (:func:`class_prompt`).  The evidence is 9 of the 144 patches, and the
small shapes are distractors of the same colours and shapes, so the answer needs the subject's
patches, its size and the binding of its colour to its shape: what token pruning can lose.
Colour-only (6 classes) and shape-only (5 classes) accuracy follow from the same prediction.

Splits are separated by seed as in the VQA data: every random stream starts from
``[SPLITS[split], seed, STREAM, index]`` (stream 7 here; the VQA records use 0 and 1), so
``train``, ``validation`` and ``test`` never share an image; images depend on nothing else
(not on ``n``, the batch or the hash seed).

CLI (writes ``<out>/<split>.jsonl`` with image paths, captions and labels, and the PNGs)::

    python eval/clip_data.py --split test --n 500 --out eval/data/clip_test
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from vtoken.vqa import data as D

IMAGE_SIZE, PATCH_SIZE = 96, 8
GRID = IMAGE_SIZE // PATCH_SIZE  # 12 patches per side, 144 patch tokens
STREAM = 7  # random-stream id of subject scenes (vtoken.vqa.data uses 0 and 1)
COLOURS, SHAPES = tuple(D.COLOURS), D.SHAPES
CLASSES = tuple((c, s) for c in COLOURS for s in SHAPES)  # 30 (colour, shape) pairs
CHANCE = 1 / len(CLASSES)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
MAX_TEXT_LEN = 64  # tokens; the longest benchmark-scene caption is about 55
SPECIAL_TOKENS = (PAD, BOS, UNK, EOS)  # ids 0..3: EOS must not be id 2 (CLIP's legacy pooling rule)


# ------------------------------------------------------------------------------ scenes

def _rng(split: str, seed: int, index: int, stream: int = STREAM) -> np.random.Generator:
    if split not in D.SPLITS:
        raise ValueError(f"split must be one of {tuple(D.SPLITS)}, got {split!r}")
    return np.random.default_rng([D.SPLITS[split], seed, stream, index])


def scene(split: str, seed: int, index: int):
    """Subject scene ``index`` of ``split``: (PIL image, placed items); ``items[0]`` is the subject."""
    rng = _rng(split, seed, index)
    for _ in range(100):
        subject = D._obj(D._pick(rng, SHAPES), D._pick(rng, COLOURS), "large")
        small = [D._obj(D._pick(rng, SHAPES), D._pick(rng, COLOURS), "small")
                 for _ in range(int(rng.integers(2, 5)))]
        tags = [D._tag(D._pick(rng, tuple(D.GLYPHS))) for _ in range(int(rng.integers(0, 3)))]
        items = [subject] + small + tags
        try:
            D._place(rng, items, IMAGE_SIZE, PATCH_SIZE)
            break
        except D.LayoutError:
            continue
    else:  # pragma: no cover - 96 px always has room for 1 large + 4 small + 2 tags
        raise RuntimeError(f"could not lay out subject scene {index}")
    return D.render(rng, items, IMAGE_SIZE, PATCH_SIZE), items


def benchmark_scene(split: str, seed: int, index: int):
    """The VQA benchmark's image of record ``index`` (``vtoken.vqa.data.generate(split, n, seed)``
    for any ``n > index``): (PIL image, placed items)."""
    # The plan is shuffled blocks of one record per family (``vtoken.vqa.data._family_plan``):
    # record ``index`` is in block ``index // 5``, and its index within its family is that block.
    block, fams = divmod(index, len(D.FAMILIES))[0], D.FAMILIES
    order = np.random.default_rng([D.SPLITS[split], seed, 1, block]).permutation(len(fams))
    family = fams[order[index % len(fams)]]
    image, items, _ = D.make_scene(split, seed, index, family, block, IMAGE_SIZE, PATCH_SIZE)
    return image, items


def label(items) -> int:
    """Class index of a subject scene: the (colour, shape) of its one large shape."""
    large = [it for it in items if it["kind"] == "shape" and it["size"] == "large"]
    if len(large) != 1:
        raise ValueError(f"the task needs exactly one large shape, the scene has {len(large)}")
    return CLASSES.index((large[0]["colour"], large[0]["shape"]))


def class_prompt(cls: int | tuple[str, str]) -> str:
    colour, shape = CLASSES[cls] if isinstance(cls, int) else cls
    return _mention_text(("large", colour, shape))


def class_prompts() -> list[str]:
    return [class_prompt(i) for i in range(len(CLASSES))]


# ---------------------------------------------------------------------------- captions

def mention(item) -> tuple:
    """What a caption says about one object: (size, colour, shape) or ("tag", char)."""
    return ("tag", item["char"]) if item["kind"] == "tag" else (item["size"], item["colour"], item["shape"])


def _reading_order(items):
    return sorted(items, key=lambda it: (it["box"][1], it["box"][0]))


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _mention_text(m: tuple) -> str:
    size, colour, shape = m
    return f"a {size} {colour} {shape}"


def caption_of(mentions: Sequence[tuple]) -> str:
    """Caption text of a sequence of mentions, in that order (tags gathered at the end)."""
    shapes = [_mention_text(m) for m in mentions if m[0] != "tag"]
    chars = [m[1] for m in mentions if m[0] == "tag"]
    parts = [_join(shapes)] if shapes else []
    if chars:
        parts.append(("a tag reading " if len(chars) == 1 else "tags reading ") + _join(chars))
    return ", ".join(parts)


def caption(items) -> str:
    """The full caption of a scene: every shape in reading order, then every tag."""
    shapes = _reading_order([it for it in items if it["kind"] == "shape"])
    tags = _reading_order([it for it in items if it["kind"] == "tag"])
    return caption_of([mention(it) for it in shapes + tags])


def training_caption(items, rng: random.Random, full: float = 0.25, subject: float = 0.25):
    """A caption for training and its mentions: with probability ``full`` the full caption, with
    ``subject`` the large shape alone (when there is exactly one), else a random non-empty subset
    of the objects in random order."""
    ms = [mention(it) for it in items]
    large = [m for m in ms if m[0] == "large"]
    u = rng.random()
    if u < full:
        chosen = [mention(it) for it in _reading_order([i for i in items if i["kind"] == "shape"])]
        chosen += [mention(it) for it in _reading_order([i for i in items if i["kind"] == "tag"])]
    elif u < full + subject and len(large) == 1:
        chosen = large
    else:
        k = rng.randint(1, len(ms))
        chosen = rng.sample(ms, k)
    return caption_of(chosen), chosen


def caption_true(caption_mentions: Sequence[tuple], scene_mentions: Sequence[tuple] | Counter) -> bool:
    """Whether every mention of a caption is in the scene, with multiplicity."""
    have = scene_mentions if isinstance(scene_mentions, Counter) else Counter(scene_mentions)
    need = Counter(caption_mentions)
    return all(have[m] >= n for m, n in need.items())


def vocabulary() -> list[str]:
    """Every word a caption or a class prompt can contain, sorted."""
    vocab = {"a", "and", "tag", "tags", "reading", ",", *D.SIZES, *COLOURS, *SHAPES}
    vocab.update(D.GLYPHS)
    return sorted(vocab)


def build_tokenizer(save_dir: str | Path | None = None):
    """Word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (built offline): lowercased,
    split like ``tokenizers``' Whitespace pre-tokenizer, ``<s> ... </s>`` around every text (the
    CLIP text tower pools at ``</s>``), right padding."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="right", model_max_length=MAX_TEXT_LEN, clean_up_tokenization_spaces=True)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


# ------------------------------------------------------------------------------ records

def records(split: str, n: int, seed: int = 0, start: int = 0) -> list[dict]:
    """Subject scenes ``start .. start+n-1`` of ``split`` as dicts: ``pil``, ``items``, ``caption``
    (full), ``label``, ``id``.  The first records do not depend on ``n``."""
    out = []
    for index in range(start, start + n):
        image, items = scene(split, seed, index)
        out.append({"id": f"clip-{split}-{seed}-{index:05d}", "pil": image, "items": items,
                    "caption": caption(items), "label": label(items)})
    return out


def benchmark_records(split: str, n: int, seed: int = 0) -> list[dict]:
    """The first ``n`` VQA benchmark images of ``split`` with their full captions (no label)."""
    out = []
    for index in range(n):
        image, items = benchmark_scene(split, seed, index)
        out.append({"id": f"{split}-{seed}-{index:05d}", "pil": image, "items": items,
                    "caption": caption(items), "label": None})
    return out


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=tuple(D.SPLITS), required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--benchmark", action="store_true", help="caption the VQA benchmark's images instead")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    make = benchmark_records if args.benchmark else records
    lines = []
    for rec in make(args.split, args.n, args.seed):
        path = f"images/{rec['id']}.png"
        rec.pop("pil").save(out / path)
        rec.pop("items")
        lines.append(json.dumps({"image": path, **rec}) + "\n")
    (out / f"{args.split}.jsonl").write_text("".join(lines), encoding="utf-8")
    print(f"wrote {len(lines)} records to {out / (args.split + '.jsonl')}")


if __name__ == "__main__":
    _main()
