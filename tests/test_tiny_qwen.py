"""The tiny Qwen2-VL trained on the offline benchmark (``eval/train_tiny_qwen.py``) ships inside the
package with its processor, loads offline with ``from_pretrained`` / ``AutoProcessor``, generates,
wraps, and runs through ``vtoken bench --model``."""

import os

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

import vtoken
from vtoken.bench import run
from vtoken.vqa.data import generate
from vtoken.vqa.evaluate import QwenVQAModel, VQAModel, evaluate

PATH = os.path.join(os.path.dirname(vtoken.__file__), "assets", "tiny-qwen2-vl")
# Full numbers (1000 test records) are in eval/results/tiny_qwen.md; 64 records are a coarse check that
# the weights load and read the image: 85.9% when written, 32.8% on blank grey images (the text-only
# prior), every text question right. The thresholds leave room for a retrained model.
MIN_ACCURACY = 0.78
MIN_GAIN_OVER_BLANK = 0.4
MIN_TEXT_ACCURACY = 0.8


@pytest.fixture(scope="module")
def shipped():
    assert os.path.isfile(os.path.join(PATH, "model.safetensors")), \
        "vtoken/assets/tiny-qwen2-vl is missing: train it with eval/train_tiny_qwen.py"
    return VQAModel.load(PATH)


@pytest.fixture(scope="module")
def records():
    return generate("test", 64, seed=0, image_size=96, patch_size=8)


def test_loads_offline_as_a_stock_qwen2_vl_with_its_processor():
    model = Qwen2VLForConditionalGeneration.from_pretrained(PATH, local_files_only=True)
    processor = AutoProcessor.from_pretrained(PATH, local_files_only=True)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert model.config.vision_config.spatial_merge_size == 2
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is the red object?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <|vision_start|><image><|vision_end|>\nwhat shape is the red object?\nASSISTANT:"
    inputs = processor(images=[Image.new("RGB", (96, 96))], text=[text], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 24, 24]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144
    assert inputs["mm_token_type_ids"].sum() == 144


def test_generates_answers_from_the_image(shipped, records):
    assert isinstance(shipped, QwenVQAModel) and shipped.tokenizer.padding_side == "left"
    blank = [dict(r, pil=Image.new("RGB", (96, 96), (120, 120, 120))) for r in records]
    result = evaluate(shipped, records)
    prior = evaluate(shipped, blank).accuracy
    assert result.accuracy >= MIN_ACCURACY and result.accuracy - prior >= MIN_GAIN_OVER_BLANK, (result.accuracy, prior)
    assert result.family_accuracy()["text"] >= MIN_TEXT_ACCURACY, result.family_accuracy()


@pytest.mark.parametrize("method", ["fastv", "pool", "random"])
def test_wraps_and_unwraps(shipped, records, method):
    model = shipped.model
    inputs = shipped.encode(records[:3])
    with torch.no_grad():
        before = model(**inputs).logits
        with vtoken.pruned(model, method, keep=1 / 9):
            answers = shipped.answer(inputs)
            kept = [list(s.values())[-1] for s in vtoken.selection(model)]
        after = model(**inputs).logits
    assert len(answers) == 3 and all(len(k) == 16 for k in kept)
    assert torch.equal(before, after)


def test_bench_runs_the_model_with_the_oracle():
    rows = run(methods=["random", "oracle"], budgets=("1", "1/9"), model_path=PATH, repeats=1, batch=2, limit=8,
               progress=lambda _: None)
    assert [r.method for r in rows] == ["none", "random", "oracle"]
    assert all(r.accuracy is not None and r.samples == 8 for r in rows)
    assert rows[1].kept_tokens == 16 and rows[0].visual_tokens == 144
    assert rows[2].recall > 0.9  # the oracle keeps the relevant merged tokens


def test_training_script_saves_a_loadable_model(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    import train_tiny_qwen

    train_tiny_qwen.main(["--steps", "2", "--distill-only-steps", "1", "--batch-size", "2", "--questions", "2",
                          "--val-n", "4", "--eval-every", "1", "--log-every", "1", "--out", str(tmp_path)])
    vqa = VQAModel.load(str(tmp_path))
    assert isinstance(vqa, QwenVQAModel) and vqa.image_tokens == 144
    assert len(vqa.answer(vqa.encode(generate("test", 2, seed=0, image_size=96, patch_size=8)))) == 2


def test_bench_refuses_trained_weights_the_model_cannot_run_before_measuring_anything():
    """TokenPacker weights (trained for the tiny LLaVA) on the tiny Qwen2-VL: one line naming the
    --trained argument and the family's gap (one grid per image), before any row is measured (it came
    after the sweep's other methods, and named the towers' depths instead of the family)."""
    weights = os.path.join(os.path.dirname(PATH), "tiny-llava-trained", "tokenpacker-s2")
    measured = []
    with pytest.raises(ValueError) as error:
        run(methods=["random", "tokenpacker"], budgets=("1/9",), model_path=PATH, repeats=1, batch=2, limit=4,
            trained=[("tokenpacker", weights)], on_row=measured.append)
    message = str(error.value)
    assert message.startswith(f"--trained tokenpacker={weights}: tokenpacker needs each image to reach the LLM as "
                              "one patch grid (signal 'one_grid_per_image'), but this Qwen2-VL model gives")
    assert "\n" not in message and not measured


def test_images_of_another_size_or_shape_get_the_grid_the_benchmark_assumes(shipped, records):
    """Every image is resized to the square the grid, the boxes and the FLOPs assume: a 96 x 64 image
    got 144 - 48 = 96 tokens where the bench counted 144 (and its boxes mapped onto the wrong cells)."""
    record = dict(records[0], pil=records[0]["pil"].resize((96, 64)))
    wide = shipped.encode([record])
    assert wide["image_grid_thw"].tolist() == [[1, 24, 24]]
    assert int((wide["input_ids"] == shipped.model.config.image_token_id).sum()) == 144


def test_a_qwen_directory_without_a_chat_template_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import json
    import shutil

    import transformers

    for name in os.listdir(PATH):
        if name != "chat_template.jinja" and name != "model.safetensors":
            shutil.copy(os.path.join(PATH, name), tmp_path / name)
    for name in ("tokenizer_config.json", "processor_config.json"):
        data = json.loads((tmp_path / name).read_text())
        data.pop("chat_template", None)
        (tmp_path / name).write_text(json.dumps(data))
    monkeypatch.setattr(transformers.Qwen2VLForConditionalGeneration, "from_pretrained",
                        classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model loaded"))))
    with pytest.raises(ValueError, match="the processor has no chat template, so benchmark questions cannot be put"):
        VQAModel.load(str(tmp_path))
