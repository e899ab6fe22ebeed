"""Train the tiny CLIP of the vision-only family (a stock ``transformers.CLIPModel``) on CPU, from
random weights, contrastively on generated image/caption pairs.

Model: CLIP vision tower on 96x96 images in 8x8 patches (144 patch tokens + CLS), width 128,
4 layers, 4 heads; text tower width 128, 3 layers, over a word-level tokenizer built offline
(``clip_data.build_tokenizer``: 44 tokens, ``<s> ... </s>``, pooled at ``</s>``); both projected to
128 dimensions; learnable temperature (``logit_scale``, CLIP's init ln(1/0.07), clamped at ln 100).
The vision tower's position embeddings start from a 2D sin/cos code of (row, column) (trainable).

Data (``clip_data``): an endless stream of fresh ``train``-split scenes, each drawn once: subject
scenes (one large shape, 2-4 small ones, 0-2 tags) and, with probability ``--benchmark-share``,
the VQA benchmark's own ``train`` images (``clip_data.benchmark_scene``).  Each image gets one
training caption (full, the subject alone, or a random subset of its objects; see
``clip_data.training_caption``).

Loss: symmetric InfoNCE over the batch (image->text and text->image cross entropy of
``logit_scale * cos``), with *every* caption that is true of an image counted as its positive
(soft targets uniform over the true captions): a partial caption such as "a small red circle" is
often true of several images of a batch, and one-hot targets would push those apart.

Model selection: zero-shot accuracy of the 30-class task (``clip_data.CLASSES``) on
``--val-n`` ``validation`` subject scenes, every ``--eval-every`` steps; the best checkpoint is
written with ``save_pretrained`` (safetensors) together with a ``CLIPProcessor`` (the tokenizer
and a ``CLIPImageProcessor`` with CLIP's normalisation constants).  The ``test`` split is never
used here; ``eval/eval_tiny_clip.py`` reports on it. ``--out`` (required) must be a new or empty
folder unless ``--overwrite`` is given.

Usage (the shipped ``vtoken/assets/tiny-clip``; log ``eval/results/tiny_clip/train.log``: 900 steps
of 128 pairs, 25.7 min on one thread of a 2-core CPU shared with other jobs; the best checkpoint was
the last, validation zero-shot 87.6% (colour 100%, shape 87.6%), retrieval recall@1 91.6% image->text
and 92.2% text->image on 500 validation scenes; test numbers in ``eval/results/tiny_clip/eval.md``)::

    # into a fresh folder
    OMP_NUM_THREADS=1 nohup python eval/train_tiny_clip.py --steps 900 --time-limit 40 \
        --out /tmp/tiny-clip > /tmp/tiny-clip-train.log 2>&1 &
    # the shipped model and its log were written in place; this replaces both
    OMP_NUM_THREADS=1 nohup python eval/train_tiny_clip.py --steps 900 --time-limit 40 \
        --out vtoken/assets/tiny-clip --overwrite > eval/results/tiny_clip/train.log 2>&1 &

Validation zero-shot accuracy along the way (steps 100..900): 14.0, 24.6, 35.8, 54.4, 72.2, 76.4,
83.4, 86.2, 87.6%; colour is learnt first (99% by step 500), the shape of the large object last.

Smoke run (a few seconds; replaces /tmp/tc)::

    OMP_NUM_THREADS=1 python eval/train_tiny_clip.py --steps 3 --batch 8 --val-n 16 --eval-every 2 --out /tmp/tc \
        --overwrite
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_llava import grid_position_code, save  # noqa: E402  (model, processor and training state, as the tiny LLaVA's)

import numpy as np
import torch
import torch.nn.functional as F

import clip_data as C
from output import add_output_arguments, claim

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------ model

def build_model(tokenizer, vision_hidden=128, vision_layers=4, text_hidden=128, text_layers=3,
                projection_dim=128, seed=0):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=C.IMAGE_SIZE, patch_size=C.PATCH_SIZE, num_channels=3, hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32), projection_dim=projection_dim, hidden_act="gelu")
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=max(1, text_hidden // 32),
        max_position_embeddings=C.MAX_TEXT_LEN, projection_dim=projection_dim, hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=projection_dim)
    model = CLIPModel(config)
    _init_positions(model)
    return model


def _init_positions(model) -> None:
    """A 2D sin/cos code of (row, column) as the initial patch position embeddings (CLS at 0)."""
    emb = model.vision_model.embeddings.position_embedding.weight
    code = grid_position_code(C.GRID, emb.shape[1])
    with torch.no_grad():
        emb.zero_()
        emb[1:, : code.shape[1]] = code * 0.5


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"height": C.IMAGE_SIZE, "width": C.IMAGE_SIZE}, do_resize=True, do_center_crop=False,
        crop_size={"height": C.IMAGE_SIZE, "width": C.IMAGE_SIZE}, do_convert_rgb=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def pixels(images) -> torch.Tensor:
    """What the saved ``CLIPImageProcessor`` gives for 96 px RGB images (rescale, normalise; the
    resize to the same size is the identity), without its per-image overhead."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    a = (a - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


