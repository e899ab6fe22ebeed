"""How many tokens each part of a VLM sees for one sample before pruning (``vtoken.accounting``):
vision-encoder passes and their patches, the projector's inputs, the visual tokens that reach the
LLM, Qwen2.5-VL's attention windows, and for AnyRes images (LLaVA-NeXT, LLaVA-OneVision) what a
vision-site stage leaves of each crop. Each family's rules follow its transformers implementation
(resizing, unpadding, newlines, ``smart_resize``); :func:`geometry` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vtoken.model_dims import ModelDims

LLAVA_NEXT_DEFAULT_IMAGE = (672, 672)
LLAVA_ONEVISION_DEFAULT_IMAGE = (672, 672)  # the LLaVA-NeXT default: base view + 2×2 crops of 384 px
QWEN_DEFAULT_IMAGE = (672, 672)
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 16384  # the official Qwen2.5-VL preprocessor_config.json value
# Qwen2-VL's preprocessor_config.json has the same min_pixels 3136 / max_pixels 12845056. Qwen3-VL's
# (Qwen2VLImageProcessorFast, patch_size 16) sizes images by size = {"shortest_edge": 65536,
# "longest_edge": 16777216} pixels, on a 32-pixel grid (16-px patches × the 2×2 merge).
QWEN3_MIN_PIXELS = 65536
QWEN3_MAX_PIXELS = 16777216
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class Geometry:
    """How many tokens each part of the model sees for one sample, before pruning.

    ``crops`` is the number of vision-encoder passes (images × AnyRes crops), ``patches`` the patch
    tokens of one pass (CLS excluded), ``windows`` the Qwen2.5-VL attention-window sizes of one pass
    in patches, ``projector_tokens`` the projector's input tokens and ``visual_tokens`` the visual
    tokens that reach the LLM.
    """

    crops: int
    patches: int
    projector_tokens: int
    visual_tokens: int
    windows: tuple[int, ...] = ()
    #: AnyRes (LLaVA-NeXT, LLaVA-OneVision, ``"true"`` convention): what a vision-site stage leaves of
    #: one image. See :class:`AnyresLayout`; None for every other geometry.
    anyres: "AnyresLayout | None" = None
    #: Of ``visual_tokens``, the newline tokens the family packs in (``"true"`` convention: one per grid
    #: row of a LLaVA-NeXT / OneVision image, one per OneVision video); no patch stands behind them.
    newlines: int = 0


@dataclass(frozen=True)
class AnyresLayout:
    """How one AnyRes image's encoder crops reach the LLM, for counting a vision-site stage.

    Each crop keeps ``k`` encoder tokens. ``crop_patches`` holds, per crop (base view first), the
    patches left after unpadding; the adapter ranks a patch that unpadding cuts last, so a crop
    reaches the LLM with at most ``min(k, crop_patches[c])`` tokens (exactly that many for a method
    that prunes; a merging one places a merged token at one of its sources, which may be cut).
    ``newlines`` tokens close the grid's rows (one after a base-view-only image) and are counted as
    all kept: a newline leaves only when every token of its row does. ``resized`` is ``(rows, cols,
    unpadded_rows, unpadded_cols)`` when LLaVA-OneVision shrinks the unpadded grid by bilinear
    interpolation: a resized token survives when any of its (up to 2 x 2) sources does, so the kept
    patches reach at most ``fan-out`` x their count of it. :meth:`visual_tokens` is therefore an upper
    bound, exact for a pruning method on a grid that is not resized when every row keeps a token.
    """

    crop_patches: tuple[int, ...]
    newlines: int
    resized: tuple[int, int, int, int] | None = None

    def visual_tokens(self, kept: int) -> int:
        """LLM tokens of the image when every crop keeps ``kept`` encoder tokens (at most)."""
        base = min(kept, self.crop_patches[0])
        grid = sum(min(kept, patches) for patches in self.crop_patches[1:])
        if self.resized is not None:
            rows, cols, source_rows, source_cols = self.resized
            fan_out = _bilinear_fan_out(source_rows, rows) * _bilinear_fan_out(source_cols, cols)
            grid = min(rows * cols, fan_out * grid)
        return base + grid + self.newlines


def _bilinear_fan_out(source: int, size: int) -> int:
    """The most outputs one input index feeds (with a nonzero weight) when ``torch.nn.functional.
    interpolate(mode="bilinear", align_corners=False)`` resizes ``source`` samples to ``size``: output i
    reads ``x = max(0, (i + 0.5) * source / size - 0.5)`` from floor(x) and, with weight x - floor(x),
    floor(x) + 1."""
    import math

    feeds = [0] * source
    for i in range(size):
        x = max(0.0, (i + 0.5) * source / size - 0.5)
        low = min(math.floor(x), source - 1)
        weight = x - low
        if weight < 1:
            feeds[low] += 1
        if weight > 0 and low + 1 < source:
            feeds[low + 1] += 1
    return max(feeds)


# --------------------------------------------------------------------------------------------------
# Token geometry


def geometry(
    dims: ModelDims,
    *,
    image_size: tuple[int, int] | None = None,
    images: int = 1,
    convention: str = "true",
    vision_tokens: int | None = None,
    visual_tokens: int | None = None,
    frames: int | None = None,
) -> Geometry:
    """Tokens per part for ``images`` images of ``image_size`` (h, w) before any pruning.

    - LLaVA-1.5: every image is resized to the tower's square input: 576 patches at 336 px.
    - LLaVA-NeXT: one base view plus the crops of the best ``image_grid_pinpoints`` resolution
      (672×672 by default: 5 crops). ``"true"``: 576 base tokens + the unpadded crop grid + one
      newline per grid row, as the model packs them (2928 at 672×672); ``"paper"``: crops × 576
      (2880).
    - LLaVA-OneVision (``LlavaOnevisionModel.pack_image_features``): one image is a base view plus the
      crops of the best pinpoint resolution (672×672 by default: 2×2 crops of 384 px, 729 patches
      each, no CLS). ``"true"``: 729 base tokens + the unpadded crop grid (rows × cols patches), which
      is bilinearly resized to ``[rows // r, cols // r]`` when r = sqrt(rows·cols / (N·27²)) > 1.1
      (N from ``vision_aspect_ratio`` ``"anyres_max_N"``), + one newline per row (3699 at 672×672);
      ``"paper"``: crops × 729 (3645). Several images in one sample (``images`` > 1) are each
      encoded as their base view only, 729 tokens + one newline (the model's multi-image path).
      ``frames`` makes the sample one video instead: every frame is one 729-patch pass whose
      projected features are pooled 2×2 (bilinear, to ceil(27/2)² = 196 tokens), + one newline per
      video; ``"paper"``: frames × 196.
    - Qwen2-VL / Qwen2.5-VL: ``smart_resize`` to multiples of 28 px within [3136, 12845056] pixels
      (default 672×672 → 48×48 patches, 576 LLM tokens after the 2×2 merger).
    - Qwen3-VL: ``smart_resize`` to multiples of 32 px (16-px patches) within [65536, 16777216]
      pixels (default 672×672 → 42×42 patches, 441 LLM tokens).

    ``vision_tokens`` overrides the patches per crop/image, ``visual_tokens`` the LLM-side count only.
    """
    if frames is not None and dims.family != "llava_onevision":
        raise ValueError(f"frames= (video) is only modelled for llava_onevision, not {dims.family}")
    if dims.family == "llava":
        geo = _llava_geometry(dims, images)
    elif dims.family == "llava_next":
        geo = _llava_next_geometry(dims, image_size or LLAVA_NEXT_DEFAULT_IMAGE, images, convention)
    elif dims.family == "llava_onevision":
        if frames is not None:
            geo = _onevision_video_geometry(dims, frames, convention)
        else:
            geo = _onevision_geometry(dims, image_size or LLAVA_ONEVISION_DEFAULT_IMAGE, images, convention)
    elif dims.family in QWEN_FAMILIES:
        geo = _qwen_geometry(dims, image_size or QWEN_DEFAULT_IMAGE, images)
    else:
        raise NotImplementedError(f"no token geometry for family {dims.family!r}")
    if vision_tokens is not None and vision_tokens != geo.patches:
        geo = _with_patches(dims, geo, vision_tokens)
    if visual_tokens is not None:
        geo = replace(geo, visual_tokens=visual_tokens)
    return geo


def patchless_tokens(dims: ModelDims, geo: Geometry) -> int:
    """Of ``geo.visual_tokens``, those no patch stands behind: the row newlines (LLaVA-NeXT,
    OneVision), and the CLS token of every crop that a LLaVA under
    ``vision_feature_select_strategy="full"`` hands the LLM."""
    return geo.newlines + (geo.crops * dims.vision.cls_tokens if dims.keep_cls else 0)


def _side_patches(dims: ModelDims) -> int:
    return dims.vision.image_size // dims.vision.patch


def _llava_geometry(dims: ModelDims, images: int) -> Geometry:
    patches = _side_patches(dims) ** 2
    per_crop = patches + (dims.vision.cls_tokens if dims.keep_cls else 0)
    return Geometry(crops=images, patches=patches, projector_tokens=images * per_crop,
                    visual_tokens=images * per_crop)


def _anyres_grid(dims: ModelDims, image_size) -> tuple[int, int]:
    """Crops per column and per row of the ``image_grid_pinpoints`` resolution the model picks for an
    image of ``image_size`` (transformers' ``select_best_resolution``): LLaVA-NeXT and OneVision alike."""
    from vtoken import compat

    best_h, best_w = compat.select_best_resolution(tuple(image_size), [list(p) for p in dims.grid_pinpoints])
    return best_h // dims.vision.image_size, best_w // dims.vision.image_size


def _llava_next_geometry(dims: ModelDims, image_size, images: int, convention: str) -> Geometry:
    side = _side_patches(dims)
    patches = side * side
    per_crop = patches + (dims.vision.cls_tokens if dims.keep_cls else 0)
    grid_h, grid_w = _anyres_grid(dims, image_size)
    crops = 1 + grid_h * grid_w
    anyres = None
    if convention == "paper":
        visual = crops * per_crop
    else:
        rows, cols = _unpadded_grid(image_size, grid_h * side, grid_w * side)
        visual = per_crop + rows * cols + rows  # base view + unpadded grid + one newline per row
        if not dims.keep_cls:  # (a CLS token per crop does not survive NeXT's packing: not modelled)
            anyres = AnyresLayout((patches, *_unpadded_crop_patches(image_size, grid_h, grid_w, side)), rows)
    return Geometry(crops=images * crops, patches=patches, projector_tokens=images * crops * per_crop,
                    visual_tokens=images * visual, anyres=anyres,
                    newlines=0 if convention == "paper" else images * rows)


def _onevision_geometry(dims: ModelDims, image_size, images: int, convention: str) -> Geometry:
    side = _side_patches(dims)
    patches = side * side  # SigLIP: no CLS, "full" selection keeps every patch
    if images > 1:  # multi-image sample: every image is its base view only, plus one newline
        visual = patches if convention == "paper" else patches + 1
        return Geometry(crops=images, patches=patches, projector_tokens=images * patches,
                        visual_tokens=images * visual,
                        anyres=None if convention == "paper" else AnyresLayout((patches,), 1),
                        newlines=0 if convention == "paper" else images)
    grid_h, grid_w = _anyres_grid(dims, image_size)
    crops = 1 + grid_h * grid_w
    anyres = None
    if convention == "paper":
        visual = crops * patches
    else:
        unpadded = _unpadded_grid(image_size, grid_h * side, grid_w * side)
        rows, cols = _onevision_grid(dims, *unpadded)
        visual = patches + rows * cols + rows  # base view + (resized) unpadded grid + one newline per row
        resized = None if (rows, cols) == unpadded else (rows, cols, *unpadded)
        anyres = AnyresLayout((patches, *_unpadded_crop_patches(image_size, grid_h, grid_w, side)), rows, resized)
    return Geometry(crops=crops, patches=patches, projector_tokens=crops * patches, visual_tokens=visual,
                    anyres=anyres, newlines=0 if convention == "paper" else rows)


def _onevision_grid(dims: ModelDims, rows: int, cols: int) -> tuple[int, int]:
    """The unpadded AnyRes grid (``rows`` x ``cols``) after LLaVA-OneVision's bilinear shrink of a grid
    larger than ``anyres_max`` base views: ratio = sqrt(rows·cols / (N·side²)); above 1.1 the grid
    becomes [int(rows // ratio), int(cols // ratio)]."""
    import math

    side = _side_patches(dims)
    ratio = math.sqrt(rows * cols / (dims.anyres_max * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def _onevision_video_geometry(dims: ModelDims, frames: int, convention: str) -> Geometry:
    side = _side_patches(dims)
    pooled = -(-side // 2)  # ceil(side / 2): apply_pooling's bilinear 2×2 downsampling
    visual = frames * pooled * pooled + (0 if convention == "paper" else 1)  # one newline per video
    return Geometry(crops=frames, patches=side * side, projector_tokens=frames * side * side,
                    visual_tokens=visual, newlines=0 if convention == "paper" else 1)


def _unpadded_grid(image_size, rows: int, cols: int) -> tuple[int, int]:
    """Rows and columns of the AnyRes feature grid left after removing the letterbox padding."""
    (top, bottom), (left, right) = _unpadded_window(image_size, rows, cols)
    return bottom - top, right - left


def _unpadded_window(image_size, rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))``: the part of the (rows, cols) AnyRes feature grid that
    unpadding keeps, as transformers' ``unpad_image`` cuts it.

    The image (h, w) was resized into the grid keeping its aspect ratio and padded symmetrically along
    the other axis; ``padding`` rows (or columns) go from each side.
    """
    height, width = image_size
    if width / height > cols / rows:  # image wider than the grid: padding above and below
        content = int(round(height * cols / width, 7))
        padding = (rows - content) // 2
        return (padding, rows - padding), (0, cols)
    content = int(round(width * rows / height, 7))
    padding = (cols - content) // 2
    return (0, rows), (padding, cols - padding)


def _unpadded_crop_patches(image_size, grid_h: int, grid_w: int, side: int) -> tuple[int, ...]:
    """Patches of each high-resolution crop (row-major, ``side`` × ``side`` each) that unpadding keeps."""
    (top, bottom), (left, right) = _unpadded_window(image_size, grid_h * side, grid_w * side)

    def overlap(start: int, low: int, high: int) -> int:
        return max(0, min(start + side, high) - max(start, low))

    return tuple(overlap(i * side, top, bottom) * overlap(j * side, left, right)
                 for i in range(grid_h) for j in range(grid_w))


def _qwen_geometry(dims: ModelDims, image_size, images: int) -> Geometry:
    from vtoken import compat

    factor = dims.vision.patch * dims.vision.merge
    low, high = (QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS) if dims.family == "qwen3_vl" else (QWEN_MIN_PIXELS,
                                                                                        QWEN_MAX_PIXELS)
    height, width = compat.qwen2_vl_smart_resize(*image_size, factor=factor, min_pixels=low, max_pixels=high)
    rows, cols = height // dims.vision.patch, width // dims.vision.patch
    patches = rows * cols
    merged = patches // dims.vision.merge**2
    return Geometry(crops=images, patches=patches, projector_tokens=images * merged,
                    visual_tokens=images * merged,
                    windows=_qwen_windows(dims, rows, cols) if dims.vision.window else ())


def _qwen_windows(dims: ModelDims, rows: int, cols: int) -> tuple[int, ...]:
    """Patch counts of the attention windows of one image: the merged grid is tiled by
    ``window`` × ``window`` squares from the top-left; edge windows are cut short."""
    merge, size = dims.vision.merge, dims.vision.window
    merged_rows, merged_cols = rows // merge, cols // merge
    windows = []
    for top in range(0, merged_rows, size):
        for left in range(0, merged_cols, size):
            units = min(size, merged_rows - top) * min(size, merged_cols - left)
            windows.append(units * merge * merge)
    return tuple(windows)


def _with_patches(dims: ModelDims, geo: Geometry, patches: int) -> Geometry:
    """Resize every crop to ``patches`` patch tokens (Qwen: windows approximated as full ones)."""
    merge2 = dims.vision.merge**2
    per_crop = patches // merge2 + (dims.vision.cls_tokens if dims.keep_cls else 0)
    windows = ()
    if dims.vision.window:
        full = dims.vision.window**2 * merge2
        windows = (full,) * (patches // full) + ((patches % full,) if patches % full else ())
    return Geometry(geo.crops, patches, geo.crops * per_crop, geo.crops * per_crop, windows)
