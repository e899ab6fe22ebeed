"""Draw what a strategy kept: the surviving visual tokens of the last forward over the input image.

Dropped regions are dimmed; kept patches keep their brightness. For LLaVA-1.5 the token grid is
laid over the image as given (pass the image as the model saw it: after the processor's resize and
centre crop, if it crops). For LLaVA-NeXT the base view covers the whole image and every
high-resolution token is placed through the same resize-and-pad geometry the processor uses, so
each kept token lights up the region it saw.
"""

from __future__ import annotations

import os

import torch
from PIL import Image

DIM = 0.25
#: ``show`` enlarges a picture whose shorter side is below this many pixels (a 96 px image to 384).
LEGIBLE = 384


def _as_image(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        try:
            return Image.open(image).convert("RGB")
        except FileNotFoundError:
            raise ValueError(f"show(): no image file at {os.fspath(image)!r}; pass the path of the picture the "
                             "model was fed (or the PIL image or pixel tensor itself)") from None
        except (OSError, Image.UnidentifiedImageError) as error:  # a directory, unreadable or not a picture
            raise ValueError(f"show(): cannot read {os.fspath(image)!r} as an image ({error}); pass a PNG/JPEG "
                             "path, a PIL image or the pixel tensor") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = image.detach().float().cpu()
        if array.dim() == 4 and array.shape[0] == 1:  # a batch of one, as a processor returns it
            array = array[0]
        if array.dim() == 3 and array.shape[0] in (1, 3):
            array = array.permute(1, 2, 0)
        if array.dim() == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.numel() == 0 or array.dim() not in (2, 3) or (array.dim() == 3 and array.shape[-1] != 3):
            raise ValueError(f"show() draws one image: a tensor of [channels, height, width] or [height, width], "
                             f"got shape {tuple(image.shape)}; pass one image of the batch")
        array = (array - array.min()) / (array.max() - array.min() + 1e-12)
        return Image.fromarray((array.numpy() * 255).astype("uint8")).convert("RGB")
    raise TypeError(f"show() takes a PIL image, a path or a tensor, not {type(image).__name__}")


def token_boxes(info, width: int, height: int) -> dict[int, tuple[float, float, float, float]]:
    """Image-local token index -> (left, top, right, bottom) in an image of ``width x height``."""
    geometry = info.geometry
    rows, cols = geometry["grid"]
    boxes = {}
    if geometry["kind"] in ("grid", "video"):  # a video: its first frame's tokens over the picture
        first = geometry.get("first", 0)
        for j in range(info.num_tokens):
            p = j - first
            if 0 <= p < rows * cols:
                r, c = divmod(p, cols)
                boxes[j] = (c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
        return boxes
    # AnyRes: crop 0 is the base view of the whole image; crops 1.. tile the best-fit canvas.
    per = geometry["tokens_per_crop"]
    crop_rows, crop_cols = geometry["crop_grid"]
    img_h, img_w = geometry["image_size"]
    canvas_h, canvas_w = crop_rows * rows, crop_cols * cols  # in patches
    scale = min(canvas_w / img_w, canvas_h / img_h)
    pad_x, pad_y = (canvas_w - img_w * scale) / 2, (canvas_h - img_h * scale) / 2
    sx, sy = width / img_w, height / img_h  # the picture drawn may be another size than image_sizes
    first_crop = info.crops[0]
    for j, src in enumerate(info.source.tolist()):
        if src < 0:
            continue
        crop, p = divmod(src, per)
        r, c = divmod(p, cols)
        if crop == first_crop:
            boxes[j] = (c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
            continue
        tr, tc = divmod(crop - first_crop - 1, crop_cols)
        y0, x0 = tr * rows + r, tc * cols + c
        boxes[j] = (
            (x0 - pad_x) / scale * sx, (y0 - pad_y) / scale * sy,
            (x0 + 1 - pad_x) / scale * sx, (y0 + 1 - pad_y) / scale * sy,
        )
    return boxes


def show(model, image, path, sample: int = 0, image_in_sample: int = 0) -> str:
    """Save a PNG at ``path`` showing which visual tokens of ``sample``'s image survived every stage of
    the last forward of the wrapped ``model``; returns the path."""
    from vtoken.api import _state

    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"give the PNG's path to write, got {type(path).__name__}")
    for name, value in (("sample", sample), ("image_in_sample", image_in_sample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0 (an index), got {value!r}")
    run = _state(model).pruner.last_run
    if run is None:
        raise ValueError("no forward pass has run since wrapping; call the model first, then show()")
    images = [(i, info) for i, info in enumerate(run.visual.images) if info.sample == sample]
    if not images:
        raise ValueError(f"sample {sample} of the last forward has no image")
    if image_in_sample >= len(images):
        raise ValueError(f"sample {sample} of the last forward has {len(images)} image(s); give image_in_sample "
                         f"0..{len(images) - 1}")
    index, info = images[image_in_sample]
    picture = _legible(_as_image(image))
    stages = run.selections[sample]
    kept_visual = list(stages.values())[-1] if stages else torch.arange(run.visual.visual_count(sample))
    kept_local = {int(v) - info.offset for v in kept_visual if info.offset <= int(v) < info.offset + info.num_tokens}
    dimmed = Image.blend(Image.new("RGB", picture.size), picture, DIM)
    boxes = token_boxes(info, *picture.size)
    holders = _merged_holders(run, info)
    if holders is None:
        holders = _vision_stage_holders(run, info, kept_local)
    if holders is None:
        holders = _sequence_holders(run, index)
    if holders is not None:  # a merging method (ToMe, pool's windows): colour what each kept token holds
        return _save(_draw_sources(picture, dimmed, boxes, holders), path)
    for j, (left, top, right, bottom) in boxes.items():
        if j in kept_local:
            box = tuple(int(round(v)) for v in (max(left, 0), max(top, 0), min(right, picture.width), min(bottom, picture.height)))
            if box[2] > box[0] and box[3] > box[1]:
                dimmed.paste(picture.crop(box), box[:2])
    return _save(dimmed, path)


def _legible(picture: Image.Image, short_side: int = LEGIBLE) -> Image.Image:
    """``picture`` enlarged by a whole factor (nearest neighbour: patches stay sharp squares) until its
    shorter side is at least ``short_side`` pixels; a large picture is left as it is."""
    factor = -(-short_side // max(1, min(picture.size)))
    if factor <= 1:
        return picture
    return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)


def _sequence_holders(run, index: int) -> list[int] | None:
    """For an image whose projector / LLM stages merged tokens (pool's windows): per visual token, the
    kept token holding it (-1: dropped); None when every kept token holds only itself."""
    holders = getattr(run, "holders", {}).get(index)
    return None if holders is None else _if_merged(holders)


def _save(picture: Image.Image, path) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        picture.save(path)
    except (OSError, ValueError) as error:  # a file where a folder is needed; an unknown image extension
        raise ValueError(f"cannot write the picture to {os.fspath(path)!r} ({getattr(error, 'strerror', None) or error}); "
                         "give a .png path in a folder you can write to") from None
    return str(path)


def _merged_holders(run, info) -> list[int] | None:
    """For a vision-only run whose stages merged tokens: per patch of ``info``'s image, the token
    leaving the encoder that holds it (-1: dropped); None when nothing was merged."""
    images = run.image_run
    owner = getattr(images, "owner", None)
    if owner is None or run.visual.tokens_per_crop == 0 or len(info.crops) != 1:
        return None
    return _if_merged(owner[info.crops[0]].cpu())


def _vision_stage_holders(run, info, kept_local: set[int]) -> list[int] | None:
    """For a vision-language run whose vision stages merged tokens (ToMe, Representation Shift's merge)
    on an image of one crop whose patches are its visual tokens one to one (LLaVA-1.5): per visual
    token, the kept token holding it (-1: dropped, also by a later stage); None otherwise (nothing
    merged; AnyRes crops and Qwen-VL's merge units, whose tokens are not single patches)."""
    merges = getattr(run, "vision_merges", None)
    if merges is None or merges[1] is None or len(info.crops) != 1:
        return None
    owner, positions, local = (t[info.crops[0]].cpu() for t in merges)
    placed = local >= 0
    if int(placed.sum()) != len(torch.unique(local[placed])):  # several patches per visual token
        return None
    holders = torch.full((info.num_tokens,), -1, dtype=torch.long)
    for patch in torch.nonzero(placed & (owner >= 0)).flatten().tolist():
        token = int(local[int(positions[owner[patch]])])  # the holder's own visual token
        if token in kept_local:
            holders[int(local[patch])] = token
    return _if_merged(holders)


def _if_merged(holders: torch.Tensor) -> list[int] | None:
    """``holders`` as a list when some kept token holds more than one patch or token; None when each
    holds only itself (plain pruning: drawn bright / dim)."""
    held = holders[holders >= 0]
    return None if int(held.numel()) == len(torch.unique(held)) else holders.tolist()


def _draw_sources(picture: Image.Image, dimmed: Image.Image, boxes: dict, holders: list[int]) -> Image.Image:
    """ToMe's source map: the patches one merged token holds share a tint; dropped patches stay dim."""
    out = dimmed.copy()
    for j, holder in enumerate(holders):
        if holder < 0 or j not in boxes:
            continue
        left, top, right, bottom = (int(round(v)) for v in boxes[j])
        if right <= left or bottom <= top:
            continue
        hue = (holder * 0.61803398875) % 1.0  # golden-ratio steps: neighbouring tokens get distant tints
        tint = Image.new("HSV", (right - left, bottom - top), (int(hue * 255), 200, 255)).convert("RGB")
        out.paste(Image.blend(picture.crop((left, top, right, bottom)), tint, 0.45), (left, top))
    return out
