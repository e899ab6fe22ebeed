"""Zero-shot classification with the shipped tiny CLIP, unpruned and with ToMe and random pruning:
python examples/zero_shot_clip.py [--n 60] [--out merged.png]

The images and class prompts come from the project's offline CLIP data (``eval/clip_data.py``: the
colour and shape of each scene's large shape, 30 classes). The model keeps its own API
(``get_image_features``); vtoken only changes how many patch tokens its vision blocks carry.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

import vtoken

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
import clip_data  # noqa: E402  (the offline scenes and their class prompts)


def features(output) -> torch.Tensor:
    return F.normalize((output if torch.is_tensor(output) else output.pooler_output).float(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--out", default="merged.png")
    args = parser.parse_args()
    path = REPO / "vtoken" / "assets" / "tiny-clip"
    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    records = clip_data.records("test", args.n)
    pixels = processor(images=[r["pil"] for r in records], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([r["label"] for r in records])
    prompts = processor.tokenizer(clip_data.class_prompts(), padding=True, return_tensors="pt")
    with torch.no_grad():
        classes = features(model.get_text_features(**prompts))

    def accuracy() -> float:
        with torch.no_grad():
            images = features(model.get_image_features(pixel_values=pixels))
        return float(((images @ classes.T).argmax(-1) == labels).float().mean())

    print(f"unpruned: {100 * accuracy():.1f}% zero-shot on {args.n} images (144 patch tokens)")
    for method, options in (("tome", {"keep": 0.25}), ("random", {"keep": 0.25})):
        with vtoken.pruned(model, method, **options):
            result = accuracy()
            flops = vtoken.flops(model)
            print(f"{method} keep 1/4: {100 * result:.1f}%  ({flops.prefill / 1e6:.0f} MFLOPs per image, "
                  f"schedule {vtoken.schedule_of(model).stages[-1].keep_tokens} patch tokens out)")
            if method == "tome":  # what each merged token holds, over the first image
                with torch.no_grad():
                    model.get_image_features(pixel_values=pixels[:1])
                print("merged tokens drawn in", vtoken.show(model, records[0]["pil"], args.out))


if __name__ == "__main__":
    main()
