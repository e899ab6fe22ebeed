"""vtoken's offline VQA benchmark as a local lmms-eval task: the plug-in checked end to end without a
download, and the same numbers as ``vtoken.vqa.evaluate``.

    python -m vtoken.lmms_eval_plugin.vqa_task --out /tmp/vtoken_vqa --n 100
    lmms-eval --model vtoken --model_args pretrained=$(python -c 'import vtoken.bench as b; print(b.default_model_path())'),method=fastv,keep=0.25 \\
        --tasks vtoken_vqa --include_path /tmp/vtoken_vqa --batch_size 8 --device cpu

``write_task`` generates records with ``vtoken.vqa.data.generate`` (or takes yours), writes their images
and a JSONL with absolute image paths, and a task YAML that loads it with ``datasets``' ``json``
builder (``dataset_path: json`` + ``dataset_kwargs: data_files:``). The YAML's ``!function`` entries
name this module by its import path, which lmms-eval resolves when no ``.py`` file sits beside the
YAML, so nothing but data is written. The score is vtoken's: the first word of the answer, lowercased,
equal to the record's answer (``VQAModel.answer``), averaged as ``vqa_accuracy``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

TASK = "vtoken_vqa"
_HERE = "vtoken.lmms_eval_plugin.vqa_task"  # not __name__: that is "__main__" under python -m

_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function {here}.doc_to_visual
doc_to_text: !function {here}.doc_to_text
doc_to_target: answer
process_results: !function {here}.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  num_beams: 1
metric_list:
  - metric: vqa_accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


def doc_to_visual(doc: dict) -> list:
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def normalize(answer: str) -> str:
    """vtoken's reading of a generated answer: its first word, lowercased."""
    return (answer.split() or [""])[0].lower()


def process_results(doc: dict, results: list) -> dict:
    return {"vqa_accuracy": float(normalize(results[0]) == doc["answer"].lower())}


def write_task(out_dir: str | Path, records: list[dict] | None = None, *, n: int = 100, split: str = "test",
               seed: int = 0, image_size: int = 96, patch_size: int = 8, name: str = TASK,
               max_new_tokens: int = 2) -> Path:
    """Write ``<out_dir>/<name>.yaml`` and its data; return the YAML's path.

    ``records`` are in-memory records (with ``"pil"``) or JSONL records whose ``image`` is a path;
    without them, ``n`` records of ``split`` are generated at the tiny LLaVA's geometry (96 px, 8 px
    patches). ``max_new_tokens=2`` is what ``vtoken.vqa.evaluate`` generates: its answers are one word."""
    from vtoken.vqa.data import generate, load_image

    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    if records is None:
        records = generate(split, n, seed=seed, image_size=image_size, patch_size=patch_size)
    lines = []
    for i, record in enumerate(records):
        path = out / "images" / f"{i:05d}.png"
        load_image(record).save(path)
        row = {"id": str(record.get("id", i)), "image": str(path), "question": record["question"],
               "answer": record["answer"], "family": record.get("family", "all")}
        lines.append(json.dumps(row) + "\n")
    data = out / f"{name}.jsonl"
    data.write_text("".join(lines), encoding="utf-8")
    yaml = out / f"{name}.yaml"
    yaml.write_text(_YAML.format(name=name, data=json.dumps(str(data)), here=_HERE, max_new_tokens=max_new_tokens),
                    encoding="utf-8")
    return yaml


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write vtoken's offline VQA benchmark as a local lmms-eval task.")
    parser.add_argument("--out", required=True, help="folder for the task YAML, its JSONL and images")
    parser.add_argument("--n", type=int, default=100, help="records to generate")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--name", default=TASK, help="task name for --tasks")
    a = parser.parse_args(argv)
    yaml = write_task(a.out, n=a.n, split=a.split, seed=a.seed, image_size=a.image_size, patch_size=a.patch_size,
                      name=a.name)
    print(f"wrote {yaml}: use --tasks {a.name} --include_path {yaml.parent}")


if __name__ == "__main__":
    main()
