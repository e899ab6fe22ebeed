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

Mask stages (``Strategy.mask_stage``, attention modulation as AIF): the prefill runs unchanged as a
probe, during which the strategy's observed layers hand it their query rows' attention
(``observe_attention``, recomputed beside SDPA); the stage is then decided, the slots from the first
text token after a hidden visual token on are recomputed over the probe's KV cache with a mask that
keeps text queries off the hidden keys from the stage's layer on (SDPA and eager only), and
decoding continues with those keys masked, or evicted from the cache (``Strategy.evict_masked``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from vtoken import compat, signals

from .base import UndoStack
from .observe import observe_layer
from vtoken.kernels import attention_rows, gather_tokens
from vtoken.layout import SequenceLayout, identity_layout
from vtoken.pruner import Pruner, PruneRun


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding of ``x`` ``[B, H, L, D]`` with ``cos``/``sin`` ``[B, L, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


#: Attention implementations that take an arbitrary mask (what a mask stage needs at prefill).
ARBITRARY_MASK_ATTENTION = ("sdpa", "eager")


def causal_mask_for(config, hidden: torch.Tensor, padding_mask: torch.Tensor, query_length: int, extra=None):
    """The mask the attention implementation of ``config`` expects, for the last ``query_length``
    tokens attending causally over ``padding_mask.shape[1]`` keys (True = may be attended).

    ``extra``: an optional transformers mask function ``(batch, head, query, key) -> bool`` (absolute
    slot indices, broadcast) that must also hold; only for :data:`ARBITRARY_MASK_ATTENTION`."""
    make_mask = compat.mask_builder(config)  # None: an implementation that builds no mask
    implementation = compat.attention_implementation(config)
    if extra is not None and implementation not in ARBITRARY_MASK_ATTENTION:
        raise ValueError(
            f"attn_implementation={implementation!r} cannot take an arbitrary attention mask; "
            f"use one of {', '.join(ARBITRARY_MASK_ATTENTION)}"
        )
    if make_mask is None:
        return None
    return compat.build_mask(
        config, make_mask, batch_size=hidden.shape[0], q_length=query_length, kv_length=padding_mask.shape[1],
        padding_mask=padding_mask.to(torch.bool), extra=extra, dtype=hidden.dtype, device=hidden.device,
    )


class DecoderPruning:
    """Realises the projector site (in front of the LLM) and the ``llm`` site (inside it).

    ``pre_llm(run, layout, embeds)`` is called by the adapter to apply everything that happens before
    the LLM (vision-site drops, projector-site stages); it returns the group-0 layout and embeddings.
    """

    def __init__(self, language_model: nn.Module, pruner: Pruner, pre_llm, head: nn.Module | None = None):
        self.lm = language_model
        self.layers: nn.ModuleList = language_model.layers
        self.pruner = pruner
        self.pre_llm = pre_llm
        #: The LM head (hidden state -> logits), for a probe that decodes one token; optional.
        self.head = head
        self.touches_input = any(s.site in ("vision", "projector") for s in pruner.stages)
        stages = [s for s in pruner.stages if s.site == "llm"] + ([pruner.mask] if pruner.mask is not None else [])
        #: Layers whose input is kept during prefill for ``ctx.attention`` (a stage's layer and the one before).
        self.stash_layers = {layer for s in stages for layer in (s.layer - 1, s.layer)}

    @property
    def config(self):
        return self.lm.config

    def install(self, undo: UndoStack) -> None:
        undo.hook(self.lm.register_forward_pre_hook(self._before_lm, with_kwargs=True))
        undo.hook(self.lm.register_forward_hook(self._after_lm, with_kwargs=True, always_call=True))
        pruner = self.pruner

        def prefilling() -> bool:
            run = pruner.active
            return run is not None and run.prefill and bool(run.groups) and run.side_pass is None

        query = pruner.needs.attention_query()
        attention_layers = pruner.needs.layers(signals.LLM_ATTENTION_OBSERVED)
        self._check_attention_layers(query, attention_layers)
        if pruner.mask is not None:
            self._check_mask_stage(pruner.mask, query)
        for layer in pruner.needs.layers(signals.LLM_OBSERVED):
            observe_layer(self.layers[layer], compat.LAYER_PARTS, prefilling,
                          partial(self._observed, layer), undo)
        for layer in attention_layers:
            hook = partial(self._attention_observed, query, layer)
            undo.hook(self.layers[layer].register_forward_hook(hook, with_kwargs=True))
        llm_layers = [s.layer for s in self.pruner.stages_at("llm")]
        if pruner.mask is not None:
            llm_layers.append(0)  # a mask stage sets the attention mask of every layer when it recomputes
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
        cache = compat.cache_from(kwargs)
        if cache is not None and self.pruner.stages_at("llm") and not compat.is_dynamic_cache(cache):
            raise ValueError(
                f"pruning inside the LLM needs a DynamicCache (layers hold different lengths); got "
                f"{type(cache).__name__}. Use the default cache (no cache_implementation='static')."
            )
        run.group_kwargs = {}
        update = self._prefill_inputs if run.prefill else self._decode_inputs
        changed = update(run, embeds, mask, kwargs)
        if run.prefill and self.pruner.mask is not None:
            changed = self._prepare_mask_prefill(run, kwargs) or changed
        return (args, kwargs) if changed else None

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
        if not (self.touches_input or run.input_layout_changed):
            return False
        _, layout = run.groups[0]
        kwargs["attention_mask"] = torch.cat([layout.valid, run.new_mask], dim=1).long()
        kwargs["position_ids"] = self._decode_positions(run, layout)
        return True

    def _after_lm(self, module, args, kwargs, output):
        run = self.pruner.active
        if run is None:
            return None
        replaced = None
        if run.prefill:
            if output is not None and self.pruner.mask is not None:
                replaced = output = self._apply_mask_stage(run, kwargs, output)
            cache = compat.output_cache(output)
            if cache is not None and run.cache_added:
                compat.drop_output_cache(output)
            elif cache is not None:
                self.pruner.attach(cache, run)
            run.end_prefill()
            self.pruner.last_run = run
        run.group_kwargs = {}
        self.pruner.active = None
        return replaced

    def _before_layer(self, index: int, module, args, kwargs):
        run = self.pruner.active
        if run is None or not run.groups:
            return None
        if run.side_pass is not None:  # an extra pass of a mask stage (see _apply_mask_stage)
            if run.side_pass != "recompute":
                return None
            first, plain, masked = run.recompute
            kwargs["attention_mask"] = masked if index >= first else plain
            return args, kwargs
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._use_group_kwargs(run, index, hidden, kwargs)
        stage = self.pruner.llm_stage_at(index) if run.prefill else None
        if run.prefill and index in self.stash_layers:
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
        cos_sin = compat.rotary_cos_sin(self.lm, hidden, positions)
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
        return query_attention_rows(self.layers[source], hidden, cos_sin, layout, query)[0]

    def _attention_observed(self, query: str, index: int, module, args, kwargs, output) -> None:
        """Forward hook of an observed-attention layer: the query rows' attention over the prompt,
        recomputed beside the layer's own attention, handed to ``observe_attention``."""
        run = self.pruner.active
        if run is None or not run.prefill or not run.groups:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cos_sin = kwargs["position_embeddings"]
        layout = run.group_for(index)[1]
        if query == "next" and run.side_pass == "next":
            keys, _ = compat.cache_layer_kv(compat.cache_from(kwargs), index)  # after this step's update
            extra = torch.ones(hidden.shape[0], keys.shape[2] - layout.length, dtype=torch.bool, device=hidden.device)
            key_valid = torch.cat([layout.valid, extra], dim=1)
            probs = llama_cached_attention_rows(module, hidden, cos_sin, keys, key_valid)[..., : layout.length]
            present = torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool, device=probs.device)
        elif query != "next" and run.side_pass is None:
            probs, present = query_attention_rows(module, hidden, cos_sin, layout, query)
        else:
            return None
        summary = self.pruner.strategy.observe_attention(index, probs, present, layout.valid)
        run.attention_observed[index] = (summary, layout)
        return None

    # --- mask stages (attention modulation) -------------------------------------------------------
    def _check_attention_layers(self, query: str, layers: list[int]) -> None:
        if not layers:
            return
        if query not in ("last", "instruction", "next"):
            raise ValueError(f"observed_attention query must be 'last', 'instruction' or 'next', got {query!r}")
        bad = [layer for layer in layers if not 0 <= layer < len(self.layers)]
        if bad:
            raise ValueError(f"observed attention layers {bad} do not exist: the LLM has {len(self.layers)} layers")
        if query == "next" and self.pruner.mask is None:
            raise ValueError("attention of the next token ('next') exists only after the prefill: it needs a mask stage")
        if query == "next" and self.head is None:
            raise ValueError(
                "attention of the next token needs the model's LM head (a probe decodes one token); wrap the "
                "model with its head (e.g. LlavaForConditionalGeneration), or use query rows 'instruction'"
            )

    def _check_mask_stage(self, stage, query: str) -> None:
        if stage.site != "llm" or not 0 <= stage.layer < len(self.layers):
            raise ValueError(
                f"a mask stage needs site 'llm' and a layer in 0..{len(self.layers) - 1}, got {stage.name!r}"
            )
        if self.pruner.stages_at("llm"):
            raise ValueError("a mask stage cannot be combined with pruning inside the LLM; use pre-LLM stages only")
        if self.pruner.config.positions != "original":
            raise ValueError("a mask stage keeps every token's position; use positions='original'")
        self._check_mask_attention()

    def _check_mask_attention(self) -> None:
        implementation = compat.attention_implementation(self.config)
        if implementation not in ARBITRARY_MASK_ATTENTION:
            raise ValueError(
                f"this method masks visual tokens from the text with an explicit attention mask, which "
                f"attn_implementation={implementation!r} cannot take; use one of {', '.join(ARBITRARY_MASK_ATTENTION)}"
            )

    def _prepare_mask_prefill(self, run: PruneRun, kwargs) -> bool:
        """A mask stage reuses the prefix's KV cache to recompute the text rows: make sure the
        prefill fills one, even when the caller asked for none (it is then not returned)."""
        self._check_mask_attention()
        if compat.cache_from(kwargs) is not None:
            return False
        wanted = compat.use_cache_from(kwargs)
        run.cache_added = not (self.config.use_cache if wanted is None else wanted)
        compat.set_cache(kwargs, compat.new_dynamic_cache(self.config))
        kwargs[compat.USE_CACHE_KWARG] = True
        return True

    def _apply_mask_stage(self, run: PruneRun, kwargs, output):
        """After the prefill (the probe): decide the mask stage, recompute the rows of the text that
        comes after a hidden token with the text -> hidden-visual attention masked from layer
        ``stage.layer`` on, and set the decoding layout (hidden slots invalid, or evicted)."""
        stage, strategy = self.pruner.mask, self.pruner.strategy
        cache = compat.output_cache(output)
        layout = run.groups[0][1]
        query, layers = self.pruner.needs.attention_query(), self.pruner.needs.layers(signals.LLM_ATTENTION_OBSERVED)
        if query == "next" and layers and run.replay is None:  # a replay decides nothing anew
            self._probe_next(run, layout, output, cache)
        hidden = run.stash[stage.layer][0]
        masked = self.pruner.run_mask_stage(run, stage, layout, hidden, partial(self._attention, run, stage.layer))
        if not bool(masked.any()):
            return output
        text = (layout.image_index < 0) & layout.valid
        affected = text & (masked.long().cumsum(-1) > 0)  # text after a hidden token
        if bool(affected.any()):
            slots = torch.arange(layout.length, device=masked.device).expand_as(affected)
            start = int(torch.where(affected, slots, layout.length).min())
            output = self._recompute(run, kwargs, output, cache, layout, masked, start)
        if run.cache_added:
            return output
        if strategy.evict_masked:
            decoding, index = layout.compact(layout.valid & ~masked)  # positions kept; pads go too
            for layer in range(stage.layer, compat.num_cache_layers(cache)):
                keys, values = (
                    gather_tokens(t.transpose(1, 2), index).transpose(1, 2).contiguous()
                    for t in compat.cache_layer_kv(cache, layer)
                )
                compat.set_cache_layer_kv(cache, layer, keys, values)
        else:
            decoding = SequenceLayout(
                layout.orig_index, layout.valid & ~masked, layout.visual_index, layout.image_index, layout.position_ids
            )
        if stage.layer == 0:
            run.groups[0] = (0, decoding)
            run.input_layout_changed = True
        else:
            run.groups.append((stage.layer, decoding))
        return output

    def _probe_next(self, run: PruneRun, layout, output, cache) -> None:
        """One greedy decoding step on the prefill's cache, so the observed layers see the next
        token's attention; the cache is then cut back to the prompt."""
        token = self.head(output.last_hidden_state[:, -1]).argmax(-1)
        embeds = self.lm.get_input_embeddings()(token)[:, None]
        positions = layout.position_ids[:, -1:] + 1
        ones = torch.ones_like(layout.valid[:, :1])
        run.side_pass = "next"
        try:
            self.lm.forward(
                inputs_embeds=embeds, attention_mask=torch.cat([layout.valid, ones], dim=1).long(),
                position_ids=positions, use_cache=True, **compat.cache_kwargs(cache),
            )
        finally:
            run.side_pass = None
        compat.crop_cache(cache, -1)

    def _recompute(self, run: PruneRun, kwargs, output, cache, layout, masked, start: int):
        """Rerun the LLM on slots ``start..`` over the prefix's cache, no text query attending to a
        ``masked`` key from the mask stage's layer on (visual queries unchanged), and splice the
        result into ``output``. Slots before ``start`` hold no text that comes after a hidden token
        in any sample, so their hidden states and cache entries are already what the mask gives."""
        embeds = kwargs["inputs_embeds"]
        length = layout.length
        text = layout.image_index < 0

        def text_may_attend(batch, head, q, kv):
            return ~(text[batch, q] & masked[batch, kv])

        plain = causal_mask_for(self.config, embeds, layout.valid, length - start)
        modulated = causal_mask_for(self.config, embeds, layout.valid, length - start, extra=text_may_attend)
        compat.crop_cache(cache, start - length)
        flags = {k: kwargs[k] for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)}
        run.side_pass, run.recompute = "recompute", (self.pruner.mask.layer, plain, modulated)
        try:
            rest = self.lm.forward(
                inputs_embeds=embeds[:, start:], attention_mask=layout.valid.long(),
                position_ids=layout.position_ids[:, start:], use_cache=True, **compat.cache_kwargs(cache), **flags,
            )
        finally:
            run.side_pass, run.recompute = None, None
        output.last_hidden_state = torch.cat([output.last_hidden_state[:, :start], rest.last_hidden_state], dim=1)
        if getattr(output, "hidden_states", None) is not None and rest.hidden_states is not None:
            output.hidden_states = tuple(
                torch.cat([a[:, :start], b], dim=1) for a, b in zip(output.hidden_states, rest.hidden_states)
            )
        if getattr(output, "attentions", None) is not None and rest.attentions is not None:
            spliced = []
            for a, b in zip(output.attentions, rest.attentions):
                a = a.clone()
                a[:, :, start:] = b
                spliced.append(a)
            output.attentions = tuple(spliced)
        return output


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
    attn = compat.attention_parts(compat.layer_attention(layer))
    x = compat.decoder_input_norm(layer)(hidden)
    batch, length, _ = x.shape
    head_dim = attn.head_dim
    rows = gather_tokens(x, query_slots)
    q = attn.q_proj(rows).view(batch, rows.shape[1], -1, head_dim)
    k = attn.k_proj(x).view(batch, length, -1, head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in cos_sin)
    q = apply_rotary(q, gather_tokens(cos, query_slots), gather_tokens(sin, query_slots))
    k = apply_rotary(k, cos, sin)
    causal = torch.arange(length, device=x.device)[None, None, :] <= query_slots[:, :, None]
    key_mask = causal & key_valid[:, None, :].to(torch.bool)
    return attention_rows(q, k, attn.scaling, key_mask)


