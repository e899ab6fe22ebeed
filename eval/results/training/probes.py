"""Diagnostics of a tiny LLaVA checkpoint quoted in ``eval/train_tiny_llava.py``'s docstring.

    python eval/results/training/probes.py MODEL_DIR

1. Tag tokens as the LLM receives them (projected visual tokens of printed-character patches):
   mean cosine between tags, and how well a least-squares linear probe reads the character.
2. Text questions about a lone tag on an empty image (and with two shapes, and two tags); with
   two shapes, the right answers per printed character.
3. Counting under the oracle and random selections at 16 of 144 tokens: (truth, answer) counts.

Validation split only; seeds fixed, so the output is the same on every run.
"""

import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # eval/

import train_tiny_llava as T  # noqa: E402
import vtoken  # noqa: E402
from vtoken.vqa.data import GLYPHS, generate  # noqa: E402
from vtoken.vqa.evaluate import VQAModel  # noqa: E402


def tag_tokens(model, processor) -> None:
    features, chars, idx = [], [], 0
    while len(features) < 3000:
        image, items = T.simple_scene("validation", 0, idx, 3, (2, 3))
        idx += 1
        with torch.no_grad():
            pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            projected = T.vision_features(model, pixels)[0]
        labels = T.patch_labels(items)[2]
        for p in (labels > 0).nonzero().flatten().tolist():
            features.append(projected[p])
            chars.append(int(labels[p]) - 1)
    x, y = torch.stack(features), torch.tensor(chars)
    unit = torch.nn.functional.normalize(x[:500], dim=-1)
    print(f"tag tokens: mean cosine between tags {(unit @ unit.T).mean():.3f}")
    xa = torch.cat([x, torch.ones(len(x), 1)], 1)
    onehot = torch.nn.functional.one_hot(y, len(GLYPHS)).float()
    w = torch.linalg.lstsq(xa[:2000], onehot[:2000]).solution
    print(f"tag tokens: linear probe reads the character at {((xa[2000:] @ w).argmax(-1) == y[2000:]).float().mean():.3f}")


def lone_tags(model, tokenizer, processor) -> None:
    packer = T.Packer(tokenizer, processor.image_processor)
    rng = random.Random(0)
    for shapes, tags in ((0, (1, 1)), (2, (1, 1)), (0, (2, 2))):
        records, i = [], 0
        while len(records) < 100:
            image, items = T.simple_scene("validation", 0, 2 * 10**6 + i, shapes, tags)
            i += 1
            for question, answer in T.extra_questions(items, rng).get("text", []):
                records.append({"pil": image, "question": question, "answer": answer, "family": "text"})
        # Grouped by the printed character (val_accuracy reports per "family"), in the same pass.
        accuracy, per_char = T.val_accuracy(model, packer, [dict(r, family=r["answer"]) for r in records])
        print(f"text questions, {shapes} shapes and {tags[0]} tag(s): {accuracy:.2f}")
        if shapes == 2:  # right answers per character: a run learns the digits before the letters
            n = Counter(r["answer"] for r in records)
            print("  right per character: " + " ".join(f"{c}:{round(a * n[c])}/{n[c]}" for c, a in per_char.items()))


def counting_under_pruning(path: str) -> None:
    vqa = VQAModel.load(path)
    records = [r for r in generate("validation", 500, seed=0) if r["family"] == "count"][:96]
    for method in ("oracle", "random"):
        pairs = Counter()
        with vtoken.pruned(vqa.model, method, keep_tokens=16):
            for s in range(0, len(records), 32):
                chunk = records[s: s + 32]
                with vtoken.annotate(vqa.model, relevant=[vqa.relevant(r) for r in chunk]):
                    answers = vqa.answer(vqa.encode(chunk))
                for r, answer in zip(chunk, answers):
                    pairs[(r["answer"], answer)] += 1
        right = sum(n for (truth, answer), n in pairs.items() if truth == answer)
        print(f"count at 16/144 tokens, {method}: {right}/{len(records)} right; (truth, answer): {sorted(pairs.items())}")


def main(path: str) -> None:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = T.build_tokenizer()
    processor = T.build_processor(tokenizer)
    tag_tokens(model, processor)
    lone_tags(model, tokenizer, processor)
    counting_under_pruning(path)


if __name__ == "__main__":
    main(sys.argv[1])
