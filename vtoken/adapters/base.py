"""The interface between vtoken and one model family.

An adapter knows where a family keeps its visual tokens, its vision-encoder layers, its projector and
its LLM decoder layers, and how positions work; it installs the hooks that realise the pruning sites
and records an undo action for each change so that ``unwrap`` restores the model exactly.
Strategies never see an adapter: they get tensors and the callables the adapter puts on their
:class:`~vtoken.context.ScoreContext`.
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from vtoken import compat
from vtoken.context import Grid
from vtoken.schedule import patches_along
from vtoken.signals import Needs, Signal


@dataclass(frozen=True)
class TokenMap:
    """Where each of one image's LLM visual tokens comes from in the vision encoder.

    ``index[v, k]`` is an encoder-token slot ``crop * tokens_per_crop + token`` (the token's place in
    the sequence the projector reads) and ``weight[v, k]`` its share in LLM token ``v``; unused
    entries are ``-1`` / ``0``. A row with no entry is a token with no encoder origin (LLaVA-NeXT's
    newline). One-to-one maps (LLaVA) have ``K == 1`` and weight 1; Qwen2-VL's 2x2 merger has
    ``K == 4`` with weight 1/4 each; LLaVA-OneVision's interpolated AnyRes-Max grid and its pooled
    video frames have the bilinear weights of ``interpolate`` (``K <= 4``, rows summing to 1).
    """

    index: torch.Tensor  # [V, K] long
    weight: torch.Tensor  # [V, K] float

    @classmethod
    def one_to_one(cls, source: torch.Tensor) -> "TokenMap":
        """A map where token ``v`` comes from slot ``source[v]`` alone (-1: no origin)."""
        source = source.long()
        return cls(source[:, None], (source >= 0).to(torch.float32)[:, None])

    @classmethod
    def concat(cls, maps: list["TokenMap"]) -> "TokenMap":
        """The tokens of ``maps`` one after the other (entries padded to the widest)."""
        width = max(m.index.shape[1] for m in maps)
        pad = [width - m.index.shape[1] for m in maps]
        index = torch.cat([torch.nn.functional.pad(m.index, (0, p), value=-1) for m, p in zip(maps, pad)])
        weight = torch.cat([torch.nn.functional.pad(m.weight.float(), (0, p)) for m, p in zip(maps, pad)])
        return cls(index, weight)

    def shifted(self, slots: int) -> "TokenMap":
        """The same map with every source slot ``slots`` further on (an image whose first crop is
        not the call's first)."""
        if slots == 0:
            return self
        return TokenMap(torch.where(self.index >= 0, self.index + slots, -1), self.weight)

    def without_unused_entries(self) -> "TokenMap":
        """The same map without the entry columns no token uses: a bilinear map that never
        interpolates (LLaVA-OneVision's crop grid below the AnyRes-Max limit) is then one-to-one, and
        takes the one-to-one paths (no re-weighting, the packing handed only the kept rows)."""
        used = (self.index >= 0).any(dim=0)
        if bool(used.all()):
            return self
        keep = torch.nonzero(used).squeeze(1) if bool(used.any()) else torch.zeros(1, dtype=torch.long)
        return TokenMap(self.index[:, keep], self.weight[:, keep])

    def __getitem__(self, tokens) -> "TokenMap":
        return TokenMap(self.index[tokens], self.weight[tokens])

    @property
    def num_tokens(self) -> int:
        return self.index.shape[0]

    @property
    def is_one_to_one(self) -> bool:
        return self.index.shape[1] == 1

    @property
    def dominant(self) -> torch.Tensor:
        """``[V]``: the slot with the largest weight behind each token, -1 where there is none."""
        best = torch.where(self.index >= 0, self.weight, -1.0).argmax(dim=1, keepdim=True)
        return torch.gather(self.index, 1, best).squeeze(1)

    @property
    def has_origin(self) -> torch.Tensor:
        """``[V]`` bool: tokens with at least one encoder source."""
        return (self.index >= 0).any(dim=1)

    def reached(self, kept_slots: torch.Tensor) -> torch.Tensor:
        """``[V]`` bool: tokens with at least one source among ``kept_slots`` (a bool ``[slots]``)."""
        safe = self.index.clamp(min=0).to(kept_slots.device)
        return ((self.index >= 0).to(kept_slots.device) & kept_slots[safe]).any(dim=1)

    def gather(self, table: torch.Tensor, kept_slots: torch.Tensor | None = None) -> torch.Tensor:
        """``[V, ...]``: each token's weighted mean of ``table[slot]`` (``table``: ``[slots, ...]``)
        over its sources (those in ``kept_slots`` when given); zeros for tokens with none."""
        index = self.index.to(table.device)
        weight = torch.where(index >= 0, self.weight.to(table.device, torch.float32), 0.0)
        if kept_slots is not None:
            weight = weight * kept_slots.to(table.device)[index.clamp(min=0)]
        total = weight.sum(dim=1, keepdim=True)
        weight = torch.where(total > 0, weight / total.clamp(min=1e-12), 0.0)
        values = table[index.clamp(min=0)]  # [V, K, ...]
        shape = (*weight.shape, *([1] * (values.dim() - 2)))
        return (values.float() * weight.view(shape)).sum(dim=1).to(table.dtype)


class ImageShapeCache:
    """What a family reads off the model for one image shape (the AnyRes families' token map numbered
    from crop 0, grids, geometry; Qwen2.5-VL's window order of a call's image grids), kept for the most
    recent ``size`` shapes: a served model sees the same few image sizes at every prefill, and reading
    them runs the model's own packing or window index. Keys hold every value
    the result depends on (the model's class and the config values it reads), so one cache serves
    every model and wrap. Safe for requests of several threads."""

    def __init__(self, size: int = 256):
        self.size = size
        self._entries: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            value = self._entries.get(key)
        if value is None:
            value = compute()
            with self._lock:
                self._entries[key] = value
                while len(self._entries) > self.size:
                    self._entries.pop(next(iter(self._entries)))
        return value


#: The token maps of the AnyRes families (LLaVA-NeXT, OneVision) by image shape, and Qwen2.5-VL's window
#: orders by image grids.
IMAGE_SHAPES = ImageShapeCache()


@dataclass
class ImageInfo:
    """One image (or video) of the batch as the LLM sees it.

    ``offset``/``num_tokens``: its span within the sample's visual tokens (sample-level indices).
    ``grids``: patch grids in image-local token indices. ``crops``: global indices of the vision
    encoder inputs (crops, frames) it came from. ``token_map``: where each of its tokens comes from
    in the encoder (:class:`TokenMap`). ``geometry``: what ``vtoken.show`` needs to draw the tokens
    over the picture.
    """

    sample: int
    offset: int
    num_tokens: int
    grids: tuple[Grid, ...]
    crops: list[int]
    token_map: TokenMap
    geometry: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> torch.Tensor:
        """``[V]``: the encoder slot each token comes from (its dominant one), -1 for none."""
        return self.token_map.dominant


@dataclass
class VisualLayout:
    """Where the visual tokens are in a batch: ``visual_index``/``image_index`` are ``[B, L]`` (-1 for
    text), ``images`` lists every image in order, ``tokens_per_crop`` is the number of tokens each
    crop hands the projector."""

    visual_index: torch.Tensor
    image_index: torch.Tensor
    images: list[ImageInfo]
    tokens_per_crop: int = 0

    @property
    def batch_size(self) -> int:
        return self.visual_index.shape[0]

    def visual_count(self, sample: int) -> int:
        return int((self.visual_index[sample] >= 0).sum())


class UndoStack:
    """Every change made to a model, as an action that reverts it; run in reverse by ``unwrap``.

    Changes to the model's modules go through :meth:`set_attribute` and :meth:`hook`, which also
    record what they changed, so that :meth:`revert_in_copy` can take the same changes back from a
    deep copy of the model without touching the model (``copy.deepcopy`` and pickling of a wrapped
    model); :meth:`push` is for actions that change nothing a copy holds."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []
        self._attributes: list[tuple[Any, str, bool, Any, Any]] = []  # (owner, name, had, old, new)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def push(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def hook(self, handle: torch.utils.hooks.RemovableHandle) -> torch.utils.hooks.RemovableHandle:
        self._handles.append(handle)
        self.push(handle.remove)
        return handle

    def set_attribute(self, owner: Any, name: str, value: Any) -> None:
        """Set ``owner.name`` in its instance dict (a module's method replaced per instance); undone
        by restoring the instance attribute it shadowed, or removing it."""
        had, old = name in owner.__dict__, owner.__dict__.get(name)
        owner.__dict__[name] = value
        self._attributes.append((owner, name, had, old, value))
        self.push(partial(_restore_instance_attribute, owner, name, had, old))

    def added_objects(self) -> list[Any]:
        """The objects wrapping put on the model (attribute values, hook functions)."""
        hooks = [dicts[0].get(handle.id) for handle in self._handles if (dicts := _hook_dicts(handle))]
        return [new for *_, new in self._attributes] + [fn for fn in hooks if fn is not None]

    def revert_in_copy(self, memo: dict[int, Any]) -> None:
        """Take every recorded change back from the deep copy that ``memo`` (``copy.deepcopy``'s:
        id of an original object -> its copy) describes; the original model is not touched."""
        for handle in self._handles:
            for hooks in _hook_dicts(handle):
                copied = memo.get(id(hooks))
                if copied is not None:
                    copied.pop(handle.id, None)
        for owner, name, had, old, _ in reversed(self._attributes):
            copied = memo.get(id(owner))
            if copied is None:
                continue
            if had:
                copied.__dict__[name] = copy.deepcopy(old, memo)
            else:
                copied.__dict__.pop(name, None)

    def pre_hook(self, module: nn.Module, fn: Callable, **options) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn`` as a forward pre-hook of ``module`` (run eagerly, see :func:`eager`)."""
        return self.hook(module.register_forward_pre_hook(eager(fn), **options))

    def post_hook(self, module: nn.Module, fn: Callable, **options) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn`` as a forward hook of ``module`` (run eagerly, see :func:`eager`)."""
        return self.hook(module.register_forward_hook(eager(fn), **options))

    def run(self) -> None:
        while self._actions:
            self._actions.pop()()


def move_hooks_last(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Move each handle's forward hook behind every other hook of its module, in the order given.

    transformers installs its output-capturing hooks (``output_hidden_states``) on a model's first
    forward that asks for them, and they stay; a vtoken hook that changes a block's output would
    run before them when the model was wrapped first and after them otherwise, so what
    ``hidden_states`` holds would depend on the model's history. Moved last before every call,
    vtoken's hooks always run after them."""
    for handle in handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            hooks.move_to_end(handle.id)


def _restore_instance_attribute(owner: Any, name: str, had: bool, old: Any) -> None:
    if had:
        owner.__dict__[name] = old
    else:
        owner.__dict__.pop(name, None)


def _hook_dicts(handle: torch.utils.hooks.RemovableHandle) -> list[dict]:
    """The module's hook dicts a handle's hook sits in (the hooks, then the with_kwargs /
    always_call flags), as ``RemovableHandle.remove`` finds them."""
    refs = (handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ()))
    return [d for d in (ref() for ref in refs) if d is not None]


def eager(fn: Callable) -> Callable:
    """``fn`` run outside ``torch.compile``'s tracing: a compiled model breaks its graph around
    vtoken's hooks and runs them as Python, so pruning happens under compile and its per-request
    bookkeeping is never baked into a graph."""
    return torch.compiler.disable(fn)


@dataclass(frozen=True)
class VisionSpec:
    """The vision encoder of a family, as the generic pipeline reads it.

    ``layers``: its transformer blocks (a vision-site stage hooks the output of one). Each crop's
    sequence is ``prefix_tokens`` never-pruned tokens (CLS, registers) then the ``grid`` of patches
    in row-major order; ``sequence="packed"`` says every image of a call runs in one sequence cut by
    ``cu_seqlens`` (Qwen2-VL) instead of ``[crops, tokens, width]``. ``attention(layer)`` gives a
    block's attention parts (q/k projections, head size, scale: :func:`vtoken.compat.attention_parts`)
    to recompute its queries and keys beside SDPA. ``read_layer``: the block whose output the
    projector reads (the last one when several are concatenated).
    """

    layers: nn.ModuleList
    prefix_tokens: int
    grid: tuple[int, int]
    #: The patch's (height, width) in pixels; a square side may be given as one int.
    patch_size: tuple[int, int] | int
    width: int
    head_dim: int
    attention: Callable[[int], Any]
    read_layer: int
    sequence: Literal["batched", "packed"] = "batched"
    #: The tower as its config names it (``"clip_vision_model"``), for messages.
    kind: str = "vision"
    #: Whether the first prefix token is a CLS token (None: it is when there is a prefix token);
    #: register tokens follow it and are never pruned either.
    cls: bool | None = None
    #: A block's attention and MLP branches by attribute name (``observe`` reads their outputs as
    #: the branches added to the residual stream; timm's ``ls1``/``ls2`` include the layer scale).
    parts: dict[str, str] = field(default_factory=lambda: dict(compat.LAYER_PARTS))
    #: The attention sub-module of a block (its input is the normed hidden states).
    attention_module: Callable[[nn.Module], nn.Module] = lambda block: compat.layer_attention(block)
    #: How to run a block in two halves (:class:`BlockHalves`), for stages inside a block (ToMe);
    #: ``halves(block, undo)`` may install hooks (on ``undo``). None: the family cannot.
    halves: Callable[[nn.Module, "UndoStack"], "BlockHalves"] | None = None
    #: Whether the patch embedding pads an image whose sides are not multiples of the patch (timm's
    #: ``dynamic_img_pad``): its grid rounds up instead of down.
    pads: bool = False

    def __post_init__(self) -> None:
        side = self.patch_size
        object.__setattr__(self, "patch_size", (int(side), int(side)) if isinstance(side, int) else tuple(map(int, side)))

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid the embedding makes of an image of ``height`` x ``width`` pixels (a timm
        patch may be taller than wide: each side is cut by its own)."""
        tall, wide = self.patch_size
        return patches_along(height, tall, self.pads), patches_along(width, wide, self.pads)

    @property
    def has_cls(self) -> bool:
        return self.prefix_tokens > 0 if self.cls is None else self.cls


def block_call_splitter(hidden: str, mask: str) -> Callable[[tuple, dict], tuple[torch.Tensor, dict]]:
    """``split_call`` of a block called ``block(hidden_states, mask, ...)`` whose first two parameters
    are named ``hidden`` and ``mask`` (either may come by position or by name)."""

    def split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
        kwargs = dict(kwargs)
        states = args[0] if args else kwargs.pop(hidden)
        if len(args) > 1:
            kwargs[mask] = args[1]
        return states, kwargs

    return split_call


@dataclass(frozen=True)
class BlockHalves:
    """One pre-norm vision block run in two halves, for a stage between its attention and its MLP
    (ToMe's placement). ``split_call(args, kwargs)`` takes the block's call apart into the hidden
    states ``[C, T, d]`` and the rest of its arguments; ``attention(hidden, bias, rest)`` returns the
    hidden states after the attention's residual add, with ``bias`` (``[C, 1, 1, T]`` or None) added
    to the attention logits, and a call that gives that attention's keys averaged over heads
    (``[C, T, head_dim]``, ToMe's metric: averaged only when a stage asks, not in every block the
    halves run); ``mlp(hidden)`` the block's output; ``output(hidden)`` it in the type the block
    returns. Every family's halves are checked against its block's own forward
    (``tests/test_vision_only.py``)."""

    split_call: Callable[[tuple, dict], tuple[torch.Tensor, dict]]
    attention: Callable[[torch.Tensor, torch.Tensor | None, dict], tuple[torch.Tensor, Callable[[], torch.Tensor]]]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    output: Callable[[torch.Tensor], Any] = lambda hidden: hidden


@dataclass(frozen=True)
class ProjectorSpec:
    """What connects the encoder to the LLM: ``module`` maps ``[crops, tokens_per_crop, width]`` to
    the LLM width token by token (its input is what ZOO-Prune perturbs); ``dropped_prefix`` tokens
    are cut from the front of each crop's sequence before it (LLaVA's
    ``vision_feature_select_strategy='default'`` drops the CLS token). Merging projectors (Qwen's 2x2
    merger) are described by the :class:`TokenMap`, not here."""

    module: nn.Module
    dropped_prefix: int = 0
    #: Encoder tokens one LLM token's projector input holds, concatenated in token-map order (1:
    #: a token-by-token projector; Qwen's 2x2 merger: 4, its input per LLM token ``[4 * width]``).
    unit: int = 1


@dataclass(frozen=True)
class PositionScheme:
    """How the LLM numbers its tokens. ``"rope_1d"``: ``position_ids`` ``[B, L]`` (Llama, Qwen2).
    ``"mrope"``: ``[3, B, L]`` (t, h, w) ids from the model's ``get_rope_index`` with per-sample
    ``rope_deltas`` for generated tokens, split over the head dimension by ``sections``
    (``interleaved`` for Qwen3-VL's layout; ``[4, B, L]`` when a text row leads)."""

    kind: Literal["rope_1d", "mrope"] = "rope_1d"
    sections: tuple[int, ...] = ()
    interleaved: bool = False


@dataclass(frozen=True)
class DecoderSpec:
    """The LLM: ``stack`` is called with ``inputs_embeds`` (its pre- and post-hooks realise the
    projector site and the decoding bookkeeping), ``layers`` its blocks (Llama-style: input norm,
    q/k projections with optional q/k norms, rotary; :mod:`vtoken.adapters.hf_decoder` recomputes
    a block's attention rows from its input), ``head`` the LM head (None on a bare model).
    ``token_inputs``: keywords of ``stack``'s forward that carry more per-token input of the prompt
    than its embeddings (Qwen3-VL's DeepStack features and their positions); a mask stage that
    reruns the prompt's tail over its cache hands them to that rerun too."""

    stack: nn.Module
    layers: nn.ModuleList
    head: nn.Module | None
    positions: PositionScheme = PositionScheme()
    width: int = 0
    head_dim: int = 0
    token_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Modality:
    """One kind of visual input of a family (images, videos): ``name`` is its key in transformers'
    ``mm_encoder_outputs``, ``entry`` the encoder method of the inner model that ``generate`` and the
    forward call (``get_image_features``), ``pixels`` its pixel keyword, ``placeholder`` the token id
    the processor repeats once per visual token, ``forward_kwargs`` the forward's keyword arguments
    the entry takes too. ``infos(arguments)`` builds the token structure (:class:`ImageInfo`, one per
    image or video) of one entry call from its bound arguments, ``crop_pixels(arguments)`` the
    ``[C, channels, H, W]`` pixels of every crop (frame) it encodes, in encoder order."""

    name: str
    entry: str
    pixels: str
    placeholder: int
    forward_kwargs: tuple[str, ...]
    infos: Callable[[dict[str, Any]], list["ImageInfo"]]
    crop_pixels: Callable[[dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class FamilyDescription:
    """Everything the generic pipeline (:class:`vtoken.adapters.pipeline.VisionLanguageAdapter`)
    needs to know about a model family, in one place.

    ``name`` as users say it; ``vision``, ``projector`` and ``decoder`` its three parts (``decoder``
    None for a vision-only model); ``gaps``: the signals (:mod:`vtoken.signals`) its models never
    provide, with the reason. Token maps are per input (they depend on the image size), so the family
    builds them in :meth:`VisionLanguageAdapter.image_infos`.

    How the families to come map onto it:

    - **Qwen2-VL / Qwen2.5-VL**: ``vision = VisionSpec(layers=visual.blocks, prefix_tokens=0,
      grid=per image from image_grid_thw, sequence="packed", attention=the block's fused qkv)``;
      ``projector = ProjectorSpec(visual.merger)``; each LLM token's ``TokenMap`` row holds its 2x2
      merge unit (K=4, weight 1/4); ``decoder = DecoderSpec(model.language_model, ..., positions=
      PositionScheme("mrope", sections=rope_scaling["mrope_section"]))``, Qwen3-VL with
      ``interleaved=True`` and its DeepStack features following the same token map.
    - **A timm / open_clip ViT** (:mod:`vtoken.adapters.timm_vit`, :mod:`vtoken.adapters.open_clip_vit`,
      CLIP / SigLIP in :mod:`vtoken.adapters.clip`): ``vision = VisionSpec(layers=model.blocks,
      prefix_tokens=1 + num_reg_tokens (0 with global pooling and no class token),
      grid=patch_embed.grid_size, attention=block.attn's fused qkv, halves=the block in two halves)``;
      ``projector = None``, ``decoder = None``: the vision-only pipeline
      (:class:`vtoken.adapters.vision_encoder.VisionEncoderAdapter`) opens each call at the patch
      embedding, the encoder's own head (pooling, ``forward_head``) reads what the vision-site stages
      leave, and a token budget counts the patch tokens leaving the encoder.
    """

    name: str
    vision: VisionSpec
    projector: ProjectorSpec | None
    decoder: DecoderSpec | None
    gaps: dict[str, str] = field(default_factory=dict)

    @property
    def tokens_per_crop(self) -> int:
        """Tokens of one crop the projector reads (its prefix tokens included)."""
        dropped = self.projector.dropped_prefix if self.projector is not None else 0
        return self.vision.prefix_tokens + self.vision.patches - dropped

    @property
    def first_patch_slot(self) -> int:
        """The slot of a crop's first patch among the tokens the projector reads (-1: LLaVA's
        ``'default'`` strategy on a tower without CLS drops the first patch)."""
        dropped = self.projector.dropped_prefix if self.projector is not None else 0
        return self.vision.prefix_tokens - dropped


class Adapter(ABC):
    """Base class of the model-family adapters."""

    #: Human-readable family name.
    family: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter handles ``model``."""

    # --- structure ----------------------------------------------------------------------------
    @abstractmethod
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer layers."""

    @abstractmethod
    def projector(self) -> nn.Module:
        """The module mapping vision features to the LLM width."""

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers."""

    @abstractmethod
    def visual_tokens_per_image(self) -> int | None:
        """Visual tokens one image gives the LLM at the default input size (None if it varies)."""

    def vision_tokens(self) -> int | None:
        """Patch tokens one crop holds in the vision encoder (None if it varies)."""
        return None

    def vision_tokens_for(self, visual_tokens: int) -> int | None:
        """Patch tokens in the vision encoder behind an image of ``visual_tokens`` LLM tokens (a
        family whose images vary in size says it from the token count)."""
        return self.vision_tokens()

    def vision_stage_keeps(self, stage, vision_tokens: int, visual_tokens: int) -> int:
        """Patch tokens a vision-site ``stage`` keeps of a crop's ``vision_tokens`` for an image of
        ``visual_tokens`` LLM tokens: its crop budget, in patches (a family that prunes whole merge
        units counts the units, :meth:`~vtoken.adapters.qwen2_vl.Qwen2VLAdapter.vision_stage_keeps`)."""
        return stage.crop_budget(vision_tokens, visual_tokens)

    def site_width(self, site: str) -> tuple[int, int]:
        """``(feature width, attention head size)`` of the tokens a stage at ``site`` works on:
        the vision encoder's at the vision and projector sites (where scoring reads vision features
        and attention), the LLM's inside it."""
        raise NotImplementedError

    def vision_feature_layer(self) -> int | None:
        """The vision-encoder layer (0-based) whose output the projector reads (the last one read when
        several are concatenated); None when the family does not say."""
        return None

    @property
    def family_name(self) -> str:
        """The family as users name it (``"LLaVA-NeXT"``), for messages."""
        return self.family

    def unavailable(self, signal: Signal) -> str | None:
        """None when this model provides ``signal`` (:mod:`vtoken.signals`); otherwise what it gives
        instead or why not, for the error that refuses the method."""
        return "no such signal in this family"

    def missing_signal(self, needs: Needs) -> tuple[Signal, str] | None:
        """The first signal of ``needs`` this model cannot provide, with the reason; None if all."""
        for signal in needs.signals:
            reason = self.unavailable(signal)
            if reason is not None:
                return signal, reason
        return None

    def placed_options(self, strategy_cls, options: dict) -> dict:
        """The options a method runs with on this family (a family may place a method whose default
        site it lacks); unchanged by default."""
        return options

    def one_grid_per_image(self) -> str | None:
        """None when every image reaches the LLM as exactly one intact patch grid (nothing else);
        otherwise a short description of what it gets instead, for error messages."""
        return None

    def incomplete_patch_grid(self) -> str | None:
        """None when each image's patch grids reach the projector whole (with other tokens beside them
        or not); otherwise what is missing, for error messages."""
        return None

    # --- runtime ------------------------------------------------------------------------------
    @abstractmethod
    def install(self, pruner: Any, undo: UndoStack) -> None:
        """Install the hooks realising ``pruner``'s stages; register each change on ``undo``."""

    def validate(self, stages: tuple) -> None:
        """Refuse stages this model cannot run (a layer index out of range, say)."""
