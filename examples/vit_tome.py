"""ToMe on a timm ViT-B/16 (random weights: nothing is downloaded), its FLOPs and a quick timing:
python examples/vit_tome.py [--batch 4]

The same call works on any timm ``VisionTransformer``, an open_clip model or a transformers CLIP:
``vtoken.wrap(model, "tome", r=16)``; ``vtoken.unwrap(model)`` gives the original back exactly.
"""

import argparse
import time

import timm
import torch

import vtoken


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", default="vit_base_patch16_224")
    args = parser.parse_args()
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)

    def seconds() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(images)
        return time.perf_counter() - start

    seconds()  # warm-up
    plain = seconds()
    unpruned = vtoken.flops(model, convention="paper")
    vtoken.wrap(model, "tome", r=16)  # 16 tokens merged in every block, proportional attention
    seconds()
    merged = seconds()
    pruned = vtoken.flops(model, convention="paper")
    print(f"{args.model}: {unpruned.prefill / 1e9:.1f} -> {pruned.prefill / 1e9:.1f} GMACs per image "
          f"(ToMe r=16), {plain / merged:.2f}x faster at batch {args.batch} on this machine")
    vtoken.unwrap(model)


if __name__ == "__main__":
    main()
