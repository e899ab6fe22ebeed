"""Random vision-only models (CLIP / SigLIP vision towers, timm and open_clip ViTs) and the checks any
wrapped one must pass, from one seed each.

What is drawn: width, heads (head dims 4 to 32), depth 1 to 6, patch sizes (a timm patch may be
taller than wide), non-square grids, images whose sides leave pixels past the last patch, timm's class
token / registers / pooling / embedded-class / qkv-bias / q-k norm / layer scale / pre-norm /
dynamic image size and padding / fused attention, open_clip's layer scale / pooling / pre-norm, HF's
sdpa or eager attention, 1 to 4 images, and a method that runs on vision-only models with random
options (a budget, a vision layer, Representation Shift's merge mode, explicit stages).

The checks (:func:`check_vit_seed`): the method at keep-all is the plain model; at the drawn budget
the output has the plain model's shape (a pooled embedding, logits or the kept tokens), each image's
kept count is the budget, and each image alone gets what it gets in the batch; unwrap gives back the
weights, hooks and outputs bit for bit. ``tests/test_random_models.py`` runs a slice of seeds;
``eval/fuzz_models.py --vits`` runs fresh ones.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import vtoken
from wrap_checks import hook_count

KINDS = ("clip_vision", "siglip_vision", "timm", "open_clip_tower")
#: Methods that run on a vision-only model (every one prunes or merges inside the tower).
METHODS = ("random", "pool", "repshift", "tome", "visionzip")


@dataclass
class RandomViT:
    seed: int
    kind: str
    model: nn.Module
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # the model's own output, as one tensor
    images: torch.Tensor
    depth: int
    patches: int  # per image
    has_cls: bool
    drawn: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"seed {self.seed}: {self.kind} {self.drawn} images {tuple(self.images.shape)}"


def draw_vit(seed: int, kind: str | None = None) -> RandomViT:
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    heads = rng.choice([1, 2, 3, 4])
    width = heads * rng.choice([4, 8, 16, 32])
    depth = rng.randint(1, 6)
    torch.manual_seed(rng.randint(0, 10_000))
    build = {"clip_vision": _hf, "siglip_vision": _hf, "timm": _timm, "open_clip_tower": _open_clip}[kind]
    model, call, image, grid, has_cls, drawn = build(kind, rng, width, heads, depth)
    batch = rng.randint(1, 4)
    images = torch.randn(batch, 3, *image, generator=torch.Generator().manual_seed(seed))
    drawn = dict(drawn, width=width, heads=heads, depth=depth, grid=grid)
    return RandomViT(seed, kind, model.eval(), call, images, depth, grid[0] * grid[1], has_cls, drawn)


def _hf(kind: str, rng: random.Random, width: int, heads: int, depth: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    patch, side = rng.choice([4, 7, 8]), rng.randint(2, 8)
    size = patch * side + rng.choice([0, 0, rng.randint(1, patch - 1)])  # leftover pixels past the last patch
    config = dict(hidden_size=width, intermediate_size=rng.choice([width, 2 * width, 37]), num_hidden_layers=depth,
                  num_attention_heads=heads, image_size=size, patch_size=patch)
    model = CLIPVisionModel(CLIPVisionConfig(**config)) if kind == "clip_vision" else SiglipVisionModel(SiglipVisionConfig(**config))
    attention = rng.choice(["sdpa", "eager"])
    model.set_attn_implementation(attention)
    pooled = rng.random() < 0.5

    def call(m, x):
        out = m(pixel_values=x)
        return out.pooler_output if pooled else out.last_hidden_state

    return model, call, (size, size), (side, side), kind == "clip_vision", dict(patch=patch, image=size, attn=attention,
                                                                                 output="pooled" if pooled else "tokens")


def _timm(kind: str, rng: random.Random, width: int, heads: int, depth: int):
    from timm.models.vision_transformer import VisionTransformer

    tall = rng.choice([4, 8])
    wide = tall if rng.random() < 0.85 else rng.choice([4, 8])
    rows, cols = rng.randint(2, 8), rng.randint(2, 8)
    class_token = rng.random() < 0.75
    options = dict(img_size=(tall * rows, wide * cols), patch_size=(tall, wide), embed_dim=width, depth=depth,
                   num_heads=heads, num_classes=rng.choice([0, 7]), mlp_ratio=rng.choice([1.0, 2.0]),
                   class_token=class_token, global_pool=rng.choice(["token", "avg"] if class_token else ["avg", "max"]),
                   reg_tokens=rng.choice([0, 0, 2]), no_embed_class=rng.random() < 0.3, qkv_bias=rng.random() < 0.8,
                   qk_norm=rng.random() < 0.15, pre_norm=rng.random() < 0.2,
                   init_values=0.1 if rng.random() < 0.2 else None, dynamic_img_size=rng.random() < 0.25)
    model = VisionTransformer(**options)
    fused = rng.random() < 0.5
    for block in model.blocks:
        block.attn.fused_attn = fused
    features = rng.random() < 0.5

    def call(m, x):
        return m.forward_features(x) if features else m(x)

    drawn = {k: v for k, v in options.items() if k not in ("embed_dim", "depth", "num_heads")}
    return model, call, (tall * rows, wide * cols), (rows, cols), class_token, dict(drawn, fused_attn=fused,
                                                                                     output="tokens" if features else "head")


def _open_clip(kind: str, rng: random.Random, width: int, heads: int, depth: int):
    from open_clip.transformer import VisionTransformer

    patch, rows = rng.choice([4, 8]), rng.randint(2, 8)
    cols = rows if rng.random() < 0.6 else rng.randint(2, 8)
    options = dict(image_size=(patch * rows, patch * cols), patch_size=patch, width=width, layers=depth, heads=heads,
                   mlp_ratio=rng.choice([1.0, 2.0]), output_dim=16, ls_init_value=0.1 if rng.random() < 0.2 else None,
                   pool_type=rng.choice(["tok", "avg"]), no_ln_pre=rng.random() < 0.2)
    model = VisionTransformer(**options)
    return model, (lambda m, x: m(x)), (patch * rows, patch * cols), (rows, cols), True, {
        k: v for k, v in options.items() if k not in ("width", "layers", "heads")}


def draw_options(method: str, vit: RandomViT, rng: random.Random) -> dict:
    """A budget and the method's own options (a vision layer, merge mode, explicit stages)."""
    last = vit.depth - 1
    if method == "tome":
        return {"r": rng.randint(1, max(1, vit.patches // (2 * vit.depth)))}
    options: dict = {"keep": rng.choice([0.25, 0.5])} if rng.random() < 0.7 else {"keep_tokens": rng.randint(1, vit.patches)}
    if method in ("random", "pool") and rng.random() < 0.5:
        options.update(site="vision", layer=rng.randint(0, last))
    if method == "random" and vit.depth > 1 and "keep" in options and rng.random() < 0.3:
        first = rng.randint(0, last - 1)
        keep = options.pop("keep")
        options.pop("site", None), options.pop("layer", None)
        options["stages"] = [{"site": "vision", "layer": first, "keep": min(1.0, 2 * keep)},
                             {"site": "vision", "layer": rng.randint(first + 1, last), "keep": keep}]
    if method == "repshift":
        if rng.random() < 0.4:
            options["layer"] = rng.randint(0, last)
        if rng.random() < 0.3:
            options["mode"] = "merge"
    if method == "visionzip" and rng.random() < 0.4:
        options["vision_layer"] = rng.randint(0, last)
    return options


def _kept_counts(options: dict, patches: int) -> int | None:
    """Patches each image keeps after the last stage (None where the method decides: ToMe)."""
    if "r" in options:
        return None
    stage = (options.get("stages") or [options])[-1]
    if "keep_tokens" in stage:
        return stage["keep_tokens"]
    return max(1, round(stage["keep"] * patches))


def check_vit_seed(seed: int, kind: str | None = None, method: str | None = None) -> list[str]:
    """Every check on the seed's random ViT; the failures, as sentences (empty: it passed). A one-line
    ValueError of vtoken's at wrap is a refusal, not a failure (a method the tower cannot serve)."""
    vit = draw_vit(seed, kind)
    rng = random.Random(seed + 1)
    method = method or rng.choice(METHODS)
    options = draw_options(method, vit, rng)
    model, x, failures = vit.model, vit.images, []
    with torch.no_grad():
        plain = vit.call(model, x)
    state = copy.deepcopy(model.state_dict())
    hooks = hook_count(model)
    keep_all = {"r": 0} if method == "tome" else {k: v for k, v in options.items() if k not in ("keep", "keep_tokens", "stages")}
    if method != "tome":
        keep_all["keep"] = 1.0
    for label, wrap_options in (("keep all", keep_all), ("budget", options)):
        try:
            vtoken.wrap(model, method, **wrap_options)
        except ValueError as error:
            if "\n" in str(error).strip():
                failures.append(f"{label}: a refusal of several lines: {error}")
            if hook_count(model) != hooks or vtoken.is_wrapped(model):
                failures.append(f"{label}: a refused wrap left the model changed")
            continue
        try:
            with torch.no_grad():
                out = vit.call(model, x)
                if label == "keep all":
                    if out.shape != plain.shape or not torch.allclose(out, plain, rtol=0, atol=1e-5):
                        failures.append("keep all: the output differs from the plain model's")
                else:
                    failures += _budget_failures(vit, model, x, out, plain, options, method)
        except Exception as error:  # noqa: BLE001 - any error from a wrapped call is what the check looks for
            failures.append(f"{label}: {type(error).__name__}: {error}")
        finally:
            vtoken.unwrap(model)
        with torch.no_grad():
            again = vit.call(model, x)
        if not torch.equal(again, plain) or hook_count(model) != hooks or any(
                not torch.equal(v, state[k]) for k, v in model.state_dict().items()):
            failures.append(f"{label}: unwrap did not give the model back (outputs, hooks or weights)")
    return [f"{vit.describe()}\n  {method} {options}: {f}" for f in failures]


def _budget_failures(vit: RandomViT, model, x, out, plain, options, method) -> list[str]:
    failures = []
    pooled = out.dim() == 2
    if pooled and out.shape != plain.shape:
        failures.append(f"budget: output of shape {tuple(out.shape)} where the plain model's is {tuple(plain.shape)}")
    if not bool(torch.isfinite(out).all()):
        failures.append("budget: an output that is not finite")
    selection = vtoken.selection(model)
    kept = _kept_counts(options, vit.patches)
    if len(selection) != x.shape[0]:
        failures.append(f"budget: {len(selection)} selections for {x.shape[0]} images")
    elif kept is not None and method != "pool" and any(len(list(s.values())[-1]) != kept for s in selection):
        failures.append(f"budget: kept {[len(list(s.values())[-1]) for s in selection]} patches, not {kept} each")
    for b in range(x.shape[0]):
        alone = vit.call(model, x[b : b + 1])
        if alone.shape[1:] != out.shape[1:] or not torch.allclose(alone[0], out[b], rtol=0, atol=1e-4):
            failures.append(f"budget: image {b} alone differs from the batch's")
            break
    return failures
