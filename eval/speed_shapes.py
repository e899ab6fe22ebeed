"""The shapes the speed bench times (``eval/bench_speed.py``): random-weight models of every family,
scaled to run on 2 CPU cores (and LLaVA-1.5-7B's full shape for an accelerator), and their prompts:
a system prompt, one image, a question; batches of mixed question lengths, left-padded.

``FAMILIES`` maps each ``--family`` name to a :class:`Family`: how to build its model and inputs, its
text and special tokens, whether a hand-written oracle exists for it, its committed result, and the
attention-map shape its scoring floor is timed on (``eval/scoring_floor.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vtoken import compat

from scoring_floor import AttentionMapShape  # eval/scoring_floor.py

IMAGE_TOKEN, VOCAB, VISUAL = 99, 100, 576
#: Qwen2-VL's other special tokens in the same small vocabulary.
VIDEO_TOKEN, VISION_START, VISION_END = 98, 97, 96
SYSTEM_TOKENS, QUESTION_TOKENS = 35, 16
#: Text tokens of the batch-1 LLaVA prompt (BOS, system prompt, question), for vtoken.flops / kv_cache_bytes.
TEXT_TOKENS = 1 + SYSTEM_TOKENS + QUESTION_TOKENS


#: Decoder layers of the scaled LLMs.
SCALED_LLM_LAYERS = 8


def scaled_llava(seed: int = 0, llm_layers: int = SCALED_LLM_LAYERS) -> LlavaForConditionalGeneration:
    """The scaled LLaVA-1.5 shape: CLIP 384 x 6 layers on 336 px (576 tokens), Llama 768 wide (GQA 12/4)
    with ``llm_layers`` decoder layers (8 by default; 32, Vicuna-7B's depth, for the ``llava_deep``
    family)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=384, intermediate_size=1536,
                              num_hidden_layers=6, num_attention_heads=6)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=llm_layers,
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


def scaled_qwen2_vl(seed: int = 0, version: str = "2", llm_layers: int = SCALED_LLM_LAYERS):
    """A random-weight Qwen2-VL shape scaled to 2 CPU cores: a 4-block packed vision tower 128 wide
    (4 heads) on 2304 patches with the 2 x 2 merger (576 visual tokens), and the same LLM as
    :func:`scaled_llava` (768 wide, 8 layers by default, GQA 12/4) with M-RoPE sections [8, 12, 12].

    ``version="2.5"``: Qwen2.5-VL's tower (RMSNorm, SwiGLU, windowed attention in 112 px windows,
    full attention in blocks 1 and 3, as the real one alternates them); ``"3"``: Qwen3-VL's (16 px
    patches, learned position embeddings, DeepStack from blocks 1 and 2 into the first LLM layers)
    and its Qwen3 LLM (q/k norms, head dim 64, interleaved M-RoPE). ``llm_layers``: the LLM's depth."""
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    qwen_text = {**QWEN_TEXT, "num_hidden_layers": llm_layers}
    common = dict(spatial_merge_size=2, temporal_patch_size=2, in_channels=3, patch_size=QWEN_PATCH[version])
    if version == "3":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        text = {**qwen_text, "head_dim": 64,
                "rope_parameters": {**QWEN_TEXT["rope_parameters"], "mrope_section": [8, 12, 12], "mrope_interleaved": True}}
        vision = dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, out_hidden_size=768,
                      num_position_embeddings=48 * 48, deepstack_visual_indexes=[1, 2], **common)
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(vision_config=vision, text_config=text, **QWEN_TOKENS))
    elif version == "2.5":
        vision = dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, out_hidden_size=768,
                      window_size=112, fullatt_block_indexes=[1, 3], **common)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=qwen_text,
                                                                     **QWEN_TOKENS))
    else:
        vision = dict(depth=4, embed_dim=128, num_heads=4, hidden_size=768, mlp_ratio=4, **common)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=qwen_text, **QWEN_TOKENS))
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


