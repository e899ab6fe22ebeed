"""The tiny LLaVA trained on the offline benchmark ships inside the package, loads by path with
``from_pretrained``, solves the task unpruned, and is ``vtoken bench``'s default model."""

import os

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from vtoken.bench import default_model_path, run
from vtoken.vqa.data import generate
from vtoken.vqa.evaluate import VQAModel, evaluate

# The shipped model's test accuracy on 1000 records is in eval/results/tiny_llava.md (89.6%); 96
# records are a coarse check that the weights load and read the image: the same questions asked about
# blank grey images (the text-only prior) score far lower (90.6% against 32.3% when written, and
# all 20 text questions right: the model reads the one-patch characters). The thresholds leave room
# for a retrained model: a rerun of the last stage with another seed scored 85.8% on the 1000.
MIN_ACCURACY = 0.82
MIN_GAIN_OVER_BLANK = 0.45
MIN_TEXT_ACCURACY = 0.8


@pytest.fixture(scope="module")
def shipped():
    path = default_model_path()
    assert path is not None, "vtoken/assets/tiny-llava is missing: train it with eval/train_tiny_llava.py"
    return VQAModel.load(path)


def test_the_shipped_model_is_a_stock_llava_saved_as_safetensors(shipped):
    path = default_model_path()
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert type(shipped.model) is LlavaForConditionalGeneration
    assert shipped.model.config.vision_config.model_type == "clip_vision_model"
    assert shipped.model.config.text_config.model_type == "llama"
    assert shipped.image_tokens >= 144


def test_the_shipped_model_answers_from_the_image(shipped):
    records = generate("test", 96, seed=0, image_size=96, patch_size=8)
    blank = [dict(r, pil=Image.new("RGB", (96, 96), (120, 120, 120))) for r in records]
    with torch.no_grad():
        result = evaluate(shipped, records)
        seeing, prior = result.accuracy, evaluate(shipped, blank).accuracy
    assert seeing >= MIN_ACCURACY and seeing - prior >= MIN_GAIN_OVER_BLANK, (seeing, prior)
    assert result.family_accuracy()["text"] >= MIN_TEXT_ACCURACY, result.family_accuracy()


def test_bench_defaults_to_the_shipped_model_and_reports_accuracy(tmp_path):
    rows = run(methods=["random"], budgets=("1", "1/9"), repeats=1, batch=2, limit=8, progress=lambda _: None)
    assert [r.method for r in rows] == ["none", "random"]
    assert all(r.accuracy is not None and r.samples == 8 for r in rows)
    assert rows[1].kept_tokens == 16
