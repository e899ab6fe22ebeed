"""What a strategy reads, by name: the one vocabulary between strategies and model families.

A strategy declares everything it reads in one :class:`Needs` (``Strategy.needs()``, on the bound
strategy, so layers are resolved for the model's depth). A family's adapter says which signals it
provides (``Adapter.unavailable``); ``vtoken.wrap`` refuses a method a family cannot serve, naming
the method, the family and the missing signal, before anything is installed.

The signals, and where a strategy finds them on its :class:`~vtoken.context.ScoreContext`:

============================  ========================================================================
``vision_attention`` (layer)   a vision layer's self-attention: mass received per patch, any patch's
                               query row, the CLS row, the patch keys (``ctx.vision_attention(layer)``)
``vision_observed`` (layer)    per-token summaries of a vision layer's input and output (``observe``;
                               ``ctx.observed(layer)``)
``pixel_patches``              the pixels behind every patch token (``ctx.pixel_patches()``)
``projector_input``            the projector and what it was fed per candidate (``ctx.projector``,
                               ``ctx.projector_input``), at the projector site
``llm_attention``              attention rows of the last or the instruction tokens at the pruning
                               layer (``ctx.attention``), at the ``"llm"`` site
``llm_observed`` (layer)       per-token summaries of an LLM layer's input and output (``observe``)
``llm_attention_observed``     every prefill's attention rows of chosen LLM layers, summarised by
(layer, query)                 ``observe_attention`` (``ctx.observed_attention(layer)``)
``one_grid_per_image``         each image reaches the LLM as exactly one intact patch grid
``vision_cls``                 the vision tower has a CLS token (its attention row is offered)
``vision_block_keys``          stages run inside the vision blocks, between attention and MLP, with
                               the block's keys (``Strategy.inside_block``; ``ctx.keys``)
``annotations`` (query=name)   per-input annotations from ``vtoken.annotate`` (``ctx.annotations``)
============================  ========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

VISION_ATTENTION = "vision_attention"
VISION_OBSERVED = "vision_observed"
PIXEL_PATCHES = "pixel_patches"
PROJECTOR_INPUT = "projector_input"
LLM_ATTENTION = "llm_attention"
LLM_OBSERVED = "llm_observed"
LLM_ATTENTION_OBSERVED = "llm_attention_observed"
ONE_GRID_PER_IMAGE = "one_grid_per_image"
TWO_LAYER_PROJECTOR = "two_layer_projector"
VISION_CLS = "vision_cls"
VISION_BLOCK_KEYS = "vision_block_keys"
ANNOTATIONS = "annotations"
PATCH_GRID = "patch_grid"

#: What each signal means, for the error that refuses a method a family cannot serve.
MEANING = {
    VISION_ATTENTION: "a vision layer's self-attention",
    VISION_OBSERVED: "a vision layer's inputs and outputs",
    PIXEL_PATCHES: "the pixels behind each patch token",
    PROJECTOR_INPUT: "the projector and its inputs",
    LLM_ATTENTION: "attention rows of the LLM's last or instruction tokens",
    LLM_OBSERVED: "an LLM layer's inputs and outputs",
    LLM_ATTENTION_OBSERVED: "the attention rows of every LLM layer",
    ONE_GRID_PER_IMAGE: "each image to reach the LLM as one patch grid",
    TWO_LAYER_PROJECTOR: "a two-layer (Linear, activation, Linear) projector, a row norm first at most",
    VISION_CLS: "a CLS token in the vision tower",
    VISION_BLOCK_KEYS: "vision blocks run in two halves (attention, then MLP) with their keys",
    ANNOTATIONS: "per-input annotations",
    PATCH_GRID: "every patch of each image's grid",
}
SIGNALS = (
    VISION_ATTENTION, VISION_OBSERVED, PIXEL_PATCHES, PROJECTOR_INPUT, LLM_ATTENTION, LLM_OBSERVED,
    LLM_ATTENTION_OBSERVED, ONE_GRID_PER_IMAGE, VISION_CLS, VISION_BLOCK_KEYS, ANNOTATIONS, TWO_LAYER_PROJECTOR,
    PATCH_GRID,
)
#: Signals read at a layer of a site: their ``Signal.layer`` is that layer's index.
LAYERED = {VISION_ATTENTION: "vision", VISION_OBSERVED: "vision", LLM_OBSERVED: "llm", LLM_ATTENTION_OBSERVED: "llm"}
VISION_LAYERED = frozenset(name for name, site in LAYERED.items() if site == "vision")
#: Query rows ``llm_attention_observed`` may follow.
QUERIES = ("last", "instruction", "next")


@dataclass(frozen=True)
class Signal:
    """One thing a strategy reads: a signal name, the layer for layered signals, and for
    ``llm_attention_observed`` the query rows (``"last"``, ``"instruction"``, ``"next"``) or for
    ``annotations`` the annotation's name."""

    name: str
    layer: int | None = None
    query: str | None = None

    def __post_init__(self) -> None:
        if self.name not in SIGNALS:
            raise ValueError(f"unknown signal {self.name!r}; known: {', '.join(SIGNALS)}")
        if (self.name in LAYERED) != (self.layer is not None):
            raise ValueError(
                f"signal {self.name!r} {'needs a layer' if self.name in LAYERED else 'takes no layer'}"
            )
        if self.name == LLM_ATTENTION_OBSERVED and self.query not in QUERIES:
            raise ValueError(f"llm_attention_observed needs query= one of {QUERIES}, got {self.query!r}")

    def __str__(self) -> str:
        where = f" at {LAYERED[self.name]} layer {self.layer}" if self.layer is not None else ""
        return f"{self.name}{where}"


@dataclass(frozen=True)
class Needs:
    """Every signal one (bound) strategy reads."""

    signals: tuple[Signal, ...] = ()

    @classmethod
    def of(cls, *signals: Signal) -> "Needs":
        return cls(tuple(dict.fromkeys(signals)))  # in order, without repeats

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.signals)

    def layers(self, name: str) -> list[int]:
        """The layers of a layered signal, ascending."""
        return sorted({s.layer for s in self.signals if s.name == name})

    def attention_query(self) -> str | None:
        """The query rows of ``llm_attention_observed`` (one for all its layers), or None."""
        queries = {s.query for s in self.signals if s.name == LLM_ATTENTION_OBSERVED}
        if len(queries) > 1:
            raise ValueError(f"llm_attention_observed layers must all follow one query, got {sorted(queries)}")
        return queries.pop() if queries else None

    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.signals)
