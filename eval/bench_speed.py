"""Speed of every method on a random-weight LLaVA-1.5 shape scaled to run on 2 CPU cores (issue
"Speed that holds up"), unpruned against pruned at 64 / 128 / 192 of 576 visual tokens (``--family``:
the same on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT and LLaVA-OneVision shapes, see below):

- time to the first token at batch 1 (a prefill with the KV cache, logits of the last position);
- each method against its own oracle, at batch 1. The *replay* (``eval/replay_strategy.py``) runs the
  method once, records every stage's reduction, then runs the same stages handing those reductions
  back with no scoring and no signal (no attention rows, no observers, no probe step): the method's
  schedule through vtoken's machinery, the fastest that schedule can be in vtoken; its logits must
  equal the method's (checked, ``--replay-atol``). ``scoring = method - replay``. Where the schedule
  sits in front of the LLM or inside it (projector and LLM stages: random, pool, VisionZip,
  ZOO-Prune, VFlowOpt, FastV, TransPrune) a hand-written *oracle* runs the unwrapped model on the
  same schedule (encode, project, the LLM on the text and the kept visual tokens, gathering the kept
  rows before each pruning layer; merged vectors taken from the recording; its logits are compared
  too), and ``machinery = replay / oracle - 1``. For vision-site (ToMe, Representation Shift) and mask
  (AIF) schedules the replay is the oracle, and vtoken's fixed machinery cost is measured as the
  replay of the method's keep-all schedule (every stage installed, nothing dropped, nothing scored)
  against the unwrapped model run beside it in the same round. A profile (torch.profiler, one prefill) says where the largest scoring
  overheads go;
- generate throughput (tokens/s, 32 new tokens, greedy) at batch 1, 8 and 16 with prompts of mixed
  lengths and left padding, every method at 64 tokens, and each batch's speed-up against the
  batch-1 speed-up of the same measure;
- peak memory (CPU: the rise of the process's peak RSS, reset before each call through
  ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``), the KV cache's bytes after a
  batch-1 prefill (read from the cache's layers) next to ``vtoken.kv_cache_bytes``'s prediction, and
  the decode latency per token at batch 1.

Targets (shown per method): machinery within 5% of the oracle; scoring under 2% of the unpruned
prefill for every training-free method, except where the paper's own algorithm costs more: its
scoring FLOPs from ``vtoken.flops`` are 2% or more of the unpruned prefill's, or its least work,
timed on the same shapes (``eval/scoring_floor.py``: a whole attention map's scores and exponentials,
which FLOPs do not count), takes 2% or more of the unpruned prefill's time (the table gives every
share); the speed-up at batch 8 and 16 at least 90% of the batch-1 speed-up. Verdicts are the
medians'; each overhead also gets a 95% interval of its median (sign-test order statistics over the
rounds; with fewer than 6 rounds the min-max, named by its lower coverage, :func:`interval_name`), and
a verdict whose interval holds values on both sides of the target is marked *within noise*. Beside the
scoring estimate (method - replay, a difference of two prefills) the time inside the strategy's own calls is measured directly (``StrategyCallTime``; CPU only): a few milliseconds
timed as such, a lower bound of the scoring that the machine's noise hardly moves. Where the scoring
hands a layer the keys it projected (TransPrune's IGA: ``vtoken/adapters/key_reuse.py``), that layer's own
key projection is spared, so the LLM layers' key projections are timed in the method's and the
replay's prefills (``LayerKeyTime``, with the layers' input norms, handed over too) and the in-call
time is given net of what the layers were spared.

Two identical prefills timed back to back differ by about 9% here (one standard deviation), so a
dozen rounds cannot tell a 1% overhead from a 3% one. On a CPU every pair is therefore also measured
with the model's blocks matched out (``eval/block_time.py``): each run's wall time less its calls of
the vision and LLM transformer blocks that the other run of the pair makes too (same block, same
input shape and mask: the same work, and most of the noise). That residual difference decides a
verdict where the whole prefills cannot tell and it can; where the whole prefills do tell, they
decide (a difference inside matched blocks shows there only).

Model: CLIP tower 384 wide x 6 layers on 336 px (576 patch tokens), Llama 768 wide x 8 layers (GQA
12 / 4 heads), random weights; a 35-token system prompt and a 16-token question (8 to 24 tokens in a
batch). ``--family qwen2_vl``: a Qwen2-VL vision tower 128 wide x 4 blocks on 672 px (2304 patches of
14 px, merged 2 x 2 into 576 visual tokens) and the same LLM as a Qwen2 with M-RoPE; the prompt adds
the vision start and end tokens; there every method's replay is its oracle (the hand-written oracle
runs LLaVA). ``--family llava_7b``: LLaVA-1.5-7B's full shape (CLIP ViT-L/14-336, Vicuna-7B;
random weights), built on the device, for a GPU (``eval/device_check.sh``). ``--family qwen2_5_vl`` and ``qwen3_vl``: the same with Qwen2.5-VL's tower (windowed
attention, full in blocks 1 and 3) and with Qwen3-VL's (16 px patches on 768 px, DeepStack) and its
Qwen3 LLM. ``--family llava_next`` and ``llava_onevision``: AnyRes images scaled down, a base view and a
2 x 2 grid of 168 px crops of a 336 x 336 image (144 tokens a view; 744 visual tokens with the
newlines; the 7B models have 2880 and more), through CLIP with the LLaVA LLM and through SigLIP
(``anyres_max_9``) with a Qwen2 LLM of the same size; budgets 83 / 165 / 248, the same shares of 744
as 64 / 128 / 192 of 576, and the replay is every method's oracle. Every configuration is timed in interleaved rounds in one process (each round runs every
configuration once; the first round warms up and is dropped), medians with min and max. Overheads
are medians of per-round pairs (the method and its replay timed back to back, the replay and the
oracle, the keep-all replay and its own unpruned run; which of the two runs first alternates from
round to round): the drift of a round cancels within a pair, not between two medians taken over
different rounds. ``--prefill-rounds`` (default ``--rounds``) sets the prefill rounds alone: they
are short, and the overheads are differences of a few percent.

    OMP_NUM_THREADS=1 python eval/bench_speed.py --out eval/results/bench_speed/cpu.md --overwrite   # the committed one
    OMP_NUM_THREADS=1 python eval/bench_speed.py --family qwen2_vl --out eval/results/bench_speed/cpu_qwen2_vl.md --overwrite
    OMP_NUM_THREADS=1 python eval/bench_speed.py --family qwen3_vl --out eval/results/bench_speed/cpu_qwen3_vl.md --overwrite
    OMP_NUM_THREADS=1 python eval/bench_speed.py --family llava_next --out eval/results/bench_speed/cpu_llava_next.md --overwrite
    python eval/bench_speed.py --device cuda --threads 8 --out eval/results/bench_speed/cuda.md
    python eval/bench_speed.py --family llava_7b --device cuda --dtype bfloat16 --replay-atol 1 --out eval/results/bench_speed/cuda_llava_7b.md
    OMP_NUM_THREADS=1 python eval/bench_speed.py --methods random,fastv,tome --budgets 64 --rounds 1 --batches 8 --out /tmp/speed.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vtoken  # noqa: E402
from vtoken import compat  # noqa: E402
from vtoken.request import renumbers  # noqa: E402

import replay_strategy as replay  # noqa: E402
from block_time import BlockTime, RunSplit, residual, residual_difference, vtoken_hooks_outside  # noqa: E402
from output import add_output_arguments, claim_stem  # noqa: E402  (eval/output.py)
from peak_memory import PeakMemory  # noqa: E402  (eval/peak_memory.py)
from scoring_floor import AttentionMapShape, scoring_floor  # noqa: E402  (eval/scoring_floor.py)

IMAGE_TOKEN, VOCAB, VISUAL = 99, 100, 576
#: Qwen2-VL's other special tokens in the same small vocabulary.
VIDEO_TOKEN, VISION_START, VISION_END = 98, 97, 96
_START = time.perf_counter()
SYSTEM_TOKENS, QUESTION_TOKENS = 35, 16
#: Text tokens of the batch-1 LLaVA prompt (BOS, system prompt, question), for vtoken.flops / kv_cache_bytes.
TEXT_TOKENS = 1 + SYSTEM_TOKENS + QUESTION_TOKENS
METHODS = ("random", "pool", "visionzip", "zoo_prune", "vflowopt", "repshift", "tome", "fastv", "transprune", "aif")
MACHINERY_TARGET, SCORING_TARGET, BATCH_TARGET = 0.05, 0.02, 0.90
#: Coverage of the intervals given for the medians of per-round pairs (``median_interval``).
CONFIDENCE = 0.95


def scaled_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=384, intermediate_size=1536,
                              num_hidden_layers=6, num_attention_heads=6)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=VISUAL)
    return LlavaForConditionalGeneration(config).eval()


def llava_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's shape (the config.json of llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 on 336 px
    (1024 wide, 24 layers, 16 heads, MLP 4096; the second-last layer's 576 patch tokens), a two-layer
    GELU projector, Vicuna-7B (Llama: 4096 wide, 32 layers, 32 heads without GQA, MLP 11008, vocabulary
    32064). The image placeholder stays the bench's ``IMAGE_TOKEN`` (the prompts are the scaled ones')."""
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=0,
                       rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=VISUAL)