def scaled_anyres(kind: str, seed: int = 0, llm_layers: int = SCALED_LLM_LAYERS):
    """A random-weight LLaVA-NeXT (``kind="next"``: CLIP 384 x 6 layers with its CLS token, read at
    the second-to-last layer; the LLaVA LLM) or LLaVA-OneVision (``"onevision"``: SigLIP 384 x 6
    layers, no CLS, read in full at the last layer, ``anyres_max_9``; a Qwen2 LLM of the same size)
    shape on :data:`ANYRES_PINPOINTS`, with a random newline embedding; ``llm_layers``: the LLM's depth."""
    from transformers import (
        LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tower = dict(image_size=ANYRES_TILE, patch_size=14, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                 num_attention_heads=6)
    llm = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=llm_layers, num_attention_heads=12,
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


def pack_views(model, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> list:
    """LLaVA-NeXT's / OneVision's own packing of per-view features (``[views, patches, d]`` per
    image): base view, unpadded crops, ``newline`` after each row (OneVision: AnyRes-Max)."""
    config = model.config
    if getattr(config, "vision_aspect_ratio", None) is not None:  # OneVision
        return compat.pack_anyres_max_features(model.model, features, image_sizes, newline, config.vision_aspect_ratio)
    return compat.pack_anyres_features(model.model, features, image_sizes, config.vision_feature_select_strategy, newline)


def anyres_visual_tokens(model) -> int:
    """Visual tokens the model makes of one :data:`ANYRES_IMAGE` (its own packing: base view,
    unpadded crops, newlines)."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    features = [torch.zeros(ANYRES_VIEWS, side * side, 1)]
    return pack_views(model, features, torch.tensor([list(ANYRES_IMAGE)]), torch.zeros(1))[0].shape[0]


def anyres_prompt(seed: int = 0, batch: int = 1, visual: int = 744) -> dict:
    """``batch`` LLaVA-NeXT / OneVision prompts as :func:`prompt` (``visual`` image tokens), with the
    processor's ``[batch, 5, 3, 168, 168]`` views (base first) and ``image_sizes``."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = _prompt_ids(g, batch, [IMAGE_TOKEN] * visual)
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(batch, ANYRES_VIEWS, 3, ANYRES_TILE, ANYRES_TILE, generator=g),
            "image_sizes": torch.tensor([list(ANYRES_IMAGE)] * batch)}


#: The pruning sites a hand-written oracle can cover.
EVERY_SITE = ("vision", "projector", "llm")


@dataclass(frozen=True)
class Family:
    """A model family the bench runs on: how to build its scaled model and prompts, and how to
    describe them."""

    name: str
    #: The heading's model name at the scaled depth (:attr:`title` names another depth).
    base_title: str
    #: The report's "Model:" sentence (without the timing), ``{llm_layers}`` standing for a scaled
    #: shape's LLM depth (:attr:`description`).
    description_format: str
    #: Text tokens of the batch-1 prompt (vtoken.flops / kv_cache_bytes).
    text_tokens: int
    #: Token ids generate must not produce (the image placeholder and the family's other specials).
    special_tokens: tuple[int, ...]
    #: The sites whose stages ``eval/speed_oracle.oracle_call`` (the unwrapped model run by hand) can run
    #: on this family: vision, projector and LLM on every family (the CLIP / SigLIP tower hand-run
    #: block by block on each view's kept patches, placed where the model's own packing puts them;
    #: Qwen-VL's packed tower on its kept patches with their own rotary positions and segments, then
    #: its merged patches with their M-RoPE ids and Qwen3-VL's DeepStack features; then the LLM by hand).
    hand_oracle: tuple[str, ...]
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
    #: Decoder layers of the scaled LLM (:meth:`at_depth` changes it).
    llm_layers: int = SCALED_LLM_LAYERS
    #: Decoder layers of the real model's LLM (Vicuna-7B 32, Qwen2-7B 28, Qwen3-8B 36): where an in-LLM
    #: method's stages sit as in the paper's model (``--llm-layers real``).
    real_llm_layers: int = 32

    def at_depth(self, layers: int) -> "Family":
        """This scaled shape with ``layers`` LLM decoder layers (everything else unchanged). An
        in-LLM method's stages follow the depth (TransPrune's 7, 9, 12 of 32 become 2, 3, 4 of 8), so
        its scoring's share of the prefill depends on it; the real model's depth
        (:attr:`real_llm_layers`) puts them where the paper's do."""
        if self.full_size:
            raise ValueError(f"--family {self.name} is a full-size shape: its depth is the real model's")
        if layers < 2:
            raise ValueError(f"an LLM of {layers} layer(s): give at least 2")
        return replace(self, llm_layers=layers)

    @property
    def title(self) -> str:
        """The heading's model name (a scaled shape at another depth says which)."""
        if self.full_size or self.llm_layers == SCALED_LLM_LAYERS:
            return self.base_title
        return f"{self.base_title} with {self.llm_layers} LLM layers"

    @property
    def description(self) -> str:
        """The report's "Model:" sentence, at this shape's LLM depth."""
        return self.description_format.format(llm_layers=self.llm_layers)

    # The builders are looked up at call time.
    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if self.full_size:
            return llava_7b(torch.device(device), dtype)
        if self.qwen is not None:
            model = scaled_qwen2_vl(version=self.qwen, llm_layers=self.llm_layers)
        elif self.anyres is not None:
            model = scaled_anyres(self.anyres, llm_layers=self.llm_layers)
        else:
            model = scaled_llava(llm_layers=self.llm_layers)
        return model.to(device=torch.device(device), dtype=dtype)

    def inputs(self, seed: int = 0, batch: int = 1) -> dict:
        if self.qwen is not None:
            return qwen_prompt(seed, batch, self.qwen)
        return prompt(seed, batch) if self.anyres is None else anyres_prompt(seed, batch, self.visual)


def family_at(name: str, llm_layers: str | None = None) -> Family:
    """``FAMILIES[name]``, at ``llm_layers`` decoder layers when given (a number, or ``"real"``: the
    real model's depth); ``ValueError`` names what is wrong (the scripts' ``--llm-layers``)."""
    family = FAMILIES[name]
    if llm_layers is None:
        return family
    if llm_layers == "real":
        return family.at_depth(family.real_llm_layers)
    if not llm_layers.isdigit():
        raise ValueError(f"--llm-layers takes a number of decoder layers or 'real' (the real model's), not {llm_layers!r}")
    return family.at_depth(int(llm_layers))


def _qwen_family(name: str, version: str, real_model: str, real_layers: int, description: str) -> Family:
    """A Qwen family: what every Qwen shape shares (the prompt's vision start / end tokens, its special
    tokens, a hand-written oracle for every site, the 4-head map over 2304 patches at head dim 32, the
    result's path)."""
    return Family(name, f"a {real_model.rsplit('-', 1)[0]} shape", description, TEXT_TOKENS + 2, QWEN_SPECIALS,
                  EVERY_SITE,
                  f"eval/results/bench_speed/cpu_{name}.md", AttentionMapShape(heads=4, tokens=2304, head_dim=32),
                  real_model, version, real_llm_layers=real_layers)


def _anyres_family(kind: str, visual: int, tokens_per_view: int, real_model: str, real_layers: int,
                   description: str) -> Family:
    """A LLaVA-NeXT / OneVision family: the LLaVA prompt with :func:`anyres_prompt`'s image, a
    hand-written oracle for every site, five views' maps, budgets at the LLaVA ones' fractions of
    ``visual``."""
    name = f"llava_{kind}"
    return Family(name, f"a {real_model.rsplit('-', 1)[0]} shape", description, TEXT_TOKENS, (IMAGE_TOKEN,), EVERY_SITE,
                  f"eval/results/bench_speed/cpu_{name}.md",
                  AttentionMapShape(heads=6, tokens=tokens_per_view, head_dim=64, views=ANYRES_VIEWS), real_model,
                  anyres=kind, visual=visual, budgets=tuple(round(visual * f) for f in (1 / 9, 2 / 9, 1 / 3)),
                  real_llm_layers=real_layers)


_LLAVA = Family(
    "llava", "a LLaVA-1.5 shape",
    "CLIP 384 x 6 layers on 336 px (576 tokens), Llama 768 x {llm_layers} layers (GQA 12/4), random weights",
    TEXT_TOKENS, (IMAGE_TOKEN,), EVERY_SITE, "eval/results/bench_speed/cpu.md",
    AttentionMapShape(heads=6, tokens=577, head_dim=64), "LLaVA-1.5-7B", real_llm_layers=32)

FAMILIES = {
    "llava": _LLAVA,
    # The same shape at Vicuna-7B's depth (``--family llava --llm-layers real`` under its own name, the
    # one its committed results were run with): an in-LLM method's layers (TransPrune's stages before
    # layers 7, 9, 12 of 32, FastV's K = 2, AIF's) scale with the depth, so on 8 layers its scoring
    # weighs about four times what it does in the paper's model; here it weighs what it does there.
    "llava_deep": replace(_LLAVA.at_depth(_LLAVA.real_llm_layers), name="llava_deep",
                          committed="eval/results/bench_speed/cpu_llava_deep.md"),
    "llava_7b": Family(
        "llava_7b", "LLaVA-1.5-7B's full shape",
        "CLIP ViT-L/14 1024 x 24 layers on 336 px (576 tokens), Vicuna-7B 4096 x 32 layers (32 heads), random "
        "weights; sized for an accelerator or a CPU with bfloat16 matrix units (AMX: 6.4 s a prefill on two cores)",
        TEXT_TOKENS, (IMAGE_TOKEN,), EVERY_SITE, "eval/results/bench_speed/cuda_llava_7b.md",
        AttentionMapShape(heads=16, tokens=577, head_dim=64), "LLaVA-1.5-7B", full_size=True, llm_layers=32),
    "qwen2_vl": _qwen_family(
        "qwen2_vl", "2", "Qwen2-VL-7B", 28,
        "Qwen2-VL vision tower 128 x 4 blocks on 672 px (2304 patches of 14 px, merged 2 x 2 into 576 tokens), "
        "Qwen2 768 x {llm_layers} layers (GQA 12/4, M-RoPE), random weights"),
    "qwen2_5_vl": _qwen_family(
        "qwen2_5_vl", "2.5", "Qwen2.5-VL-7B", 28,
        "Qwen2.5-VL vision tower 128 x 4 blocks on 672 px (2304 patches of 14 px; windowed attention in 112 px "
        "windows, full attention in blocks 1 and 3; merged 2 x 2 into 576 tokens), Qwen2 768 x {llm_layers} layers (GQA 12/4, "
        "M-RoPE), random weights"),
    "qwen3_vl": _qwen_family(
        "qwen3_vl", "3", "Qwen3-VL-8B", 36,
        "Qwen3-VL vision tower 128 x 4 blocks on 768 px (2304 patches of 16 px, DeepStack from blocks 1 and 2; "
        "merged 2 x 2 into 576 tokens), Qwen3 768 x {llm_layers} layers (GQA 12/4, head dim 64, interleaved M-RoPE), "
        "random weights"),
    "llava_next": _anyres_family(
        "next", 744, 145, "LLaVA-NeXT-7B", 32,
        "CLIP 384 x 6 layers on 168 px views (a base view and a 2 x 2 grid of crops of a 336 x 336 image: 144 tokens "
        "each; 576 crop tokens with a newline per row and the base view's 144 make 744), Llama 768 x {llm_layers} layers "
        "(GQA 12/4), random weights"),
    "llava_onevision": _anyres_family(
        "onevision", 744, 144, "LLaVA-OneVision-7B", 28,
        "SigLIP 384 x 6 layers on 168 px views (a base view and a 2 x 2 grid of crops of a 336 x 336 image: 144 "
        "tokens each, anyres_max_9; 576 crop tokens with a newline per row and the base view's 144 make 744), "
        "Qwen2 768 x {llm_layers} layers (GQA 12/4), random weights"),
}
