"""The tiny CLIP of the vision-only family: its data (``eval/clip_data.py``) is deterministic and its
splits are disjoint, captions are true of their scenes, the shipped model (``vtoken/assets/tiny-clip``)
loads offline and solves the zero-shot task far above chance, and the eval, training and speed
scripts run."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

C = pytest.importorskip("clip_data")
ASSET = ROOT / "vtoken" / "assets" / "tiny-clip"

# The shipped model's zero-shot accuracy on 500 test scenes is in eval/results/tiny_clip/eval.md
# (85.0%); 100 validation scenes are a coarse check that the weights load and the towers agree (88%,
# retrieval recall@1 98% both ways, when written). The thresholds leave room for a retrained model:
# chance is 1/30, the colour alone (100% right) would give at most 1/5 of the classes.
VAL_N = 100
MIN_ZERO_SHOT = 18 * C.CHANCE  # 60% on 30 classes
MIN_RECALL = 0.6


def _pixels(recs):
    return [np.asarray(r["pil"]) for r in recs]


def test_scenes_are_deterministic_and_independent_of_n():
    a, b = C.records("validation", 4, seed=0), C.records("validation", 2, seed=0)
    again = C.records("validation", 4, seed=0)
    for x, y in zip(a, again):
        assert np.array_equal(np.asarray(x["pil"]), np.asarray(y["pil"]))
        assert (x["caption"], x["label"]) == (y["caption"], y["label"])
    for x, y in zip(a, b):  # the first records do not depend on n
        assert np.array_equal(np.asarray(x["pil"]), np.asarray(y["pil"]))


def test_splits_and_seeds_are_disjoint():
    seen = {}
    for split, seed in (("train", 0), ("validation", 0), ("test", 0), ("test", 1)):
        for rec in C.records(split, 20, seed=seed):
            key = np.asarray(rec["pil"]).tobytes()
            assert key not in seen, f"{rec['id']} repeats {seen[key]}"
            seen[key] = rec["id"]


def test_benchmark_scene_is_the_vqa_benchmark_image():
    from vtoken.vqa.data import generate

    recs = generate("test", 7, seed=0)
    for i, rec in enumerate(recs):
        image, _ = C.benchmark_scene("test", 0, i)
        assert np.array_equal(np.asarray(image), np.asarray(rec["pil"]))


def test_captions_labels_and_prompts_are_true_of_their_scene():
    tok = C.build_tokenizer()
    rng = random.Random(0)
    for rec in C.records("train", 30):
        items, mentions = rec["items"], [C.mention(it) for it in rec["items"]]
        large = [it for it in items if it["kind"] == "shape" and it["size"] == "large"]
        assert len(large) == 1 and C.CLASSES[rec["label"]] == (large[0]["colour"], large[0]["shape"])
        assert C.class_prompt(rec["label"]) in rec["caption"]
        assert C.caption_true([("large", *C.CLASSES[rec["label"]])], mentions)
        text, chosen = C.training_caption(items, rng)
        assert C.caption_true(chosen, mentions) and text == C.caption_of(chosen)
        assert tok.unk_token_id not in tok(text)["input_ids"]
        ids = tok(rec["caption"])["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert len(ids) <= C.MAX_TEXT_LEN
    assert not C.caption_true([("small", "red", "circle")] * 2, [("small", "red", "circle")])
    assert len(set(C.class_prompts())) == len(C.CLASSES) == 30


@pytest.fixture(scope="module")
def shipped():
    from transformers import CLIPModel, CLIPProcessor

    assert (ASSET / "model.safetensors").is_file(), "train it with eval/train_tiny_clip.py"
    model = CLIPModel.from_pretrained(str(ASSET), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(ASSET), local_files_only=True)
    return model, processor


def test_shipped_model_loads_offline_and_is_small(shipped):
    model, processor = shipped
    vision = model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == 144
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id != 2
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 8 * 2 ** 20
    assert processor.tokenizer("a large red circle")["input_ids"] == C.build_tokenizer()("a large red circle")["input_ids"]


def test_shipped_model_zero_shot_is_far_above_chance(shipped):
    import eval_tiny_clip as E

    model, processor = shipped
    recs = C.records("validation", VAL_N, seed=0)
    pixel_values = processor(images=[r["pil"] for r in recs], return_tensors="pt")["pixel_values"]
    image_emb = E.image_embeddings(model, pixel_values)
    class_emb = E.text_embeddings(model, processor.tokenizer, C.class_prompts())
    scores = E.zero_shot(image_emb, class_emb, [r["label"] for r in recs])
    assert scores["zero_shot"] >= MIN_ZERO_SHOT, scores
    text_emb = E.text_embeddings(model, processor.tokenizer, [r["caption"] for r in recs])
    recall = E.retrieval(image_emb, text_emb, [r["caption"] for r in recs])
    assert min(recall.values()) >= MIN_RECALL, recall


def test_eval_script_smoke(tmp_path):
    import eval_tiny_clip as E

    out = tmp_path / "eval"
    result = E.main(["--n", "8", "--benchmark-n", "4", "--methods", "random", "no_such_method",
                     "--budgets", "0.5", "--out", str(out)])
    rows = {(r["method"], r["keep"]): r for r in result["rows"]}
    assert rows[("none", 1.0)]["status"] == "ok"
    assert rows[("no_such_method", 0.5)]["status"] == "skipped"
    assert "not a registered method" in rows[("no_such_method", 0.5)]["reason"]
    assert rows[("random", 0.5)]["status"] in ("ok", "skipped")  # skipped while wrap refuses CLIP
    if rows[("random", 0.5)]["status"] == "skipped":
        assert rows[("random", 0.5)]["reason"]
    assert result["unwrap_restores_embeddings"]
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    md = out.with_suffix(".md").read_text()
    assert "python eval/eval_tiny_clip.py --n 8" in md and "| none | 1 | 144 | - |" in md


def test_training_script_smoke(tmp_path):
    import train_tiny_clip as T

    T.main(["--steps", "2", "--batch", "6", "--val-n", "6", "--eval-every", "2", "--log-every", "1",
            "--vision-hidden", "32", "--vision-layers", "1", "--text-hidden", "32", "--text-layers", "1",
            "--out", str(tmp_path / "m")])
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(tmp_path / "m"))
    processor = CLIPProcessor.from_pretrained(str(tmp_path / "m"))
    recs = C.records("validation", 2)
    pv = processor(images=[r["pil"] for r in recs], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pv, T.pixels([r["pil"] for r in recs]), atol=1e-5)  # training = shipped processor
    assert model.config.vision_config.image_size == 96


def test_contrastive_loss_counts_every_true_caption():
    import train_tiny_clip as T

    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    one_hot = T.contrastive_loss(emb, emb, torch.tensor(0.0), torch.eye(3))
    soft = torch.eye(3)
    soft[0, 1] = soft[1, 0] = 1.0
    assert not torch.isclose(one_hot, T.contrastive_loss(emb, emb, torch.tensor(0.0), soft))


def test_bench_tome_budgets():
    import bench_vit_speed as B

    counts = B.tome_counts(196, 12, 16)
    assert counts[0] == (196, 180) and counts[-1] == (20, 10)  # the last block is clamped to half
    assert B.tome_budgets(196, 12, 16) == {"final": 10, "mean": 100.25}
    from vtoken.schedule import Stage

    tome = [Stage(site="vision", keep_tokens=m, layer=i, inside=True) for i, (_, m) in enumerate(counts)]
    assert B.block_mean(tome) == 100.25  # (sum 196..20 + sum 180..10) / 24
    assert B.block_mean([Stage(site="vision", keep_tokens=52, layer=3, inside=False)]) == (4 * 196 + 8 * 52) / 12
    assert B.parse_options(["random:site=vision,layer=3"]) == {"random": {"site": "vision", "layer": 3}}
