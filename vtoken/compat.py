"""Every transformers name that vtoken reads or writes and that moves between releases.

vtoken patches close to transformers' internals (keyword arguments the hooks see, cache layers,
mask builders, rotary modules, attention-module attributes, multimodal encoder outputs). Each such
name is read or written here, version-gated here and nowhere else, so a new release means one file
to change. The declared range (``pyproject.toml``) is what CI tests: the lowest and the newest
release it admits.

Known moves:

- 5.24 renamed the KV-cache keyword and output field ``past_key_values`` to ``cache`` (the old
  keyword stays a deprecated alias until 5.40, and the forward's decorator renames it *after* the
  module's pre-hooks ran, so a hook may see either name).
- 5.24 replaced ``image_hidden_states`` on LLaVA outputs by ``image_outputs``, and Qwen-VL's model
  began returning its encoder outputs too (``with_output_encoding`` writes whichever field the output
  type has, for a prefill fed the kept tokens alone).
- 5.24 renamed ``compute_3d_position_ids``'s cache keyword with the rest (``model_mrope_ids`` passes
  the one its signature names).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import transformers
from packaging.version import Version
from torch import nn

TRANSFORMERS_VERSION = Version(transformers.__version__)

#: transformers 5.24 renamed ``past_key_values`` (keyword and output field) to ``cache``.
CACHE_RENAMED = TRANSFORMERS_VERSION >= Version("5.24.0.dev0")
#: The keyword the installed transformers' forwards take the KV cache under.
CACHE_KWARG = "cache" if CACHE_RENAMED else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")
USE_CACHE_KWARG = "use_cache"
#: ``generate`` encodes images once and hands the features to each forward under this keyword.
ENCODER_OUTPUTS_KWARG = "mm_encoder_outputs"


# --- KV cache: keyword, output field, internals --------------------------------------------------
def cache_from(kwargs: dict) -> Any:
    """The KV cache a forward was called with, under either name (None if none)."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def set_cache(kwargs: dict, cache) -> None:
    """Pass ``cache`` to a forward under the installed release's keyword (the other name removed)."""
    for name in _CACHE_NAMES:
        kwargs.pop(name, None)
    kwargs[CACHE_KWARG] = cache


def cache_kwargs(cache) -> dict:
    """``{keyword: cache}`` for calling a forward directly."""
    return {CACHE_KWARG: cache}


def use_cache_from(kwargs: dict) -> bool | None:
    return kwargs.get(USE_CACHE_KWARG)


def output_cache(output) -> Any:
    """The KV cache a model output carries (None if none)."""
    if output is None:
        return None
    name = "cache" if CACHE_RENAMED else "past_key_values"
    return getattr(output, name, None)


def drop_output_cache(output) -> None:
    """Remove the KV cache from a model output, as if the model had made none. A ``ModelOutput`` is
    a dict whose attribute setter does not remove keys for ``None`` (and which refuses ``del``), so the
    key is taken out of the dict itself: ``to_tuple()`` and ``**output`` then no longer carry it."""
    name = "cache" if CACHE_RENAMED else "past_key_values"
    if name in output.keys():
        OrderedDict.__delitem__(output, name)  # ModelOutput is an OrderedDict that refuses ``del``
    object.__setattr__(output, name, None)


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def slice_logits_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """What a model's forward keeps of ``hidden`` ``[B, L, ...]`` for its ``logits_to_keep`` (an int:
    the last ones; a tensor: positions, or a boolean mask that flattens), as transformers slices it."""
    from transformers.modeling_utils import slice_logits_to_keep as keep

    return keep(hidden, logits_to_keep)


def new_dynamic_cache(config):
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=config)


def dynamic_cache_windows(config) -> tuple[int | None, ...]:
    """Per decoder layer of ``config``'s LLM, the window of the layer the dynamic cache built from
    that config gives it (a sliding-window or chunked layer: it keeps the last ``window - 1`` tokens,
    and a decoding step attends to at most ``window``), None for a layer that keeps every token. Read
    off the cache transformers itself builds (``DynamicCache(config=...)``, what ``generate`` and a
    forward with ``use_cache=True`` start from): no tensor is allocated before the first update."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    layers = new_dynamic_cache(config).layers
    return tuple(int(entry.sliding_window) if isinstance(entry, DynamicSlidingWindowLayer) else None
                 for entry in layers)


def is_dynamic_cache(cache) -> bool:
    from transformers.cache_utils import DynamicCache

    return isinstance(cache, DynamicCache)


def cache_layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` ``[B, H_kv, L, D]`` of the L tokens ``cache`` holds for decoder ``layer``.
    A static layer's buffers span all its slots; only its first ``get_seq_length()`` are written
    (the rest are zeros or stale after a crop), so only those are returned: attention over the whole
    buffer gave every unwritten slot a score of 0 in the softmax."""
    entry = cache.layers[layer]
    if _is_slotted_static_layer(entry):
        held = int(entry.get_seq_length())
        return entry.keys[:, :, :held], entry.values[:, :, :held]
    return entry.keys, entry.values


