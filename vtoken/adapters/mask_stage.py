"""The mechanism of a mask stage (attention modulation, as AIF), apart from the decoder pruning.

A mask stage removes nothing: from the stage's layer on, text queries no longer attend to the
visual tokens it hides. It runs one of two ways.

- **Probe, then rerun** (a strategy that reads the prefill's own attention, as AIF): the prefill
  runs unchanged as a probe, during which the strategy's observed layers hand it their query rows'
  attention (``observe_attention``, recomputed beside SDPA); after it the stage is decided, the
  slots from the first text token after a hidden visual token on are recomputed over the probe's KV
  cache with a mask that keeps text queries off the hidden keys from the stage's layer on (SDPA and
  eager only). With ``query="next"`` one greedy probe step after the prefill shows the observed
  layers the next token's attention first.
- **Decided in the pass** (:meth:`MaskStagePass.decides_in_pass`: a strategy that observes no LLM
  layer at or after the stage's, or a prefill that replays a decision already made, as ``generate``
  without a KV cache does at every step): the stage is decided at its layer's input, as a pruning
  stage is, and the prefill's layers from there on take the modulated mask: one masked pass, no
  probe, no rerun. Both ways give the same outputs: a text row's hidden state never depends on what
  the mask changes before its layer, and the rerun is the masked pass's rows over the same prefix.

Either way decoding continues with the hidden keys masked, or evicted from the cache
(``MaskStage.evict``).

:class:`~vtoken.adapters.hf_decoder.DecoderPruning` calls it at four points: when it installs
(checks), before the prefill (a KV cache to recompute over, or the in-pass decision), before each
layer during the prefill (the in-pass masks) and its own extra passes (their masks), and after the
prefill (decide, recompute, set the decoding layout).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch

from vtoken import compat, signals
from vtoken.kernels import gather_tokens
from vtoken.layout import SequenceLayout, positions_out
from vtoken.request import PruneRun

from .masks import ARBITRARY_MASK_ATTENTION, causal_mask_for


class Recompute(NamedTuple):
    """A mask stage's rerun of the prompt from slot ``start`` on: layers before ``first`` (the
    stage's layer) take the ``plain`` causal mask, the others the ``masked`` one."""

    first: int
    plain: torch.Tensor
    masked: torch.Tensor
    start: int


class DecidedInPass(NamedTuple):
    """A mask stage decided at its layer's input during the prefill: ``hidden`` ``[B, L]``, the
    visual slots text may no longer attend to; ``attention_mask``, what the layers from the stage's
    on take instead of the model's causal mask (None when nothing is hidden)."""

    hidden: torch.Tensor
    attention_mask: object


