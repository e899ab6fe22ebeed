"""Train a TokenPacker projector for the tiny LLaVA, then wrap the model with it and answer questions.

    python examples/train_tokenpacker.py [--steps 200] [--out tokenpacker-tiny] [--n 50]

Stage 1 of TokenPacker's recipe (only the packer trains; the published architecture, ``init="random"``)
on the offline benchmark's train split, on the CPU: about 0.15 s a step on 2 cores. The same from the command line:

    vtoken train-projector --model vtoken/assets/tiny-llava --data generated --out tokenpacker-tiny --steps 200 --n 1600

A rerun with the same --out resumes from its last checkpoint (delete the folder to start afresh). The
packer shipped for this model (1000 steps, vtoken/assets/tiny-llava-trained/tokenpacker-s2, trained with
vtoken's residual variant ``init="projector"``, which starts from the model's projector) is shown beside
it: a few steps do not make a good packer.
"""

import argparse
import os

import vtoken
from vtoken.bench import default_model_path
from vtoken.vqa.data import generate
from vtoken.vqa.evaluate import VQAModel, evaluate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=200, help="optimizer steps (batch 8)")
parser.add_argument("--out", default="tokenpacker-tiny", help="where the packer's weights go")
parser.add_argument("--n", type=int, default=50, help="test questions to score it on")
args = parser.parse_args()

path = default_model_path()
vtoken.train_projector(path, "generated", out=args.out, scale=2, steps=args.steps, batch_size=8,
                       generated=8 * args.steps, device="cpu", progress=False)
print(f"packer weights saved in {os.path.abspath(args.out)}: {sorted(os.listdir(args.out))}")

vqa = VQAModel.load(path)
image_size, patch_size, _ = vqa.grid                          # 96 px images in 8 px patches
records = generate("test", args.n, seed=0, image_size=image_size, patch_size=patch_size)
question = records[0]
shipped = os.path.join(os.path.dirname(path), "tiny-llava-trained", "tokenpacker-s2")
for name, weights in [("unpruned", None), (f"trained here ({args.steps} steps)", args.out),
                      ("shipped (1000 steps)", shipped)]:
    if weights is not None:
        vtoken.wrap(vqa.model, "tokenpacker", weights=weights)   # scale 2: one token per 2x2 patches
    answer = vqa.answer(vqa.encode([question]))[0]
    tokens = len(list(vtoken.selection(vqa.model)[0].values())[-1]) if weights else vqa.image_tokens
    accuracy = evaluate(vqa, records).accuracy
    print(f"{name}: {tokens} of {vqa.image_tokens} visual tokens, {accuracy:.0%} of {len(records)} test questions "
          f"right; {question['question']!r} -> {answer!r} (truth {question['answer']!r})")
    if weights is not None:
        vtoken.unwrap(vqa.model)