def llava_7b(device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA-1.5-7B (:func:`llava_7b_config`) built on ``device`` in ``dtype`` (14 GB
    in bfloat16, 28 GB in float32: never built elsewhere first, nor in float32 and then cast)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(llava_7b_config())
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _question_lengths(batch: int) -> list[int]:
    """16 tokens at batch 1; 8 to 24 across a batch (mixed prompt lengths, left padding)."""
    return [QUESTION_TOKENS if batch == 1 else 8 + (16 * b) // max(batch - 1, 1) for b in range(batch)]


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _prompt_ids(g: torch.Generator, batch: int, image: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of ``batch`` prompts: BOS, a 35-token system prompt, the ``image``
    tokens, a question of :func:`_question_lengths` tokens (every family's prompt)."""
    rows = []
    for question in _question_lengths(batch):
        rows.append([1, *torch.randint(3, 90, (SYSTEM_TOKENS,), generator=g).tolist(), *image,
                     *torch.randint(3, 90, (question,), generator=g).tolist()])
    return _left_pad(rows)


def prompt(seed: int = 0, batch: int = 1) -> dict:
    """``batch`` LLaVA prompts (a 35-token system prompt, the image, a question of 8 to 24 tokens:
    mixed lengths, left-padded)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = _prompt_ids(g, batch, [IMAGE_TOKEN] * VISUAL)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}


#: Qwen's patch grid: 48 x 48 patches (672 px at 14 px, 768 px at 16 px), merged 2 x 2 into 576 visual tokens.
QWEN_GRID = (1, 48, 48)
QWEN_SPECIALS = (IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END)


#: The LLM of every Qwen shape: the LLaVA one's size (768 x 8 layers, GQA 12/4) with M-RoPE.
QWEN_TEXT = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]})
QWEN_TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                   vision_end_token_id=VISION_END)
#: Patch side in pixels: 14 for Qwen2-VL and Qwen2.5-VL, 16 for Qwen3-VL.
QWEN_PATCH = {"2": 14, "2.5": 14, "3": 16}


def scaled_qwen2_vl(seed: int = 0, version: str = "2"):
    """A random-weight Qwen2-VL shape scaled to 2 CPU cores: a 4-block packed vision tower 128 wide
    (4 heads) on 2304 patches with the 2 x 2 merger (576 visual tokens), and the same LLM as
    :func:`scaled_llava` (768 x 8 layers, GQA 12/4) with M-RoPE sections [8, 12, 12].

    ``version="2.5"``: Qwen2.5-VL's tower (RMSNorm, SwiGLU, windowed attention in 112 px windows,
    full attention in blocks 1 and 3, as the real one alternates them); ``"3"``: Qwen3-VL's (16 px
    patches, learned position embeddings, DeepStack from blocks 1 and 2 into the first LLM layers)
    and its Qwen3 LLM (q/k norms, head dim 64, interleaved M-RoPE)."""
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    common = dict(spatial_merge_size=2, temporal_patch_size=2, in_channels=3, patch_size=QWEN_PATCH[version])
    if version == "3":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        text = {**QWEN_TEXT, "head_dim": 64,
                "rope_parameters": {**QWEN_TEXT["rope_parameters"], "mrope_section": [8, 12, 12], "mrope_interleaved": True}}
        vision = dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, out_hidden_size=768,
                      num_position_embeddings=48 * 48, deepstack_visual_indexes=[1, 2], **common)
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(vision_config=vision, text_config=text, **QWEN_TOKENS))
    elif version == "2.5":
        vision = dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, out_hidden_size=768,
                      window_size=112, fullatt_block_indexes=[1, 3], **common)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=QWEN_TEXT,
                                                                     **QWEN_TOKENS))
    else:
        vision = dict(depth=4, embed_dim=128, num_heads=4, hidden_size=768, mlp_ratio=4, **common)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=QWEN_TEXT, **QWEN_TOKENS))
    model.set_attn_implementation("sdpa")
    return model.eval()


def qwen_prompt(seed: int = 0, batch: int = 1, version: str = "2") -> dict:
    """``batch`` Qwen2-VL prompts: BOS, a 35-token system prompt, <vision_start>, the 576 image
    tokens, <vision_end>, a question of 8 to 24 tokens (mixed lengths, left-padded), with the
    processor's ``image_grid_thw`` and ``mm_token_type_ids``."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = QWEN_GRID
    ids, mask = _prompt_ids(g, batch, [VISION_START, *[IMAGE_TOKEN] * (t * h * w // 4), VISION_END])
    patch_values = 3 * 2 * QWEN_PATCH[version] ** 2
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(batch * t * h * w, patch_values, generator=g),
            "image_grid_thw": torch.tensor([list(QWEN_GRID)] * batch), "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}


#: LLaVA-NeXT / OneVision's AnyRes views scaled down: 168 px tiles (12 x 12 patches of 14 px) and one
#: 336 x 336 image, i.e. a base view and a 2 x 2 grid of crops (the 7B models: 336 / 384 px tiles and
#: 2880 / up to 7290 tokens). The unpadded crop grid (24 x 24) with a newline per row, after the
#: base view's 144: 744 visual tokens.
ANYRES_TILE, ANYRES_IMAGE, ANYRES_PINPOINTS = 168, (336, 336), [[336, 336]]
ANYRES_VIEWS = 5


def scaled_anyres(kind: str, seed: int = 0):
    """A random-weight LLaVA-NeXT (``kind="next"``: CLIP 384 x 6 layers with its CLS token, read at
    the second-to-last layer; the LLaVA LLM) or LLaVA-OneVision (``"onevision"``: SigLIP 384 x 6
    layers, no CLS, read in full at the last layer, ``anyres_max_9``; a Qwen2 LLM of the same size)
    shape on :data:`ANYRES_PINPOINTS`, with a random newline embedding."""
    from transformers import (
        LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tower = dict(image_size=ANYRES_TILE, patch_size=14, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                 num_attention_heads=6)
    llm = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
               num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0)
    if kind == "next":
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**tower), text_config=LlamaConfig(**llm),
                                 image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default", image_grid_pinpoints=ANYRES_PINPOINTS,
                                 image_seq_length=(ANYRES_TILE // 14) ** 2)
        model = LlavaNextForConditionalGeneration(config)
    elif kind == "onevision":
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**tower), text_config=Qwen2Config(**llm),
                                      image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                      image_grid_pinpoints=ANYRES_PINPOINTS)
        model = LlavaOnevisionForConditionalGeneration(config)
    else:
        raise ValueError(f"kind must be 'next' or 'onevision', got {kind!r}")
    with torch.no_grad():  # zeros by default would hide where the newlines go
        model.model.image_newline.normal_()
    model.set_attn_implementation("sdpa")
    return model.eval()


def anyres_visual_tokens(model) -> int:
    """Visual tokens the model makes of one :data:`ANYRES_IMAGE` (its own packing: base view,
    unpadded crops, newlines)."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    features, sizes, newline = [torch.zeros(ANYRES_VIEWS, side * side, 1)], torch.tensor([list(ANYRES_IMAGE)]), torch.zeros(1)
    if getattr(config, "vision_aspect_ratio", None) is not None:  # OneVision
        packed = compat.pack_anyres_max_features(model.model, features, sizes, newline, config.vision_aspect_ratio)
    else:
        packed = compat.pack_anyres_features(model.model, features, sizes, "full", newline)
    return packed[0].shape[0]


def anyres_prompt(seed: int = 0, batch: int = 1, visual: int = 744) -> dict:
    """``batch`` LLaVA-NeXT / OneVision prompts as :func:`prompt` (``visual`` image tokens), with the
    processor's ``[batch, 5, 3, 168, 168]`` views (base first) and ``image_sizes``."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = _prompt_ids(g, batch, [IMAGE_TOKEN] * visual)
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(batch, ANYRES_VIEWS, 3, ANYRES_TILE, ANYRES_TILE, generator=g),
            "image_sizes": torch.tensor([list(ANYRES_IMAGE)] * batch)}


@dataclass(frozen=True)
class Family:
    """A model family the bench runs on: how to build its scaled model and prompts, and how to
    describe them."""

    name: str
    #: The heading's model name.
    title: str
    #: The report's "Model:" sentence (without the timing).
    description: str
    #: Text tokens of the batch-1 prompt (vtoken.flops / kv_cache_bytes).
    text_tokens: int
    #: Token ids generate must not produce (the image placeholder and the family's other specials).
    special_tokens: tuple[int, ...]
    #: Whether ``oracle_call`` (a hand-run unwrapped LLaVA) exists for it.
    hand_oracle: bool
    #: The committed output of a CPU run.
    committed: str
    #: One image's attention in a vision layer (the measured floor of a whole-map statistic).
    vision_map: AttentionMapShape

    #: The full-size model this shape scales down.
    real_model: str
    #: Qwen's version ("2", "2.5", "3"); None for the LLaVA families.
    qwen: str | None = None
    #: The AnyRes family ("next", "onevision"); None for the others.
    anyres: str | None = None
    #: A full-size shape (not scaled down): built on the bench's device, in its dtype, by ``llava_7b``.
    full_size: bool = False
    #: Visual tokens of the prompt's image.
    visual: int = VISUAL
    #: Default budgets (visual tokens kept of ``visual``): 1/9, 2/9 and 1/3 of them.
    budgets: tuple[int, ...] = (64, 128, 192)

    # The builders are looked up at call time.
    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if self.full_size:
            return llava_7b(torch.device(device), dtype)
        if self.qwen is not None:
            model = scaled_qwen2_vl(version=self.qwen)
        else:
            model = scaled_llava() if self.anyres is None else scaled_anyres(self.anyres)
        return model.to(device=torch.device(device), dtype=dtype)

    def inputs(self, seed: int = 0, batch: int = 1) -> dict:
        if self.qwen is not None:
            return qwen_prompt(seed, batch, self.qwen)
        return prompt(seed, batch) if self.anyres is None else anyres_prompt(seed, batch, self.visual)


def _qwen_family(name: str, version: str, real_model: str, description: str) -> Family:
    """A Qwen family: what every Qwen shape shares (the prompt's vision start / end tokens, its special
    tokens, no hand-written oracle, the 4-head map over 2304 patches at head dim 32, the result's path)."""
    return Family(name, f"a {real_model.rsplit('-', 1)[0]} shape", description, TEXT_TOKENS + 2, QWEN_SPECIALS, False,
                  f"eval/results/bench_speed/cpu_{name}.md", AttentionMapShape(heads=4, tokens=2304, head_dim=32),
                  real_model, version)


def _anyres_family(kind: str, visual: int, tokens_per_view: int, real_model: str, description: str) -> Family:
    """A LLaVA-NeXT / OneVision family: the LLaVA prompt with :func:`anyres_prompt`'s image, no
    hand-written oracle, five views' maps, budgets at the LLaVA ones' fractions of ``visual``."""
    name = f"llava_{kind}"
    return Family(name, f"a {real_model.rsplit('-', 1)[0]} shape", description, TEXT_TOKENS, (IMAGE_TOKEN,), False,
                  f"eval/results/bench_speed/cpu_{name}.md",
                  AttentionMapShape(heads=6, tokens=tokens_per_view, head_dim=64, views=ANYRES_VIEWS), real_model,
                  anyres=kind, visual=visual, budgets=tuple(round(visual * f) for f in (1 / 9, 2 / 9, 1 / 3)))


FAMILIES = {
    "llava": Family(
        "llava", "a LLaVA-1.5 shape",
        "CLIP 384 x 6 layers on 336 px (576 tokens), Llama 768 x 8 layers (GQA 12/4), random weights",
        TEXT_TOKENS, (IMAGE_TOKEN,), True, "eval/results/bench_speed/cpu.md",
        AttentionMapShape(heads=6, tokens=577, head_dim=64), "LLaVA-1.5-7B"),
    "llava_7b": Family(
        "llava_7b", "LLaVA-1.5-7B's full shape",
        "CLIP ViT-L/14 1024 x 24 layers on 336 px (576 tokens), Vicuna-7B 4096 x 32 layers (32 heads), random "
        "weights; sized for an accelerator or a CPU with bfloat16 matrix units (AMX: 6.4 s a prefill on two cores)",
        TEXT_TOKENS, (IMAGE_TOKEN,), True, "eval/results/bench_speed/cuda_llava_7b.md",
        AttentionMapShape(heads=16, tokens=577, head_dim=64), "LLaVA-1.5-7B", full_size=True),
    "qwen2_vl": _qwen_family(
        "qwen2_vl", "2", "Qwen2-VL-7B",
        "Qwen2-VL vision tower 128 x 4 blocks on 672 px (2304 patches of 14 px, merged 2 x 2 into 576 tokens), "
        "Qwen2 768 x 8 layers (GQA 12/4, M-RoPE), random weights"),
    "qwen2_5_vl": _qwen_family(
        "qwen2_5_vl", "2.5", "Qwen2.5-VL-7B",
        "Qwen2.5-VL vision tower 128 x 4 blocks on 672 px (2304 patches of 14 px; windowed attention in 112 px "
        "windows, full attention in blocks 1 and 3; merged 2 x 2 into 576 tokens), Qwen2 768 x 8 layers (GQA 12/4, "
        "M-RoPE), random weights"),
    "qwen3_vl": _qwen_family(
        "qwen3_vl", "3", "Qwen3-VL-8B",
        "Qwen3-VL vision tower 128 x 4 blocks on 768 px (2304 patches of 16 px, DeepStack from blocks 1 and 2; "
        "merged 2 x 2 into 576 tokens), Qwen3 768 x 8 layers (GQA 12/4, head dim 64, interleaved M-RoPE), "
        "random weights"),
    "llava_next": _anyres_family(
        "next", 744, 145, "LLaVA-NeXT-7B",
        "CLIP 384 x 6 layers on 168 px views (a base view and a 2 x 2 grid of crops of a 336 x 336 image: 144 tokens "
        "each; 576 crop tokens with a newline per row and the base view's 144 make 744), Llama 768 x 8 layers "
        "(GQA 12/4), random weights"),
    "llava_onevision": _anyres_family(
        "onevision", 744, 144, "LLaVA-OneVision-7B",
        "SigLIP 384 x 6 layers on 168 px views (a base view and a 2 x 2 grid of crops of a 336 x 336 image: 144 "
        "tokens each, anyres_max_9; 576 crop tokens with a newline per row and the base view's 144 make 744), "
        "Qwen2 768 x 8 layers (GQA 12/4), random weights"),
}


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


def to_device(x: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """``x`` on ``device``, its floating tensors (the pixels) in ``dtype`` when one is given."""
    return {k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
            for k, v in x.items()}


# --------------------------------------------------------------------------------------------------
# Clocks and meters


class Clock:
    """Wall time of one call, synchronizing an accelerator before and after."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        self.sync()
        return time.perf_counter() - start


def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a KV cache holds, read layer by layer through the cache's
    ``layers[i].keys / .values`` (transformers 5.23 and 5.24 alike, through ``vtoken.compat``)."""
    if cache is None:
        raise ValueError("the prefill returned no KV cache")
    total = 0
    for layer in range(compat.num_cache_layers(cache)):
        keys, values = compat.cache_layer_kv(cache, layer)
        for name, tensor in (("keys", keys), ("values", values)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
                raise ValueError(f"KV cache layer {layer} holds no [B, H, L, D] {name} ({type(tensor).__name__})")
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(f"KV cache layer {layer}: keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree")
        total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return total


class StepClock(BaseStreamer):
    """Timestamps of ``generate``'s streamer calls: the prompt, then each new token (already moved to
    the CPU by ``generate``, so an accelerator has finished the step)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# The hand-written oracle: the unwrapped model on a projector / LLM schedule


@dataclass
class OraclePlan:
    """What the hand-written oracle runs, prepared once from a recording (batch 1): the sequence rows
    that enter the LLM (``enter``) with their positions, replacement vectors for merged tokens, and
    before each pruning layer which of the current rows stay (and their positions)."""

    enter: torch.Tensor
    positions: torch.Tensor
    replace_slots: torch.Tensor | None
    replace_features: torch.Tensor | None
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def oracle_supported(recording: replay.Recording) -> bool:
    """A hand-written oracle exists for schedules of projector and LLM stages (no vision stage, no
    mask stage)."""
    stages = recording.source.stages()
    return bool(stages) and recording.source.mask_stage() is None and all(s.site in ("projector", "llm") for s in stages)


def oracle_plan(recording: replay.Recording, x: dict) -> OraclePlan:
    source = recording.source
    mode = source.config.positions
    ids = x["input_ids"][0]
    device = ids.device
    slots = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    visual_of = torch.full(ids.shape, -1, dtype=torch.long, device=device)
    visual_of[slots] = torch.arange(len(slots), device=device)
    selection = recording.selection[0]
    rows = torch.arange(len(ids), device=device)
    positions = rows.clone()
    enter, enter_positions = rows, positions
    replace_slots = replace_features = None
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for stage in source.stages():
        kept = selection[stage.name].to(device)
        if stage.site == "projector":
            keep = ids != IMAGE_TOKEN
            keep[slots[kept]] = True
            rows = torch.nonzero(keep).squeeze(-1)
            positions = torch.arange(len(rows), device=device) if renumbers(mode, "projector") else rows.clone()
            enter, enter_positions = rows, positions
            reduction = recording.reductions[stage.name]
            if reduction.features is not None:  # merged vectors (VisionZip, pool, VFlowOpt's recycling), as recorded
                columns = reduction.keep[0] >= 0
                replace_slots = slots[reduction.keep[0][columns].to(device)]
                replace_features = reduction.features[0][columns]
        else:  # before LLM layer ``stage.layer``: the text rows and the kept visual rows stay
            vis = visual_of[rows]
            stay = torch.nonzero((vis < 0) | torch.isin(vis, kept)).squeeze(-1)
            rows = rows[stay]
            positions = torch.arange(len(rows), device=device) if renumbers(mode, "llm") else positions[stay]
            layers[stage.layer] = (stay, positions[None].clone())
    return OraclePlan(enter, enter_positions[None], replace_slots, replace_features, layers)


def oracle_call(model, x: dict, plan: OraclePlan) -> torch.Tensor:
    """The unwrapped model's work for the schedule alone: encode, project, embed the text and the
    visual tokens (merged ones as recorded), then every LLM layer on the rows still kept, gathering
    before each pruning layer, with a KV cache; the first token's logits."""
    core = model.model
    features = core.get_image_features(pixel_values=x["pixel_values"], vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    visual = torch.cat(list(features) if isinstance(features, (tuple, list)) else [features]).reshape(-1, features[0].shape[-1])
    ids = x["input_ids"][0]
    embeds = core.get_input_embeddings()(ids[None])
    embeds[0, ids == IMAGE_TOKEN] = visual.to(embeds.dtype)
    if plan.replace_slots is not None:
        embeds[0, plan.replace_slots] = plan.replace_features.to(embeds.dtype)
    lm = core.language_model
    hidden, positions = embeds[:, plan.enter], plan.positions
    cache = compat.new_dynamic_cache(lm.config)
    eager = getattr(lm.config, "_attn_implementation", "sdpa") == "eager"
    rotary = mask = None
    for index, layer in enumerate(lm.layers):
        if index in plan.layers:
            stay, positions = plan.layers[index]
            hidden, rotary, mask = hidden[:, stay], None, None
        if rotary is None:  # once per sequence length, as the model does once per forward
            rotary = lm.rotary_emb(hidden, positions)
            if eager:  # SDPA / FlashAttention are causal without a mask (one unpadded sample)
                n = hidden.shape[1]
                mask = torch.full((n, n), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                       position_embeddings=rotary, **compat.cache_kwargs(cache))
    return model.lm_head(lm.norm(hidden[:, -1:]))


# --------------------------------------------------------------------------------------------------
# Profile of the scoring


#: A strategy's own calls, made by vtoken's pipeline and adapters (``Strategy.reduce`` calls
#: ``score``; ``observe`` and ``observe_attention`` summarise signals as the forward goes).
STRATEGY_CALLS = ("reduce", "observe", "observe_attention")


def _around_calls(strategy, around, names=STRATEGY_CALLS):
    """Run each of ``strategy``'s own calls inside ``around(label)`` (a context manager; this
    instance only); returns an undo."""
    for name in names:
        method = getattr(strategy, name)

        def wrapped(*args, _method=method, _label=f"strategy.{name}", **kwargs):
            with around(_label):
                return _method(*args, **kwargs)

        setattr(strategy, name, wrapped)
    return lambda: [strategy.__dict__.pop(n, None) for n in names]


def _labelled(strategy):
    """Wrap ``strategy``'s own calls in profiler labels (this instance only); returns an undo."""
    from torch.profiler import record_function

    return _around_calls(strategy, record_function)


class StrategyCallTime:
    """Wall time spent inside a strategy's own calls (:data:`STRATEGY_CALLS`) during the runs since
    the last :meth:`take`: the part of the scoring that is timed directly, a few milliseconds measured
    as such rather than as the difference of two prefills of hundreds. It misses the work of
    vtoken's hooks outside those calls (recording a layer's input, say), so it bounds the scoring
    from below. CPU only: on an accelerator the calls return before their kernels finish."""

    def __init__(self, block_time: BlockTime | None = None) -> None:
        self.seconds, self._depth, self._start = 0.0, 0, 0.0
        self.block_time = block_time

    @contextmanager
    def around(self, label: str):
        # Outermost calls only: a call made from inside another is already in its time.
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1
        try:
            # A call made from inside a block (ToMe's merges, an observer) is not the block's time.
            with (self.block_time.outside() if self.block_time is not None else nullcontext()):
                yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - self._start

    @contextmanager
    def pruned(self, model, method: str, budget: int):
        """``vtoken.pruned(model, method, keep_tokens=budget)`` with the strategy's calls timed."""
        with vtoken.pruned(model, method, keep_tokens=budget):
            undo = _around_calls(vtoken.strategy_of(model), self.around)
            try:
                yield
            finally:
                undo()

    @property
    def inside(self) -> bool:
        """True while one of the strategy's calls runs."""
        return self._depth > 0

    def take(self) -> float:
        """The seconds gathered since the last take, and start again from 0."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class LayerKeyTime:
    """Wall time in the LLM layers' own input norms and key projections (calls made outside the
    strategy's calls) during the runs since the last :meth:`take`, and whether any of them ran on no
    row: a stage's scoring normalised and projected that layer's keys and handed the kept rows to it
    (``vtoken/adapters/key_reuse.py``). The time in the strategy's calls then holds work its replay's
    layers do themselves; the replay's time in those modules less the method's is that work, taken
    off the in-calls time. CPU only, like :class:`StrategyCallTime`."""

    def __init__(self, model, calls: StrategyCallTime):
        layers = model.model.language_model.layers
        self.modules = [module for layer in layers for module in (
            compat.decoder_input_norm(layer), compat.attention_parts(compat.layer_attention(layer)).k_proj)]
        self.calls = calls
        self.seconds, self.handed, self._start = 0.0, False, None

    @contextmanager
    def timing(self):
        # Registered before vtoken's key-reuse hooks (added during the forward): the post-hook here
        # sees the module's own output, zero rows where the normed rows or keys were handed over.
        handles = [h for p in self.modules
                   for h in (p.register_forward_pre_hook(self._before), p.register_forward_hook(self._after))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _before(self, module, args) -> None:
        if not self.calls.inside:
            self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        if self._start is not None and not self.calls.inside:
            self.seconds += time.perf_counter() - self._start
            self.handed = self.handed or output.shape[-2] == 0
        self._start = None

    def take(self) -> tuple[float, bool]:
        """(seconds, whether a layer was handed its keys) since the last take; both start again."""
        out = (self.seconds, self.handed)
        self.seconds, self.handed = 0.0, False
        return out


def _profile(fn, device: torch.device) -> dict[str, tuple[float, int]]:
    """op / label -> (self time in ms for ops, total time for labels; calls) over one call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, torch.no_grad():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = {}
    for event in prof.key_averages():
        if event.key.startswith("strategy."):
            out[event.key] = (event.cpu_time_total / 1000, event.count)
        else:
            self_time = event.self_cpu_time_total
            if device.type == "cuda":
                self_time += getattr(event, "self_device_time_total", 0)
            out[event.key] = (self_time / 1000, event.count)
    return out


def profile_scoring(model, x, method: str, budget: int, recording, device, calls) -> str:
    """One line on where ``method``'s scoring time goes: the strategy's own calls (inclusive) and
    the torch ops that grew most over the replay (self time, one prefill each, under the profiler)."""
    with vtoken.pruned(model, method, keep_tokens=budget):
        undo = _labelled(vtoken.strategy_of(model))
        try:
            calls(model, x)  # warm
            mine = _profile(lambda: calls(model, x), device)
        finally:
            undo()
    with replay.replaying(model, recording):
        calls(model, x)
        theirs = _profile(lambda: calls(model, x), device)
    ops = {k: v for k, v in mine.items() if not k.startswith("strategy.")}
    total = sum(v[0] for v in ops.values())
    base = sum(v[0] for k, v in theirs.items() if not k.startswith("strategy."))
    own = ", ".join(f"{k} {v[0]:.0f} ms ({v[1]}x)" for k, v in sorted(mine.items()) if k.startswith("strategy."))
    grown = sorted(((v[0] - theirs.get(k, (0.0, 0))[0], k, v[1] - theirs.get(k, (0.0, 0))[1]) for k, v in ops.items()),
                   reverse=True)[:5]
    grown_text = ", ".join(f"{k} +{d:.0f} ms ({'+' if c >= 0 else ''}{c} calls)" for d, k, c in grown if d > 0)
    return (f"- **{method}** at {budget} (op time under the profiler: {total:.0f} ms against the replay's {base:.0f} ms): "
            f"inside the strategy's own calls: {own or 'none'}; ops that grew most over the replay: {grown_text}.")


# --------------------------------------------------------------------------------------------------
# The runs


def ttft_call(model, x):
    """The first token's work: a prefill with the KV cache, logits of the last position only (what
    ``generate`` computes at its first step)."""
    return model(**x, use_cache=True, logits_to_keep=1).logits


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _rounds(first: list[float], second: list[float]):
    if len(first) != len(second):
        raise ValueError(f"paired runs need one time each per round, got {len(first)} and {len(second)}")
    return zip(first, second)


def paired_differences(first: list[float], second: list[float]) -> list[float]:
    """``first[r] - second[r]`` of each round: two runs timed back to back in the same round share
    its drift (the machine's load, the heap after the round's other runs), which a difference of
    two medians taken over different rounds does not cancel."""
    return [a - b for a, b in _rounds(first, second)]


def paired_ratios(first: list[float], second: list[float]) -> list[float]:
    """``first[r] / second[r] - 1`` of each round (see :func:`paired_differences`)."""
    return [a / b - 1 for a, b in _rounds(first, second)]


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values`` (one per independent round): the
    k-th smallest and the k-th largest value, k the largest rank whose tails each hold at most
    ``(1 - confidence) / 2`` of Binomial(n, 1/2) (the sign test's interval; 12 values: the 3rd and
    the 10th, 96.1%). Returns ``(low, high, coverage)``; with too few values for ``confidence`` (5 at
    95%) the interval is the min-max and the coverage it returns, ``1 - 2^(1 - n)``, is below it."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval needs at least one value")

    def tail(k: int) -> float:  # P(Binomial(n, 1/2) <= k - 1)
        return sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and tail(k + 1) <= (1 - confidence) / 2:
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * tail(k)


def interval_coverage(rounds: int) -> float:
    """How often :func:`median_interval` over ``rounds`` values holds the median (it depends on the
    count alone): at least 95% from 6 rounds on, 75% for the min-max of 3."""
    return median_interval([0.0] * rounds)[2]


def interval_name(rounds: int) -> str:
    """What an interval of :func:`median_interval` over ``rounds`` values is, by its real coverage: the
    sign test's 95% interval from 6 rounds on; with fewer, the min-max of the rounds, which holds the
    median less often (3 rounds: 75%), and the tables say so rather than call it 95%."""
    coverage = interval_coverage(rounds)
    if coverage >= CONFIDENCE:
        return f"{CONFIDENCE:.0%} interval"
    return f"{coverage:.0%} interval (min-max of {rounds} rounds)"


def within_noise(low: float, high: float, target: float) -> bool:
    """Whether an estimate's interval holds values on both sides of its target: the rounds do not
    tell a pass from a fail, whatever the median says."""
    return low < target < high


def _verdict_text(ok: bool | None, within_noise: bool, decided_by: str | None) -> str:
    """pass / **FAIL**, then "(within noise)" and "(by the split)" where they apply."""
    return (_pf(ok) + (" (within noise)" if within_noise else "")
            + (" (by the split)" if decided_by == "split" else ""))


@dataclass(frozen=True)
class Verdict:
    """A target's verdict for one budget: ``ok`` (pass), ``within_noise`` (its interval holds
    values on both sides of the target), ``basis``: ``"prefill"`` (the whole prefills' pairs) or
    ``"split"`` (the same pairs with the model's blocks matched out, ``eval/block_time.py``: used
    only where the whole prefills cannot tell and the split can)."""

    ok: bool
    within_noise: bool
    basis: str


def verdict(value: float, interval: tuple[float, float], target: float,
            split: tuple[float, tuple[float, float]] | None = None, strict: bool = False) -> Verdict:
    """Pass when ``value`` is at most ``target`` (under it when ``strict``); decided by ``split`` (value, interval) instead when
    ``interval`` straddles the target and the split's does not. A difference inside the matched
    blocks is in the whole prefills only, so where they do tell, they decide."""
    if within_noise(*interval, target) and split is not None and not within_noise(*split[1], target):
        return Verdict(split[0] < target if strict else split[0] <= target, False, "split")
    return Verdict(value < target if strict else value <= target, within_noise(*interval, target), "prefill")


def generate_runs(model, args, device, clock, meter, methods) -> dict:
    """Per batch (1 and ``args.batches``), per configuration (``none`` and every method at
    ``args.generate_budget``): tokens/s, time to the first token and decode ms per token over
    interleaved rounds after a warm-up round, and the peak memory of the warm-up round's call (measured
    there because the meter hands freed heap back first, which would slow the timed calls)."""
    batches = sorted({1, *args.batches})
    inputs = {b: to_device(args.model_family.inputs(seed=1, batch=b), device, model.dtype) for b in batches}
    keys = ["none", *methods]
    out = {b: {k: {"tokens_per_s": [], "ttft_ms": [], "decode_ms": [], "peak_bytes": []} for k in keys} for b in batches}
    errors = {}

    def once(b: int, memory: bool) -> dict:
        steps = StepClock()
        x = inputs[b]

        def run():
            clock.sync()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(**x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               suppress_tokens=list(args.model_family.special_tokens), streamer=steps)
            clock.sync()
            return start, time.perf_counter()

        if memory:
            peak, _ = meter.measure(run)
            return {"peak_bytes": peak}
        start, end = run()
        tokens = steps.times[1:]  # the first call is the prompt
        gaps = [1000 * (b2 - a) for a, b2 in zip(tokens, tokens[1:])]
        return {"tokens_per_s": b * args.new_tokens / (end - start), "ttft_ms": 1000 * (tokens[0] - start),
                "decode_ms": statistics.median(gaps) if gaps else float("nan")}

    for round_ in range(args.rounds + 1):
        memory = round_ == 0  # the warm-up round measures memory; the later ones are timed
        for b in batches:
            samples = {"none": once(b, memory)}
            for method in methods:
                if method in errors:
                    continue
                try:
                    with vtoken.pruned(model, method, keep_tokens=args.generate_budget):
                        samples[method] = once(b, memory)
                except Exception as error:  # a method that cannot run here is reported, the rest measured
                    errors[method] = f"{type(error).__name__}: {error}"
            for key, sample in samples.items():
                for name, value in sample.items():
                    out[b][key][name].append(value)
        log(f"generate round {round_ + 1}/{args.rounds + 1} done")
    return {"batches": batches, "runs": out, "errors": errors}


@dataclass
class Config:
    method: str
    budget: int
    recording: replay.Recording
    replay_diff: float
    plan: OraclePlan | None = None
    oracle_diff: float | None = None
    #: Seconds per measured round: the method's prefill, its replay's, the oracle's, the time inside
    #: the strategy's own calls during the method's prefill, and the LLM layers' own input norms and key
    #: projections in the method's and the replay's prefills (CPU only); and, with the model's blocks matched out
    #: (``eval/block_time.py``, CPU only), the method's residual less the replay's (``scoring_split``,
    #: seconds) and the replay's residual less the oracle's over the oracle's time (``machinery_split``).
    times: dict[str, list[float]] = field(default_factory=lambda: {
        "method": [], "replay": [], "oracle": [], "strategy_calls": [], "method_keys": [], "replay_keys": [],
        "scoring_split": [], "scoring_matched": [], "machinery_split": []})
    #: True when the method's scoring handed an LLM layer its keys (the layer projected no row).
    keys_handed: bool = False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="llava", choices=sorted(FAMILIES),
                        help="the model family whose scaled shape is timed (576 visual tokens in each, 744 in the "
                             "LLaVA-NeXT and OneVision ones)")
    parser.add_argument("--budgets", default=None, help="visual tokens kept, comma separated (default: the family's "
                                                        "1/9, 2/9 and 1/3: 64,128,192 of 576; 83,165,248 of 744)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--prefill-rounds", type=int, default=None,
                        help="measured rounds of the batch-1 prefills (default: --rounds); they are short, and the "
                             "overheads they give are differences of a few percent, so more rounds pay")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (synchronized before and after each timing)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the model's dtype (a reduced one wants a looser --replay-atol)")
    parser.add_argument("--batches", default="8,16", help="generate batches besides 1 (0: no generate runs)")
    parser.add_argument("--generate-methods", default=None, help="methods of the generate runs (default: --methods)")
    parser.add_argument("--generate-budget", type=int, default=None, help="default: the family's first budget")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", default="auto",
                        help="methods whose scoring is profiled at the first budget: a list, 'auto' (the three "
                             "largest scoring overheads) or 'none'")
    parser.add_argument("--replay-atol", type=float, default=1e-4, help="largest logit difference replay vs method")
    parser.add_argument("--note", default="", help="what else ran on the machine, for the record")
    add_output_arguments(parser, "Markdown file (e.g. eval/results/bench_speed/cpu.md); a .json is written beside it")
    args = parser.parse_args(argv)
    if args.prefill_rounds is None:
        args.prefill_rounds = args.rounds
    if args.rounds < 1 or args.prefill_rounds < 1:
        parser.error("--rounds and --prefill-rounds must be at least 1 (the warm-up round is not counted)")
    claim_stem(Path(args.out).with_suffix(""), args.overwrite)  # before any model is built
    threads_env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    words = [os.path.relpath(sys.argv[0]), *sys.argv[1:]] if argv is None else ["eval/bench_speed.py", *argv]
    command = threads_env + "python " + " ".join(shlex.quote(w) for w in words)
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.batches = [int(b) for b in args.batches.split(",") if b.strip() and int(b) > 0]
    family = args.model_family = FAMILIES[args.family]
    budgets = list(family.budgets) if args.budgets is None else [int(b) for b in args.budgets.split(",") if b.strip()]
    if args.generate_budget is None:
        args.generate_budget = budgets[0]
    methods = [m for m in args.methods.split(",") if m]
    generate_methods = methods if args.generate_methods is None else [m for m in args.generate_methods.split(",") if m]
    text_tokens = family.text_tokens
    clock, meter = Clock(device), PeakMemory(device)
    dtype = getattr(torch, args.dtype)
    model = family.build(device, dtype)
    x = to_device(family.inputs(), device, dtype)

    # --- recordings, replay checks, oracle plans ---------------------------------------------------
    configs: list[Config] = []
    keep_all: dict[str, replay.Recording] = {}
    skipped: dict[tuple, str] = {}
    for method in methods:
        for budget in budgets:
            try:
                recording = replay.record(model, method, x, keep_tokens=budget)
            except Exception as error:
                skipped[(method, budget)] = f"{type(error).__name__}: {error}"
                continue
            replayed = replay.replay_logits(model, recording, x)
            diff = replay.max_abs_diff(replayed, recording.logits)
            if not diff <= args.replay_atol:
                raise AssertionError(f"{method} at {budget}: the replay's logits differ from the method's by {diff:.3g} "
                                     f"(> {args.replay_atol}): it is not the same schedule")
            config = Config(method, budget, recording, diff)
            if family.hand_oracle and oracle_supported(recording):
                config.plan = oracle_plan(recording, x)
                with torch.no_grad():
                    config.oracle_diff = replay.max_abs_diff(oracle_call(model, x, config.plan)[:, -1],
                                                             recording.logits[:, -1])
            configs.append(config)
        try:
            keep_all[method] = replay.record(model, method, x, keep=1.0)
        except Exception as error:
            skipped[(method, "keep-all")] = f"{type(error).__name__}: {error}"
    log(f"recorded and checked {len(configs)} configurations")

    # --- batch-1 prefill: interleaved rounds ---------------------------------------------------------
    times_none: list[float] = []
    # Each keep-all replay is timed beside an unpruned run of its own (its pair): a fixed cost of a
    # few percent must not be lost to the drift of a round (the heap after other methods' runs).
    times_keep_all: dict[str, dict[str, list[float]]] = {m: {"keep_all": [], "unpruned": [], "split": []} for m in keep_all}
    # Every pair (or trio, with a hand-written oracle) of runs, each run as (sample key, the context
    # it runs in, the call timed). Within a group the order alternates from round to round (method
    # then replay, then replay then method): a run that is slower for following another (the heap it
    # leaves) biases neither side.
    def prefill():
        return ttft_call(model, x)

    # The method's own calls are timed on a CPU only (on an accelerator they return before their
    # kernels finish, and a synchronisation inside them would slow the run they are part of).
    # The model's blocks are timed (and matched out of each overhead: eval/block_time.py) on a CPU
    # only, for the same reason.
    block_time = BlockTime(model) if device.type == "cpu" else None
    call_time = StrategyCallTime(block_time) if device.type == "cpu" else None
    key_time = LayerKeyTime(model, call_time) if call_time is not None else None

    def method_context(c: Config):
        if call_time is None:
            return vtoken.pruned(model, c.method, keep_tokens=c.budget)
        return call_time.pruned(model, c.method, c.budget)

    groups = []
    for c in configs:
        runs = [((c.method, c.budget, "method"), lambda c=c: method_context(c), prefill),
                ((c.method, c.budget, "replay"), lambda c=c: replay.replaying(model, c.recording), prefill)]
        if c.plan is not None:
            runs.append(((c.method, c.budget, "oracle"), nullcontext, lambda c=c: oracle_call(model, x, c.plan)))
        groups.append(runs)
    for method, recording in keep_all.items():
        groups.append([((method, "keep-all pair"), nullcontext, prefill),
                       ((method, "keep-all"), lambda r=recording: replay.replaying(model, r), prefill)])
    keys_handed: set[tuple] = set()  # (method, budget) whose layers were handed keys by the scoring
    splits: dict[tuple, RunSplit] = {}  # this round's runs with their block calls
    hooks_outside = (lambda: vtoken_hooks_outside(block_time)) if block_time is not None else nullcontext
    for round_ in range(args.prefill_rounds + 1):
        sample = {("none",): clock.time(prefill)}
        for runs in groups:
            for key, context, call in (reversed(runs) if round_ % 2 == 1 else runs):
                timed_keys = key_time is not None and key[-1] in ("method", "replay")
                # vtoken's hooks are registered inside hooks_outside (they then run outside any
                # block's time), the block hooks after them (so they run inside vtoken's).
                with hooks_outside(), context(), (key_time.timing() if timed_keys else nullcontext()), \
                        (block_time.timing() if block_time is not None else nullcontext()):
                    sample[key] = clock.time(call)
                if block_time is not None:
                    splits[key] = RunSplit(sample[key], block_time.take())
                if call_time is not None and key[-1] == "method":
                    sample[(*key[:-1], "strategy_calls")] = call_time.take()
                if timed_keys:
                    sample[(*key[:-1], f"{key[-1]}_keys")], handed = key_time.take()
                    if handed:
                        keys_handed.add(key[:-1])
        if round_:
            times_none.append(sample[("none",)])
            for c in configs:
                for kind in c.times:
                    if (c.method, c.budget, kind) in sample:
                        c.times[kind].append(sample[(c.method, c.budget, kind)])
                if block_time is not None:
                    method_run, replay_run = splits[(c.method, c.budget, "method")], splits[(c.method, c.budget, "replay")]
                    c.times["scoring_split"].append(residual_difference(method_run, replay_run))
                    c.times["scoring_matched"].append(residual(method_run, replay_run)[1])
                    if c.plan is not None:
                        oracle_run = splits[(c.method, c.budget, "oracle")]
                        c.times["machinery_split"].append(residual_difference(replay_run, oracle_run) / oracle_run.wall)
            for method in keep_all:
                times_keep_all[method]["keep_all"].append(sample[(method, "keep-all")])
                times_keep_all[method]["unpruned"].append(sample[(method, "keep-all pair")])
                if block_time is not None:
                    unpruned_run = splits[(method, "keep-all pair")]
                    times_keep_all[method]["split"].append(
                        residual_difference(splits[(method, "keep-all")], unpruned_run) / unpruned_run.wall)
        log(f"prefill round {round_ + 1}/{args.prefill_rounds + 1} done")
    base = statistics.median(times_none)
    for c in configs:
        c.keys_handed = (c.method, c.budget) in keys_handed

    # --- memory and KV cache after a batch-1 prefill ------------------------------------------------
    def prefill_memory() -> tuple[int, int]:
        peak, out = meter.measure(lambda: model(**x, use_cache=True, logits_to_keep=1))
        return peak, kv_cache_bytes(compat.output_cache(out))

    memory = {"none": prefill_memory()}
    predicted = {"none": vtoken.kv_cache_bytes(model, text_tokens=text_tokens, dtype=model.dtype)}
    for c in configs:
        with vtoken.pruned(model, c.method, keep_tokens=c.budget):
            prefill_memory()  # warm
            memory[(c.method, c.budget)] = prefill_memory()
            predicted[(c.method, c.budget)] = vtoken.kv_cache_bytes(model, text_tokens=text_tokens, dtype=model.dtype)
        with replay.replaying(model, c.recording):
            memory[(c.method, c.budget, "replay")] = prefill_memory()

    log("memory and KV cache measured")

    # --- scoring FLOPs of each method's own algorithm (vtoken.flops), for the scoring target --------
    unpruned_flops = vtoken.flops(model, text_tokens=text_tokens).prefill
    scoring_share = {}
    # ... and the least work of that algorithm, timed (eval/scoring_floor.py: a whole attention map's
    # exponentials, which FLOPs do not count), as a share of the unpruned prefill's time.
    floor_share, floor_cache = {}, {}
    for c in configs:
        with vtoken.pruned(model, c.method, keep_tokens=c.budget):
            scoring_share[(c.method, c.budget)] = vtoken.flops(model, text_tokens=text_tokens).scoring / unpruned_flops
            costs = vtoken.schedule_of(model, visual_tokens=family.visual).scoring
        floor_share[(c.method, c.budget)] = scoring_floor(costs, family.vision_map, device, floor_cache) / base
    log("scoring FLOPs and floors measured")

    # --- profile of the largest scoring overheads ----------------------------------------------------
    first = [c for c in configs if c.budget == budgets[0]]
    scoring_ms = {c.method: statistics.median(paired_differences(c.times["method"], c.times["replay"])) for c in first}
    if args.profile == "auto":
        profiled = sorted(scoring_ms, key=scoring_ms.get, reverse=True)[:3]
    elif args.profile == "none":
        profiled = []
    else:
        profiled = [m for m in args.profile.split(",") if m in scoring_ms]
    profile_lines = []
    for method in profiled:
        c = next(c for c in first if c.method == method)
        try:
            profile_lines.append(profile_scoring(model, x, method, c.budget, c.recording, device, ttft_call))
        except Exception as error:
            profile_lines.append(f"- **{method}**: profile failed ({type(error).__name__}: {error})")

    log(f"profiled {', '.join(profiled) or 'nothing'}")

    # --- generate -------------------------------------------------------------------------------------
    generate = generate_runs(model, args, device, clock, meter, generate_methods) if args.batches else None

    text, data = report(args, command, load_at_start, device, meter, base, times_none, configs, keep_all, times_keep_all,
                        memory, predicted, scoring_share, floor_share, profile_lines, generate, skipped)
    print(text)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")


# --------------------------------------------------------------------------------------------------
# The report


def machine_text(args, device, load_at_start) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if names:
            cpu = f"{names[0].strip()} ({len(names)} logical CPUs)"
    except OSError:
        pass
    text = f"CPU {cpu}, {args.threads} torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    else:
        text += "; no GPU used"
    text += f"; model in {args.dtype}"
    load = ", ".join(f"{v:.2f}" for v in load_at_start)
    return (f"{text}; load average at start {load} (1, 5, 15 min); torch {torch.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}")


def _pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "**FAIL**")


def _batch_verdict(ratio: float, low: float, high: float) -> str:
    return _verdict_text(ratio >= BATCH_TARGET, within_noise(low, high, BATCH_TARGET), None)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def generate_speedup(runs: dict, batch: int, method: str) -> float:
    """A method's generate speed-up at ``batch``: the median over rounds of its tokens/s over the
    unpruned model's in the same round."""
    if method == "none":
        return 1.0
    return 1 + statistics.median(paired_ratios(runs[batch][method]["tokens_per_s"], runs[batch]["none"]["tokens_per_s"]))


def batch_ratio(runs: dict, batch: int, method: str) -> tuple[float, float, float]:
    """The issue's batch target for ``method``: its generate speed-up at ``batch`` over its batch-1
    speed-up, with an interval ``(ratio, low, high)``: the lowest and highest ratio the two speed-ups'
    median intervals (:func:`median_interval`) allow. A method that does not speed up (AIF, whose
    speed-up is 1 but for noise) has a ratio of two numbers near 1, which these rounds may not tell
    apart from the target; the interval says so."""
    def speedup_interval(b: int) -> tuple[float, float, float]:
        ratios = paired_ratios(runs[b][method]["tokens_per_s"], runs[b]["none"]["tokens_per_s"])
        low, high, _ = median_interval(ratios)
        return generate_speedup(runs, b, method), 1 + low, 1 + high

    at_batch, at_batch_low, at_batch_high = speedup_interval(batch)
    alone, alone_low, alone_high = speedup_interval(1)
    return at_batch / alone, at_batch_low / alone_high, at_batch_high / alone_low


def keep_all_ratios(pair: dict[str, list[float]]) -> list[float]:
    """The keep-all replay against the unpruned run timed beside it, per round."""
    return paired_ratios(pair["keep_all"], pair["unpruned"])


def keep_all_overhead(pair: dict[str, list[float]]) -> float:
    """The keep-all replay against the unpruned run timed beside it, median over rounds."""
    return statistics.median(keep_all_ratios(pair))


def report(args, command, load_at_start, device, meter, base, times_none, configs, keep_all, times_keep_all, memory,
           predicted, scoring_share, floor_share, profile_lines, generate, skipped):
    rows = []
    for c in configs:
        method_ms = 1000 * statistics.median(c.times["method"])
        replay_ms = 1000 * statistics.median(c.times["replay"])
        oracle_ms = 1000 * statistics.median(c.times["oracle"]) if c.times["oracle"] else None
        # Each overhead is the median of its per-round pairs (method and replay back to back; replay
        # and oracle; keep-all and its own unpruned run), not a difference of two medians.
        scoring_runs = [1000 * d for d in paired_differences(c.times["method"], c.times["replay"])]
        scoring = statistics.median(scoring_runs)
        scoring_low, scoring_high, _ = median_interval(scoring_runs)
        share, floor = scoring_share[(c.method, c.budget)], floor_share[(c.method, c.budget)]
        exempt = share >= SCORING_TARGET or floor >= SCORING_TARGET
        in_calls = 1000 * statistics.median(c.times["strategy_calls"]) if c.times["strategy_calls"] else None
        spared, spared_runs = None, [0.0] * len(c.times["scoring_split"])
        if in_calls is not None and c.keys_handed:
            # The keys the layers were handed: projected inside the strategy's calls, by the layers
            # themselves in the replay. Per round, what the calls took less what the layers were spared.
            spared_runs = paired_differences(c.times["replay_keys"], c.times["method_keys"])
            spared = 1000 * statistics.median(spared_runs)
            in_calls = 1000 * statistics.median([t - d for t, d in zip(c.times["strategy_calls"], spared_runs)])
        # The same pairs with the model's blocks matched out (eval/block_time.py). The layers' input
        # norms and key projections are inside matched blocks, so what they were spared comes off here too.
        split = split_interval = None
        if c.times["scoring_split"]:
            split_runs = [1000 * (d - k) for d, k in zip(c.times["scoring_split"], spared_runs)]
            split = statistics.median(split_runs)
            split_interval = median_interval(split_runs)[:2]
        to_share = 1 / (1000 * base)
        scoring_verdict = verdict(scoring * to_share, (scoring_low * to_share, scoring_high * to_share), SCORING_TARGET,
                                  None if split is None else (split * to_share, tuple(v * to_share for v in split_interval)),
                                  strict=True)  # "under 2%"
        paired = times_keep_all.get(c.method)
        if oracle_ms is not None:
            machinery_runs, machinery_basis = paired_ratios(c.times["replay"], c.times["oracle"]), "oracle"
        elif paired and paired["keep_all"]:
            machinery_runs, machinery_basis = keep_all_ratios(paired), "keep-all"
        else:
            machinery_runs, machinery_basis = None, None
        machinery = statistics.median(machinery_runs) if machinery_runs else None
        machinery_interval = median_interval(machinery_runs)[:2] if machinery_runs else None
        machinery_split_runs = (c.times["machinery_split"] if machinery_basis == "oracle" else
                                paired["split"] if machinery_basis == "keep-all" else [])
        machinery_split = statistics.median(machinery_split_runs) if machinery_split_runs else None
        machinery_split_interval = median_interval(machinery_split_runs)[:2] if machinery_split_runs else None
        machinery_verdict = None if machinery is None else verdict(
            machinery, machinery_interval, MACHINERY_TARGET,
            None if machinery_split is None else (machinery_split, machinery_split_interval))
        final = list(c.recording.selection[0].values())[-1] if c.recording.selection[0] else None
        rows.append({
            "method": c.method, "budget": c.budget, "kept": None if final is None else int(len(final)),
            "ms": method_ms, "min": 1000 * min(c.times["method"]), "max": 1000 * max(c.times["method"]),
            "speedup": base / (method_ms / 1000), "replay_ms": replay_ms,
            "replay_min": 1000 * min(c.times["replay"]), "replay_max": 1000 * max(c.times["replay"]),
            "oracle_ms": oracle_ms, "scoring_ms": scoring, "scoring_min": min(scoring_runs),
            "scoring_max": max(scoring_runs), "scoring_share": scoring / (1000 * base),
            "scoring_interval_share": (scoring_low / (1000 * base), scoring_high / (1000 * base)),
            "scoring_within_noise": scoring_verdict.within_noise, "scoring_decided_by": scoring_verdict.basis,
            "scoring_split_ms": split, "scoring_split_interval_share": None if split is None else
            tuple(v * to_share for v in split_interval),
            "scoring_split_matched": statistics.median(c.times["scoring_matched"]) if c.times["scoring_matched"] else None,
            "strategy_calls_ms": in_calls, "spared_key_projection_ms": spared,
            "strategy_calls_share": None if in_calls is None else in_calls / (1000 * base),
            "algorithm_scoring_flops_share": share, "algorithm_floor_share": floor, "scoring_exempt": exempt,
            "scoring_pass": None if exempt else scoring_verdict.ok,
            "machinery": machinery, "machinery_basis": machinery_basis, "machinery_interval": machinery_interval,
            "machinery_within_noise": machinery_verdict is not None and machinery_verdict.within_noise,
            "machinery_decided_by": None if machinery_verdict is None else machinery_verdict.basis,
            "machinery_pass": None if machinery_verdict is None else machinery_verdict.ok,
            "machinery_split": machinery_split, "machinery_split_interval": machinery_split_interval,
            "replay_logit_diff": c.replay_diff, "oracle_logit_diff": c.oracle_diff,
            "replayed_verbatim": sorted(c.recording.verbatim), "replayed_recomputed": sorted(c.recording.recompute),
            "times_s": c.times,
        })
    base_ms = 1000 * base
    family = args.model_family
    lines = [
        f"# Speed on {family.title}{'' if family.full_size else ' scaled to CPU'} ({device.type}): time to first token, "
        "overhead against oracles, batch throughput, memory",
        "",
        f"Produced by `{command}` ({args.prefill_rounds} interleaved rounds of the batch-1 prefills and "
        f"{f'{args.rounds} of the generate runs' if args.batches else 'no generate runs'}, each after a warm-up round, "
        f"in one process; medians "
        f"with min and max). Machine: {machine_text(args, device, load_at_start)}. {args.note}".rstrip(),
        "",
        f"Model: {family.description}, "
        f"{args.dtype}, on {device.type}; a 35-token system prompt and a 16-token question. Unpruned time to first token "
        f"{base_ms:.0f} ms (median of {len(times_none)}, min {1000 * min(times_none):.0f}, max {1000 * max(times_none):.0f}).",
    ]

    # summary of targets per method
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    gen_ratio = {}
    if generate:
        runs = generate["runs"]
        for b in generate["batches"]:
            if b == 1:
                continue
            for method, values in runs[b].items():
                if method == "none" or not values["tokens_per_s"] or not runs[1][method]["tokens_per_s"]:
                    continue
                gen_ratio[(method, b)] = batch_ratio(runs, b, method)

    def worst(method, key):
        values = [r[key] for r in by_method.get(method, []) if r[key] is not None]
        return None if not values else all(values)

    def judged(method, key) -> str:
        """pass / **FAIL** over a method's budgets, "(within noise)" when every failing budget's
        interval also holds passing values."""
        text = _pf(worst(method, f"{key}_pass"))
        failing = [r for r in by_method.get(method, []) if r[f"{key}_pass"] is False]
        if failing and all(r[f"{key}_within_noise"] for r in failing):
            text += " (within noise)"
        split = [str(r["budget"]) for r in by_method.get(method, [])
                 if r[f"{key}_pass"] is not None and r[f"{key}_decided_by"] == "split"]
        if split:
            text += f" (at {', '.join(split)}: by the split)"
        return text

    prefill_interval, prefill_coverage = interval_name(args.prefill_rounds), interval_coverage(args.prefill_rounds)
    few_rounds = ("" if prefill_coverage >= CONFIDENCE else
                  f" With {args.prefill_rounds} prefill rounds the batch-1 tables' intervals are each the min-max of the "
                  f"rounds and hold the median with probability {prefill_coverage:.0%} "
                  f"only (6 rounds are the fewest for {CONFIDENCE:.0%}): their verdicts are indicative.")
    lines += ["", "## Targets", "",
              f"Machinery within {MACHINERY_TARGET:.0%} of the oracle (every budget); scoring under {SCORING_TARGET:.0%} of the "
              f"unpruned prefill (every budget; *exempt* where the method's own algorithm needs {SCORING_TARGET:.0%} or more "
              f"of the unpruned prefill's FLOPs, or where its least work, timed here, takes {SCORING_TARGET:.0%} or more of the "
              f"unpruned prefill's time; every share in the overhead table); generate speed-up at batch 8 and 16 "
              f"at least {BATCH_TARGET:.0%} of the batch-1 speed-up (keep {args.generate_budget}). Each verdict is the "
              f"median's; *(within noise)*: every failing budget's {CONFIDENCE:.0%} interval of the median also holds "
              f"passing values (the rounds cannot tell; a pass whose interval reaches the target is marked so in the overhead "
              f"table); *by the split*: the whole prefills could not tell and the same pairs with the model's blocks "
              f"matched out could (their interval on one side of the target; see the overhead table).{few_rounds}", "",
              "| " + " | ".join(["method", "machinery", "scoring", *(f"batch {b} / batch 1" for b in
                                                                   (generate["batches"][1:] if generate else []))]) + " |",
              "|---|---|---|" + "---|" * len(generate["batches"][1:] if generate else [])]
    for method, method_rows in by_method.items():
        exempt = [r for r in method_rows if r["scoring_exempt"]]
        scoring = judged(method, "scoring")
        if exempt:
            worst_share = max(r["algorithm_scoring_flops_share"] for r in exempt)
            worst_floor = max(r["algorithm_floor_share"] for r in exempt)
            measured = max(r["scoring_share"] for r in exempt)
            needs = [f"{100 * worst_share:.1f}% of the unpruned prefill's FLOPs"]
            if worst_floor > 0:
                needs.append(f"its least work (timed) {100 * worst_floor:.1f}% of the unpruned prefill's time")
            scoring = (f"exempt: its own scoring needs up to {'; '.join(needs)}; "
                       f"measured: up to {100 * measured:.1f}% of the unpruned prefill's time")
            if len(exempt) < len(method_rows):
                scoring += f"; other budgets {judged(method, 'scoring')}"
        basis = method_rows[0]["machinery_basis"]
        machinery = judged(method, "machinery") + (f" ({basis})" if basis else "")
        cells = [method, machinery, scoring]
        for b in (generate["batches"][1:] if generate else []):
            ratio = gen_ratio.get((method, b))
            cells.append("not run" if ratio is None else f"{_batch_verdict(*ratio)} ({ratio[0]:.2f})")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Time to first token, batch 1", "",
              "| method | budget | kept tokens | ms (median) | min | max | speed-up |", "|---|---|---|---|---|---|---|",
              f"| none | {family.visual} | {family.visual} | {base_ms:.0f} | {1000 * min(times_none):.0f} | {1000 * max(times_none):.0f} | 1.00x |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['kept'] if r['kept'] is not None else ''} | {r['ms']:.0f} | "
                     f"{r['min']:.0f} | {r['max']:.0f} | {r['speedup']:.2f}x |")

    lines += ["", "## Overhead against the oracle, batch-1 prefill", "",
              "*replay*: the method's recorded reductions replayed through vtoken with no scoring and no signal (its logits "
              "equal the method's: Δ replay); *scoring* = method - replay, the median over rounds of the two runs timed back to back in "
              "each round, in alternating order (min-max of those differences), as a share of the unpruned prefill, beside the "
              f"share of the unpruned prefill's FLOPs the method's own scoring needs (`vtoken.flops`) and the share of its time the "
              f"least work of that scoring takes, timed here (*floor*, `eval/scoring_floor.py`: the exponentials of a whole "
              f"attention map; blank where FLOPs are the only measure); *{prefill_interval}*: of the median of the "
              f"per-round pairs (sign-test order statistics); *in strategy calls*: the time inside the strategy's own calls "
              f"(reduce, observe, observe_attention) during the method's prefill, median over rounds, a direct measure of most "
              f"of the scoring (a lower bound: vtoken's hooks outside those calls are not in it), net of the keys the scoring "
              f"normalised, projected and handed to the layers, which compute them themselves in the replay (their input "
              f"norms and key projections timed in both, per round); *oracle*: the "
              "unwrapped model hand-run on the same schedule (Δ oracle: its first-token logits against the method's), "
              "*machinery* = replay / oracle - 1 (median over rounds of the pair); where no hand-written oracle exists the replay is the oracle and the "
              "machinery is the keep-all replay against the unwrapped model (next table). *Blocks matched out* "
              "(`eval/block_time.py`): the same pairs of runs, each run's wall time less its calls of the model's "
              "transformer blocks that the other run makes too (same block, same input shape and mask, in call order: the "
              "same work), which is most of the noise; what is left is the embedding, projector and head, transformers' "
              "glue, vtoken's hooks, the strategy's calls and any block call only one run makes; median of the per-round "
              "differences with its interval (the scoring net of the keys handed over; *matched*: the share of the "
              "method's prefill matched out). It decides a verdict only where the whole prefills cannot tell: a "
              "difference inside matched blocks shows in the whole prefills only.", "",
              f"| method | budget | method ms | replay ms (min-max) | scoring ms (min-max) | scoring / unpruned | {prefill_interval} | "
              "blocks matched out | in strategy calls | algorithm FLOPs share | floor | scoring target | oracle ms | machinery | "
              f"{prefill_interval} | blocks matched out | machinery target | Δ replay | Δ oracle |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scoring_target = ("exempt" if r["scoring_exempt"] else
                          _verdict_text(r["scoring_pass"], r["scoring_within_noise"], r["scoring_decided_by"]))
        scoring_split = "" if r["scoring_split_ms"] is None else (
            f"{r['scoring_split_ms']:.1f} ms ({100 * r['scoring_split_ms'] / base_ms:.1f}%; "
            f"{100 * r['scoring_split_interval_share'][0]:.1f}% to {100 * r['scoring_split_interval_share'][1]:.1f}%; "
            f"matched {100 * r['scoring_split_matched']:.0f}%)")
        machinery_split = "" if r["machinery_split"] is None else (
            f"{100 * r['machinery_split']:+.1f}% ({100 * r['machinery_split_interval'][0]:+.1f}% to "
            f"{100 * r['machinery_split_interval'][1]:+.1f}%)")
        low, high = r["scoring_interval_share"]
        in_calls = "" if r["strategy_calls_ms"] is None else f"{r['strategy_calls_ms']:.1f} ms ({100 * r['strategy_calls_share']:.1f}%)"
        if r["spared_key_projection_ms"] is not None:
            in_calls += f" (net of {r['spared_key_projection_ms']:.1f} ms of normed rows and keys handed to the layers)"
        floor = f"{100 * r['algorithm_floor_share']:.1f}%" if r["algorithm_floor_share"] else ""
        machinery_interval = ("" if r["machinery_interval"] is None else
                              f"{100 * r['machinery_interval'][0]:+.1f}% to {100 * r['machinery_interval'][1]:+.1f}%")
        machinery_target = _verdict_text(r["machinery_pass"], r["machinery_within_noise"], r["machinery_decided_by"])
        oracle = f"{r['oracle_ms']:.0f}" if r["oracle_ms"] is not None else "= replay"
        machinery = "" if r["machinery"] is None else f"{100 * r['machinery']:+.1f}%"
        if r["machinery_basis"] == "keep-all":
            machinery += " (keep-all)"
        oracle_diff = "" if r["oracle_logit_diff"] is None else f"{r['oracle_logit_diff']:.1e}"
        lines.append(f"| {r['method']} | {r['budget']} | {r['ms']:.0f} | {r['replay_ms']:.0f} ({r['replay_min']:.0f}-"
                     f"{r['replay_max']:.0f}) | {r['scoring_ms']:.0f} ({r['scoring_min']:.0f} to {r['scoring_max']:.0f}) | {100 * r['scoring_share']:.1f}% | "
                     f"{100 * low:.1f}% to {100 * high:.1f}% | {scoring_split} | {in_calls} | "
                     f"{100 * r['algorithm_scoring_flops_share']:.2f}% | {floor} | {scoring_target} | {oracle} | {machinery} | "
                     f"{machinery_interval} | {machinery_split} | {machinery_target} | {r['replay_logit_diff']:.1e} | {oracle_diff} |")
    verbatim = sorted({(r["method"], s) for r in rows for s in r["replayed_verbatim"]})
    recomputed = sorted({(r["method"], s) for r in rows for s in r["replayed_recomputed"]})
    lines += ["", "Merges: " + ("; ".join(f"{m} {s}" for m, s in recomputed) + " are replayed by recomputing the size-weighted "
              "means from the live features (the averaging stays in the replay's time)" if recomputed else
              "no stage's merged vectors are recomputed") + ("; " + "; ".join(f"{m} {s}" for m, s in verbatim) +
              " hand back the recorded merged vectors (not a size-weighted mean of `merged_into`, or no `merged_into`: "
              "their weights are the method's scores), so their averaging counts as scoring" if verbatim else "") + "."]

    if keep_all:
        lines += ["", "## Machinery at keep-all: every stage installed, nothing dropped, nothing scored", "",
                  "Each keep-all replay runs beside an unpruned run of its own in every round (alternately after and before it); *unpruned ms* is "
                  "the median of those paired runs, *overhead* the median over rounds of keep-all / its pair - 1.", "",
                  "| method | stages installed at keep 1 | keep-all replay ms | min | max | unpruned ms | overhead | "
                  "blocks matched out | target |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, pair in times_keep_all.items():
            values = pair["keep_all"]
            if not values:
                continue
            median = 1000 * statistics.median(values)
            unpruned_ms = 1000 * statistics.median(pair["unpruned"])
            overhead = keep_all_overhead(pair)
            stages = ", ".join(keep_all[method].reductions) or "none (the method has no stage at keep 1: hooks only)"
            split_text, split = "", None
            if pair["split"]:
                split_low, split_high, _ = median_interval(pair["split"])
                split = (statistics.median(pair["split"]), (split_low, split_high))
                split_text = f"{100 * split[0]:+.1f}% ({100 * split_low:+.1f}% to {100 * split_high:+.1f}%)"
            decided = verdict(overhead, median_interval(keep_all_ratios(pair))[:2], MACHINERY_TARGET, split)
            target = _verdict_text(decided.ok, decided.within_noise, decided.basis)
            lines.append(f"| {method} | {stages} | {median:.0f} | {1000 * min(values):.0f} | {1000 * max(values):.0f} | "
                         f"{unpruned_ms:.0f} | {100 * overhead:+.1f}% | {split_text} | {target} |")

    if profile_lines:
        lines += ["", f"## Where the scoring time goes (torch.profiler, one batch-1 prefill at {rows[0]['budget'] if rows else ''} "
                  "tokens against one of its replay; times inflated by the profiler, compare them with each other)", "",
                  *profile_lines]

    if generate:
        runs, batches = generate["runs"], generate["batches"]
        header = "| method | TTFT speed-up (batch 1) | " + " | ".join(
            f"batch {b} tokens/s (min-max) | speed-up" + ("" if b == 1 else f" | / batch 1 | ≥ {BATCH_TARGET:.2f}")
            for b in batches) + " |"
        columns = 2 + sum(2 if b == 1 else 4 for b in batches)
        lines += ["", f"## Generate throughput ({args.new_tokens} new tokens, greedy; prompts of mixed lengths, left padding; "
                  f"keep {args.generate_budget} of {family.visual})", "",
                  "Speed-ups against the unpruned model in the same rounds (median over rounds of the pair); */ batch 1*: the batch's speed-up over the batch-1 "
                  "generate speed-up (the same measure at batch 1), the issue's target, with the lowest and highest ratio "
                  f"the two speed-ups' {CONFIDENCE:.0%} intervals of the median allow (*within noise* where they hold the target). The TTFT speed-up is the "
                  "batch-1 prefill's, for reference (decoding gains less from pruning than the prefill).", "",
                  header, "|" + "---|" * columns]
        ttft = {r["method"]: r["speedup"] for r in rows if r["budget"] == args.generate_budget}
        for method in ["none", *[m for m in runs[batches[0]] if m != "none"]]:
            cells = [method, "1.00x" if method == "none" else (f"{ttft[method]:.2f}x" if method in ttft else "")]
            for b in batches:
                values = runs[b][method]["tokens_per_s"]
                if not values:
                    cells += ["not run", ""] + ([] if b == 1 else ["", ""])
                    continue
                median, low, high = median_spread(values)
                speedup = generate_speedup(runs, b, method)
                cells += [f"{median:.1f} ({low:.1f}-{high:.1f})", f"{speedup:.2f}x"]
                if b != 1:
                    ratio = gen_ratio.get((method, b)) if method != "none" else None
                    cells += ["" if ratio is None else f"{ratio[0]:.2f} ({ratio[1]:.2f} to {ratio[2]:.2f})",
                              "" if ratio is None else _batch_verdict(*ratio)]
            lines.append("| " + " | ".join(cells) + " |")
        if generate["errors"]:
            lines += ["", "Not run: " + "; ".join(f"{m} ({e})" for m, e in generate["errors"].items())]

    lines += ["", "## Memory and decode latency", "",
              f"Peak memory: {meter.how}. KV cache: the bytes of every key and value tensor in the cache a batch-1 prefill "
              "returns (read from its layers), beside `vtoken.kv_cache_bytes` for the method's schedule.", "",
              "| method | budget | prefill peak MiB | replay's peak MiB | KV cache after prefill, MiB (bytes) | "
              "vtoken.kv_cache_bytes, MiB |", "|---|---|---|---|---|---|",
              f"| none | {family.visual} | {_mib(memory['none'][0])} | | {_mib(memory['none'][1])} ({memory['none'][1]}) | "
              f"{_mib(predicted['none'])} |"]
    for r in rows:
        key = (r["method"], r["budget"])
        r["prefill_peak_bytes"], r["kv_cache_bytes"] = memory[key]
        r["replay_peak_bytes"] = memory[key + ("replay",)][0]
        r["kv_cache_bytes_predicted"] = predicted[key]
        lines.append(f"| {r['method']} | {r['budget']} | {_mib(r['prefill_peak_bytes'])} | {_mib(r['replay_peak_bytes'])} | "
                     f"{_mib(r['kv_cache_bytes'])} ({r['kv_cache_bytes']}) | {_mib(r['kv_cache_bytes_predicted'])} |")
    if generate:
        runs, batches = generate["runs"], generate["batches"]
        lines += ["", f"Generate at keep {args.generate_budget} ({args.new_tokens} new tokens): decode latency per token "
                  "(median gap between consecutive new tokens after the first; median over rounds) and time to the first token at "
                  "batch 1, peak memory of one generate call at each batch (the warm-up round's).", "",
                  "| method | decode ms/token (batch 1) | generate TTFT ms (batch 1) | " +
                  " | ".join(f"peak MiB batch {b}" for b in batches) + " |", "|---|---|---|" + "---|" * len(batches)]
        for method in runs[batches[0]]:
            one = runs[1][method]
            if not one["decode_ms"]:
                continue
            peaks = [(_mib(statistics.median(runs[b][method]["peak_bytes"])) if runs[b][method]["peak_bytes"] else "")
                     for b in batches]
            lines.append(f"| {method} | {statistics.median(one['decode_ms']):.1f} | {statistics.median(one['ttft_ms']):.0f} | "
                         + " | ".join(peaks) + " |")

    not_run = [f"{m} at {b} ({e})" for (m, b), e in skipped.items()]
    lines += ["", "## Not measured here", "",
              (f"- The real model's weights ({family.real_model}): its shape with random weights, in {args.dtype}; "
               "the prompt is the scaled shapes' (random ids), so accuracy is not measured here."
               if family.full_size else
               f"- The real model ({family.real_model}): a random-weight shape "
               f"scaled to run on 2 CPU cores (width and depth cut{'' if family.anyres else ', 576 tokens'} and the prompt "
               f"kept), {args.dtype}; `--family llava_7b --device cuda --dtype bfloat16` runs LLaVA-1.5-7B's full shape "
               "on a GPU."),
              ("- Hand-written oracles for vision-site schedules (ToMe, Representation Shift) and mask stages (AIF): "
               if family.hand_oracle else
               "- Hand-written oracles (they hand-run the unwrapped LLaVA): on this family every method's replay is "
               "its oracle, ")
              + "their replay is the oracle (the schedule with no scoring, inside vtoken), and their machinery is the "
              "keep-all replay against the unwrapped model, which bounds vtoken's fixed cost but not the cost of "
              "realising the merges or drops themselves.",
              "- Time to first token and overheads at batch > 1 (the overhead tables are batch 1); memory peaks are "
              "single calls, not repeated to a spread.",
              "- Scoring of a merge whose weights are scores (VFlowOpt's recycling, Representation Shift's merge mode) "
              "includes its averaging: the replay hands the recorded vectors back."]
    if not_run:
        lines.append("- Not run (the method refused the point): " + "; ".join(not_run))
    text = "\n".join(lines) + "\n"
    data = {"command": command, "machine": machine_text(args, device, load_at_start), "device": str(device),
            "unpruned_ms": base_ms, "unpruned_times_s": times_none, "rows": rows,
            "keep_all_times_s": times_keep_all, "memory_method": meter.how,
            "kv_cache_bytes_unpruned": memory["none"][1], "prefill_peak_bytes_unpruned": memory["none"][0],
            "profile": profile_lines, "generate": generate, "skipped": {f"{m}@{b}": e for (m, b), e in skipped.items()},
            "args": {k: v for k, v in vars(args).items() if k != "model_family"}}
    return text, data


if __name__ == "__main__":
    main()