def query_attention_rows(layer: nn.Module, hidden, cos_sin, layout, query: str):
    """``([B, H, Q, L], [B, Q])``: the attention probabilities of a layout's query rows (``"last"``:
    each sample's last valid slot, so right padding is never scored as a query; ``"instruction"``: see :func:`instruction_slots`) over its slots, zero
    for absent rows, and which rows are present."""
    if query == "last":
        # Each sample's last *valid* slot: in a right-padded batch the last slot is padding.
        slots = torch.arange(layout.length, device=hidden.device).expand_as(layout.valid)
        query_slots = torch.where(layout.valid.bool(), slots, -1).max(dim=-1, keepdim=True).values.clamp(min=0)
        present = torch.ones(query_slots.shape, dtype=torch.bool, device=hidden.device)
        return llama_attention_rows(layer, hidden, cos_sin, query_slots, layout.valid), present
    if query == "instruction":
        query_slots, present = instruction_slots(layout)
        probs = llama_attention_rows(layer, hidden, cos_sin, query_slots, layout.valid)
        return probs * present[:, None, :, None], present
    raise ValueError(f"query must be 'last' or 'instruction', got {query!r}")


def llama_cached_attention_rows(layer: nn.Module, hidden, cos_sin, keys, key_valid) -> torch.Tensor:
    """Attention probabilities ``[B, H, S, K]`` of the S new tokens of a decoding step (the layer's
    input ``hidden`` ``[B, S, d]`` and their rotary ``cos_sin``) over the K keys the layer's cache
    holds after its update (post-rotary, the new tokens last), through
    :func:`vtoken.kernels.attention_rows`. New token j attends to valid keys ``<= K - S + j``."""
    attn = compat.attention_parts(compat.layer_attention(layer))
    x = compat.decoder_input_norm(layer)(hidden)
    batch, steps, _ = x.shape
    q = attn.q_proj(x).view(batch, steps, -1, attn.head_dim)
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    cos, sin = (t.expand(batch, -1, -1) for t in cos_sin)
    q = apply_rotary(q.transpose(1, 2), cos, sin)
    total = keys.shape[2]
    causal = torch.arange(total, device=x.device)[None, :] <= (total - steps + torch.arange(steps, device=x.device))[:, None]
    key_mask = causal[None] & key_valid[:, None, :].to(torch.bool)
    return attention_rows(q, keys, attn.scaling, key_mask)
