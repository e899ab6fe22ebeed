"""The tiny LLaVA's training script (``eval/train_tiny_llava.py``): packed questions compute what
single prompts compute, background dropout never hides evidence, extra questions are true."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

T = pytest.importorskip("train_tiny_llava")


@pytest.fixture(scope="module")
def setup():
    tokenizer = T.build_tokenizer()
    processor = T.build_processor(tokenizer)
    model = T.build_model(tokenizer, vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=2,
                          text_heads=2).eval()
    packer = T.Packer(tokenizer, processor.image_processor)
    stream = T.Stream(questions=4, rng_seed=0)
    scenes = [stream.next() for _ in range(3)]
    return model, processor, packer, scenes


def test_each_packed_question_gets_the_logits_of_its_own_single_prompt(setup):
    model, processor, packer, scenes = setup
    images, qas, _ = zip(*scenes)
    assert all(len(qa) >= 2 for qa in qas)  # several questions share one image prefix
    with torch.no_grad():
        packed = T.packed_logits(model, packer.batch(list(images), list(qas)))
        i = 0
        for image, qa in zip(images, qas):
            for question, answer in qa:
                text = T.prompt(question)
                inputs = processor(images=image, text=text, return_tensors="pt")
                logits = model(**inputs).logits[0, -1]
                assert torch.allclose(packed[i], logits, atol=1e-4), question
                i += 2  # the answer target, then the end-of-sequence target after it


def test_background_dropout_hides_background_only(setup):
    _, _, packer, scenes = setup
    images, qas, items = zip(*scenes)
    batch = packer.batch(list(images), list(qas))
    before = batch["mask"].clone()
    offset = len(packer.prefix) - T.N_PATCHES
    labels = torch.stack([T.patch_labels(scene) for scene in items])
    T.drop_background(batch, labels, offset, rate=1.0, rng=random.Random(0))
    hidden_any = False
    for b, scene in enumerate(items):
        labels = T.patch_labels(scene)
        evidence = (labels[0] > 0) | (labels[2] > 0)  # shape or tag patches
        row = batch["mask"][b, 0, batch["cols"][0]]  # what the first answer position sees
        seen = row[offset: offset + T.N_PATCHES]
        assert seen[evidence].all()
        hidden_any |= bool((~seen[~evidence]).any())
        assert torch.equal(batch["mask"][b, 0, :, :offset], before[b, 0, :, :offset])  # prompt untouched
        assert batch["mask"][b, 0].diagonal().all()  # every row attends somewhere (no NaN)
    assert hidden_any


def test_extra_questions_are_true_of_the_scene(setup):
    *_, scenes = setup
    for _, _, items in scenes:
        shapes = [it for it in items if it["kind"] == "shape"]
        extra = T.extra_questions(items, random.Random(0))
        for question, answer in extra["count"]:
            words = question.split()  # how many [colour] <plural shape | objects> are there?
            colour, noun = (words[2], words[3]) if words[2] in T.D.COLOURS else (None, words[2])
            matches = [o for o in shapes if colour in (None, o["colour"])
                       and noun in ("objects", T.D.PLURALS[o["shape"]])]
            assert int(answer) == len(matches), question
        for question, answer in extra["exist"]:
            colour, shape = question.split()[3:5]
            present = any(o["colour"] == colour and o["shape"] == shape for o in shapes)
            assert answer == ("yes" if present else "no"), question


def test_a_two_step_run_with_every_stage4_option_saves_a_loadable_model(tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "model"
    T.main(["--steps", "2", "--warmup", "1", "--batch-size", "2", "--questions", "3", "--val-n", "5",
            "--eval-every", "2", "--log-every", "1", "--vision-hidden", "32", "--vision-layers", "2",
            "--text-hidden", "32", "--text-layers", "1", "--aux-projected-weight", "1", "--aux-warmup", "1",
            "--background-dropout", "1", "--family-weights", "text=4", "spatial=4", "--out", str(out)])
    log = capsys.readouterr().out
    assert "aux-proj-char-acc" in log and "[val] step 2" in log
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.hidden_size == 32
    assert (out / "training_state.txt").read_text().startswith("step 2 val ")  # the first evaluation is saved


def test_family_weights_must_name_a_family(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(["--steps", "1", "--val-n", "1", "--text-hidden", "32", "--family-weights", "colour=2",
                "--out", str(tmp_path / "model")])
    assert "--family-weights takes FAMILY=WEIGHT" in capsys.readouterr().err


def test_the_question_stream_does_not_depend_on_the_string_hash_seed():
    code = ("import sys; sys.path.insert(0, 'eval'); import train_tiny_llava as T; s = T.Stream(questions=12); "
            "print([qa for _ in range(6) for qa in s.next()[1]])")
    root = Path(__file__).resolve().parents[1]
    streams = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2", "3")}
    assert len(streams) == 1
    assert streams.pop().count("?") >= 6 * 2  # six images with their benchmark question and extra ones