# ------------------------------------------------------------------------------- eval

@torch.no_grad()
def embed_images(model, images, batch_size=100) -> torch.Tensor:
    out = [model.get_image_features(pixel_values=pixels(images[i: i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat([_tensor(o) for o in out]), dim=-1)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size=250) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i: i + batch_size]), padding=True, return_tensors="pt")
        out.append(_tensor(model.get_text_features(input_ids=enc["input_ids"],
                                                   attention_mask=enc["attention_mask"])))
    return F.normalize(torch.cat(out), dim=-1)


def _tensor(x):
    """``get_*_features`` return a tensor (transformers <5) or an output whose pooler_output is it."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def scores(image_emb, text_emb, class_emb, labels, captions) -> dict:
    """Zero-shot accuracy (and its colour / shape marginals) and retrieval recall@1 both ways.
    Retrieval counts a hit when the retrieved caption equals the image's own caption text (two
    images with identical full captions are interchangeable)."""
    labels = torch.as_tensor(labels)
    pred = (image_emb @ class_emb.T).argmax(-1)
    classes = C.CLASSES
    colour = sum(classes[p][0] == classes[t][0] for p, t in zip(pred.tolist(), labels.tolist()))
    shape = sum(classes[p][1] == classes[t][1] for p, t in zip(pred.tolist(), labels.tolist()))
    sim = image_emb @ text_emb.T
    i2t = sim.argmax(1).tolist()
    t2i = sim.argmax(0).tolist()
    n = len(captions)
    return {
        "zero_shot": (pred == labels).float().mean().item(),
        "zero_shot_colour": colour / n,
        "zero_shot_shape": shape / n,
        "i2t_r1": sum(captions[j] == captions[i] for i, j in enumerate(i2t)) / n,
        "t2i_r1": sum(captions[i] == captions[j] for j, i in enumerate(t2i)) / n,
    }


def evaluate(model, tokenizer, recs) -> dict:
    was = model.training
    model.eval()
    img = embed_images(model, [r["pil"] for r in recs])
    txt = embed_texts(model, tokenizer, [r["caption"] for r in recs])
    cls = embed_texts(model, tokenizer, C.class_prompts())
    model.train(was)
    return scores(img, txt, cls, [r["label"] for r in recs], [r["caption"] for r in recs])


# ------------------------------------------------------------------------------ train

class Stream:
    """Fresh training scenes: subject scenes 0, 1, 2, ... and benchmark images 0, 1, 2, ... of the
    ``train`` split, the mix and the captions drawn from ``rng``."""

    def __init__(self, seed: int, data_seed: int, benchmark_share: float, start: int = 0):
        self.rng = random.Random(seed)
        self.data_seed, self.share = data_seed, benchmark_share
        self.subject, self.bench = start, start

    def batch(self, n: int):
        images, texts, caps, scenes = [], [], [], []
        for _ in range(n):
            if self.rng.random() < self.share:
                image, items = C.benchmark_scene("train", self.data_seed, self.bench)
                self.bench += 1
            else:
                image, items = C.scene("train", self.data_seed, self.subject)
                self.subject += 1
            text, mentions = C.training_caption(items, self.rng)
            images.append(image)
            texts.append(text)
            caps.append(mentions)
            scenes.append(Counter(C.mention(it) for it in items))
        match = torch.tensor([[C.caption_true(c, s) for c in caps] for s in scenes], dtype=torch.float32)
        return images, texts, match


def contrastive_loss(image_emb, text_emb, logit_scale, match):
    """Symmetric InfoNCE with soft targets: uniform over the captions true of each image (rows) and
    over the images each caption is true of (columns)."""
    logits = logit_scale.exp() * image_emb @ text_emb.T
    li = -(F.log_softmax(logits, 1) * (match / match.sum(1, keepdim=True))).sum(1).mean()
    lt = -(F.log_softmax(logits, 0) * (match / match.sum(0, keepdim=True))).sum(0).mean()
    return (li + lt) / 2


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--benchmark-share", type=float, default=0.25)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="weights, caption sampling and mix")
    ap.add_argument("--data-seed", type=int, default=0, help="generator seed of the train/validation splits")
    ap.add_argument("--val-n", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=0, help="minutes; stop (and evaluate) after")
    add_output_arguments(ap, "model folder to save the best checkpoint in (new or empty)")
    args = ap.parse_args(argv)
    out = claim(args.out, args.overwrite, "*")
    torch.set_num_threads(args.threads)
    print("args:", vars(args), flush=True)

    tokenizer = C.build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, args.vision_hidden, args.vision_layers, args.text_hidden,
                        args.text_layers, seed=args.seed)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    val = C.records("validation", args.val_n, seed=args.data_seed)
    stream = Stream(args.seed, args.data_seed, args.benchmark_share)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    best, start = -1.0, time.time()
    run_loss, data_time = 0.0, 0.0
    model.train()
    for step in range(1, args.steps + 1):
        t0 = time.time()
        images, texts, match = stream.batch(args.batch)
        pv = pixels(images)
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        data_time += time.time() - t0
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        img = F.normalize(_tensor(model.get_image_features(pixel_values=pv)), dim=-1)
        txt = F.normalize(_tensor(model.get_text_features(input_ids=enc["input_ids"],
                                                          attention_mask=enc["attention_mask"])), dim=-1)
        loss = contrastive_loss(img, txt, model.logit_scale, match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        run_loss += loss.item()
        elapsed = time.time() - start
        out_of_time = args.time_limit and elapsed > args.time_limit * 60
        if step % args.log_every == 0:
            print(f"step {step} loss {run_loss / args.log_every:.4f} lr {lr_at(step - 1):.2e} "
                  f"T {1 / model.logit_scale.exp().item():.4f} positives/row {match.sum(1).mean():.2f} "
                  f"data {data_time / step:.2f}s/step elapsed {elapsed / 60:.1f}m", flush=True)
            run_loss = 0.0
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            s = evaluate(model, tokenizer, val)
            msg = " ".join(f"{k} {v:.4f}" for k, v in s.items())
            print(f"eval step {step} (validation n={len(val)}): {msg}", flush=True)
            if s["zero_shot"] > best:
                best = s["zero_shot"]
                save(model, processor, out, f"step {step} validation n={len(val)} {msg} "
                     f"elapsed {elapsed / 60:.1f}m args {vars(args)}")
                print(f"saved {out} (best zero-shot {best:.4f})", flush=True)
        if out_of_time:
            print(f"time limit reached at step {step}", flush=True)
            break
    print(f"done in {(time.time() - start) / 60:.1f} min; best validation zero-shot {best:.4f}", flush=True)


if __name__ == "__main__":
    main()