class MaskStagePass:
    """Runs the strategy's mask stage for one wrapped decoder stack (``decoder``: its
    :class:`~vtoken.adapters.hf_decoder.DecoderPruning`)."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.pruner = decoder.pruner
        self._check(self.pruner.mask)
        #: True when the strategy reads nothing the prefill observes at or after the stage's layer
        #: (nor the next token's attention): the stage is decided in the pass, every prefill.
        self.needs_no_probe = self._needs_no_probe()

    def _needs_no_probe(self) -> bool:
        needs, layer = self.pruner.needs, self.pruner.mask.layer
        if needs.attention_query() == "next":
            return False
        observed = needs.layers(signals.LLM_OBSERVED) + needs.layers(signals.LLM_ATTENTION_OBSERVED)
        return all(index < layer for index in observed)

    def decides_in_pass(self, run: PruneRun) -> bool:
        """Whether this prefill decides the stage at its layer's input and runs masked from there (one
        pass): when the strategy needs no probe, or the prefill replays the decision of the prefill
        whose prompt it continues (``PruneRun.replay``)."""
        # A mask stage is the LLM's only decision (_check), so this is whether the mask is replayed.
        return self.needs_no_probe or self.decoder.replays_llm_decisions(run)

    def in_pass_layer(self, run: PruneRun, index: int, hidden: torch.Tensor, kwargs) -> None:
        """Before decoder layer ``index`` of a prefill that decides the stage in the pass: at the
        stage's layer decide it on ``hidden`` (the layer's input) and build the modulated mask; from
        there on hand it to every layer."""
        stage = self.pruner.mask
        if index < stage.layer:
            return
        if index == stage.layer:
            layout = run.groups[0][1]
            attention = partial(self.decoder._attention, run, index)
            masked = self.pruner.run_mask_stage(run, stage, layout, hidden, attention)
            mask = self._text_off_hidden(run, hidden, layout, masked, 0) if bool(masked.any()) else None
            run.decided_mask = DecidedInPass(masked, mask)
        decided = run.decided_mask
        if decided is not None and decided.attention_mask is not None:
            kwargs["attention_mask"] = decided.attention_mask

    def _text_off_hidden(self, run: PruneRun, like: torch.Tensor, layout: SequenceLayout, masked: torch.Tensor,
                         start: int):
        """The causal mask of the query slots ``start..`` over the layout's keys in which no text query
        attends to a ``masked`` key (visual queries unchanged), in the attention implementation's form."""
        text = layout.image_index < 0
        # Under a static cache the masks span all its slots; those past the prompt hide no token.
        capacity = run.static_capacity
        hidden = masked if capacity is None else torch.nn.functional.pad(masked, (0, capacity - layout.length))

        def text_may_attend(batch, head, q, kv):
            return ~(text[batch, q] & hidden[batch, kv])

        return causal_mask_for(self.decoder.config, like, layout.valid, layout.length - start, extra=text_may_attend,
                               capacity=capacity)

    def layer_inputs(self, run: PruneRun, index: int, args, kwargs):
        """Before decoder layer ``index`` during an extra pass: the recompute's masks (plain before
        the stage's layer, modulated from it on); the probe step runs as the model would."""
        if run.side_pass != "recompute":
            return None
        recompute = run.recompute
        kwargs["attention_mask"] = recompute.masked if index >= recompute.first else recompute.plain
        return args, kwargs

    def _check(self, stage) -> None:
        if stage.site != "llm" or not 0 <= stage.layer < len(self.decoder.layers):
            raise ValueError(
                f"a mask stage needs site 'llm' and a layer in 0..{len(self.decoder.layers) - 1}, got {stage.name!r}"
            )
        if self.pruner.stages_at("llm"):
            raise ValueError("a mask stage cannot be combined with pruning inside the LLM; use pre-LLM stages only")
        if self.pruner.config.positions != "original":
            raise ValueError("a mask stage keeps every token's position; use positions='original'")
        self.check_attention()

    def check_attention(self) -> None:
        implementation = compat.attention_implementation(self.decoder.config)
        if implementation not in ARBITRARY_MASK_ATTENTION:
            raise ValueError(
                f"this method masks visual tokens from the text with an explicit attention mask, which "
                f"attn_implementation={implementation!r} cannot take; use one of {', '.join(ARBITRARY_MASK_ATTENTION)}"
            )

    def prepare_prefill(self, run: PruneRun, kwargs) -> bool:
        """Choose how this prefill runs the stage (:meth:`decides_in_pass`). A probe reuses the
        prefix's KV cache to recompute the text rows: make sure the prefill fills one, even when the
        caller asked for none (it is then not returned)."""
        self.check_attention()
        run.mask_in_pass = self.decides_in_pass(run)
        if run.mask_in_pass:
            return False  # one masked pass: no cache of its own, no rerun
        if self.decoder.lm.training and compat.activation_checkpointing(self.decoder.lm):
            raise ValueError(
                f"{self.pruner.strategy.name} recomputes the text's rows over the prefix's KV cache after its mask "
                "stage, but activation (gradient) checkpointing runs the LLM's layers without a cache; call "
                f"model.{compat.CHECKPOINTING_DISABLE}() for this method, or use one that prunes (fastv, pool)"
            )
        if compat.cache_from(kwargs) is not None:
            return False
        wanted = compat.use_cache_from(kwargs)
        run.cache_added = not (self.decoder.config.use_cache if wanted is None else wanted)
        compat.set_cache(kwargs, compat.new_dynamic_cache(self.decoder.config))
        kwargs[compat.USE_CACHE_KWARG] = True
        return True

    def apply(self, run: PruneRun, kwargs, output):
        """After the prefill. A probe: decide the mask stage, recompute the rows of the text that
        comes after a hidden token with the text -> hidden-visual attention masked from layer
        ``stage.layer`` on. Then set the decoding layout (hidden slots invalid, or evicted)."""
        cache = compat.output_cache(output)
        layout = run.groups[0][1]
        if run.mask_in_pass:
            decided = run.decided_mask
            if decided is not None and cache is not None and bool(decided.hidden.any()):
                self._decode_without(run, cache, layout, decided.hidden)
            return output
        stage = self.pruner.mask
        query, layers = self.pruner.needs.attention_query(), self.pruner.needs.layers(signals.LLM_ATTENTION_OBSERVED)
        if query == "next" and layers:  # a replay decides in the pass, never here
            self._probe_next(run, layout, output, cache)
        hidden = run.stash[stage.layer][0]
        masked = self.pruner.run_mask_stage(run, stage, layout, hidden, partial(self.decoder._attention, run, stage.layer))
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
        self._decode_without(run, cache, layout, masked)
        return output

    def _decode_without(self, run: PruneRun, cache, layout: SequenceLayout, masked: torch.Tensor) -> None:
        """Decoding goes on with the ``masked`` slots invalid from the stage's layer on, or evicted
        from those layers of the cache (positions kept; pads go too)."""
        stage = self.pruner.mask
        run.prompt_groups = list(run.groups)  # the prompt's logits (and labels) still cover these slots
        if self.pruner.masking.evict:
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
            run.decode_from(decoding)
        else:
            run.groups.append((stage.layer, decoding))

    def _probe_next(self, run: PruneRun, layout, output, cache) -> None:
        """One greedy decoding step on the prefill's cache, so the observed layers see the next
        token's attention; the cache is then cut back to the prompt (a static cache with no slot left is
        not written: the step runs over a copy). Each sample's step follows its
        last prompt token (its last valid slot before any candidates an assistant appended: under
        right padding not the last slot) at that token's position plus one, and attends to the
        prompt's slots alone, as the sample's first decoding step would."""
        prompt = layout.prompt_slots(run.prompt_end)
        last = layout.last_slot(prompt)
        rows = torch.arange(prompt.shape[0], device=prompt.device)
        token = self.decoder.head(output.last_hidden_state[rows, last]).argmax(-1)
        embeds = self.decoder.lm.get_input_embeddings()(token)[:, None]
        positions = positions_out(layout.position_ids[rows, last][:, None] + 1)
        ones = torch.ones_like(prompt[:, :1])
        # A static cache sized to the prompt has no slot for the step: it runs over a growing copy of
        # what the cache holds (the same keys and values), and nothing is written into the cache.
        full = compat.is_static_cache(cache) and compat.static_cache_free_slots(cache) < 1
        step_cache = compat.dynamic_cache_holding(cache, self.decoder.config) if full else cache
        run.side_pass = "next"
        try:
            self.decoder.lm.forward(
                inputs_embeds=embeds, attention_mask=torch.cat([prompt, ones], dim=1).long(),
                position_ids=positions, use_cache=True, **compat.cache_kwargs(step_cache),
            )
        finally:
            run.side_pass = None
        if not full:
            compat.crop_cache(cache, -1)

    def _recompute(self, run: PruneRun, kwargs, output, cache, layout, masked, start: int):
        """Rerun the LLM on slots ``start..`` over the prefix's cache, no text query attending to a
        ``masked`` key from the mask stage's layer on (visual queries unchanged), and splice the
        result into ``output``. Slots before ``start`` hold no text that comes after a hidden token
        in any sample, so their hidden states and cache entries are already what the mask gives."""
        embeds = kwargs["inputs_embeds"]
        length = layout.length
        plain = causal_mask_for(self.decoder.config, embeds, layout.valid, length - start, capacity=run.static_capacity)
        modulated = self._text_off_hidden(run, embeds, layout, masked, start)
        compat.crop_cache(cache, start - length)
        flags = {k: kwargs[k] for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)}
        # The prompt's other per-token inputs (DeepStack) go to the rerun whole: the model's hook for
        # them reads ``run.recompute.start`` to find the rerun's slots.
        token_inputs = {k: kwargs[k] for k in self.decoder.token_inputs if kwargs.get(k) is not None}
        run.side_pass, run.recompute = "recompute", Recompute(self.pruner.mask.layer, plain, modulated, start)
        try:
            rest = self.decoder.lm.forward(
                inputs_embeds=embeds[:, start:], attention_mask=layout.valid.long(),
                position_ids=positions_out(layout.position_ids[:, start:]), use_cache=True, **compat.cache_kwargs(cache),
                **flags, **token_inputs,
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



