"""Pruning inside and in front of a Hugging Face decoder stack (Llama, Vicuna, Mistral, Qwen2).

transformers builds the causal mask and the rotary embeddings once per forward and hands the same
objects to every layer. After pruning at layer K the layers from K on hold fewer tokens, so each layer
group gets its own mask, position ids and rotary embeddings, built here and swapped into the layer's
keyword arguments by a forward pre-hook: no modeling code is forked or copied.

Where state lives: the request's :class:`~vtoken.pruner.PruneRun` (attached to its KV cache after
prefill). Layers before the first pruning layer keep the full KV cache; each later group caches only
its own slots, so decoding masks are sized per group from the group's layout. A static cache's layers
each write from their own count too; its groups' masks span every slot, those not yet written masked
(a mask stage's rerun as well; one that evicts rewrites the kept tokens to a layer's first slots).

Positions: during decoding, the new tokens' position ids are the ones the unwrapped model would use
(given by ``generate``, or counted from the original length), shifted per sample by the number of
dropped tokens in ``contiguous`` mode.

Mask stages (``Strategy.mask_stage``, attention modulation as AIF) run through their own mechanism,
:class:`~vtoken.adapters.mask_stage.MaskStagePass`; the decoder calls it at four points.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Callable

import torch
from torch import nn
from vtoken import compat, signals

from .base import UndoStack
from .key_reuse import KeyReuse
from .mask_stage import MaskStagePass
from .masks import causal_mask_for
from .observe import observe_layer
from vtoken.kernels import attention_rows, gather_tokens
from vtoken.layout import identity_layout, positions_in, positions_out, rotary_positions
from vtoken.pruner import Pruner
from vtoken.request import PruneRun


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding of ``x`` ``[B, H, L, D]`` with ``cos``/``sin`` ``[B, L, D]``:
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` (transformers'
    ``apply_rotary_pos_emb``), the same numbers bit for bit: written on the halves of ``x * cos``
    (``x1 c1 - x2 s1``, ``x2 c2 + x1 s2``, each product rounded before the sum as there; ``addcmul_``
    would fuse them and round once), it makes three passes over ``x`` where negating,
    concatenating, a second full product and a full sum made four and a half (scoring rotates
    every key of a layer). Partial rotary (``cos`` narrower than ``x``: Phi-3's
    ``partial_rotary_factor``) rotates the first ``cos.shape[-1]`` features and passes the rest, as
    transformers does."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos
    out[..., :half].sub_(x2 * sin[..., :half])
    out[..., half:].add_(x1 * sin[..., half:])
    return out


@lru_cache(maxsize=None)
def _rotates_as_llama(function: Callable) -> bool:
    """Whether a modeling file's ``apply_rotary_pos_emb(q, k, cos, sin)`` gives what
    :func:`apply_rotary` gives (transformers' Llama convention, ``rotate_half(x) = cat(-x2, x1)``).
    Cohere's and GLM's rotate interleaved pairs (``x[0::2]``, ``x[1::2]``, their cos and sin repeated
    per pair), which the fast path would rotate wrongly. Both conventions are linear in ``x``,
    ``cos`` and ``sin``, so random numbers tell them apart. A function that cannot be called so (not
    transformers' signature) is left to the fast path, as before this check."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 8, generator=generator, dtype=torch.float64)
    cos, sin = torch.randn(2, 1, 3, 8, generator=generator, dtype=torch.float64)
    try:
        theirs = function(x, x, cos, sin)[0]
    except Exception:  # noqa: BLE001 - any other signature: not a rotary this check can compare
        return True
    return isinstance(theirs, torch.Tensor) and theirs.shape == x.shape and torch.allclose(theirs, apply_rotary(x, cos, sin))


def rotary_of(attention: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """How an LLM attention module rotates ``x`` ``[B, H, L, D]`` with ``cos``/``sin`` ``[B, L, D']``:
    not at all on a layer without rotary (:func:`vtoken.compat.attention_rotates`), :func:`apply_rotary`
    where its modeling file's function rotates as Llama's, else that function itself (it rotates a
    query and a key together: ``x`` goes in as both and the key half is left)."""
    if not compat.attention_rotates(attention):  # a NoPE layer (SmolLM3's every fourth, EXAONE 4's global ones)
        return lambda x, cos, sin: x
    function = compat.decoder_rotary_function(attention)
    if function is None or _rotates_as_llama(function):
        return apply_rotary
    return lambda x, cos, sin: function(x, x, cos, sin)[0]


def split_heads(x: torch.Tensor, norm: nn.Module | None, head_dim: int) -> torch.Tensor:
    """A query or key projection ``[B, L, heads * head_dim]`` as ``[B, L, heads, head_dim]`` through
    the attention module's norm of it, where it has one: over the whole projection before the split
    (OLMo2) or per head after it (Qwen3, Cohere), as :func:`vtoken.compat.norm_before_head_split`
    reads it."""
    if norm is not None and compat.norm_before_head_split(norm, head_dim):
        return norm(x).view(*x.shape[:-1], -1, head_dim)
    x = x.view(*x.shape[:-1], -1, head_dim)
    return x if norm is None else norm(x)


class DecoderPruning:
    """Realises the projector site (in front of the LLM) and the ``llm`` site (inside it).

    ``pre_llm(run, layout, embeds)`` is called by the adapter to apply everything that happens before
    the LLM (vision-site drops, projector-site stages); it returns the group-0 layout and embeddings.
    """

    def __init__(self, language_model: nn.Module, pruner: Pruner, pre_llm, head: nn.Module | None = None,
                 token_inputs: tuple[str, ...] = ()):
        self.lm = language_model
        #: The LLM's per-token inputs besides its embeddings (``DecoderSpec.token_inputs``).
        self.token_inputs = token_inputs
        self.layers: nn.ModuleList = language_model.layers
        self.pruner = pruner
        self.pre_llm = pre_llm
        #: The LM head (hidden state -> logits), for a probe that decodes one token; optional.
        self.head = head
        self.touches_input = any(s.site in ("vision", "projector") for s in pruner.stages)
        stages = [s for s in pruner.stages if s.site == "llm"] + ([pruner.mask] if pruner.mask is not None else [])
        #: The names of the stages decided inside the LLM (pruning stages and a mask stage).
        self.llm_decisions = tuple(s.name for s in stages)
        #: Layers whose input is kept during prefill for ``ctx.attention`` (a stage's layer and the one before).
        self.stash_layers = {layer for s in stages for layer in (s.layer - 1, s.layer)}

    @property
    def config(self):
        return self.lm.config

    def install(self, undo: UndoStack) -> None:
        undo.pre_hook(self.lm, self._before_lm, with_kwargs=True)
        undo.post_hook(self.lm, self._after_lm, with_kwargs=True, always_call=True)
        pruner = self.pruner

        def prefilling() -> bool:
            run = pruner.active
            return (run is not None and run.prefill and bool(run.groups) and run.side_pass is None
                    and not self.replays_llm_decisions(run))

        query = pruner.needs.attention_query()
        attention_layers = pruner.needs.layers(signals.LLM_ATTENTION_OBSERVED)
        self._check_attention_layers(query, attention_layers)
        #: The mechanism of a mask stage (attention modulation, AIF), when the strategy has one.
        self.masking = MaskStagePass(self) if pruner.mask is not None else None
        #: Layer K's keys projected for scoring at a stage at K, handed to the layer itself.
        self.key_reuse = KeyReuse(self.layers, lambda: pruner.active, undo)
        for layer in pruner.needs.layers(signals.LLM_OBSERVED):
            observe_layer(self.layers[layer], compat.decoder_layer_parts(self.layers[layer]), prefilling,
                          partial(self._observed, layer), undo)
        for layer in attention_layers:
            hook = partial(self._attention_observed, query, layer)
            undo.post_hook(self.layers[layer], hook, with_kwargs=True)
            if query != "next":
                self._keep_layer_queries(layer, prefilling, undo)
        llm_layers = [s.layer for s in self.pruner.stages_at("llm")]
        if pruner.mask is not None:
            llm_layers.append(0)  # a mask stage sets the attention mask of every layer when it recomputes
        if not llm_layers:
            return
        first_hooked = max(0, min(llm_layers) - 1)  # layer K-1's input is kept for scoring
        for index in range(first_hooked, len(self.layers)):
            hook = partial(self._before_layer, index)
            undo.pre_hook(self.layers[index], hook, with_kwargs=True)
    # --- hooks ----------------------------------------------------------------------------------
    def _before_lm(self, module, args, kwargs):
        run = self.pruner.active
        if run is None:
            return None
        if run.prefill:
            for name, value in run.entered_inputs.items():  # what the forward fed the kept tokens alone did not derive
                if kwargs.get(name) is None:
                    kwargs[name] = value
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("vtoken expects the LLM to be called with inputs_embeds, as LLaVA does")
        mask = compat.full_attention_mask(kwargs.get("attention_mask"))
        cache = compat.cache_from(kwargs)
        if mask is not None and mask.dim() == 4 and cache is not None and not compat.is_dynamic_cache(cache):
            # generate() with a static cache hands the LLM a 4-D mask. At prefill (empty cache) its last
            # query row says which prompt tokens are real (padding), which is all vtoken needs; while
            # decoding it is built from the pruned cache's length, so only what it implies is used: the
            # generated tokens are real. Where the input changes, the 2-D mask of the pruned sequence
            # replaces it (``_prefill_inputs`` / ``_decode_inputs``) and the LLM builds its own; where it
            # does not (no stage before the LLM), generate's mask is the right one and stays.
            if run.prefill:
                mask = padding_from_4d_mask(mask, self._prompt_length(run, embeds))
            else:
                mask = torch.ones(embeds.shape[0], run.seen + embeds.shape[1], dtype=torch.long, device=embeds.device)
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                "vtoken needs a 2-D attention_mask (batch, length); a custom 4-D mask cannot be pruned: pass the "
                "processor's 2-D attention_mask"
            )
        inside = bool(self.pruner.stages_at("llm")) or self.pruner.mask is not None
        static = cache is not None and compat.is_static_cache(cache)
        # A quantized cache's layers grow from their own counts as dynamic ones do, so layers holding
        # fewer tokens after a stage are fine; a mask stage rewrites and crops what layers hold, which
        # a quantized layer does not model.
        quantized = cache is not None and self.masking is None and compat.is_quantized_cache(cache)
        if cache is not None and inside and not (compat.is_dynamic_cache(cache) or static or quantized):
            # A static cache's layers each write from their own count, so layers holding fewer tokens
            # after a stage, a mask stage's rerun over a cropped prefix and its eviction (the kept
            # tokens rewritten to a layer's first slots, its count set: ``compat.set_cache_layer_kv``)
            # are fine, sliding-window static layers too while they have as many slots as the others
            # (the cache no longer than the window, which the check below holds the sequence to);
            # caches of other kinds (offloaded to another device; quantized under a mask stage) are not
            # modelled.
            kinds = compat.cache_layer_kinds(cache)
            slots = sorted({getattr(layer, "max_cache_len", None) for layer in cache.layers} - {None})
            got = (type(cache).__name__ + (f" of {', '.join(kinds)} layers" if kinds else "")
                   + (f" holding {' and '.join(map(str, slots))} slots" if len(slots) > 1 else ""))
            raise ValueError(
                f"{self.pruner.strategy.name} prunes or masks inside the LLM, which needs a DynamicCache, a "
                f"StaticCache whose layers all hold the same number of slots (static layers, sliding-window ones "
                f"with max_cache_len within the window) or, except for a mask stage (AIF's), a quantized cache; "
                f"got {got}. Use the default cache, a static cache no longer than the sliding window, or a method "
                "that prunes before the LLM."
            )
        run.static_capacity = compat.cache_capacity(cache) if static else None
        window = compat.sliding_window(self.config)
        length = self._prompt_length(run, embeds) if run.prefill else embeds.shape[1] + run.seen
        if inside and window is not None and length > window:
            # The layer groups after a stage (and a mask stage's rerun over a cropped cache) attend through
            # full causal masks vtoken builds; within the window those equal the model's own.
            raise ValueError(
                f"{self.pruner.strategy.name} prunes or masks inside the LLM, whose layers attend through a sliding "
                f"window of {window} tokens, and this sequence has {length}; vtoken's in-LLM stages do not model the "
                "window yet: keep prompt and generated tokens within it, or use a method that prunes before the LLM"
            )
        run.group_kwargs = {}
        update = self._prefill_inputs if run.prefill else self._decode_inputs
        changed = update(run, embeds, mask, kwargs)
        if run.prefill and self.masking is not None:
            changed = self.masking.prepare_prefill(run, kwargs) or changed
        capacity = compat.cache_capacity(cache) if cache is not None else None
        padding = kwargs.get("attention_mask") if changed else None
        if capacity is not None and padding is not None and padding.shape[1] < capacity:
            if compat.cache_holds_recurrent_state(cache):
                # The model reads its recurrent layers' padding mask off the last columns of the 2-D
                # mask, which the padding below would fill with the unwritten slots' zeros.
                raise ValueError(
                    f"{self.pruner.strategy.name} hands this LLM a shorter sequence than the prompt, and the "
                    f"{', '.join(compat.cache_layer_kinds(cache))} layers of its static cache hold a recurrent (Mamba) "
                    "state whose padding mask vtoken cannot size to the slots; use the default dynamic cache"
                )
            # A static cache holds ``capacity`` slots, written one after the other: slots not yet
            # written (the pruned prompt is shorter than the positions say) must be masked out. A
            # sequence longer than a sliding-window layer's slots (its oldest tokens rolled out) keeps
            # its whole mask: the layer reads it by the tokens' own indices (cropping it to the slots
            # dropped the newest tokens' columns).
            kwargs["attention_mask"] = torch.nn.functional.pad(padding, (0, capacity - padding.shape[1]))
        return (args, kwargs) if changed else None

    @staticmethod
    def _prompt_length(run: PruneRun, embeds) -> int:
        """The prefill's prompt length: the embeddings', or the whole prompt's when the model was fed
        only the tokens the vision stages kept (``PruneRun.entered``)."""
        return run.entered.shape[1] if run.entered is not None else embeds.shape[1]

    def _prefill_inputs(self, run: PruneRun, embeds, mask, kwargs) -> bool:
        batch, length = embeds.shape[0], self._prompt_length(run, embeds)
        padding = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        positions = positions_in(kwargs.get("position_ids"), batch, length, embeds.device)
        run.orig_length = length
        run.seen = length
        visual = run.visual
        layout = identity_layout(
            padding, positions, visual.visual_index.to(embeds.device), visual.image_index.to(embeds.device)
        )
        run.orig_max_position = layout.max_position()
        run.orig_last_position = layout.last_position()
        if not self.touches_input:
            run.groups = [(0, layout)]
            return False
        layout, embeds = self.pre_llm(run, layout, embeds)
        run.groups = [(0, layout)]
        kwargs["inputs_embeds"] = embeds
        kwargs["attention_mask"] = layout.valid.to(padding.dtype)
        kwargs["position_ids"] = positions_out(layout.position_ids)
        return True

    def _decode_inputs(self, run: PruneRun, embeds, mask, kwargs) -> bool:
        batch, steps = embeds.shape[:2]
        if batch != run.batch_size:
            raise ValueError(
                f"mismatched batch: this cache was filled for {run.batch_size} samples but the input has {batch}; "
                "vtoken keeps each sample's pruned layout with the cache, so continue with the whole batch (a cache cut "
                "to some samples, as batch_select_indices does, is not supported), or start those samples from their prompts"
            )
        new_columns = run.seen + steps - run.orig_length
        if mask is not None:
            run.new_mask = mask[:, run.orig_length :].bool()
        else:
            run.new_mask = torch.ones(batch, new_columns, dtype=torch.bool, device=embeds.device)
        numbered_by_caller = kwargs.get("position_ids") is not None and (
            run.generate_call is not None and run.generate_call is self.pruner.generate_call.get()
        )
        mrope = run.groups[0][1].position_ids.dim() == 3
        run.decode_ids_from_caller = mrope and numbered_by_caller
        if mrope and run.seen >= run.orig_length and not numbered_by_caller:
            # M-RoPE outside the generate call that ran the prefill (a direct forward, a continued
            # generate): the ids the plain model gives from its rope_deltas, the prompt's largest + 1.
            # Within that call generate numbered the unpruned prompt itself and continues from its last
            # token's ids, as for the plain model (the two differ where the largest id is not the last
            # token's: Qwen2.5-VL's time-scaled video ids, a prompt ending in visual tokens). A step that
            # feeds prompt tokens again (assisted decoding's first check) keeps the caller's ids.
            run.new_positions = self._mrope_decode_positions(run, steps)
        else:
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = (torch.arange(steps, device=embeds.device) + run.seen)[None].expand(batch, steps)
            run.new_positions = positions_in(positions, batch, steps, embeds.device)
        run.seen += steps
        if not (self.touches_input or run.input_layout_changed):
            return False
        _, layout = run.groups[0]
        kwargs["attention_mask"] = torch.cat([layout.valid, run.new_mask], dim=1).long()
        kwargs["position_ids"] = positions_out(self._decode_positions(run, layout))
        return True

    def _after_lm(self, module, args, kwargs, output):
        run = self.pruner.active
        if run is None:
            return None
        replaced = None
        if run.prefill:
            if output is not None and self.masking is not None:
                replaced = output = self.masking.apply(run, kwargs, output)
            if len(run.groups) > 1 and run.groups[1][0] == 0:
                # A stage at layer 0 pruned before any layer ran: every layer holds its tokens. During
                # the prefill its group came after the input's (whose kwargs the model built); now
                # decoding continues from it.
                run.decode_from(run.groups.pop(1)[1])
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
        if run.side_pass is not None:  # an extra pass of the mask stage's own (MaskStagePass)
            return self.masking.layer_inputs(run, index, args, kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._use_group_kwargs(run, index, hidden, kwargs)
        stage = self.pruner.llm_stage_at(index) if run.prefill else None
        if run.prefill and index in self.stash_layers:
            run.stash[index] = (hidden, kwargs.get("position_embeddings"), run.group_for(index)[1], compat.cache_from(kwargs))
        if run.prefill and run.mask_in_pass:
            self.masking.in_pass_layer(run, index, hidden, kwargs)
        if stage is not None:
            _, layout = run.groups[-1]
            scorer = partial(self._attention, run, index)
            before = hidden
            layout, hidden, selected_from = self.pruner.run_sequence_stage(run, stage, layout, hidden, scorer)
            self.key_reuse.after_stage(run, index, before, hidden, selected_from)
            run.groups.append((index, layout))
            self._use_group_kwargs(run, index, hidden, kwargs)
            if index in self.stash_layers:
                # What layer K runs on is the stage's output: a stage at K + 1 scoring with the previous
                # layer's attention reads these tokens (the stash above, before the stage, served a
                # scorer reading layer K's own attention at K).
                run.stash[index] = (hidden, kwargs.get("position_embeddings"), layout, compat.cache_from(kwargs))
        return (hidden, *args[1:]), kwargs

    def _observed(self, layer: int, io: dict) -> None:
        run = self.pruner.active
        layout = run.group_for(layer)[1]
        run.observed[layer] = (self.pruner.strategy.observe("llm", layer, io, layout.valid), layout)

    # --- per-group kwargs -------------------------------------------------------------------------
    def _use_group_kwargs(self, run: PruneRun, index: int, hidden, kwargs) -> None:
        first, layout = run.group_for(index)
        if layout is run.groups[0][1]:
            return  # the model's own input layout: the mask, positions and rotary it built
        if first not in run.group_kwargs:
            run.group_kwargs[first] = self._group_kwargs(run, layout, hidden)
        kwargs.update(run.group_kwargs[first])

    def _group_kwargs(self, run: PruneRun, layout, hidden) -> dict:
        if run.prefill:
            padding, positions = layout.valid, layout.position_ids
        else:
            padding = torch.cat([layout.valid, run.new_mask], dim=1)
            positions = self._decode_positions(run, layout)
        cos_sin = compat.rotary_cos_sin(self.lm, hidden, rotary_positions(positions))
        mask = causal_mask_for(self.config, hidden, padding, hidden.shape[1], capacity=run.static_capacity)
        return {"attention_mask": mask, "position_ids": positions_out(positions), "position_embeddings": cos_sin}

    @staticmethod
    def _mrope_decode_positions(run: PruneRun, steps: int) -> torch.Tensor:
        """``[B, steps, k]``: the M-RoPE ids the unwrapped model gives tokens decoded after the prompt:
        its largest id plus one, plus the valid new tokens before (``rope_deltas``), every component.

        Used outside the ``generate`` call that ran the prefill, where the plain model numbers from its
        ``rope_deltas`` too: a direct forward, and a continued ``generate`` on the returned cache, whose
        ids transformers' Qwen-VL would derive from the cache's length, which pruning shortened (it
        takes prompt image tokens for new ones and resets ``rope_deltas`` to zero). A
        4-row form's leading text row (mask building only) is the new tokens' place among the valid
        tokens, as generate numbers it from the attention mask."""
        new_mask = run.new_mask.long()
        offsets = (new_mask.cumsum(-1) - 1).clamp(min=0)[:, -steps:]
        rows = run.orig_max_position.to(offsets.device)[:, None] + 1 + offsets
        layout = run.groups[0][1]
        positions = rows[..., None].expand(*rows.shape, 3)
        if layout.position_ids.shape[-1] == 4:
            prompt_mask = run.prompt[1] if run.prompt is not None else None
            valid = prompt_mask.sum(-1) if prompt_mask is not None else torch.full_like(rows[:, 0], run.orig_length)
            text = valid.to(offsets.device)[:, None] + offsets
            positions = torch.cat([text[..., None], positions], dim=-1)
        return positions.to(layout.position_ids.dtype)

    def _decode_positions(self, run: PruneRun, layout) -> torch.Tensor:
        """New tokens' positions: the unwrapped model's, less the tokens renumbering removed (all the
        group's drops under "contiguous", those before the LLM under "pre_llm")."""
        positions = self.pruner.config.positions
        if positions == "original":
            return run.new_positions
        if positions == "pre_llm":
            layout = run.groups[0][1]
        if run.decode_ids_from_caller:
            # generate's ids continue from the last prompt token's, row by row: take off what
            # renumbering took off that token (the last kept one, if pruning dropped it).
            dropped = run.orig_last_position.to(layout.valid.device) - layout.last_position()
            return run.new_positions - dropped[:, None, :]
        # What renumbering took off the next position: the prompt's largest id, unwrapped, less the
        # layout's (for 1-D RoPE, the number of dropped tokens).
        dropped = run.orig_max_position.to(layout.valid.device) - layout.max_position()
        dropped = dropped.view(-1, *([1] * (run.new_positions.dim() - 1)))
        return run.new_positions - dropped

    # --- attention rows for scoring -------------------------------------------------------------
    def _attention(self, run: PruneRun, index: int, query: str = "last", layer: str = "previous"):
        if layer not in ("previous", "current"):
            raise ValueError(f"layer must be 'previous' or 'current', got {layer!r}")
        source = index - 1 if layer == "previous" else index
        if source < 0 or source not in run.stash:
            raise ValueError(f"no attention input is kept for LLM layer {source}")
        hidden, cos_sin, layout, cache = run.stash[source]
        normed = keys = rotated = None
        if source == index:
            # Layer K's own keys (layer="current" at a stage at K) are projected once: for the scores
            # here and, for the tokens the stage keeps, for the layer itself.
            normed, keys = self.key_reuse.keys_for(run, index, hidden)
        elif self.pruner.llm_stage_at(source) is None:
            # The previous layer ran on exactly this input (no stage of its own changed it), so the
            # keys it left in the cache are the ones to score with: no second projection.
            rotated = compat.prompt_keys(cache, source, hidden.shape[1], hidden.device)
        return query_attention_rows(self.layers[source], hidden, cos_sin, layout, query, run.prompt_end, keys,
                                    rotated, normed)[0]

    def _keep_layer_queries(self, index: int, prefilling: Callable[[], bool], undo: UndoStack) -> None:
        """Keep layer ``index``'s own query projection of the prompt while it runs the prefill, so
        that its observed attention slices the query rows out of it instead of normalising and
        projecting them again (with a weight the layer has just read). A query projection fused with
        the keys and values (Phi-3's ``qkv_proj``) has no output of its own: its rows are projected
        again."""
        q_proj = compat.attention_parts(compat.layer_attention(self.layers[index])).q_proj
        if not isinstance(q_proj, nn.Module):
            return

        def keep(module, args, output) -> None:
            if prefilling():
                self.pruner.active.layer_queries[index] = output

        undo.post_hook(q_proj, keep)

    def _attention_observed(self, query: str, index: int, module, args, kwargs, output) -> None:
        """Forward hook of an observed-attention layer: the query rows' attention over the prompt,
        recomputed beside the layer's own attention, handed to ``observe_attention``."""
        run = self.pruner.active
        if run is None or not run.prefill or not run.groups or self.replays_llm_decisions(run):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cos_sin = kwargs["position_embeddings"]
        layout = run.group_for(index)[1]
        if query == "next" and run.side_pass == "next":
            keys, _ = compat.cache_layer_kv(compat.cache_from(kwargs), index)  # after this step's update
            extra = torch.ones(hidden.shape[0], keys.shape[2] - layout.length, dtype=torch.bool, device=hidden.device)
            key_valid = torch.cat([layout.prompt_slots(run.prompt_end), extra], dim=1)  # as the probe's mask
            probs = llama_cached_attention_rows(module, hidden, cos_sin, keys, key_valid)[..., : layout.length]
            present = torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool, device=probs.device)
        elif query != "next" and run.side_pass is None:
            # The layer has just run on ``hidden``: its keys are in the cache (when there is one), its
            # query projection of every slot was kept as it ran.
            rotated = compat.prompt_keys(compat.cache_from(kwargs), index, hidden.shape[1], hidden.device)
            queries = run.layer_queries.pop(index, None)
            if queries is not None and queries.shape[:-1] != hidden.shape[:-1]:
                queries = None  # not a projection of these slots
            probs, present = query_attention_rows(module, hidden, cos_sin, layout, query, run.prompt_end,
                                                  rotated_keys=rotated, queries=queries)
        else:
            return None
        summary = self.pruner.strategy.observe_attention(index, probs, present, layout.valid)
        run.attention_observed[index] = (summary, layout)
        return None

    def replays_llm_decisions(self, run: PruneRun) -> bool:
        """True when this prefill applies again every in-LLM decision of the prefill whose prompt it
        continues (``generate`` without a KV cache): nothing the layers would observe is read."""
        return run.replay is not None and all(name in run.replay for name in self.llm_decisions)

    # --- observed attention -----------------------------------------------------------------------
    def _check_attention_layers(self, query: str, layers: list[int]) -> None:
        if not layers:
            return
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


def padding_from_4d_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length]`` long: the 2-D padding mask a prefill's ``[B, 1, Q, K]`` mask (bool: True
    allowed; float: 0 allowed) was built from: the keys its last query row may attend to, and each
    key its own query row attends to (every real token attends to itself, a pad is masked in every
    row). The last row alone misses the real tokens a sliding window (Mistral's, Gemma2's under a
    static cache) has already left behind: a prompt longer than the window read them as padding."""
    def allowed(entries: torch.Tensor) -> torch.Tensor:  # read entry by entry: no [B, Q, K] copy
        return entries if entries.dtype == torch.bool else entries == 0

    padding = allowed(mask[:, 0, -1, :length])
    if mask.shape[2] >= length:  # query row i is key i (a prefill from an empty cache)
        index = torch.arange(length, device=mask.device)
        padding = padding | allowed(mask[:, 0, index, index])
    return padding.long()


def instruction_slots(layout, prompt_end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the slots of the valid text tokens after its last visual token (the question and
    the chat template's tail) within the prompt, as ``[B, Q]`` slot indices with a ``[B, Q]``
    presence mask; missing entries point at the last slot."""
    if layout.valid.shape[0] == 1:  # one sample: the slots after its last visual one, found directly
        return _instruction_slots_of_one(layout, prompt_end)
    return _instruction_slots_batched(layout, prompt_end)