def prompt_keys(cache, layer: int, length: int, device: torch.device) -> torch.Tensor | None:
    """The keys ``[B, H_kv, length, D]`` (as the layer's attention used them: after its key norm and
    rotary embedding) of the last ``length`` tokens ``cache`` holds for decoder ``layer``, or None
    where they may not be those: a layer of another kind than the growing and the static ones
    (quantized, indexed), fewer tokens held, or keys offloaded to another device. A sliding-window
    layer that has dropped nothing yet (a prompt within its window: Mistral's 4096) holds them as a
    growing one does; a static layer holds them in its first ``get_seq_length()`` slots
    (:func:`cache_layer_kv`), the tokens it has been given in order, a sliding-window one until it
    has taken more than its slots (:func:`_is_slotted_static_layer`)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    entry = cache.layers[layer] if cache is not None and layer < len(getattr(cache, "layers", ())) else None
    if entry is None or not getattr(entry, "is_initialized", True):
        return None
    if type(entry) is DynamicSlidingWindowLayer:
        held = getattr(entry.keys, "shape", (0, 0, -1))[2]
        if getattr(entry, "cumulative_length", None) != held:  # it has cut its oldest tokens
            return None
    elif type(entry) is not DynamicLayer and not _is_slotted_static_layer(entry):
        return None
    keys = cache_layer_kv(cache, layer)[0]
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[2] < length or keys.device != device:
        return None
    return keys[:, :, keys.shape[2] - length:]


def set_cache_layer_kv(cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Hand decoder ``layer`` these keys and values (``[B, H_kv, L, D]``) as the tokens it holds.

    A growing layer takes the tensors. A sliding-window one (Gemma2's every other layer, Mistral's
    every layer) sizes its masks by the count of tokens it has taken (``cumulative_length``), which
    then becomes the count it holds, as its own ``crop`` sets it: left at the old count, the next
    step's mask was wider than its keys. A static layer (:func:`_is_slotted_static_layer`) keeps its
    buffers (their addresses are static under torch.compile): the tokens are written into its first L
    slots and its counts become L, so the next token is written after them; the slots past L are
    stale until overwritten, and masked, as after a crop."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    entry = cache.layers[layer]
    if _is_slotted_static_layer(entry):
        length, held = keys.shape[-2], int(entry.get_seq_length())
        if length > held:
            raise ValueError(f"a static cache layer holding {held} tokens cannot be handed {length}")
        entry.keys[:, :, :length].copy_(keys)
        entry.values[:, :, :length].copy_(values)
        if held > length:
            _crop_static_layer(entry, held - length)
        return
    entry.keys, entry.values = keys, values
    if isinstance(entry, DynamicSlidingWindowLayer):
        entry.cumulative_length = keys.shape[-2]


def crop_cache_layer(cache, layer: int, length: int) -> None:
    """Keep the first ``length`` tokens ``cache`` holds for decoder ``layer``. A static layer keeps
    its slots (the next writes overwrite the stale ones): its count goes back, as its own ``crop``
    does; a growing layer's tensors are cut."""
    from transformers.cache_utils import StaticLayer

    entry = cache.layers[layer]
    if isinstance(entry, StaticLayer):
        held = int(entry.get_seq_length())
        if held > length:
            _crop_static_layer(entry, held - length)
        return
    if entry.keys is not None and entry.keys.shape[-2] > length:
        entry.keys, entry.values = entry.keys[..., :length, :], entry.values[..., :length, :]


def num_cache_layers(cache) -> int:
    return len(cache.layers)


def is_quantized_cache(cache) -> bool:
    """Whether every layer of ``cache`` is one of transformers' quantized layers
    (``cache_implementation="quantized"``: quanto, HQQ or FP8): each grows from its own count like a
    dynamic layer, storing what it is given in fewer bits."""
    from transformers.cache_utils import BaseQuantizedLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(isinstance(layer, BaseQuantizedLayer) for layer in layers)


def is_static_cache(cache) -> bool:
    """Whether every layer of ``cache`` is a static layer that writes its tokens one after the other
    from its own count (:func:`_is_slotted_static_layer`: layers may hold different numbers of
    tokens), all with the same number of slots. A sliding-window layer with fewer slots than the
    others (a cache longer than the window) sizes its masks by its own slots, not the cache's."""
    layers = getattr(cache, "layers", None) or []
    return (bool(layers) and all(_is_slotted_static_layer(layer) for layer in layers)
            and len({layer.max_cache_len for layer in layers}) == 1)


