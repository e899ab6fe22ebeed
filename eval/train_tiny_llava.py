"""Train the tiny LLaVA of the synthetic VQA benchmark (issue 5) on CPU, from random weights.

The model is a stock ``transformers.LlavaForConditionalGeneration``: a CLIP vision tower
(96x96 images, 8x8 patches -> 144 patch tokens + CLS), the standard two-layer GELU MLP
projector and a small Llama language model over the benchmark's word-level tokenizer.
``vision_feature_layer=-2`` and ``vision_feature_select_strategy="default"`` give 144 visual
tokens per image; the prompt holds 144 ``<image>`` placeholders (the saved ``LlavaProcessor``
expands the single ``<image>`` of ``vqa_tokenizer.prompt`` itself).

Training data: the ``train`` split of ``vqa_data`` (seed ``--data-seed``), an endless stream of
fresh images (record index 0, 1, 2, ...).  Every image comes with its benchmark question (the
exact record ``vqa_data.generate("train", ...)`` makes) plus up to ``--questions - 1`` extra
questions about the same scene, written with the benchmark's own templates from the scene's
objects (colour of the unique <shape>, shape of the unique <colour> object, counts, spatial
relations between uniquely named objects, existence of present/absent colour+shape pairs,
printed digit/letter).  Extra questions are only asked when their answer is unambiguous.
The LLM is supervised on answers only; attention is never supervised. The vision tower gets an
auxiliary per-patch loss (colour / shape / printed character of the object covering each patch,
through a linear head that is not saved), so its features name what each patch shows. Curriculum:
a share of simpler scenes (1..N objects) annealed over ``--curriculum-steps``. The LLM's linear
weights use a fan-in init (``--lm-init-scale``, see :func:`scale_lm_init`).

Efficiency: the questions of one image are packed into one sequence ``[<s> USER : <image>*144]
[q1 ASSISTANT : a1 </s>] [q2 ... ] ...`` with a block attention mask: each question segment sees
the image prefix and itself only, with positions continuing after the prefix, so every segment
computes exactly what the single-question prompt computes while the vision tower and the image
prefix are run once per image.  The loss is on the answer token and the ``</s>`` after it.

Model selection: exact-match accuracy of the greedy first answer token on ``--val-n`` records of
the ``validation`` split (teacher-forced argmax = greedy ``generate``'s first token).  The best
checkpoint is saved with ``save_pretrained`` (safetensors) together with the processor.  The
``test`` split is never used here; ``eval/eval_tiny_llava.py`` reports test accuracy with greedy
``generate``. ``--out`` (required) must be a new or empty folder unless ``--overwrite`` is given: the
first checkpoint replaces what is there.

Usage (the shipped ``vtoken/assets/tiny-llava`` came from these four runs on the grid-aligned
scenes, ~22 + ~19 + ~47 + ~96 min with two runs sharing two cores; logs in
``eval/results/training/``)::

    # 1. from scratch; only the vision tower and projector are kept (per-patch shape 0.97, char 1.00)
    OMP_NUM_THREADS=1 python eval/train_tiny_llava.py --steps 8000 --warmup 200 --curriculum-steps 1000 \
        --text-hidden 128 --eval-every 500 --val-n 400 --stop-after 1500 --out /tmp/tl/A
    # 2. a fresh LLM on that tower: 8 heads, RoPE base 1e7, word embeddings at std 1 (step 1000: 50.2% val)
    OMP_NUM_THREADS=1 python eval/train_tiny_llava.py --steps 7000 --warmup 100 --curriculum-steps 1000 \
        --simple-start 0.6 --simple-end 0.3 --text-hidden 128 --text-heads 8 --questions 12 \
        --rope-theta 1e7 --embed-init-std 1.0 --vision-from /tmp/tl/A --eval-every 500 --val-n 400 \
        --seed 1 --stop-after 1000 --out /tmp/tl/E
    # 3. continue with more printed tags and text answers weighted 3x (best: step 2500, 67.2% val)
    OMP_NUM_THREADS=1 python eval/train_tiny_llava.py --init /tmp/tl/E --start-index 200000 --steps 3500 \
        --warmup 30 --curriculum-steps 1 --simple-start 0.3 --simple-end 0.3 --simple-tags 1 2 \
        --text-weight 3 --questions 12 --eval-every 500 --val-n 400 --seed 2 --stop-after 2500 \
        --out /tmp/tl/F
    # 4. cosine per-patch head on the projected tokens, spatial and text questions sampled 4x
    #    (text questions on validation: 6% at step 1000, 56% at 1500, 100% at 4000;
    #    best: the last step, 5000, 90.25% val; log stage4_shipped.log)
    OMP_NUM_THREADS=1 python eval/train_tiny_llava.py --init /tmp/tl/F --start-index 600000 --steps 5000 \
        --warmup 50 --curriculum-steps 1 --simple-start 0.3 --simple-end 0.3 --simple-tags 1 2 \
        --text-weight 3 --questions 12 --lr 3e-4 --aux-warmup 150 --family-weights spatial=4 text=4 \
        --aux-projected-weight 1 --eval-every 500 --val-n 400 --seed 5 --time-limit 105 \
        --out vtoken/assets/tiny-llava --overwrite

What moved the LLM off its plateau (same steps, validation accuracy at step 1000 of stage 2 and
its ablations): 8 heads of 16 with RoPE base 1e4: 39.5% (ablation B, trained from scratch); base
1e7: 44.0% (D); base 1e7 and embeddings at std 1: 50.2% (E).  With 16-dim heads and base 1e4 only
a few rotary pairs turn slowly enough over the 144 visual positions for a question word to match a
patch by content; at std 0.02 a word's embedding is ~1% of its residual stream once the first
attention layer has added visual-token values (norm ~25).

What made it read the printed characters (stage 4): after stage 3 the model answered text questions
from the prior even about a lone tag on an empty image (10%), although a least-squares probe read
the character from the projected tokens the LLM receives at 0.988: tags had cosine 0.997 with each
other, the character a sliver beside a common "white tag" direction (``python
eval/results/training/probes.py /tmp/tl/F``, output in ``probes_stage3_F.log`` there). Stage 4 adds
a per-patch loss on the projected tokens through a cosine head (:class:`CosineHead`), which can
only lower its loss by making the character a large share of the token; its character accuracy rose
from 0.32 (step 675) to 0.96 (step 2225) and the text answers followed (100% at step 3000, run G
below). In the shipped model tags have cosine 0.263 with each other and a lone tag is read every
time (``probes_shipped.log``; run G: 0.284, ``probes_run_G.log``). Not established: whether
the cosine form matters, or whether stage 4 without the projected loss gets there too. The runs
that would tell (a linear head on RMS-normalised tokens, since replaced by the cosine head,
ablation Y1; no projected loss, text and spatial sampled 2x, ablation W2) were stopped near step
700, before the cosine run's text answers had moved either (at step 675 Y1 read characters from
the projected tokens at 0.27, the cosine run at 0.32). Spatial questions stay at their prior (50%)
although the projected tokens now give each patch's column at 0.999: the LLM has not learnt to
compare two objects' positions.

Reproducibility of stage 4, from the same stage-3 weights. Test: unpruned accuracy on 1000 test
records by ``eval/eval_tiny_llava.py --model DIR`` (shipped: ``eval/results/tiny_llava.md``; seed
25: ``eval/results/training/rerun_stage4_seed25_test.md``; run G: ``eval/results/tiny_llava.md`` as
of commit 17b87f5). Seed 25 is the stage-4 command above with ``--seed 25`` and a fresh ``--out``
instead of ``vtoken/assets/tiny-llava --overwrite``:

=====================================  ========  ======  =====  ====================================
run                                    val       test    text   log
=====================================  ========  ======  =====  ====================================
seed 5, 5000 steps (shipped)           90.25     89.6    100    ``stage4_shipped.log``
seed 25, 5000 steps                    85.00     85.8    78.5   ``rerun_stage4_seed25.log``
seed 5, stopped at 3717 (run G)        88.75     87.2    100    ``stage4_run_G.log``
seed 15, stopped at 2909 (50 min)      73.25     --      --     ``rerun_stage4_seed15_partial.log``
=====================================  ========  ======  =====  ====================================

Run G (seed 5, stopped by a 65-minute limit) was the previously shipped model; it ran before the
question stream stopped depending on PYTHONHASHSEED (existence questions were listed in set order),
so it saw other questions than the 5000-step seed-5 run. The three runs that got past step 3700
land within 3.8 points of each other on test (85.8 to 89.6, all above the 85% bar); what varies is
when the printed letters are learnt. Seed 25 was at 46% of the text questions at step 3500 and 61%
at 4500; when the learning rate had decayed it read every digit and most letters but not l, p, r
and x (right answers per character on lone tags beside two shapes, ``probes_rerun_seed25.log``: l
1/5, p 1/7, r 0/3, x 0/9), 78.5% of the test's text questions. Seed 15 was at 34% when its time ran
out. A rerun whose validation text accuracy is still climbing at its last step may gain from more
steps (not tested). Stages 1 to 3 were not rerun: they ran before the hash-seed fix, so their
exact streams are gone.

Not used for the shipped model: ``--background-dropout`` (ablation W4). The model counts by
proportion: shown only the counted objects' patches (the oracle at 1/9) it answers "5" whatever the
count (24 of 96 validation records right, random 33; ``probes_shipped.log``). Hiding random
background tokens during training made the oracle count better than random within 500 steps (a
hand check, not a committed result), but unpruned counting fell from 85% to 71% on validation by
step 1000 (ablation W4's log), so the shipped model keeps this weakness and the benchmark reports
it.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F

import vqa_data as D
from vqa_tokenizer import IMAGE, build_tokenizer, prompt
from output import add_output_arguments, claim

IMAGE_SIZE, PATCH_SIZE = 96, 8
SIDE = IMAGE_SIZE // PATCH_SIZE  # patches per row and column
N_PATCHES = SIDE ** 2  # 144 visual tokens per image


# ----------------------------------------------------------------------------- model

def build_model(tokenizer, vision_hidden=96, vision_layers=4, text_hidden=192, text_layers=4,
                seed=0, text_heads=None, rope_theta=10000.0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32), projection_dim=vision_hidden,
        hidden_act="gelu")
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=int(text_hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=text_layers, num_attention_heads=text_heads or max(1, text_hidden // 32),
        num_key_value_heads=text_heads or max(1, text_hidden // 32), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, rope_theta=rope_theta)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=N_PATCHES, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlavaForConditionalGeneration(config)
    _init_positions(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _vision_model(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)  # transformers 5: CLIPVisionModel is flat


def grid_position_code(side: int, dim: int) -> torch.Tensor:
    """A 2D sin/cos code of (row, column) for a ``side x side`` patch grid, row-major:
    ``[side * side, 4 * (dim // 4)]`` (sin and cos of each coordinate at ``dim // 4`` frequencies)."""
    quarter = dim // 4
    freqs = 1.0 / (side ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    code = []
    for pos in (rows.flatten().float(), cols.flatten().float()):
        ang = pos[:, None] * freqs[None, :] * math.pi / 2
        code += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(code, dim=1)


def _init_positions(model) -> None:
    """Initialise CLIP's learned position embeddings with a 2D sin/cos code (row, column).

    Only an initialisation (the embeddings stay trainable); it gives the patches a usable sense of
    where they are from step 0, which the spatial questions and locating named objects need."""
    emb = _vision_model(model).embeddings.position_embedding.weight
    code = grid_position_code(SIDE, emb.shape[1])  # (144, 4 * (dim // 4))
    with torch.no_grad():
        emb.zero_()
        emb[1:, : code.shape[1]] = code * 0.5  # index 0 is CLS
        emb.add_(torch.randn_like(emb) * 0.02)


def scale_lm_init(model, scale: float, embed_std: float = 0.0) -> None:
    """Re-draw the LLM's linear weights with std ``scale / sqrt(fan_in)``.

    transformers' Llama init (std 0.02) is sized for hidden widths in the thousands; at width 128 it
    makes attention logits ~16x flatter than a fan-in init, and the locating circuit (query from
    the question word, key from the patch) sat on a plateau for thousands of steps. Measured on
    clean symbolic patch inputs: attribute accuracy 0.50 at step 400 with 0.02, 0.75 at step 575
    with the fan-in init and still rising."""
    with torch.no_grad():
        for module in model.model.language_model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, scale * module.in_features ** -0.5)
        if embed_std:
            # Word embeddings at the scale of the sublayer outputs (and of the visual tokens, whose
            # norm grows to ~25): at 0.02 a question word's identity is ~1% of its residual stream
            # after the first attention layer, so later layers can no longer tell which word it was.
            model.model.language_model.embed_tokens.weight.normal_(0.0, embed_std)


def copy_vision(model, path: str) -> None:
    """Load the vision tower and projector of a saved model (same shapes) into ``model``."""
    from transformers import LlavaForConditionalGeneration

    source = LlavaForConditionalGeneration.from_pretrained(path)
    model.model.vision_tower.load_state_dict(source.model.vision_tower.state_dict())
    model.model.multi_modal_projector.load_state_dict(source.model.multi_modal_projector.state_dict())


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_resize=True, do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE)


def vision_features(model, pixel_values, with_hidden=False):
    """Projected visual tokens (B, 144, D), same as ``model.model.get_image_features`` with
    ``vision_feature_layer=-2`` but without running the (unused) last vision layer.  With
    ``with_hidden`` also the selected vision hidden states (B, 144, vision hidden)."""
    vm = _vision_model(model)
    h = vm.pre_layrnorm(vm.embeddings(pixel_values))
    for layer in vm.encoder.layers[:-1]:
        h = layer(h, None)
        if isinstance(h, tuple):
            h = h[0]
    proj = model.model.multi_modal_projector(h[:, 1:])
    return (proj, h[:, 1:]) if with_hidden else proj


# ------------------------------------------------------------------------------- data

def scene(split: str, seed: int, index: int, family: str, k: int):
    """The benchmark's own scene for a record, with its objects: (PIL image, items, record fields)."""
    return D.make_scene(split, seed, index, family, k, IMAGE_SIZE, PATCH_SIZE)


def extra_questions(items, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Unambiguous benchmark-template questions about a scene, grouped by family."""
    shapes = [it for it in items if it["kind"] == "shape"]
    tags = [it for it in items if it["kind"] == "tag"]
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    by_shape = Counter(o["shape"] for o in shapes)
    by_colour = Counter(o["colour"] for o in shapes)
    by_shape_size = Counter((o["shape"], o["size"]) for o in shapes)
    by_name = Counter((o["colour"], o["shape"]) for o in shapes)
    for o in shapes:
        if by_shape[o["shape"]] == 1:
            out["attribute"].append((D.Q_COLOUR.format(shape=o["shape"]), o["colour"]))
        elif by_shape_size[(o["shape"], o["size"])] == 1:
            out["attribute"].append((D.Q_COLOUR_SIZED.format(size=o["size"], shape=o["shape"]), o["colour"]))
        if by_colour[o["colour"]] == 1:
            out["attribute"].append((D.Q_SHAPE.format(colour=o["colour"]), o["shape"]))
    for s, n in by_shape.items():
        if n <= D.MAX_COUNT:
            out["count"].append((D.Q_COUNT_SHAPE.format(shapes=D.PLURALS[s]), str(n)))
    for c, n in by_colour.items():
        if n <= D.MAX_COUNT:
            out["count"].append((D.Q_COUNT_COLOUR.format(colour=c), str(n)))
    for (c, s), n in by_name.items():
        if n <= D.MAX_COUNT:
            out["count"].append((D.Q_COUNT_COLOUR_SHAPE.format(colour=c, shapes=D.PLURALS[s]), str(n)))
    unique = [o for o in shapes if by_name[(o["colour"], o["shape"])] == 1]
    rels = tuple(D.RELATIONS)
    for a, b in combinations(unique, 2):
        if rng.random() < 0.5:
            a, b = b, a
        for axis in (0, 1):
            gap = (a["box"][axis] + a["box"][axis + 2]) / 2 - (b["box"][axis] + b["box"][axis + 2]) / 2
            if abs(gap) < (D._side(a, PATCH_SIZE)[0] + D._side(b, PATCH_SIZE)[0]) / 2:
                continue
            true_rel = 2 * axis + int(gap > 0)
            yes = rng.random() < 0.5
            rel = rels[true_rel if yes else true_rel ^ 1]
            out["spatial"].append((D.Q_SPATIAL.format(a=D._name(a), relation=D.RELATIONS[rel], b=D._name(b)),
                                   "yes" if yes else "no"))
    present = set(by_name)
    absent = [(c, s) for c in D.COLOURS for s in D.SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    # by_name, not the set: a set of strings iterates in PYTHONHASHSEED order, which made every
    # run's question stream (and so its weights) differ from process to process
    yes_q = [(D.Q_EXIST.format(colour=c, shape=s), "yes") for c, s in by_name]
    pool = near if near and rng.random() < 0.5 else absent
    no_q = [(D.Q_EXIST.format(colour=c, shape=s), "no") for c, s in rng.sample(pool, min(len(pool), len(yes_q)))]
    out["exist"] = yes_q + no_q
    for kind, chars in (("digit", D.DIGITS), ("letter", D.LETTERS)):
        found = [t for t in tags if t["char"] in chars]
        if len(found) == 1:
            out["text"].append((D.Q_TEXT.format(kind=kind), found[0]["char"]))
    return out


def simple_scene(split: str, seed: int, index: int, n_objects: int, tags: tuple[int, int] = (0, 2)):
    """Curriculum scene: ``n_objects`` random shapes and ``tags`` (min, max) tags, rendered by ``vqa_data``.

    Drawn from the train split's seed space on a stream of its own (``vqa_data`` records use
    streams 0 and 1), so it never shares an image with validation or test."""
    rng = np.random.default_rng([D.SPLITS[split], seed, 7, index])
    for _ in range(100):
        items = [D._random_obj(rng) for _ in range(n_objects)]
        items += [D._tag(D._pick(rng, tuple(D.GLYPHS))) for _ in range(int(rng.integers(tags[0], tags[1] + 1)))]
        try:
            D._place(rng, items, IMAGE_SIZE, PATCH_SIZE)
            break
        except D.LayoutError:
            continue
    return D.render(rng, items, IMAGE_SIZE, PATCH_SIZE), items


class Stream:
    """Endless train-split images, each with its benchmark question + extra questions.

    Curriculum: with probability ``p_simple`` an image is instead a simple scene of 1..``max_objects``
    random objects (extra questions only); the caller anneals both over training."""

    def __init__(self, split="train", seed=0, questions=8, start=0, rng_seed=0):
        self.split, self.seed, self.questions = split, seed, questions
        self.index = start
        self.simple_index = start
        self.p_simple, self.max_objects = 0.0, 6
        self.simple_tags = (0, 2)
        self.focus = False
        self.focus_family = "attribute"
        self.family_weights = {f: 1.0 for f in D.FAMILIES}
        self.block = 10 ** 9
        self.plan: list[str] = []
        self.k = Counter()
        self.rng = random.Random(rng_seed)

    def next(self):
        if self.focus:
            # Warm-up on one family: 2-3 object scenes asked only questions of ``focus_family``
            # (attribute: locating a named object; text: looking at the tags at all).
            image, items = simple_scene(self.split, self.seed, self.simple_index, self.rng.randint(2, 3),
                                        self.simple_tags)
            self.simple_index += 1
            extra = extra_questions(items, self.rng)
            focused = {self.focus_family: extra[self.focus_family]} if extra.get(self.focus_family) else extra
            return image, self._sample([], set(), focused), items
        if self.p_simple > 0 and self.rng.random() < self.p_simple:
            image, items = simple_scene(self.split, self.seed, self.simple_index,
                                        self.rng.randint(1, self.max_objects), self.simple_tags)
            self.simple_index += 1
            return image, self._sample([], set(), extra_questions(items, self.rng)), items
        if self.index >= len(self.plan):
            self.plan = D._family_plan(self.split, self.index + 5000, self.seed, D.FAMILIES)
        family = self.plan[self.index]
        image, items, q = scene(self.split, self.seed, self.index, family, self.k[family])
        self.k[family] += 1
        self.index += 1
        qa = [(q["question"], q["answer"])]
        return image, self._sample(qa, {q["question"]}, extra_questions(items, self.rng)), items

    def _sample(self, qa, seen, extra):
        fams = [f for f in D.FAMILIES if extra.get(f)]
        tries = 0
        while len(qa) < self.questions and fams and tries < 4 * self.questions:
            tries += 1
            weights = [self.family_weights[f] for f in fams]
            # uniform draws keep the random stream of runs made before the option existed
            fam = self.rng.choice(fams) if len(set(weights)) == 1 else self.rng.choices(fams, weights)[0]
            question, answer = self.rng.choice(extra[fam])
            if question not in seen:
                seen.add(question)
                qa.append((question, answer))
        return qa


TEXT_MARK = D.Q_TEXT.split("}")[1]  # " is printed in the image?": only text questions have it
COLOUR_IDS = {c: i + 1 for i, c in enumerate(D.COLOURS)}
SHAPE_IDS = {c: i + 1 for i, c in enumerate(D.SHAPES)}
CHAR_IDS = {c: i + 1 for i, c in enumerate(D.GLYPHS)}
SIZE_IDS = {c: i + 1 for i, c in enumerate(D.SIZES)}
# colour, shape, printed character, object anchor (top-left patch of a shape), size; 0 = none
AUX_SIZES = (len(COLOUR_IDS) + 1, len(SHAPE_IDS) + 1, len(CHAR_IDS) + 1, 2, len(SIZE_IDS) + 1)


def patch_labels(items) -> torch.Tensor:
    """(5, 144) per-patch labels of a scene: colour, shape, printed character, "top-left patch
    of a shape" and size of the object whose block covers the patch (0 = none).

    Used by the auxiliary dense losses (heads that are not part of the saved model) and to tell
    background from evidence in :func:`drop_background`; answers and attention are not touched.
    The anchor label gives every object one patch that stands for it, which counting needs."""
    lab = np.zeros((len(AUX_SIZES), SIDE, SIDE), dtype=np.int64)
    for it in items:
        x0, y0, x1, y1 = (v // PATCH_SIZE for v in it["box"])
        if it["kind"] == "tag":
            lab[2, y0:y1, x0:x1] = CHAR_IDS[it["char"]]
        else:
            lab[0, y0:y1, x0:x1] = COLOUR_IDS[it["colour"]]
            lab[1, y0:y1, x0:x1] = SHAPE_IDS[it["shape"]]
            lab[4, y0:y1, x0:x1] = SIZE_IDS[it["size"]]
            lab[3, y0, x0] = 1
    return torch.from_numpy(lab.reshape(len(AUX_SIZES), -1))


POSITION_SIZES = (SIDE, SIDE)  # row, column of every patch


def position_labels(batch_size: int) -> torch.Tensor:
    """(B, 2, 144) row and column of each patch (same for every image)."""
    idx = torch.arange(N_PATCHES)
    return torch.stack([idx // SIDE, idx % SIDE])[None].expand(batch_size, -1, -1)


class CosineHead(torch.nn.Module):
    """Per-patch classifier on cosine similarity, ``scale * cos(feature, class weight)``.

    A linear head reaches any margin by growing its weights, so it can read a class from a sliver
    of the feature (printed characters are ~8% of a tag token beside a common "white tag"
    direction; tags have cosine 0.997 with each other).  With the norms fixed, the loss can only
    fall by making the class directions a large share of each token, which is what the LLM, which
    sees RMS-normalised tokens, needs in order to read them."""

    def __init__(self, dim: int, classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(classes, dim) * dim ** -0.5)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


def dense_loss(head, feats, labels, sizes):
    """Mean cross-entropy of a per-patch head over label groups (label 0 = none, counted
    as a class: the head must also say "no object here"); also the heads' logits."""
    parts = head(feats).split(sizes, dim=-1)
    loss = sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), labels[:, i].reshape(-1))
               for i, p in enumerate(parts)) / len(parts)
    return loss, parts