def _instruction_slots_batched(layout, prompt_end: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`instruction_slots` of any batch, samples side by side."""
    length = layout.length
    slots = torch.arange(length, device=layout.valid.device).expand_as(layout.valid)
    last_visual = torch.where(layout.image_index >= 0, slots, -1).max(dim=-1, keepdim=True).values
    wanted = layout.prompt_slots(prompt_end) & (layout.image_index < 0) & (slots > last_visual) & (last_visual >= 0)
    count = wanted.sum(-1)
    width = max(int(count.max()), 1)
    order = torch.sort(torch.where(wanted, slots, length + slots), dim=-1).values[:, :width]
    present = torch.arange(width, device=slots.device)[None] < count[:, None]
    return torch.where(present, order, length - 1), present


def _instruction_slots_of_one(layout, prompt_end: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`instruction_slots` of a batch of one, in a few ops (a stage's scoring asks for them on
    every layout): the prompt's valid slots after the last visual one; no visual slot or no such
    text: one absent entry at the last slot, as the batched form gives."""
    device = layout.valid.device
    visual = (layout.image_index[0] >= 0).nonzero()
    first = int(visual[-1, 0]) + 1 if visual.numel() else layout.length
    found = layout.prompt_slots(prompt_end)[0, first:].nonzero()[:, 0] + first
    if found.numel() == 0:
        return (torch.full((1, 1), layout.length - 1, dtype=torch.long, device=device),
                torch.zeros(1, 1, dtype=torch.bool, device=device))
    return found[None], torch.ones(1, found.numel(), dtype=torch.bool, device=device)


def _query_rows(query_slots: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """How to take the query slots' rows of a ``[B, L, ...]`` tensor: a slice (a view, no copy) when
    one sample's slots are one consecutive run (the instruction rows of an unpadded prompt),
    ``gather_tokens`` otherwise. The rows are the same numbers either way."""
    if query_slots.shape[0] == 1 and query_slots.numel():
        first = int(query_slots[0, 0])
        stop = first + query_slots.shape[1]
        if torch.equal(query_slots[0], torch.arange(first, stop, device=query_slots.device)):
            return lambda x: x[:, first:stop]
    return lambda x: gather_tokens(x, query_slots)


def llama_attention_rows(layer: nn.Module, hidden, cos_sin, query_slots, key_valid,
                         keys: torch.Tensor | None = None, rotated_keys: torch.Tensor | None = None,
                         normed: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities ``[B, H, Q, L]`` of the query slots of a Llama-style decoder layer,
    recomputed from the layer's input exactly as its attention would (RMSNorm, q/k projections,
    optional q/k norms, rotary), through :func:`vtoken.kernels.attention_rows`. Query slot ``q``
    attends to key slots ``<= q`` that are valid. ``keys``: the layer's key projection of ``hidden``
    (``k_proj`` of its input norm, ``[B, L, kv_heads * head_dim]``) when already computed;
    ``rotated_keys``: the keys as the layer's attention used them (``[B, kv_heads, L, head_dim]``,
    after the key norm and rotary embedding: what its KV cache holds), which then need nothing;
    ``normed``: the layer's input norm of ``hidden`` when already computed (the query rows are rows
    of it: the norm works per token, so they are the numbers a norm of the rows alone gives, and the
    norm module is not called again for a few rows); ``queries``: the layer's own query projection of
    every slot (``q_proj`` of its input norm, ``[B, L, heads * head_dim]``, before any q norm and
    the rotary), whose rows then need neither."""
    attn = compat.attention_parts(compat.layer_attention(layer))
    norm = compat.decoder_input_norm(layer)
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    query_rows = _query_rows(query_slots)
    if keys is None and rotated_keys is None:
        normed = norm(hidden) if normed is None else normed
        keys = attn.k_proj(normed)
    if queries is not None:
        projected = query_rows(queries)
    elif normed is not None:
        projected = attn.q_proj(query_rows(normed))
    else:  # the norm is per token: only the query rows need it
        projected = attn.q_proj(norm(query_rows(hidden)))
    rotate = rotary_of(compat.layer_attention(layer))
    q = split_heads(projected, attn.q_norm, head_dim)
    cos, sin = (t.expand(batch, -1, -1) for t in cos_sin)
    q = rotate(q.transpose(1, 2), query_rows(cos), query_rows(sin))
    if rotated_keys is not None:
        k = rotated_keys
    else:
        k = rotate(split_heads(keys, attn.k_norm, head_dim).transpose(1, 2), cos, sin)
    causal = torch.arange(length, device=hidden.device)[None, None, :] <= query_slots[:, :, None]
    key_mask = causal & key_valid[:, None, :].to(torch.bool)
    return attention_rows(q, k, attn.scaling, key_mask, attn.softcap)


def query_attention_rows(layer: nn.Module, hidden, cos_sin, layout, query: str, prompt_end: int | None = None,
                         keys: torch.Tensor | None = None, rotated_keys: torch.Tensor | None = None,
                         normed: torch.Tensor | None = None, queries: torch.Tensor | None = None):
    """``([B, H, Q, L], [B, Q])``: the attention probabilities of a layout's query rows (``"last"``:
    each sample's last valid slot of the prompt, so right padding and an assistant's candidate tokens
    are never scored as a query; ``"instruction"``: see :func:`instruction_slots`) over its slots,
    zero for absent rows, and which rows are present (``keys``, ``rotated_keys``, ``normed``,
    ``queries``: see :func:`llama_attention_rows`)."""
    if query == "last":
        query_slots = layout.last_slot(layout.prompt_slots(prompt_end))[:, None]
        present = torch.ones(query_slots.shape, dtype=torch.bool, device=hidden.device)
        return llama_attention_rows(layer, hidden, cos_sin, query_slots, layout.valid, keys, rotated_keys, normed,
                                    queries), present
    if query == "instruction":
        query_slots, present = instruction_slots(layout, prompt_end)
        probs = llama_attention_rows(layer, hidden, cos_sin, query_slots, layout.valid, keys, rotated_keys, normed,
                                     queries)
        if not bool(present.all()):  # a sample with fewer instruction rows than the widest: zero the rest
            probs = probs * present[:, None, :, None]
        return probs, present
    raise ValueError(f"query must be 'last' or 'instruction', got {query!r}")


def llama_cached_attention_rows(layer: nn.Module, hidden, cos_sin, keys, key_valid) -> torch.Tensor:
    """Attention probabilities ``[B, H, S, K]`` of the S new tokens of a decoding step (the layer's
    input ``hidden`` ``[B, S, d]`` and their rotary ``cos_sin``) over the K keys the layer's cache
    holds after its update (post-rotary, the new tokens last), through
    :func:`vtoken.kernels.attention_rows`. New token j attends to valid keys ``<= K - S + j``."""
    attn = compat.attention_parts(compat.layer_attention(layer))
    x = compat.decoder_input_norm(layer)(hidden)
    batch, steps, _ = x.shape
    q = split_heads(attn.q_proj(x), attn.q_norm, attn.head_dim)
    cos, sin = (t.expand(batch, -1, -1) for t in cos_sin)
    q = rotary_of(compat.layer_attention(layer))(q.transpose(1, 2), cos, sin)
    total = keys.shape[2]
    causal = torch.arange(total, device=x.device)[None, :] <= (total - steps + torch.arange(steps, device=x.device))[:, None]
    key_mask = causal[None] & key_valid[:, None, :].to(torch.bool)
    return attention_rows(q, keys, attn.scaling, key_mask, attn.softcap)