def _is_slotted_static_layer(entry) -> bool:
    """A static cache layer whose first ``get_seq_length()`` slots hold its tokens in order, written
    one after the other from its own count: a plain ``StaticLayer``, or a ``StaticSlidingWindowLayer``
    (Mistral's every layer, Gemma2's every other one under a static cache) that has not taken more
    tokens than its slots (it writes as a plain one until then, and rolls its oldest tokens out
    after; vtoken's in-LLM stages refuse a sequence longer than the window). Not an indexed or other
    subclass that writes elsewhere."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    if type(entry) is StaticLayer:
        return True
    return type(entry) is StaticSlidingWindowLayer and int(entry.get_seq_length()) <= entry.max_cache_len


def cache_holds_recurrent_state(cache) -> bool:
    """Whether some layer of ``cache`` holds a recurrent (Mamba, linear-attention) state beside or
    instead of keys and values (5.25's ``LinearAttentionCacheLayerMixin``: FalconH1's layers under a
    static cache); 5.23 has no such layers in a static cache."""
    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin
    except ImportError:
        return False
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in getattr(cache, "layers", None) or [])


def cache_layer_kinds(cache) -> list[str]:
    """The class names of a cache's layers, each once, in order (``StaticLayer``,
    ``StaticSlidingWindowLayer``, ...): what a refusal names."""
    return list(dict.fromkeys(type(layer).__name__ for layer in getattr(cache, "layers", None) or []))


def cache_capacity(cache) -> int | None:
    """The fixed number of positions a static cache holds per layer (None for a growing cache)."""
    layers = getattr(cache, "layers", None) or []
    return getattr(layers[0], "max_cache_len", None) if layers else None


def static_cache_free_slots(cache) -> int:
    """The slots a static cache (:func:`is_static_cache`) has left before its fullest layer is full:
    ``generate(max_new_tokens=1, cache_implementation="static")`` sizes it to the prompt (its
    ``max_length - 1``), so none; one more write there raises ``index_copy_``'s IndexError."""
    return int(cache_capacity(cache)) - max(int(layer.get_seq_length()) for layer in cache.layers)


def dynamic_cache_holding(cache, config):
    """A new growing cache (``config``'s layer types) holding what ``cache`` holds, layer by layer
    (:func:`cache_layer_kv`: a static layer's written slots), for a side pass that must not write
    into ``cache``: its updates go into the copy's own tensors and ``cache`` is left as it was."""
    copy = new_dynamic_cache(config)
    for layer in range(num_cache_layers(cache)):
        keys, values = cache_layer_kv(cache, layer)
        copy.update(keys, values, layer)
    return copy


def full_attention_mask(mask):
    """The mask of the full-attention layers when a model hands its layers one per layer type (a
    dict, as Qwen2 does under a static cache), else ``mask``."""
    return mask.get("full_attention", next(iter(mask.values()))) if isinstance(mask, dict) else mask


def crop_cache(cache, tokens: int) -> None:
    """``cache.crop``: a negative ``tokens`` removes that many from the end of every layer (a static
    layer's count goes back: 5.23's static layers have no ``crop`` of their own)."""
    if is_static_cache(cache):
        for entry in cache.layers:
            _crop_static_layer(entry, -tokens)
        return
    cache.crop(tokens)


def _crop_static_layer(entry, tokens: int) -> None:
    """Forget the last ``tokens`` a static layer holds: its slots stay and its count goes back, so the
    next writes overwrite them. The layer's own ``crop`` does it where transformers has one (5.25:
    a sliding-window layer also moves the Python count it writes by); 5.23's static layers have none,
    and the same is done here: the count tensor in place (its address is static under torch.compile),
    and a sliding-window layer's Python count with it."""
    if callable(getattr(type(entry), "crop", None)):
        entry.crop(-tokens)
        return
    entry.cumulative_length.sub_(tokens)
    if hasattr(entry, "cumulative_length_int"):
        entry.cumulative_length_int -= tokens


# --- multimodal encoder outputs -------------------------------------------------------------------
def encoded_output(kwargs: dict, modality: str):
    """The encoding of ``modality`` (``"image"``, ``"video"``) handed to a forward (None if none)."""
    return (kwargs.get(ENCODER_OUTPUTS_KWARG) or {}).get(modality)


def set_encoded_output(kwargs: dict, modality: str, encoded) -> None:
    kwargs[ENCODER_OUTPUTS_KWARG] = {**(kwargs.get(ENCODER_OUTPUTS_KWARG) or {}), modality: encoded}


def drop_encoded_output(kwargs: dict, modality: str) -> None:
    """Take the encoding of ``modality`` out of a forward's inputs."""
    rest = {k: v for k, v in (kwargs.get(ENCODER_OUTPUTS_KWARG) or {}).items() if k != modality}
    kwargs[ENCODER_OUTPUTS_KWARG] = rest or None


