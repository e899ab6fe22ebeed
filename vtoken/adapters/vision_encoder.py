"""The pipeline of a vision-only family (``FamilyDescription.decoder is None``): a ViT used on its own,
for zero-shot classification, retrieval or embeddings (CLIP, SigLIP, timm and open_clip ViTs).

The model keeps its own API (``get_image_features``, ``encode_image``, ``forward_features`` /
``forward_head``, a classifier's logits): nothing but the vision blocks is touched. A call of the
tower starts at its patch embedding, whose pre-hook opens the call's
:class:`~vtoken.request.ImageRun` with the pixels (one image per batch row); the vision-site stages
(:class:`~vtoken.adapters.vision_site.VisionSite`) shorten each image's sequence; the prefix tokens
(CLS, registers) are never candidates. Whatever reads the encoder's output (the CLS token, an
average over tokens, an attention-pooling head) reads what the stages left. A budget counts the patch
tokens leaving the encoder: ``keep_tokens=K`` leaves K patch tokens per image. The end of the last
block records what each image kept, for ``vtoken.selection`` and ``vtoken.show``.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod

import torch
from torch import nn

from .base import Adapter, FamilyDescription, ImageInfo, TokenMap, UndoStack, VisualLayout
from .vision_site import VisionSite, VisionSource
from vtoken import signals
from vtoken.context import Grid
from vtoken.pruner import Pruner
from vtoken.request import ImageRun, PruneRun, TextOnlyPrefill

#: Signals of a vision-language model that a vision-only model has no part for.
NO_LLM = "a vision-only model (no projector, no LLM)"
LANGUAGE_SIGNALS = (
    signals.PROJECTOR_INPUT, signals.LLM_ATTENTION, signals.LLM_OBSERVED, signals.LLM_ATTENTION_OBSERVED,
)


def vision_only_missing_sites() -> dict[str, str]:
    """The sites no vision-only family has (``vtoken.methods``)."""
    return {"projector": NO_LLM, "llm": NO_LLM}


def vision_only_gaps() -> dict[str, str]:
    """The signals no vision-only family provides, and why (``vtoken.methods``)."""
    return {name: NO_LLM for name in LANGUAGE_SIGNALS}


class VisionEncoderAdapter(VisionSite, Adapter):
    """A family whose model is a vision tower alone (or a CLIP whose text tower is left untouched)."""

    #: Sites a vision-only model has.
    model_sites = ("vision",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.description: FamilyDescription = self.describe()

    # --- what the family supplies ---------------------------------------------------------------
    @abstractmethod
    def describe(self) -> FamilyDescription:
        """The tower's description (``projector`` and ``decoder`` None)."""

    @abstractmethod
    def pixel_entry(self) -> nn.Module:
        """The module each call of the tower first hands the pixels (its patch embedding)."""

    def feature_map_modules(self) -> list[nn.Module]:
        """Modules whose ``forward_intermediates`` lays each block's patch tokens out on the patch
        grid (timm, open_clip): refused with ``output_fmt="NCHW"`` while wrapped."""
        return []

    def pixels_from(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The ``[B, channels, H, W]`` pixels of one call of :meth:`pixel_entry`."""
        return args[0] if args else next(iter(kwargs.values()))

    # --- structure, from the description --------------------------------------------------------
    def projector(self) -> nn.Module:
        raise ValueError(f"{self.family_name} is a vision-only model: it has no projector")

    def decoder_layers(self) -> nn.ModuleList:
        return nn.ModuleList()

    def visual_tokens_per_image(self) -> int | None:
        return self.description.vision.patches

    def vision_tokens(self) -> int | None:
        return self.description.vision.patches

    def vision_tokens_for(self, visual_tokens: int) -> int | None:
        return visual_tokens  # its visual tokens are its patches: another image size, another count

    def site_width(self, site: str) -> tuple[int, int]:
        return self.description.vision.width, self.description.vision.head_dim

    def default_vision_layer(self) -> int:
        """Where a method that is not placed by its own defaults prunes on this family: after block
        ``depth // 3`` (1-based; block 4 of 12, EViT's first pruning place), so two thirds of the
        tower run on the kept tokens."""
        return max(len(self.vision_layers()) // 3 - 1, 0)

    def placed_options(self, strategy_cls, options: dict) -> dict:
        """``options`` with the site placed on this family: a method whose default site is one a
        vision-only model lacks runs at the vision site after :meth:`default_vision_layer`."""
        if "vision" not in strategy_cls.sites:
            raise ValueError(
                f"{strategy_cls.name} prunes at the {' / '.join(strategy_cls.sites)} site, which a vision-only "
                f"{self.family_name} model lacks; use a method that prunes inside the vision tower "
                "(tome, repshift, visionzip, random, pool)"
            )
        sites = [options.get("site")] + [getattr(st, "site", None) if not isinstance(st, dict) else st.get("site")
                                         for st in options.get("stages") or ()]
        lacking = next((site for site in sites if site not in (None, "vision")), None)
        if lacking is not None:  # before the options are checked on their own (a stage's missing layer, say)
            raise self._no_site(lacking)
        if "site" in options and options["site"] is None:  # (the generic check would offer sites it lacks)
            raise ValueError(f"site=None: {self.family_name} is a vision-only model; use site='vision' with "
                             f"layer=0..{len(self.vision_layers()) - 1}, or leave site out")
        if "site" in options or options.get("stages"):
            return options
        if getattr(strategy_cls.Config, "site", "vision") == "vision":
            return options
        # A method that reads one vision layer (VisionZip's vision_layer) prunes after that layer.
        layer = options.get("vision_layer")
        return {"site": "vision", "layer": self.default_vision_layer() if layer is None else layer, **options}

    def _no_site(self, site: str) -> ValueError:
        return ValueError(
            f"{self.family_name} is a vision-only model: it has no {site!r} site; use site='vision' with "
            f"layer=0..{len(self.vision_layers()) - 1}"
        )

    def unavailable(self, signal) -> str | None:
        gap = self.description.gaps.get(signal.name)
        if gap is not None:
            return gap
        return self.vision_unavailable(signal)

    def validate(self, stages: tuple) -> None:
        depth = len(self.vision_layers())
        patches = self.description.vision.patches
        for stage in stages:
            if stage.site != "vision":
                raise self._no_site(stage.site)
            if stage.layer >= depth:
                raise ValueError(f"vision layer {stage.layer} does not exist: the vision encoder has {depth} layers")
            if stage.keep_tokens is not None and stage.keep_tokens > patches:
                raise ValueError(
                    f"keep_tokens={stage.keep_tokens} is larger than the {patches} patch tokens of an image; "
                    f"use keep_tokens <= {patches} (or keep=1.0 to keep all)"
                )
            stage.crop_budget(patches, patches)  # a budget the stage cannot meet (ToMe's cap) raises here

    # --- hooks ----------------------------------------------------------------------------------
    def install(self, pruner: Pruner, undo: UndoStack) -> None:
        self.pruner = pruner
        # open_clip's and timm's patch dropout (a module named PatchDropout with a drop ``prob``) keeps a
        # random subset of the patches in training mode, before the first block: the grid is gone.
        self._patch_dropouts = [m for m in self.model.modules() if type(m).__name__ == "PatchDropout" and hasattr(m, "prob")]
        # timm's and open_clip's own gradient checkpointing (``set_grad_checkpointing``) flag.
        self._checkpointing = [m for m in self.model.modules() if isinstance(getattr(m, "grad_checkpointing", None), bool)]
        undo.pre_hook(self.pixel_entry(), self._open_encoding, with_kwargs=True)
        self.install_vision(undo)
        # After every stage hook of the last block: what each image kept is final.
        closing = undo.post_hook(self.vision_layers()[len(self.vision_layers()) - 1], self._close_encoding)
        if self.last_vision_hooks:
            self.last_vision_hooks.append(closing)
        for module in self.feature_map_modules():
            self._refuse_feature_maps(module, undo)

    def _refuse_feature_maps(self, module: nn.Module, undo: UndoStack) -> None:
        """Replace ``module.forward_intermediates`` on the instance (undone by ``unwrap``) by one that
        refuses feature maps (``output_fmt="NCHW"``): the tokens left after pruning or merging no
        longer fill the patch grid (timm's reshape would silently fold them into fewer channels).
        ``output_fmt="NLC"`` (each block's tokens as they are) runs as before."""
        original = getattr(module, "forward_intermediates", None)
        if original is None:  # (older timm / open_clip: no such method)
            return
        signature = inspect.signature(original)
        method = self.pruner.strategy.name

        def forward_intermediates(*args, **kwargs):
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            if call.arguments.get("output_fmt") == "NCHW":
                raise ValueError(
                    f"forward_intermediates(output_fmt='NCHW') lays each block's patch tokens out on the patch grid, "
                    f"but the tokens {method} leaves (pruned or merged) have no feature-map layout; pass "
                    "output_fmt='NLC' for the tokens left, or call vtoken.unwrap(model) first for feature maps"
                )
            try:
                return original(*args, **kwargs)
            finally:
                # stop_early=True (or indices short of the last block) ends the call before the last
                # block, whose hook closes the encoding: close it here, on the stages that ran.
                if self.pruner.encoding is not None:
                    self._close_encoding(None, (), None)

        undo.set_attribute(module, "forward_intermediates", forward_intermediates)

    def _open_encoding(self, module, args, kwargs):
        pruner, vision = self.pruner, self.description.vision
        dropping = [m for m in self._patch_dropouts if m.training and m.prob > 0]
        if dropping:
            raise ValueError(
                f"the model's patch dropout (prob={dropping[0].prob}) is active in training mode: it keeps a random subset "
                "of the patches before the first block, so there is no patch grid left to prune; call model.eval(), or "
                "set its prob to 0 to train with vtoken"
            )
        if torch.is_grad_enabled() and any(m.grad_checkpointing for m in self._checkpointing):
            # The blocks would run again in backward, after this encoding closed, unpruned: a
            # different graph than the forward's, which torch.utils.checkpoint refuses there.
            raise ValueError(
                "the model's gradient checkpointing reruns its blocks during backward, outside the forward vtoken "
                "prunes in; call model.set_grad_checkpointing(False) to train with vtoken, or run under torch.no_grad()"
            )
        pixels = self.pixels_from(args, kwargs)
        if pixels.shape[0] == 0:  # an empty batch runs as the model: nothing to prune, an empty selection
            pruner.encoding = None
            pruner.last_run = TextOnlyPrefill(0, [stage.name for stage in pruner.stages])
            return None
        rows, cols = vision.grid_for(pixels.shape[-2], pixels.shape[-1])
        patches, prefix = rows * cols, vision.prefix_tokens
        geometry = {"kind": "grid", "grid": (rows, cols), "first": 0}
        per = prefix + patches  # encoder slots of image i: i * per + token
        images = [
            ImageInfo(i, 0, patches, (Grid(0, rows, cols, cols),), [i], TokenMap.one_to_one(i * per + prefix + torch.arange(patches)), geometry)
            for i in range(pixels.shape[0])
        ]
        candidate_local = torch.arange(patches).expand(len(images), -1)
        crop_pixels = lambda: pixels  # noqa: E731  (the call's own pixels: per-image seeds, pixel_patches)
        run = ImageRun(images, candidate_local, pruner.config, crop_pixels=crop_pixels, tokens_per_crop=per)
        if (rows, cols) != tuple(vision.grid):
            run.grid = (rows, cols)
        needs = pruner.needs
        if needs.layers(signals.VISION_ATTENTION) or needs.has(signals.PIXEL_PATCHES):
            run.vision_source = VisionSource(self, crop_pixels, (rows, cols))
        pruner.encoding = run
        return None

    def _close_encoding(self, module, args, output):
        """Record what each image kept (its patch indices after every stage) as the thread's last run."""
        pruner = self.pruner
        images = pruner.encoding
        if images is None:
            return None
        batch, patches = len(images.images), images.candidate_local.shape[1]
        visual_index = torch.arange(patches).expand(batch, -1)
        image_index = torch.arange(batch)[:, None].expand(-1, patches)
        run = PruneRun(VisualLayout(visual_index, image_index, images.images, images.tokens_per_crop), pruner.config, images)
        ran = [stage for stage in pruner.stages_at("vision") if stage.name in images.stage_positions]
        if ran:
            pruner.vision_kept_visual(run, ran)
        run.diagnostics = dict(images.diagnostics)
        pruner.last_run = run
        pruner.encoding = None
        return None


def encoder_sources(run: PruneRun) -> torch.Tensor | None:
    """``[B, P]``: for each patch of each image of a vision-only run, the index (among the image's
    tokens leaving the encoder, in sequence order) of the token that holds it; -1 when dropped; None
    when no stage ran. Merged tokens hold several patches (ToMe's source map)."""
    images: ImageRun | None = run.image_run
    if images is None or images.owner is None:
        return None
    return images.owner.cpu()


__all__ = ["VisionEncoderAdapter", "vision_only_gaps", "encoder_sources", "NO_LLM"]
