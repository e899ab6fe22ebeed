"""Random model configurations and prompts for every vision-language family, none of which the
generic suites use: random depths and widths, grouped / multi-query / multi-head attention, head
dims 8 to 32, other tower sizes and patch sizes, Llama, Qwen2, Phi-3 (fused qkv_proj, partial rotary)
or Gemma2 (soft-capped logits, eager only) text models under LLaVA, AnyRes grid
pinpoints and aspect ratios, Qwen2.5-VL windows and full-attention blocks, Qwen3-VL DeepStack layers,
Qwen videos, and batches of 1 to 4 left-padded samples holding 0, 1 or 2 images each.

Everything is drawn from one ``random.Random``, so a seed names a case: ``RandomCase.draw(seed)``.
``eval/fuzz_models.py`` runs the checks of ``eval/wrap_checks.py`` over fresh seeds; the suite runs a
fixed slice of seeds (``tests/test_random_models.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

IMAGE, VIDEO, VISION_START, VISION_END, PAD, VOCAB = 99, 98, 97, 96, 0, 100
#: Tokens a generate call must never emit (a generated image token would ask for pixels).
SUPPRESS = [IMAGE, VIDEO, VISION_START, VISION_END]
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: The family as ``vtoken.methods()`` names it.
LABELS = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision",
          "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ANYRES = ("llava_next", "llava_onevision")
#: Interleaved M-RoPE sections (temporal, height, width) per head dim.
MROPE_SECTIONS = {8: [2, 1, 1], 16: [2, 3, 3], 32: [4, 6, 6]}


@dataclass
class TextShape:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    head_dim: int
    intermediate: int

    @classmethod
    def draw(cls, rng: random.Random) -> "TextShape":
        head_dim = rng.choice([8, 16, 32])
        heads = rng.choice([h for h in (1, 2, 4, 8) if 32 <= h * head_dim <= 128])
        kv_heads = rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
        hidden = heads * head_dim
        return cls(hidden, heads, kv_heads, rng.randint(2, 6), head_dim, rng.choice([1, 2, 3]) * hidden)

    def common(self) -> dict:
        return dict(vocab_size=VOCAB, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, max_position_embeddings=1024, pad_token_id=PAD,
                    bos_token_id=1, eos_token_id=2)


@dataclass
class Image:
    """One image (or Qwen video) of a prompt: its pixels as the model takes them."""

    pixels: torch.Tensor
    size: tuple[int, int] | None = None  # AnyRes: the original (height, width)
    grid: torch.Tensor | None = None  # Qwen: (t, h, w) patches
    video: bool = False


@dataclass
class Sample:
    """One prompt: ``words[i]`` text tokens, then image ``i``; the last run of words closes it."""

    images: list[Image]
    words: list[list[int]]


@dataclass
class RandomCase:
    """A random model of one family, a batch for it and what was drawn, from one seed."""

    seed: int
    family: str
    model: nn.Module
    samples: list[Sample]
    inputs: dict
    #: Visual tokens per image, in batch order, as the plain model makes them.
    image_tokens: list[int]
    drawn: dict = field(default_factory=dict)

    @classmethod
    def draw(cls, seed: int, family: str | None = None, attn: str | None = None) -> "RandomCase":
        rng = random.Random(seed)
        family = family or rng.choice(FAMILIES)
        attn = attn or rng.choice(["sdpa", "sdpa", "eager"])
        model, drawn = build_model(family, rng)
        if not all(getattr(module, "_supports_sdpa", True) for module in model.modules()):
            attn = "eager"  # Gemma2 runs eager only (SDPA has no logit soft-cap)
        model.set_attn_implementation(attn)
        model.generation_config.pad_token_id = PAD
        generator = torch.Generator().manual_seed(rng.randint(0, 10_000))
        samples = draw_samples(model, family, drawn, rng, generator)
        inputs, counts = build_inputs(model, family, samples)
        return cls(seed, family, model, samples, inputs, counts, dict(drawn, attn=attn))

    def inputs_of(self, index: int) -> dict:
        """The batch of sample ``index`` alone (as the family's processor would make it)."""
        first = sum(len(s.images) for s in self.samples[:index])
        counts = self.image_tokens[first : first + len(self.samples[index].images)]
        return build_inputs(self.model, self.family, [self.samples[index]], counts)[0]

    def describe(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.inputs.items() if torch.is_tensor(v)}
        return f"seed {self.seed}: {self.family} {self.drawn} inputs {shapes} visual tokens {self.image_tokens}"


# --- models ---------------------------------------------------------------------------------------
def build_model(family: str, rng: random.Random) -> tuple[nn.Module, dict]:
    """A random-weight model of ``family`` in eval mode and what was drawn for it."""
    text = TextShape.draw(rng)
    torch.manual_seed(rng.randint(0, 10_000))
    if family in QWEN:
        model, drawn = _qwen(family, text, rng)
    else:
        model, drawn = _llava(family, text, rng)
    return model.eval(), dict(drawn, text=text)


def _llama_like(pick: float, text: TextShape):
    """A Llama-style LLM config: Llama mostly, Phi-3 (one fused qkv_proj, sometimes partial rotary),
    Gemma2 (logits soft-capped or not, extra norms, sliding-window layer types), Mistral (a sliding
    window on every layer: 4096, or 32, shorter than many prompts: in-LLM methods then refuse it in
    one line, the others run past it) or one of :data:`OTHER_LLMS`. Drawn from a stream of its own
    seeded by ``pick``, so the draws after it, and the cases of seeds that keep Llama, are what they
    were before the others were drawn (Mistral took a tenth of Llama's, the others a fifth more)."""
    import transformers as tf

    own = random.Random(pick)
    backbone = own.random()
    if backbone < 0.15:
        return tf.Phi3Config(**text.common(), partial_rotary_factor=own.choice([1.0, 0.5]))
    if backbone < 0.3:
        return tf.Gemma2Config(**text.common(), head_dim=text.head_dim, query_pre_attn_scalar=text.head_dim,
                               attn_logit_softcapping=own.choice([None, 2.0, 50.0]))
    if backbone < 0.37:
        return tf.MistralConfig(**text.common(), head_dim=text.head_dim, sliding_window=own.choice([4096, 32]))
    if backbone < 0.52:
        return _other_llm(own.choice(OTHER_LLMS), text, own)
    return tf.LlamaConfig(**text.common())


#: LLMs that make their attention or MLP their own way, drawn in the cases that were Llama's
#: before them (``backbone`` 0.37 to 0.52), one as often as another: post-norm layers with q/k norms over the whole
#: projection (OLMo2), rotary on interleaved pairs (Cohere, GLM: partial), per-head LayerNorms taken
#: with the heads first (StableLM), multipliers for the embeddings, residuals, softmax scale and
#: logits (Granite, as IBM's LLaVA-NeXT Granite Vision), per-head q/k norms (Qwen3), a scaled
#: embedding (Gemma), layers without rotary (NoPE: SmolLM3's every fourth, EXAONE 4's and Cohere2's
#: global ones), mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE's
#: ``block_sparse_moe``), and two that in-LLM methods refuse (HunYuan's q/k norms after the rotary,
#: FalconH1's Mamba mixer beside the attention: the checks see a one-line refusal, the model unchanged).
OTHER_LLMS = ("olmo2", "cohere", "glm", "stablelm", "granite", "qwen3", "gemma", "smollm3", "exaone4", "cohere2",
              "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "hunyuan_v1_dense", "falcon_h1")


def _other_llm(kind: str, text: TextShape, own: random.Random):
    import transformers as tf

    common = text.common()
    if kind == "olmo2":
        return tf.Olmo2Config(**common)
    if kind == "cohere":
        return tf.CohereConfig(**common, use_qk_norm=own.random() < 0.5, logit_scale=own.choice([1.0, 0.0625]))
    if kind == "glm":
        return tf.GlmConfig(**common, head_dim=text.head_dim, partial_rotary_factor=own.choice([0.5, 1.0]))
    if kind == "stablelm":
        return tf.StableLmConfig(**common, partial_rotary_factor=own.choice([0.25, 1.0]),
                                 qk_layernorm=own.random() < 0.5, use_parallel_residual=own.random() < 0.5)
    if kind == "granite":
        return tf.GraniteConfig(**common, embedding_multiplier=own.choice([1.0, 12.0]),
                                residual_multiplier=own.choice([1.0, 0.22]),
                                attention_multiplier=own.choice([text.head_dim ** -0.5, 0.015625]),
                                logits_scaling=own.choice([1.0, 8.0]))
    if kind == "qwen3":
        return tf.Qwen3Config(**common, head_dim=text.head_dim)
    if kind == "smollm3":
        return tf.SmolLM3Config(**common)
    if kind == "exaone4":
        return tf.Exaone4Config(**common, head_dim=text.head_dim, sliding_window=4096)
    if kind == "cohere2":
        return tf.Cohere2Config(**common, head_dim=text.head_dim, sliding_window=4096)
    if kind == "mixtral":
        return tf.MixtralConfig(**common, head_dim=text.head_dim, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text.hidden,
                                 shared_expert_intermediate_size=text.hidden)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=text.head_dim, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=text.hidden, decoder_sparse_step=own.choice([1, 2]))
    if kind == "olmoe":
        return tf.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2)
    if kind == "granitemoe":
        return tf.GraniteMoeConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                   residual_multiplier=own.choice([1.0, 0.22]))
    if kind == "hunyuan_v1_dense":
        return tf.HunYuanDenseV1Config(**common, head_dim=text.head_dim)
    if kind == "falcon_h1":
        return tf.FalconH1Config(**common, head_dim=text.head_dim, mamba_d_ssm=text.hidden, mamba_n_heads=4,
                                 mamba_d_head=text.hidden // 4, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8)
    return tf.GemmaConfig(**common, head_dim=text.head_dim)


def _llava(family: str, text: TextShape, rng: random.Random) -> tuple[nn.Module, dict]:
    import transformers as tf

    size = rng.choice([16, 24, 32] if family != "llava" else [16, 24, 32, 40, 48])
    patch = rng.choice([p for p in (4, 8) if 2 <= size // p <= 8])
    width = rng.choice([16, 32, 48])
    vision_kwargs = dict(image_size=size, patch_size=patch, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=rng.randint(2, 4), num_attention_heads=rng.choice([2, 4]))
    if family == "llava_onevision":
        vision = tf.SiglipVisionConfig(**vision_kwargs)
        text_config = (tf.Qwen2Config if rng.random() < 0.7 else tf.LlamaConfig)(**text.common())
        feature_layer = rng.choice([-1, -1, -2])
    else:
        vision = tf.CLIPVisionConfig(**vision_kwargs, projection_dim=32)
        pick = rng.random()
        text_config = _llama_like(pick, text) if pick < 0.8 else tf.Qwen2Config(**text.common())
        feature_layer = rng.choice([-1, -2])
    drawn = dict(image_size=size, patch=patch, vision_layers=vision.num_hidden_layers,
                 feature_layer=feature_layer, text_model=type(text_config).__name__)
    softcap = getattr(text_config, "attn_logit_softcapping", None)
    if softcap:
        drawn["softcap"] = softcap
    if getattr(text_config, "partial_rotary_factor", 1.0) != 1.0:
        drawn["partial_rotary"] = text_config.partial_rotary_factor
    common = dict(vision_config=vision, text_config=text_config, image_token_id=IMAGE)
    if family == "llava":
        if rng.random() < 0.15:
            feature_layer = drawn["feature_layer"] = [-2, -1]
        strategy = "default" if rng.random() < 0.85 else "full"
        tokens = (size // patch) ** 2 + (strategy == "full")
        config = tf.LlavaConfig(**common, vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                                image_seq_length=tokens, multimodal_projector_bias=rng.random() < 0.8)
        return tf.LlavaForConditionalGeneration(config), dict(drawn, strategy=strategy)
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [size, 3 * size], [3 * size, size]]
    pinpoints = rng.sample(pinpoints, rng.randint(1, len(pinpoints)))
    drawn["pinpoints"] = pinpoints
    if family == "llava_next":
        config = tf.LlavaNextConfig(**common, vision_feature_layer=feature_layer,
                                    vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                                    image_seq_length=(size // patch) ** 2)
        model = tf.LlavaNextForConditionalGeneration(config)
    else:
        ratio = rng.choice(["anyres_max_1", "anyres_max_2", "anyres_max_9"])
        config = tf.LlavaOnevisionConfig(**common, video_token_id=VIDEO, vision_feature_layer=feature_layer,
                                         vision_feature_select_strategy="full", vision_aspect_ratio=ratio,
                                         image_grid_pinpoints=pinpoints)
        model = tf.LlavaOnevisionForConditionalGeneration(config)
        drawn["aspect_ratio"] = ratio
    with torch.no_grad():  # the newline embedding starts at zero; a random one shows where it lands
        model.model.image_newline.normal_()
    return model, drawn


def _qwen(family: str, text: TextShape, rng: random.Random) -> tuple[nn.Module, dict]:
    import transformers as tf

    patch = rng.choice([2, 4])
    width, heads, depth = rng.choice([16, 32, 48]), rng.choice([2, 4]), rng.randint(2, 4)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE_SECTIONS[text.head_dim]}
    text_config = dict(text.common(), rope_parameters=rope)
    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                  vision_end_token_id=VISION_END)
    tower = dict(depth=depth, num_heads=heads, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                 in_channels=3)
    drawn = dict(patch=patch, vision_layers=depth, videos=rng.random() < 0.25)
    if family == "qwen3_vl":
        text_config = dict(text_config, head_dim=text.head_dim, rope_parameters=dict(rope, mrope_interleaved=True))
        deepstack = sorted(rng.sample(range(depth), rng.randint(0, min(depth, text.layers, 3))))
        vision = dict(tower, hidden_size=width, intermediate_size=2 * width, out_hidden_size=text.hidden,
                      num_position_embeddings=rng.choice([16, 64]), deepstack_visual_indexes=deepstack)
        config = tf.Qwen3VLConfig(vision_config=vision, text_config=text_config, **tokens)
        return tf.Qwen3VLForConditionalGeneration(config), dict(drawn, deepstack=deepstack)
    if family == "qwen2_5_vl":
        window = rng.choice([2 * patch, 4 * patch, 8 * patch])
        full = sorted(rng.sample(range(depth), rng.randint(0, depth)))
        vision = dict(tower, hidden_size=width, intermediate_size=2 * width, out_hidden_size=text.hidden,
                      window_size=window, fullatt_block_indexes=full)
        config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text_config, **tokens)
        return tf.Qwen2_5_VLForConditionalGeneration(config), dict(drawn, window=window, full_attention=full)
    vision = dict(tower, embed_dim=width, hidden_size=text.hidden, mlp_ratio=2)
    config = tf.Qwen2VLConfig(vision_config=vision, text_config=text_config, **tokens)
    return tf.Qwen2VLForConditionalGeneration(config), drawn


# --- prompts --------------------------------------------------------------------------------------
def draw_samples(model: nn.Module, family: str, drawn: dict, rng: random.Random,
                 generator: torch.Generator) -> list[Sample]:
    """1 to 4 samples of 0 (15%), 1 or 2 (15%) images each; at least one image in the batch."""
    def sample(images: int) -> Sample:
        pictures = [_image(model, family, drawn, rng, generator) for _ in range(images)]
        lengths = [rng.randint(0, 6) for _ in range(images)] + [rng.randint(1, 6)]
        return Sample(pictures, [torch.randint(3, 90, (n,), generator=generator).tolist() for n in lengths])

    def count() -> int:
        r = rng.random()
        return 0 if r < 0.15 else (2 if r > 0.85 else 1)

    samples = [sample(count()) for _ in range(rng.randint(1, 4))]
    if not any(s.images for s in samples):
        samples[rng.randrange(len(samples))] = sample(1)
    return samples


def _image(model: nn.Module, family: str, drawn: dict, rng: random.Random, generator: torch.Generator) -> Image:
    if family == "llava":
        size = drawn["image_size"]
        return Image(torch.randn(3, size, size, generator=generator))
    if family in ANYRES:
        size = drawn["image_size"]
        shape = (rng.randint(size // 2, 3 * size), rng.randint(size // 2, 3 * size))
        return Image(torch.randn(16, 3, size, size, generator=generator), size=shape)
    frames = rng.choice([1, 2]) if drawn["videos"] and family != "qwen3_vl" else 1  # Qwen3-VL: one frame a video
    grid = torch.tensor([frames, 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)])
    patch = drawn["patch"]
    return Image(torch.randn(int(grid.prod()), 3 * 2 * patch * patch, generator=generator), grid=grid,
                 video=drawn["videos"])


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def right_padded(x: dict) -> dict:
    """``x`` with each row's tokens moved to the front, in order, and its padding to the end: the same
    prompts right-padded (token-aligned fields with them; the images are unchanged)."""
    mask = x["attention_mask"].bool()
    out = dict(x)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in x:
            out[key] = torch.stack([torch.cat([row[m], row[~m]]) for row, m in zip(x[key], mask)])
    return out


def training_labels(x: dict) -> torch.Tensor:
    """Language-modelling labels of ``x``: its tokens, -100 (no target) on padding, image and video
    placeholders and each row's first token (left padding would otherwise make it a target of a pad
    slot, right padding not: the loss would differ with the side)."""
    ids, mask = x["input_ids"], x["attention_mask"]
    ignored = (mask == 0) | (ids == IMAGE) | (ids == VIDEO)
    ignored[torch.arange(ids.shape[0]), mask.long().argmax(-1)] = True
    return ids.masked_fill(ignored, -100)


def build_inputs(model: nn.Module, family: str, samples: list[Sample],
                 counts: list[int] | None = None) -> tuple[dict, list[int]]:
    """The model's keyword arguments for ``samples`` (left-padded) and the visual tokens of each image
    (``counts``, or asked of the plain model: AnyRes counts come from its own ``get_image_features``)."""
    images = [image for s in samples for image in s.images]
    per_sample = torch.tensor([len(s.images) for s in samples])
    if counts is None:
        counts = _image_tokens(model, family, images, per_sample) if images else []
    rows, next_image = [], 0
    for s in samples:
        row = [1]
        for i, words in enumerate(s.words):
            row += words
            if i < len(s.images):
                tokens = counts[next_image]
                next_image += 1
                if family in QWEN:
                    row += [VISION_START, *[VIDEO if s.images[i].video else IMAGE] * tokens, VISION_END]
                else:
                    row += [IMAGE] * tokens
        rows.append(row)
    ids, mask = left_pad(rows)
    x = {"input_ids": ids, "attention_mask": mask}
    if family in QWEN:
        x["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
        stills = [image for image in images if not image.video]
        videos = [image for image in images if image.video]
        if stills:
            x["pixel_values"] = torch.cat([image.pixels for image in stills])
            x["image_grid_thw"] = torch.stack([image.grid for image in stills])
        if videos:
            x["pixel_values_videos"] = torch.cat([image.pixels for image in videos])
            x["video_grid_thw"] = torch.stack([image.grid for image in videos])
    elif family == "llava":
        if images:
            x["pixel_values"] = torch.stack([image.pixels for image in images])
    elif images:
        x["pixel_values"], x["image_sizes"] = _anyres_pixels(model, family, images, per_sample)
        if family == "llava_onevision" and bool((per_sample > 1).any()):
            x["batch_num_images"] = per_sample
    return x, counts


def _base_view_only(family: str, per_sample: torch.Tensor) -> list[bool]:
    """OneVision encodes only the base view of an image that shares its prompt with others."""
    return [family == "llava_onevision" and int(n) > 1 for n in per_sample.tolist() for _ in range(int(n))]


def _anyres_pixels(model, family: str, images: list[Image], per_sample: torch.Tensor):
    from vtoken import compat

    config = model.config
    size = config.vision_config.image_size
    crops = [1 if base else compat.image_size_to_num_patches(list(image.size), config.image_grid_pinpoints, size)
             for image, base in zip(images, _base_view_only(family, per_sample))]
    pixels = torch.zeros(len(images), max(crops), 3, size, size)
    for i, (image, n) in enumerate(zip(images, crops)):
        pixels[i, :n] = image.pixels[:n]
    return pixels, torch.tensor([list(image.size) for image in images])


def _image_tokens(model, family: str, images: list[Image], per_sample: torch.Tensor) -> list[int]:
    """Visual tokens per image: Qwen's merged grid, LLaVA's fixed count, AnyRes from the plain model."""
    if family in QWEN:
        return [int(image.grid.prod()) // 4 for image in images]
    config = model.config
    if family == "llava":
        return [config.image_seq_length] * len(images)
    pixels, sizes = _anyres_pixels(model, family, images, per_sample)
    kwargs = dict(pixel_values=pixels, image_sizes=sizes, vision_feature_layer=config.vision_feature_layer,
                  vision_feature_select_strategy=config.vision_feature_select_strategy)
    if family == "llava_onevision":
        kwargs.update(vision_aspect_ratio=config.vision_aspect_ratio, batch_num_images=per_sample)
    with torch.no_grad():
        out = model.model.get_image_features(**kwargs)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return [f.shape[0] for f in features]
