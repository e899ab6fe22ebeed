"""A wrapped model in the pipeline you already use: transformers.pipeline("image-text-to-text") with
standard chat messages, unpruned and pruned, on generated benchmark images.

    python examples/pipeline.py [--n 8]

Runs offline on the tiny LLaVA shipped in the package (its processor carries the chat template the model
was trained with and pads on the left, so batched calls work); any LLaVA with a processor works the same.
"""

import argparse

from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

import vtoken
from vtoken.bench import default_model_path
from vtoken.vqa.data import generate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n", type=int, default=8, help="benchmark questions to ask")
args = parser.parse_args()

path = default_model_path()  # or "llava-hf/llava-1.5-7b-hf"
processor = AutoProcessor.from_pretrained(path)
model = LlavaForConditionalGeneration.from_pretrained(path).eval()
vision = model.config.vision_config
tokens = (vision.image_size // vision.patch_size) ** 2     # 144 visual tokens per image

records = generate("test", args.n, seed=0, image_size=vision.image_size, patch_size=vision.patch_size)
messages = [[{"role": "user", "content": [{"type": "image", "image": r["pil"]},
                                          {"type": "text", "text": r["question"]}]}] for r in records]


def ask(model):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 2, "do_sample": False},
               return_full_text=False, batch_size=len(messages))
    return [o[0]["generated_text"].strip() for o in out]


columns = {"unpruned": ask(model)}
kept = {}
for method in ("fastv", "pool"):
    with vtoken.pruned(model, method, keep=1 / 4):           # the same model object, wrapped in place
        columns[f"{method} 1/4"] = ask(model)
        kept[method] = len(list(vtoken.selection(model)[0].values())[-1])

width = max(len(r["question"]) for r in records)
print(f"{'question':<{width}}  {'truth':<8}" + "".join(f"{name:<11}" for name in columns).rstrip())
for i, record in enumerate(records):
    print(f"{record['question']:<{width}}  {record['answer']:<8}" + "".join(f"{c[i]:<11}" for c in columns.values()).rstrip())
for name, answers in columns.items():
    print(f"{name}: {sum(a == r['answer'] for a, r in zip(answers, records))}/{len(records)} right")
for method, n in kept.items():
    print(f"{method} keep=1/4: {n} of {tokens} visual tokens")