def with_output_encoding(output, modality: str, encoded):
    """``output`` (the model's output object) carrying the encoding of ``modality`` where the model's
    own output type puts it: the encoder's output object (``image_outputs``: LLaVA and Qwen-VL from
    transformers 5.24) or the features it scattered into the prompt (``image_hidden_states``: LLaVA
    before). A type with neither field (Qwen-VL before 5.24 returns its LLM's output) is returned as
    it is."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    if f"{modality}_outputs" in fields:
        output[f"{modality}_outputs"] = encoded
    elif f"{modality}_hidden_states" in fields:
        output[f"{modality}_hidden_states"] = torch.cat(image_features(encoded)).to(output.last_hidden_state.dtype)
    return output


def returns_tuple(module: nn.Module, kwargs: dict) -> bool:
    """Whether a forward decorated with transformers' ``can_return_tuple`` (every multimodal model's)
    called with ``kwargs`` returns a tuple: ``return_dict`` given, else the model's config's."""
    return_dict = getattr(getattr(module, "config", None), "return_dict", True)
    given = kwargs.get("return_dict", return_dict)
    return not (given if given is not None else return_dict)


@functools.lru_cache(maxsize=None)
def _parameter_names(function: Callable) -> frozenset[str]:
    """The parameters ``function`` takes by name (read once per function, not at every prefill)."""
    return frozenset(inspect.signature(function).parameters)


def model_mrope_ids(core: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The 3-D (M-RoPE) position ids a Qwen-VL forward called with ``input_ids`` and ``kwargs``
    computes for its prompt (its ``compute_3d_position_ids``, which sets the model's ``rope_deltas``
    as the forward would); None where the model cannot (no ``mm_token_type_ids``: the forward then
    leaves the numbering to its LLM)."""
    compute = core.compute_3d_position_ids
    accepted = _parameter_names(type(core).compute_3d_position_ids)
    given = {
        "input_ids": input_ids, "inputs_embeds": None, "attention_mask": kwargs.get("attention_mask"),
        **{name: kwargs.get(name) for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")},
        **{name: cache_from(kwargs) for name in _CACHE_NAMES},  # "cache" from 5.24, "past_key_values" before
    }
    return compute(**{name: value for name, value in given.items() if name in accepted})


# --- generate's options ------------------------------------------------------------------------------
#: ``generate``'s option that feeds the prompt to the model in chunks of this many tokens (5.x).
PREFILL_CHUNK_OPTION = "prefill_chunk_size"


def prefill_chunk_size(model: nn.Module, generate_kwargs: dict) -> int | None:
    """The chunk size ``generate(**generate_kwargs)`` would prefill ``model``'s prompt in (None: one
    forward), with generate's precedence: a keyword, then a ``generation_config`` passed in, then the
    model's own ``generation_config``."""
    if PREFILL_CHUNK_OPTION in generate_kwargs:
        return generate_kwargs[PREFILL_CHUNK_OPTION]
    for config in (generate_kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        size = getattr(config, PREFILL_CHUNK_OPTION, None)
        if size is not None:
            return size
    return None


#: The model method every continuous-batching entry (``generate_batch``, the context manager) goes
#: through, and the ``generate`` keyword value that switches to it (both transformers >= 5.0).
CONTINUOUS_BATCHING_ENTRY = "init_continuous_batching"
PAGED_CACHE = "paged"


def asks_continuous_batching(generate_kwargs: dict) -> bool:
    """Whether ``generate(**generate_kwargs)`` hands its prompts to continuous batching (a paged
    cache), as generate decides it: by the keyword alone."""
    return generate_kwargs.get("cache_implementation") == PAGED_CACHE


def without_chunked_prefill(model: nn.Module, generate_kwargs: dict) -> dict:
    """``generate_kwargs`` asking for ``model``'s prompt in one forward. The keyword has generate's
    highest precedence. A ``generation_config`` passed in is copied without the option instead, as
    generate warns when one comes with generation keywords; but where the model's own config asks for
    chunks, generate fills an unset option of the passed config from it, and only the keyword wins."""
    config = generate_kwargs.get("generation_config")
    from_model = getattr(getattr(model, "generation_config", None), PREFILL_CHUNK_OPTION, None)
    if config is None or PREFILL_CHUNK_OPTION in generate_kwargs or from_model is not None:
        return {**generate_kwargs, PREFILL_CHUNK_OPTION: None}
    config = copy.deepcopy(config)
    setattr(config, PREFILL_CHUNK_OPTION, None)
    return {**generate_kwargs, "generation_config": config}


def image_features(encoded) -> list[torch.Tensor]:
    """Per-image feature tensors of an image encoding (``get_image_features`` output)."""
    return list(encoded.pooler_output)


# --- attention masks --------------------------------------------------------------------------------
def sliding_window(text_config) -> int | None:
    """The sliding window (tokens) some of the LLM's layers attend through, or None: Mistral's
    ``sliding_window`` (every layer), Qwen2's when ``use_sliding_window``, Gemma2/3's and newer
    configs' ``layer_types`` holding ``"sliding_attention"``."""
    window = getattr(text_config, "sliding_window", None)
    if window is None:
        return None
    types = getattr(text_config, "layer_types", None)
    if types is not None:
        return window if "sliding_attention" in types else None
    return window if getattr(text_config, "use_sliding_window", True) else None


def attention_implementation(config) -> str:
    return config._attn_implementation


def mask_builder(config) -> Callable | None:
    """The mask function transformers uses for ``config``'s attention implementation (None where
    it builds no mask)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    try:
        return ALL_MASK_ATTENTION_FUNCTIONS[attention_implementation(config)]
    except KeyError:
        return None


def build_mask(config, make_mask: Callable, *, batch_size: int, q_length: int, kv_length: int,
               padding_mask: torch.Tensor, extra: Callable | None, dtype, device, q_offset: int | None = None):
    """Call a transformers mask builder: causal over ``kv_length`` keys for ``q_length`` queries at
    slots ``q_offset`` on (default: the last ones), ``padding_mask`` ``[B, kv]`` (True = may be
    attended), and ``extra`` (a mask function ``(batch, head, q, kv) -> bool``) also holding when
    given."""
    from transformers.masking_utils import and_masks, causal_mask_function

    return make_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=kv_length - q_length if q_offset is None else q_offset,
        kv_offset=0,
        mask_function=causal_mask_function if extra is None else and_masks(causal_mask_function, extra),
        attention_mask=padding_mask,
        allow_is_causal_skip=extra is None,
        dtype=dtype,
        config=config,
        use_vmap=False,
        device=device,
    )


# --- training ----------------------------------------------------------------------------------------
#: How a user turns activation checkpointing off (``gradient_checkpointing_disable`` is a deprecated
#: alias, with a FutureWarning, in every release vtoken admits).
CHECKPOINTING_DISABLE = "activation_checkpointing_disable"


def activation_checkpointing(module: nn.Module) -> bool:
    """Whether ``module`` (a decoder stack) runs its layers under activation checkpointing: each such
    module flags itself ``gradient_checkpointing`` (the attribute kept its name when the methods were
    renamed to ``activation_checkpointing_*``)."""
    return bool(getattr(module, "gradient_checkpointing", False))


# --- decoder layers, attention modules, rotary ------------------------------------------------------
@dataclass(frozen=True)
class AttentionParts:
    """What recomputing one attention module's query and key rows needs. ``q_proj`` / ``k_proj`` map
    the normed input ``[..., d]`` to the queries / keys ``[..., heads * head_dim]``: the module's own
    projections, or slices of its fused one (:class:`FusedSlice`). ``softcap``: the cap of logits
    soft-capped before the softmax (``c * tanh(logits / c)``, Gemma2), else None."""

    q_proj: nn.Module | FusedSlice
    k_proj: nn.Module | FusedSlice
    head_dim: int
    scaling: float
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    softcap: float | None = None


@dataclass(frozen=True)
class FusedSlice:
    """The query or the key part of a fused projection (Phi-3's ``qkv_proj``: queries, keys, values
    side by side in its output): the projection's output columns ``[start, stop)``, as its attention
    slices them. A plain ``nn.Linear`` computes those columns alone (the rows of its weight: the
    values and the other part cost nothing, and ``vtoken.flops`` counts only these); any other module
    is called whole and its output sliced, so it stays what it is: a subclass (quantised, LoRA), one
    with hooks, or one whose ``forward`` was replaced (accelerate's offloading brings the weight in
    there)."""

    projection: nn.Module
    start: int
    stop: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.projection
        if self._plain(module):
            bias = None if module.bias is None else module.bias[self.start : self.stop]
            return torch.nn.functional.linear(x, module.weight[self.start : self.stop], bias)
        return module(x)[..., self.start : self.stop]

    @staticmethod
    def _plain(module: nn.Module) -> bool:
        # (Global module hooks are left out: they observe every module, as FlopCounterMode's tracker.)
        return (type(module) is nn.Linear and "forward" not in vars(module)
                and not (module._forward_hooks or module._forward_pre_hooks))


def bring_in_offloaded_weights(module: nn.Module) -> None:
    """accelerate's offloading hook (``module._hf_hook``, what ``cpu_offload`` and a ``device_map``
    with offloaded parts install) loads a module's own weights when its ``forward`` starts, after
    torch's forward pre-hooks. vtoken encodes the images in a pre-hook of the model's core, whose own
    parameters (LLaVA-NeXT's and OneVision's ``image_newline``) are then still on the meta device:
    load them now, as the hook would (its post-forward offloads them again after the forward)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and callable(getattr(hook, "pre_forward", None)):
        hook.pre_forward(module)


#: A transformer block's sub-modules by role -> attribute name (Llama decoder and CLIP encoder layers).
LAYER_PARTS = {"attention": "self_attn", "mlp": "mlp"}


def layer_attention(layer: nn.Module) -> nn.Module:
    return layer.self_attn


#: Where a decoder layer keeps its MLP branch: ``mlp`` (most LLMs), ``block_sparse_moe`` (GraniteMoE).
_DECODER_MLP_ATTRIBUTES = ("mlp", "block_sparse_moe")


def decoder_has_self_attention(layer: nn.Module) -> bool:
    """Whether a decoder layer keeps its attention in ``self_attn`` (where vtoken reads it)."""
    return isinstance(getattr(layer, "self_attn", None), nn.Module)


def decoder_layer_parts(layer: nn.Module) -> dict[str, str] | None:
    """A decoder layer's attention and MLP branches by attribute name (as :data:`LAYER_PARTS`), or
    None where one branch is not a single module vtoken knows: no ``self_attn`` (JetMoE's
    ``self_attention`` mixes experts into it), no MLP module, or a second MLP added into the same
    branch (GraniteMoE-Shared's ``shared_mlp``)."""
    if not decoder_has_self_attention(layer):
        return None
    mlp = next((name for name in _DECODER_MLP_ATTRIBUTES if isinstance(getattr(layer, name, None), nn.Module)), None)
    if mlp is None or isinstance(getattr(layer, "shared_mlp", None), nn.Module):
        return None
    return {"attention": "self_attn", "mlp": mlp}


#: A decoder layer's sub-modules that are its MLP branch under any name vtoken has met (Llama 4's
#: ``feed_forward``, GraniteMoE-Shared's ``shared_mlp`` beside ``block_sparse_moe``).
_DECODER_MLP_NAMES = frozenset(_DECODER_MLP_ATTRIBUTES) | {"feed_forward", "shared_mlp"}


def other_token_mixers(layer: nn.Module) -> list[str]:
    """The sub-modules with weights of a decoder layer that are none of its attention, MLP branch or
    norms: a second way of mixing tokens beside the attention (FalconH1's ``mamba``), whose state
    across tokens vtoken's in-LLM stages do not prune along (dropping tokens there broke its shapes)."""
    return [name for name, child in layer.named_children()
            if name != "self_attn" and name not in _DECODER_MLP_NAMES and "norm" not in type(child).__name__.lower()
            and next(child.parameters(), None) is not None]


def attention_rows_gap(layer: nn.Module) -> str | None:
    """Why vtoken cannot recompute a decoder layer's attention rows beside its attention (input norm,
    q/k projections, q/k norms, rotary, scale, soft cap: :func:`attention_parts`), or None where it
    can. What it cannot see it refuses rather than leaves out: norms under other names or after the
    rotary (HunYuan's ``query_layernorm``), parameters of the attention module itself (GPT-OSS's
    attention sinks, which join the softmax), a rotary embedding that is not ``(cos, sin)`` (Llama 4's
    complex one, with no ``apply_rotary_pos_emb`` in its modeling file)."""
    if not decoder_has_self_attention(layer):
        return f"a {type(layer).__name__} with no self_attn module"
    attention = layer.self_attn
    if query_key_projections(attention) is None:
        return (f"a {type(attention).__name__} with neither q_proj and k_proj nor a fused qkv_proj, from which "
                "vtoken recomputes the attention rows")
    if not (has_input_norm(layer) or is_post_norm_layer(layer)):
        return (f"a {type(layer).__name__} with no input_layernorm (nor OLMo2's post-norms), so vtoken cannot "
                "tell what its attention reads")
    if getattr(attention, "scaling", None) is None and getattr(attention, "scale", None) is None:
        return (f"a {type(attention).__name__} with no softmax scale (scaling) vtoken can read, which its recomputed "
                "attention rows need")
    parts = attention_parts(attention)
    applied = [norm.norm if isinstance(norm, HeadsFirst) else norm for norm in (parts.q_norm, parts.k_norm)]
    other_norms = [name for name, child in attention.named_children()
                   if "norm" in type(child).__name__.lower() and not any(child is norm for norm in applied)]
    if other_norms:
        return (f"a {type(attention).__name__} that normalises its queries or keys with {', '.join(other_norms)}, "
                "which vtoken's recomputed attention rows do not apply")
    own = [name for name, _ in attention.named_parameters(recurse=False)]
    if own:
        return (f"a {type(attention).__name__} with parameters of its own ({', '.join(own)}: attention sinks or "
                "the like), which vtoken's recomputed attention rows do not apply")
    if attention_rotates(attention) and decoder_rotary_function(attention) is None:
        return (f"a {type(attention).__name__} whose modeling file has no apply_rotary_pos_emb (a rotary "
                "embedding other than transformers' cos/sin one), which vtoken's recomputed rows cannot apply")
    return None


def has_separate_query_key(attn: nn.Module) -> bool:
    """Whether an attention module has its own ``q_proj`` and ``k_proj`` modules (Llama-style); Phi-3's
    fuses them into ``qkv_proj`` (:func:`fused_query_key`)."""
    return isinstance(getattr(attn, "q_proj", None), nn.Module) and isinstance(getattr(attn, "k_proj", None), nn.Module)


#: ``text_config.model_type`` of the LLMs whose attention fuses q, k and v into one ``qkv_proj``
#: (:func:`fused_query_key`), for the FLOPs model, which sees a config and not the modules.
FUSED_QKV_MODEL_TYPES = ("phi3",)


def fused_query_key(attn: nn.Module) -> tuple[FusedSlice, FusedSlice] | None:
    """The query and key slices of a fused ``qkv_proj`` (Phi-3: ``num_attention_heads * head_dim``
    query columns, then ``num_key_value_heads * head_dim`` key columns, then the values), or None
    where the module has no such projection."""
    qkv = getattr(attn, "qkv_proj", None)
    config = getattr(attn, "config", None)
    if not isinstance(qkv, nn.Module) or config is None:
        return None
    queries = config.num_attention_heads * attn.head_dim
    keys = getattr(attn, "num_key_value_heads", config.num_key_value_heads) * attn.head_dim
    return FusedSlice(qkv, 0, queries), FusedSlice(qkv, queries, queries + keys)


def query_key_projections(attn: nn.Module) -> tuple[nn.Module | FusedSlice, nn.Module | FusedSlice] | None:
    """``(q_proj, k_proj)`` of an attention module: its own modules (Llama-style), the slices of its
    fused ``qkv_proj`` (Phi-3), or None where it has neither."""
    if has_separate_query_key(attn):
        return attn.q_proj, attn.k_proj
    return fused_query_key(attn)


def attention_softcap(attn: nn.Module) -> float | None:
    """The cap ``c`` of an attention module that soft-caps its logits (``c * tanh(logits / c)``,
    Gemma2's ``attn_logit_softcapping``), or None."""
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
    return float(cap) if cap else None


def rotary_needs_layer_type(language_model: nn.Module) -> bool:
    """Whether the decoder stack's rotary embedding is asked per layer type (Gemma3: ``rotary_emb(x,
    position_ids, layer_type)``), which :func:`rotary_cos_sin` does not pass."""
    rotary = getattr(language_model, "rotary_emb", None)
    if rotary is None:
        return False
    parameters = inspect.signature(rotary.forward).parameters
    return "layer_type" in parameters and parameters["layer_type"].default is inspect.Parameter.empty


def has_input_norm(layer: nn.Module) -> bool:
    """Whether a decoder layer normalises its input before its attention (``input_layernorm``)."""
    return isinstance(getattr(layer, "input_layernorm", None), nn.Module)


def is_post_norm_layer(layer: nn.Module) -> bool:
    """Whether a decoder layer normalises its attention's and MLP's outputs instead of their inputs
    (OLMo2: ``post_attention_layernorm`` and ``post_feedforward_layernorm``, no ``input_layernorm``):
    its attention reads the hidden state itself."""
    return not has_input_norm(layer) and all(
        isinstance(getattr(layer, name, None), nn.Module) for name in ("post_attention_layernorm", "post_feedforward_layernorm")
    )


def decoder_input_norm(layer: nn.Module) -> nn.Module:
    """What a decoder layer's attention reads of the layer's input: its ``input_layernorm``, or the
    input itself (an identity) for a post-norm layer (:func:`is_post_norm_layer`)."""
    if has_input_norm(layer):
        return layer.input_layernorm
    if is_post_norm_layer(layer):
        return nn.Identity()
    raise ValueError(
        f"{type(layer).__name__} has no input_layernorm and is not a post-norm layer (OLMo2's), so vtoken "
        "cannot tell what its attention reads; use a method that does not recompute the LLM's attention"
    )


def norm_before_head_split(norm: nn.Module, head_dim: int) -> bool:
    """Whether an attention module's query or key norm normalises the whole projection before it is
    split into heads (OLMo2: an RMSNorm over ``heads * head_dim``) rather than each head after the
    split (Qwen3: over ``head_dim``; Cohere: a LayerNorm of shape ``(heads, head_dim)``), read off the
    norm's weight as each modeling file builds it."""
    weight = getattr(norm, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.shape[0] != head_dim


#: ``model_type`` -> when a layer's attention rotates its queries and keys, for the LLMs whose
#: modeling files skip the rotary embedding on some layers (NoPE layers): EXAONE 4 (and its MoE,
#: 4.5 and Kolibri-1) rotate under a sliding window or where the model has none, Cohere2 only under
#: a sliding window. Read off each file's ``if`` around ``apply_rotary_pos_emb`` (transformers 5.25);
#: a module with a ``use_rope`` flag (SmolLM3, Llama 4) follows the flag.
def _rotates_unless_global_beside_a_window(attn: nn.Module) -> bool:
    return attn.sliding_window is None or attn.is_sliding


_ROTATES_WHEN = {
    **dict.fromkeys(("exaone4", "exaone4_5", "exaone_moe", "kolibri1"), _rotates_unless_global_beside_a_window),
    "cohere2": lambda attn: attn.sliding_window is not None,
}


def attention_rotates(attn: nn.Module) -> bool:
    """Whether an LLM attention module applies the rotary embedding to its queries and keys (every
    layer of most LLMs; not the NoPE layers of :data:`_ROTATES_WHEN`'s and of ``use_rope`` ones)."""
    if hasattr(attn, "use_rope"):
        return bool(attn.use_rope)
    rule = _ROTATES_WHEN.get(getattr(getattr(attn, "config", None), "model_type", None))
    return True if rule is None else bool(rule(attn))


def _modeling_file(module: nn.Module):
    """The Python module (transformers' ``modeling_<model>.py``) that defines ``module``'s class."""
    import sys

    return sys.modules[type(module).__module__]


def decoder_rotary_function(attn: nn.Module):
    """``apply_rotary_pos_emb(q, k, cos, sin)`` of the modeling file an LLM attention module comes
    from (transformers writes one per model: Llama's rotate-half convention in most, interleaved pairs
    in Cohere's and GLM's), or None where that file has none."""
    return getattr(_modeling_file(attn), "apply_rotary_pos_emb", None)


def attention_parts(attn: nn.Module) -> AttentionParts:
    """The projections, head size, softmax scale, optional q/k norms and logit cap of a Llama-style
    (decoder) or CLIP-style (vision) attention module; a fused ``qkv_proj`` (Phi-3) gives its query
    and key slices."""
    scaling = getattr(attn, "scaling", None)
    if scaling is None:
        scaling = getattr(attn, "scale")
    projections = query_key_projections(attn)
    if projections is None:
        raise ValueError(f"{type(attn).__name__} has neither q_proj and k_proj nor a fused qkv_proj")
    q_proj, k_proj = projections
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is None and getattr(attn, "qk_layernorm", False):  # StableLM: a LayerNorm per head
        q_norm, k_norm = HeadsFirst(attn.q_layernorm), HeadsFirst(attn.k_layernorm)
    return AttentionParts(
        q_proj=q_proj, k_proj=k_proj, head_dim=attn.head_dim, scaling=float(scaling),
        q_norm=q_norm, k_norm=k_norm, softcap=attention_softcap(attn),
    )


@dataclass(frozen=True)
class HeadsFirst:
    """A per-head norm that takes ``[B, heads, L, head_dim]`` (StableLM's ``q_layernorm`` /
    ``k_layernorm``, applied after the heads are moved first), called on ``[B, L, heads, head_dim]``
    as :class:`AttentionParts` norms are."""

    norm: nn.Module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def rotary_cos_sin(language_model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
    """``(cos, sin)`` of the decoder stack's rotary embedding for ``positions``."""
    return language_model.rotary_emb(hidden, positions)


def qwen_vision_window_index(visual: nn.Module, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(window_index, cu_window_seqlens)`` of a Qwen2.5-VL vision tower for ``grid_thw``: the
    units in window order and the windows' cumulative lengths in patches, as its forward computes them
    (``transformers.vision_utils.get_vision_window_index`` in 5.23 and 5.24)."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size,
    )


def qwen_vision_rotary(attention: nn.Module):
    """The rotary function a Qwen-VL vision attention module applies to its ``q, k`` (``[N, H, d]``)
    with the block's ``(cos, sin)``: ``apply_rotary_pos_emb_vision`` of its own modeling file."""
    return _modeling_file(attention).apply_rotary_pos_emb_vision


def deepstack_mergers(visual: nn.Module) -> list[nn.Module]:
    """Qwen3-VL's DeepStack mergers (one per ``deepstack_visual_indexes`` block), in order."""
    return list(visual.deepstack_merger_list)


#: The Qwen3-VL text model's method that adds the DeepStack features after a layer (replaced on the
#: instance by the adapter, so the features follow the pruning).
DEEPSTACK_PROCESS = "_deepstack_process"
#: The Qwen3-VL text model's forward keywords for the DeepStack features and the visual positions they
#: are added at.
DEEPSTACK_KWARGS = ("visual_pos_masks", "deepstack_visual_embeds")


def deepstack_rows(encoded) -> list[torch.Tensor]:
    """Per DeepStack layer, every image's rows of an image encoding in order, as Qwen3-VL's forward
    hands them to its LLM (``deepstack_visual_embeds``)."""
    return [torch.cat(features, dim=0) for features in encoded.deepstack_features]


def encoder_layer_norms(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The norms before the attention and before the MLP of a CLIP / SigLIP encoder layer."""
    return layer.layer_norm1, layer.layer_norm2


def clip_vision_tower(model: nn.Module) -> nn.Module:
    """The module holding a CLIP / SigLIP model's vision ``embeddings`` and ``encoder``:
    ``model.vision_model`` (``CLIPModel``, ``CLIPVisionModelWithProjection``, ``SiglipModel``), or the
    model itself (``CLIPVisionModel`` and ``SiglipVisionModel`` since transformers 5 hold them directly)."""
    return getattr(model, "vision_model", model)


# --- family internals (LLaVA-NeXT, image processors, activations) ------------------------------------
def llava_next_modeling():
    from transformers.models.llava_next import modeling_llava_next

    return modeling_llava_next


def image_size_to_num_patches(image_size, grid_pinpoints, patch_size: int) -> int:
    return llava_next_modeling().image_size_to_num_patches(
        image_size=image_size, grid_pinpoints=grid_pinpoints, patch_size=patch_size
    )


#: The LLaVA-NeXT / OneVision model's method that packs each image's projected crop grids (unpad, a
#: newline per row), which vtoken replaces per instance after a vision stage.
ANYRES_PACKING = "pack_image_features"


def pack_anyres_features(core: nn.Module, features: list, image_sizes, select: str, image_newline) -> list:
    """LLaVA-NeXT's own packing of per-crop features (unpadding, newline after each row)."""
    packed, _ = core.pack_image_features(
        features, image_sizes, vision_feature_select_strategy=select, image_newline=image_newline
    )
    return packed


def pack_anyres_max_features(core: nn.Module, features: list, image_sizes, image_newline, aspect_ratio: str) -> list:
    """LLaVA-OneVision's own packing of per-crop features (unpadding, AnyRes-Max interpolation,
    newline after each row)."""
    packed, _ = core.pack_image_features(
        features, image_sizes, image_newline=image_newline, vision_aspect_ratio=aspect_ratio
    )
    return packed


def pool_video_features(core: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """LLaVA-OneVision's own 2x2 bilinear pooling of per-frame features ``[frames, patches, d]``."""
    return core.apply_pooling(features)


def anyres_grid_shape(image_size, grid_pinpoints, patch_size: int) -> tuple[int, int]:
    rows, cols = llava_next_modeling().get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size)
    return int(rows), int(cols)


def select_best_resolution(original_size, possible_resolutions):
    from transformers.image_processing_utils import select_best_resolution as select

    return select(original_size, possible_resolutions)


def qwen2_vl_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def llava_projector(config) -> nn.Module:
    """A LLaVA multimodal projector (``linear_1``, ``act``, ``linear_2``) built from a ``LlavaConfig``,
    random weights: for benchmarks and tests of projector-site scoring outside a whole model."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    return LlavaMultiModalProjector(config)


def qwen2_vl_patch_merger(out_dim: int, context_dim: int, spatial_merge_size: int = 2) -> nn.Module:
    """Qwen2-VL's patch merger (LayerNorm per patch, then Linear, GELU, Linear over the merged row),
    random weights: for benchmarks of projector-site scoring outside a whole model."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    return PatchMerger(dim=out_dim, context_dim=context_dim, spatial_merge_size=spatial_merge_size)


def activation(name: str) -> nn.Module:
    """The activation module transformers uses for ``name`` (as LLaVA's projector builds it)."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]