def labelled_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of per-patch ``logits`` on the patches whose label is not 0 (none); 0 if there are none."""
    has = labels > 0
    hit = logits.argmax(-1)[has] == labels[has]
    return hit.float().mean().item() if hit.numel() else 0.0


def drop_background(batch, labels: torch.Tensor, image_offset: int, rate: float, rng: random.Random) -> None:
    """Background dropout: for a share ``rate`` of the images, hide a random fraction (uniform in
    [0, 1)) of the visual tokens that show no object or tag from every query, in place.

    Without it the model counts by proportion (softmax attention averages over the 144 visual
    tokens): shown only the patches of the counted objects, as a query-aware pruner would, it
    answers "5" for any count.  Hiding background teaches counts that do not depend on how much
    background is left.  Object and tag tokens are never hidden, so every answer stays true, and
    no token is favoured over another by anything but its content.  ``labels``: the batch's
    :func:`patch_labels`, (B, 5, 144)."""
    mask = batch["mask"]
    for b, scene in enumerate(labels):
        if rng.random() >= rate:
            continue
        background = ((scene[0] == 0) & (scene[2] == 0)).nonzero().flatten().tolist()
        share = rng.random()
        hidden = [p for p in background if rng.random() < share]
        if hidden:
            cols = torch.tensor(hidden) + image_offset
            mask[b, 0, :, cols] = False
            mask[b, 0, cols, cols] = True  # a hidden token still attends to itself (no NaN row)


class Packer:
    """Token ids and block masks for image-prefix + packed question segments."""

    def __init__(self, tokenizer, image_processor, prompt_fn=None):
        self.tok, self.improc = tokenizer, image_processor
        self.prompt = prompt_fn or prompt  # the tiny Qwen passes its own prompt
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        ids = tokenizer(self.prompt("x"))["input_ids"]
        at = ids.index(self.image_id)
        self.prefix = ids[:at] + [self.image_id] * N_PATCHES
        self.cache: dict[str, list[int]] = {}

    def suffix(self, question: str) -> list[int]:
        if question not in self.cache:
            ids = self.tok(self.prompt(question))["input_ids"]
            self.cache[question] = ids[ids.index(self.image_id) + 1:]
        return self.cache[question]

    def batch(self, images, qas, with_eos=True):
        """-> dict(pixel_values, input_ids, mask (B,1,L,L) bool, position_ids, targets list of
        (b, position, token, is_answer, question index))."""
        P = len(self.prefix)
        seqs, segs = [], []
        for qa in qas:
            ids, seg = list(self.prefix), [0] * P
            for j, (q, a) in enumerate(qa, 1):
                s = self.suffix(q) + [self.tok.convert_tokens_to_ids(a)] + ([self.tok.eos_token_id] if with_eos else [])
                ids += s
                seg += [j] * len(s)
            seqs.append(ids)
            segs.append(seg)
        L = max(len(s) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, L), self.tok.pad_token_id, dtype=torch.long)
        seg_t = torch.full((B, L), -1, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        rows, cols, tgt, is_ans, qidx = [], [], [], [], []
        for b, (ids, seg) in enumerate(zip(seqs, segs)):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            seg_t[b, : len(seg)] = torch.tensor(seg)
            p, last = [], 0
            for i, s in enumerate(seg):
                if s == 0 or seg[i - 1] != s:
                    last = P if s else 0
                p.append(i if s == 0 else last + (i - seg.index(s)))
            pos[b, : len(p)] = torch.tensor(p)
            # targets: answer token predicted from the token before it; eos from the answer.
            j = 0
            for qi, (q, a) in enumerate(qas[b]):
                start = seg.index(qi + 1)
                n_suf = len(self.suffix(q))
                ans_pos = start + n_suf
                rows.append(b); cols.append(ans_pos - 1); tgt.append(ids[ans_pos]); is_ans.append(True); qidx.append(qi)
                if with_eos:
                    rows.append(b); cols.append(ans_pos); tgt.append(ids[ans_pos + 1]); is_ans.append(False); qidx.append(qi)
        q_seg, k_seg = seg_t[:, :, None], seg_t[:, None, :]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = causal & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
        mask |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
        pixels, extra = self.pixels(images)
        return {"pixel_values": pixels, "input_ids": input_ids, "mask": mask[:, None],
                "position_ids": pos, "rows": torch.tensor(rows), "cols": torch.tensor(cols),
                "targets": torch.tensor(tgt), "is_answer": torch.tensor(is_ans), **extra}

    def pixels(self, images):
        """(pixel values, other image inputs of the batch); the tiny Qwen adds its grids."""
        return self.improc(images=images, return_tensors="pt")["pixel_values"], {}


def packed_logits(model, batch, with_hidden=False):
    """Logits (N, V) at the target positions of a packed batch (and the vision hidden states)."""
    feats, hidden = vision_features(model, batch["pixel_values"], with_hidden=True)
    lm = model.model.language_model
    ids = batch["input_ids"]
    emb = lm.embed_tokens(ids)
    img = ids == model.config.image_token_id
    emb = emb.masked_scatter(img[..., None], feats.to(emb.dtype).reshape(-1, feats.shape[-1]))
    out = lm(inputs_embeds=emb, attention_mask=batch["mask"], position_ids=batch["position_ids"], use_cache=False)
    h = out.last_hidden_state[batch["rows"], batch["cols"]]
    logits = model.lm_head(h)
    return (logits, hidden, feats) if with_hidden else logits


# ------------------------------------------------------------------------- evaluation

def val_accuracy(model, packer, records, batch_size=32, logits_fn=None):
    """Greedy first-token exact match (teacher-forced argmax) per family on single-question records
    (``logits_fn``: :func:`packed_logits` unless given, e.g. the tiny Qwen's)."""
    logits_fn = logits_fn or packed_logits
    model.eval()
    correct, total = Counter(), Counter()
    with torch.no_grad():
        for s in range(0, len(records), batch_size):
            chunk = records[s: s + batch_size]
            batch = packer.batch([r["pil"] for r in chunk], [[(r["question"], r["answer"])] for r in chunk],
                                 with_eos=False)
            pred = logits_fn(model, batch).argmax(-1)
            for r, p, t in zip(chunk, pred.tolist(), batch["targets"].tolist()):
                total[r["family"]] += 1
                correct[r["family"]] += int(p == t)
    model.train()
    fam = {f: correct[f] / total[f] for f in sorted(total)}
    return sum(correct.values()) / max(1, sum(total.values())), fam


def save(model, processor, out: Path, info: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    (out / "training_state.txt").write_text(info + "\n")


# ------------------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=16, help="images per step")
    ap.add_argument("--questions", type=int, default=8, help="questions packed per image")
    ap.add_argument("--seed", type=int, default=0, help="init / sampling seed")
    ap.add_argument("--data-seed", type=int, default=0, help="vqa_data seed of the train/validation splits")
    ap.add_argument("--val-n", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vision-hidden", type=int, default=96)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=192)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--text-heads", type=int, default=None, help="LLM attention heads (default: hidden / 32)")
    ap.add_argument("--rope-theta", type=float, default=10000.0,
                    help="RoPE base of the LLM; a large base keeps more rotary pairs slow over the 144 visual "
                         "positions, so small heads can match question words to patches by content")
    ap.add_argument("--curriculum-steps", type=int, default=0,
                    help="anneal simple scenes over this many steps (0: no curriculum)")
    ap.add_argument("--focus-steps", type=int, default=0,
                    help="first steps on 2-3 object scenes with attribute questions only (locating warm-up)")
    ap.add_argument("--focus-family", default="attribute", choices=D.FAMILIES,
                    help="the family the --focus-steps warm-up asks about")
    ap.add_argument("--simple-start", type=float, default=0.8, help="share of simple scenes at step 0")
    ap.add_argument("--simple-end", type=float, default=0.3, help="share of simple scenes after the curriculum")
    ap.add_argument("--simple-tags", type=int, nargs=2, default=(0, 2), metavar=("MIN", "MAX"),
                    help="printed tags per simple scene (more tags: more text questions)")
    ap.add_argument("--text-weight", type=float, default=1.0,
                    help="loss weight of text-family answers (a scene has at most two text questions)")
    ap.add_argument("--family-weights", nargs="+", default=[], metavar="FAMILY=W",
                    help="sampling weights of the extra questions' families (default 1 each), e.g. "
                         "spatial=4 text=4: more of the questions a model is still answering from the prior")
    ap.add_argument("--aux-weight", type=float, default=1.0,
                    help="weight of the auxiliary per-patch colour/shape/character loss on the vision tower")
    ap.add_argument("--aux-projected-weight", type=float, default=0.0,
                    help="weight of a second per-patch loss (object labels plus row and column, cosine head) on "
                         "the projected visual tokens: it makes what tells tags and positions apart a large share "
                         "of each token, not a sliver beside a common component")
    ap.add_argument("--background-dropout", type=float, default=0.0,
                    help="share of images whose background tokens are partly hidden from the LLM (see "
                         "drop_background); 0: none")
    ap.add_argument("--aux-warmup", type=int, default=0,
                    help="steps during which the auxiliary loss trains only its head (use with --init)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward")
    ap.add_argument("--time-limit", type=float, default=0, help="stop after this many minutes (0: none)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop after this step, keeping the --steps learning-rate schedule (0: run all steps)")
    ap.add_argument("--init", default=None, help="resume weights from a saved model dir")
    ap.add_argument("--lm-init-scale", type=float, default=1.0,
                    help="std of the LLM's linear weights as a multiple of 1/sqrt(fan_in) (0: transformers' 0.02)")
    ap.add_argument("--embed-init-std", type=float, default=0.0,
                    help="std of the LLM's word embeddings at init (0: transformers' 0.02)")
    ap.add_argument("--vision-from", default=None,
                    help="start the vision tower and projector from a saved model dir (the LLM stays fresh)")
    ap.add_argument("--start-index", type=int, default=0, help="first train-split record index")
    add_output_arguments(ap, "model folder to save the best checkpoint in (new or empty)")
    args = ap.parse_args(argv)
    out = claim(args.out, args.overwrite, "*")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    random.seed(args.seed); np.random.seed(args.seed); torch.manual_seed(args.seed)

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    if args.init:
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(args.init)
    else:
        model = build_model(tokenizer, args.vision_hidden, args.vision_layers, args.text_hidden,
                            args.text_layers, args.seed, args.text_heads, args.rope_theta)
        if args.lm_init_scale:
            scale_lm_init(model, args.lm_init_scale, args.embed_init_std)
        if args.vision_from:
            copy_vision(model, args.vision_from)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M; args {vars(args)}", flush=True)
    packer = Packer(tokenizer, processor.image_processor)
    val = D.generate("validation", args.val_n, seed=args.data_seed, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    stream = Stream("train", args.data_seed, args.questions, start=args.start_index, rng_seed=args.seed)
    stream.simple_tags = tuple(args.simple_tags)
    stream.focus_family = args.focus_family
    for item in args.family_weights:
        family, _, weight = item.partition("=")
        if family not in stream.family_weights or not weight:
            ap.error(f"--family-weights takes FAMILY=WEIGHT with FAMILY one of {D.FAMILIES}, got {item!r}")
        stream.family_weights[family] = float(weight)

    aux_head = torch.nn.Linear(model.config.vision_config.hidden_size, sum(AUX_SIZES))
    proj_head = None  # built only when used: drawing its weights would shift earlier recipes' random streams
    if args.aux_projected_weight:
        proj_head = CosineHead(model.config.text_config.hidden_size, sum(AUX_SIZES) + sum(POSITION_SIZES))
    heads = list(aux_head.parameters()) + (list(proj_head.parameters()) if proj_head is not None else [])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n] + heads
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    dropout_rng = random.Random(args.seed + 1)
    best, t0 = -1.0, time.time()
    run_loss, run_acc, run_aux, run_n = 0.0, 0.0, 0.0, 0
    run_aux_acc = Counter()
    model.train()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        stream.focus = step <= args.focus_steps
        if args.curriculum_steps:
            t = min(1.0, max(0, step - 1 - args.focus_steps) / args.curriculum_steps)
            stream.p_simple = args.simple_start + (args.simple_end - args.simple_start) * t
            stream.max_objects = 1 + round(6 * t)
        images, qas, items = zip(*(stream.next() for _ in range(args.batch_size)))
        batch = packer.batch(list(images), list(qas))
        labels = torch.stack([patch_labels(it) for it in items])  # B, 5, 144
        if args.background_dropout:
            drop_background(batch, labels, len(packer.prefix) - N_PATCHES, args.background_dropout, dropout_rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits, hidden, projected = packed_logits(model, batch, with_hidden=True)
        logits = logits.float()
        if args.text_weight != 1.0:  # targets come as (answer, eos) per question, in batch order
            weights = torch.tensor([w for qa in qas for q, _ in qa
                                    for w in (args.text_weight if TEXT_MARK in q else 1.0, 1.0)])
            loss = (F.cross_entropy(logits, batch["targets"], reduction="none") * weights).sum() / weights.sum()
        else:
            loss = F.cross_entropy(logits, batch["targets"])
        aux_loss = torch.zeros(())
        # a resumed run starts with fresh (unsaved) aux heads: fit them on frozen features first,
        # or their random gradients scramble the tower's features for the first hundred steps
        frozen = step <= args.aux_warmup
        if args.aux_weight > 0:
            feats_for_aux = hidden.detach() if frozen else hidden
            aux_loss, parts = dense_loss(aux_head, feats_for_aux.float(), labels, AUX_SIZES)
            aux_loss = args.aux_weight * aux_loss
            with torch.no_grad():  # shape / character accuracy on the patches that have one
                for name, i in (("shape", 1), ("char", 2)):
                    run_aux_acc[name] += labelled_accuracy(parts[i], labels[:, i])
        if args.aux_projected_weight > 0:
            feats_for_aux = (projected.detach() if frozen else projected).float()
            proj_labels = torch.cat([labels, position_labels(len(items))], dim=1)
            proj_loss, parts = dense_loss(proj_head, feats_for_aux, proj_labels, AUX_SIZES + POSITION_SIZES)
            aux_loss = aux_loss + args.aux_projected_weight * proj_loss
            with torch.no_grad():
                run_aux_acc["proj-char"] += labelled_accuracy(parts[2], labels[:, 2])
                run_aux_acc["proj-col"] += (parts[-1].argmax(-1) == proj_labels[:, -1]).float().mean().item()
        run_aux += aux_loss.item()
        total = loss + aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + heads, 1.0)
        opt.step()
        with torch.no_grad():
            ans = batch["is_answer"]
            run_acc += (logits[ans].argmax(-1) == batch["targets"][ans]).float().mean().item()
        run_loss += loss.item(); run_n += 1
        if step % args.log_every == 0:
            el = time.time() - t0
            aux_acc = " ".join(f"aux-{k}-acc {v / run_n:.3f}" for k, v in run_aux_acc.items())
            print(f"step {step} loss {run_loss / run_n:.4f} aux {run_aux / run_n:.4f} {aux_acc} "
                  f"train-answer-acc {run_acc / run_n:.3f} "
                  f"lr {lr_at(step - 1):.2e} images {stream.index}+{stream.simple_index - args.start_index} "
                  f"max-objects {stream.max_objects} elapsed {el / 60:.1f}m", flush=True)
            run_loss, run_acc, run_aux, run_n = 0.0, 0.0, 0.0, 0
            run_aux_acc = Counter()
        last = (step == args.steps or step == args.stop_after
                or (args.time_limit and time.time() - t0 > args.time_limit * 60))
        if step % args.eval_every == 0 or last:
            acc, fam = val_accuracy(model, packer, val)
            el = time.time() - t0
            msg = " ".join(f"{f}={a:.3f}" for f, a in fam.items())
            flag = ""
            if acc > best:
                best = acc
                save(model, processor, out, f"step {step} val {acc:.4f} {msg} elapsed {el / 60:.1f}m "
                     f"next_train_index {stream.index}")
                flag = " (saved best)"
            print(f"[val] step {step} acc {acc:.4f} {msg} best {best:.4f} elapsed {el / 60:.1f}m{flag}", flush=True)
        if last:
            break
    print(f"done: best val {best:.4f}, wall {(time.time() - t0) / 60:.1f}m, train images {stream.index}", flush=True)


if __name__ == "__main__":
    main()
