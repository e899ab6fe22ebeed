"""Pruning inside and in front of a Hugging Face decoder stack (Llama, Vicuna, Mistral, Qwen2).

transformers builds the causal mask and the rotary embeddings once per forward and hands the same
objects to every layer. After pruning at layer K the layers from K on hold fewer tokens, so each layer
group gets its own mask, position ids and rotary embeddings, built here and swapped into the layer's
keyword arguments by a forward pre-hook: no modeling code is forked or copied.

Where state lives: the request's :class:`~vtoken.pruner.PruneRun` (attached to its KV cache after
prefill). Layers before the first pruning layer keep the full KV cache; each later group caches only
its own slots, so decoding masks are sized per group from the group's layout.

Positions: during decoding, the new tokens' position ids are the ones the unwrapped model would use
(given by ``generate``, or counted from the original length), shifted per sample by the number of
dropped tokens in ``contiguous`` mode.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from .base import UndoStack
from .observe import observe_layer
from vtoken.kernels import attention_rows, gather_tokens
from vtoken.layout import identity_layout
from vtoken.pruner import Pruner, PruneRun


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding of ``x`` ``[B, H, L, D]`` with ``cos``/``sin`` ``[B, L, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def causal_mask_for(config, hidden: torch.Tensor, padding_mask: torch.Tensor, query_length: int):
    """The mask the attention implementation of ``config`` expects, for the last ``query_length``
    tokens attending causally over ``padding_mask.shape[1]`` keys (True = may be attended)."""
    try:
        make_mask = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    except KeyError:  # an implementation that builds no mask (as transformers does for it)
        return None
    kv_length = padding_mask.shape[1]
    return make_mask(
        batch_size=hidden.shape[0],
        q_length=query_length,
        kv_length=kv_length,
        q_offset=kv_length - query_length,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=padding_mask.to(torch.bool),
        allow_is_causal_skip=True,
        dtype=hidden.dtype,
        config=config,
        use_vmap=False,
        device=hidden.device,
    )


class DecoderPruning:
    """Realises the projector site (in front of the LLM) and the ``llm`` site (inside it).

    ``pre_llm(run, layout, embeds)`` is called by the adapter to apply everything that happens before
    the LLM (vision-site drops, projector-site stages); it returns the group-0 layout and embeddings.
    """

    def __init__(self, language_model: nn.Module, pruner: Pruner, pre_llm):
        self.lm = language_model
        self.layers: nn.ModuleList = language_model.layers
        self.pruner = pruner
        self.pre_llm = pre_llm
        self.touches_input = any(s.site in ("vision", "projector") for s in pruner.stages)

    @property
    def config(self):
        return self.lm.config

    def install(self, undo: UndoStack) -> None:
        undo.hook(self.lm.register_forward_pre_hook(self._before_lm, with_kwargs=True))
        undo.hook(self.lm.register_forward_hook(self._after_lm, with_kwargs=True, always_call=True))
        pruner = self.pruner

        def prefilling() -> bool:
            return pruner.active is not None and pruner.active.prefill and bool(pruner.active.groups)

        for layer in pruner.strategy.observed_layers("llm", len(self.layers)):
            observe_layer(self.layers[layer], {"attention": "self_attn", "mlp": "mlp"}, prefilling,
                          partial(self._observed, layer), undo)
        llm_layers = [s.layer for s in self.pruner.stages_at("llm")]
        if not llm_layers:
            return
        first_hooked = max(0, min(llm_layers) - 1)  # layer K-1's input is kept for scoring
        for index in range(first_hooked, len(self.layers)):
            hook = partial(self._before_layer, index)
            undo.hook(self.layers[index].register_forward_pre_hook(hook, with_kwargs=True))

    # --- hooks ----------------------------------------------------------------------------------
    def _before_lm(self, module, args, kwargs):
        run = self.pruner.active
        if run is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("vtoken expects the LLM to be called with inputs_embeds, as LLaVA does")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("vtoken needs a 2-D attention_mask (batch, length); a 4-D custom mask cannot be pruned")
        cache = kwargs.get("past_key_values")
        if cache is not None and self.pruner.stages_at("llm") and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"pruning inside the LLM needs a DynamicCache (layers hold different lengths); got "
                f"{type(cache).__name__}. Use the default cache (no cache_implementation='static')."
            )
        run.group_kwargs = {}
        update = self._prefill_inputs if run.prefill else self._decode_inputs
        return (args, kwargs) if update(run, embeds, mask, kwargs) else None

    def _prefill_inputs(self, run: PruneRun, embeds, mask, kwargs) -> bool:
        batch, length = embeds.shape[:2]
        padding = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=embeds.device)[None]
        positions = positions.expand(batch, length)
        run.orig_length = length
        run.seen = length
        run.orig_valid_count = padding.bool().sum(-1)
        visual = run.visual
        layout = identity_layout(
            padding, positions, visual.visual_index.to(embeds.device), visual.image_index.to(embeds.device)
        )
        if not self.touches_input:
            run.groups = [(0, layout)]
            return False
        layout, embeds = self.pre_llm(run, layout, embeds)
        run.groups = [(0, layout)]
        kwargs["inputs_embeds"] = embeds
        kwargs["attention_mask"] = layout.valid.to(padding.dtype)
        kwargs["position_ids"] = layout.position_ids
        return True

    def _decode_inputs(self, run: PruneRun, embeds, mask, kwargs) -> bool:
        batch, steps = embeds.shape[:2]
        if batch != run.batch_size:
            raise ValueError(
                f"mismatched batch: this cache was filled for {run.batch_size} samples but the input has {batch}"
            )
        new_columns = run.seen + steps - run.orig_length
        if mask is not None:
            run.new_mask = mask[:, run.orig_length :].bool()
        else:
            run.new_mask = torch.ones(batch, new_columns, dtype=torch.bool, device=embeds.device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(steps, device=embeds.device) + run.seen)[None].expand(batch, steps)
        run.new_positions = positions.expand(batch, steps)
        run.seen += steps
        if not self.touches_input:
            return False
        _, layout = run.groups[0]
        kwargs["attention_mask"] = torch.cat([layout.valid, run.new_mask], dim=1).long()
        kwargs["position_ids"] = self._decode_positions(run, layout)
        return True

    def _after_lm(self, module, args, kwargs, output):
        run = self.pruner.active
        if run is None:
            return None
        if run.prefill:
            cache = getattr(output, "past_key_values", None) if output is not None else None
            if cache is not None:
                cache._vtoken_run = run
            run.end_prefill()
            self.pruner.last_run = run
        run.group_kwargs = {}
        self.pruner.active = None
        return None

    def _before_layer(self, index: int, module, args, kwargs):
        run = self.pruner.active
        if run is None or not run.groups:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._use_group_kwargs(run, index, hidden, kwargs)
        stage = self.pruner.llm_stage_at(index) if run.prefill else None
        if run.prefill:
            run.stash[index] = (hidden, kwargs.get("position_embeddings"), run.group_for(index)[1])
        if stage is not None:
            _, layout = run.groups[-1]
            scorer = partial(self._attention, run, index)
            layout, hidden = self.pruner.run_sequence_stage(run, stage, layout, hidden, scorer)
            run.groups.append((index, layout))
            self._use_group_kwargs(run, index, hidden, kwargs)
        return (hidden, *args[1:]), kwargs

    def _observed(self, layer: int, io: dict) -> None:
        run = self.pruner.active
        layout = run.group_for(layer)[1]
        run.observed[layer] = (self.pruner.strategy.observe("llm", layer, io, layout.valid), layout)

    # --- per-group kwargs -------------------------------------------------------------------------
    def _use_group_kwargs(self, run: PruneRun, index: int, hidden, kwargs) -> None:
        first, layout = run.group_for(index)
        if first == 0:
            return
        if first not in run.group_kwargs:
            run.group_kwargs[first] = self._group_kwargs(run, layout, hidden)
        kwargs.update(run.group_kwargs[first])

    def _group_kwargs(self, run: PruneRun, layout, hidden) -> dict:
        if run.prefill:
            padding, positions = layout.valid, layout.position_ids
        else:
            padding = torch.cat([layout.valid, run.new_mask], dim=1)
            positions = self._decode_positions(run, layout)
        cos_sin = self.lm.rotary_emb(hidden, positions)
        mask = causal_mask_for(self.config, hidden, padding, hidden.shape[1])
        return {"attention_mask": mask, "position_ids": positions, "position_embeddings": cos_sin}

    def _decode_positions(self, run: PruneRun, layout) -> torch.Tensor:
        if self.pruner.config.positions == "original":
            return run.new_positions
        dropped = run.orig_valid_count.to(layout.valid.device) - layout.valid.sum(-1)
        return run.new_positions - dropped[:, None]

    # --- attention rows for scoring -------------------------------------------------------------
    def _attention(self, run: PruneRun, index: int, query: str = "last", layer: str = "previous"):
        if layer not in ("previous", "current"):
            raise ValueError(f"layer must be 'previous' or 'current', got {layer!r}")
        source = index - 1 if layer == "previous" else index
        if source < 0 or source not in run.stash:
            raise ValueError(f"no attention input is kept for LLM layer {source}")
        hidden, cos_sin, layout = run.stash[source]
        if query == "last":
            query_slots = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, device=hidden.device)
            return llama_attention_rows(self.layers[source], hidden, cos_sin, query_slots, layout.valid)
        if query == "instruction":
            query_slots, present = instruction_slots(layout)
            probs = llama_attention_rows(self.layers[source], hidden, cos_sin, query_slots, layout.valid)
            return probs * present[:, None, :, None]
        raise ValueError(f"query must be 'last' or 'instruction', got {query!r}")


def instruction_slots(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the slots of the valid text tokens after its last visual token (the question and
    the chat template's tail), as ``[B, Q]`` slot indices with a ``[B, Q]`` presence mask; missing
    entries point at the last slot."""
    length = layout.length
    slots = torch.arange(length, device=layout.valid.device).expand_as(layout.valid)
    last_visual = torch.where(layout.image_index >= 0, slots, -1).max(dim=-1, keepdim=True).values
    wanted = layout.valid & (layout.image_index < 0) & (slots > last_visual) & (last_visual >= 0)
    count = wanted.sum(-1)
    width = max(int(count.max()), 1)
    order = torch.sort(torch.where(wanted, slots, length + slots), dim=-1).values[:, :width]
    present = torch.arange(width, device=slots.device)[None] < count[:, None]
    return torch.where(present, order, length - 1), present


def llama_attention_rows(layer: nn.Module, hidden, cos_sin, query_slots, key_valid) -> torch.Tensor:
    """Attention probabilities ``[B, H, Q, L]`` of the query slots of a Llama-style decoder layer,
    recomputed from the layer's input exactly as its attention would (RMSNorm, q/k projections,
    optional q/k norms, rotary), through :func:`vtoken.kernels.attention_rows`. Query slot ``q``
    attends to key slots ``<= q`` that are valid."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    head_dim = attn.head_dim
    rows = gather_tokens(x, query_slots)
    q = attn.q_proj(rows).view(batch, rows.shape[1], -1, head_dim)
    k = attn.k_proj(x).view(batch, length, -1, head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in cos_sin)
    q = apply_rotary(q, gather_tokens(cos, query_slots), gather_tokens(sin, query_slots))
    k = apply_rotary(k, cos, sin)
    causal = torch.arange(length, device=x.device)[None, None, :] <= query_slots[:, :, None]
    key_mask = causal & key_valid[:, None, :].to(torch.bool)
    return attention_rows(q, k, attn.scaling, key_mask)
