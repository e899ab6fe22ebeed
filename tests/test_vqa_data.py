"""The offline VQA generator and its tokenizer (vtoken.vqa)."""

import hashlib
from pathlib import Path
import json
import statistics
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vtoken.vqa import data as vqa_data
from vtoken.vqa.data import FAMILIES, generate, load_image, load_jsonl, relevant_patches
from vtoken.vqa.tokenizer import build_tokenizer, prompt

N = 100  # 20 per family


@pytest.fixture(scope="module")
def records():
    return generate("test", N, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _image_hashes(recs):
    return {hashlib.sha256(r["pil"].tobytes()).hexdigest() for r in recs}


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    a = generate("validation", 12, seed=3, out_dir=tmp_path / "a")
    b = generate("validation", 12, seed=3, out_dir=tmp_path / "b")
    assert a == b
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 13 and files_a == files_b  # 12 PNGs + JSONL


def test_in_memory_matches_written(tmp_path, records):
    written = generate("test", 10, seed=0, out_dir=tmp_path)
    for mem, disk in zip(records[:10], written):
        assert {k: v for k, v in mem.items() if k != "pil"} == disk
        assert load_image(disk, root=tmp_path).tobytes() == mem["pil"].tobytes()


def test_splits_and_seeds_are_disjoint(records):
    test0 = _image_hashes(records[:30])
    assert not test0 & _image_hashes(generate("train", 30, seed=0))
    assert not test0 & _image_hashes(generate("validation", 30, seed=0))
    assert not test0 & _image_hashes(generate("test", 30, seed=1))


def test_family_balance(records):
    counts = Counter(r["family"] for r in records)
    assert set(counts) == set(FAMILIES)
    assert all(c == N // len(FAMILIES) for c in counts.values())


@pytest.mark.parametrize("family", ["exist", "spatial"])
def test_yes_no_half_half(records, family):
    answers = Counter(r["answer"] for r in records if r["family"] == family)
    assert answers == {"yes": N // 10, "no": N // 10}


def test_exist_boxes(records):
    for r in records:
        if r["family"] == "exist":
            assert (len(r["boxes"]) > 0) == (r["answer"] == "yes"), r


def test_count_answer_is_number_of_boxes(records):
    counts = [r for r in records if r["family"] == "count"]
    assert all(int(r["answer"]) == len(r["boxes"]) for r in counts)
    assert len({r["answer"] for r in counts}) >= 3


def test_spatial_and_single_object_boxes(records):
    for r in records:
        if r["family"] == "spatial":
            assert len(r["boxes"]) == 2
        if r["family"] in ("attribute", "text"):
            assert len(r["boxes"]) == 1


def test_answers_are_single_lowercase_vocabulary_words(records):
    vocab = set(vqa_data.vocabulary())
    for r in records:
        assert r["answer"] == r["answer"].strip().lower() and " " not in r["answer"]
        assert r["answer"] in vocab
        assert set(vqa_data.words(r["question"])) <= vocab, r["question"]


def test_tokenizer_round_trip_has_no_unk(records, tokenizer):
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    for text in {t for r in records for t in (r["question"], r["answer"], prompt(r["question"]))}:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == text.replace("<image>", "").lower().replace(" ", "").replace("\n", "")


def test_relevant_patches_hand_made():
    rec = {"boxes": [[8, 8, 24, 24]]}  # 2x2 patches at rows 1-2, cols 1-2 of a 12x12 grid
    assert relevant_patches(rec, 96, 8) == [13, 14, 25, 26]
    assert relevant_patches({"boxes": [[4, 0, 12, 8]]}, 96, 8) == [0, 1]  # 50% each
    assert relevant_patches({"boxes": [[4, 0, 8, 6]]}, 96, 8) == [0]  # 37.5% > 25%
    assert relevant_patches({"boxes": [[6, 0, 10, 8]]}, 96, 8) == [0]  # 25% each: best one
    assert relevant_patches({"boxes": [[4, 4, 20, 20]]}, 96, 8, min_frac=0.0) == [0, 1, 2, 12, 13, 14, 24, 25, 26]
    assert relevant_patches({"boxes": []}, 96, 8) == []
    scaled = {"boxes": [[4, 4, 12, 12]], "image_size": [48, 48]}  # record is half the model size
    assert relevant_patches(scaled, 96, 8) == [13, 14, 25, 26]
    assert relevant_patches({"boxes": [[0, 8, 8, 16]]}, (64, 32), 8) == [8]  # 8 cols x 4 rows


def test_relevant_objects_cover_few_patches(records):
    n_patches = 12 * 12
    assert all(r["grid"] == [12, 12] for r in records)
    per_family = {f: [len(relevant_patches(r, 96, 8)) for r in records if r["family"] == f]
                  for f in FAMILIES}
    assert all(n in (4, 9) for n in per_family["attribute"])  # one 2x2 or 3x3 block
    assert statistics.mean(per_family["attribute"]) <= 0.06 * n_patches
    assert per_family["text"] == [1] * len(per_family["text"])  # a glyph is one visual token
    assert all(n >= 1 for f in ("attribute", "count", "spatial", "text") for n in per_family[f])


def test_scenes_lie_on_the_patch_grid_without_sharing_a_patch():
    """Every object fills whole patches (2x2 or 3x3, tags 1x1) and no patch holds two objects,
    so a patch's content is unambiguous and the boxes name exactly the evidence tokens."""
    for patch in (8, 16):
        rng = vqa_data._record_rng("train", 0, 3)
        for k in range(40):
            try:
                items, _ = vqa_data.BUILDERS[FAMILIES[k % 5]](rng, 12 * patch, k, patch)
            except vqa_data.LayoutError:  # the caller redraws; nothing to check
                continue
            taken = set()
            for it in items:
                x0, y0, x1, y1 = it["box"]
                assert x0 % patch == y0 % patch == x1 % patch == y1 % patch == 0
                side = (x1 - x0) // patch
                assert side == (y1 - y0) // patch == (1 if it["kind"] == "tag" else (2, 3)[it["size"] == "large"])
                cells = {(r, c) for r in range(y0 // patch, y1 // patch) for c in range(x0 // patch, x1 // patch)}
                assert not cells & taken
                taken |= cells


def test_a_glyph_is_drawn_inside_its_patch():
    rng = vqa_data._record_rng("train", 0, 0)
    tag = {"kind": "tag", "char": "8", "box": [16, 24, 24, 32]}
    image = vqa_data.render(rng, [tag], 96, 8)
    pixels = np.asarray(image).min(axis=2)
    dark = pixels[24:32, 16:24] < 60
    assert dark.sum() == sum(row.count("1") for row in vqa_data.GLYPHS["8"])
    assert (pixels[24:32, 16:24] > 200).sum() == 64 - dark.sum()  # the rest of the patch is the white tag


def test_image_and_patch_size_parameters():
    recs = generate("train", 5, seed=0, image_size=192, patch_size=16)
    assert all(r["pil"].size == (192, 192) and r["grid"] == [12, 12] for r in recs)
    assert all(0 <= p < 144 for r in recs for p in relevant_patches(r, 192, 16))
    with pytest.raises(ValueError):
        generate("test", 1, image_size=100, patch_size=16)
    with pytest.raises(ValueError):
        generate("dev", 1)


def test_load_jsonl_user_data(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 48), "red").save(tmp_path / "imgs" / "a.png")
    absolute = tmp_path / "b.png"
    Image.new("RGB", (32, 32), "blue").save(absolute)
    lines = [
        {"image": "imgs/a.png", "question": "what colour is it?", "answer": "red",
         "boxes": [[0, 0, 16, 16]], "family": "attribute", "id": "x1"},
        {"image": str(absolute), "question": "is it blue?", "answer": "yes"},
    ]
    data = tmp_path / "data" / "my.jsonl"
    data.parent.mkdir()
    for rec in lines:
        rec["image"] = rec["image"] if Path(rec["image"]).is_absolute() else "../" + rec["image"]
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")

    recs = load_jsonl(data)
    assert [r["id"] for r in recs] == ["x1", "my-2"]
    assert recs[0]["family"] == "attribute" and recs[1]["family"] == "all"
    assert recs[1]["boxes"] == [] and recs[0]["image_size"] == [64, 48]
    assert load_image(recs[0]).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(recs[1]).size == (32, 32)
    assert relevant_patches(recs[0], (64, 48), 16) == [0]


def test_load_jsonl_reads_generated_data(tmp_path, records):
    generate("test", 5, seed=0, out_dir=tmp_path)
    loaded = load_jsonl(tmp_path / "test.jsonl")
    for mem, rec in zip(records, loaded):
        assert Path(rec["image"]).is_absolute()
        assert (rec["question"], rec["answer"], rec["boxes"]) == (mem["question"], mem["answer"], mem["boxes"])
        assert load_image(rec).tobytes() == mem["pil"].tobytes()


def test_load_jsonl_missing_image(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "nope.png", "question": "q", "answer": "a"}))
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "d.jsonl")


def test_a_corrupt_image_is_named_with_its_line_even_when_the_record_gives_its_size(tmp_path):
    """A record with image_size skipped the image; its corrupt file failed after the model loaded,
    naming neither file nor line."""
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(json.dumps({"image": name, "question": "q", "answer": "a", "image_size": [8, 8]})
                              for name in ("ok.png", "bad.png")) + "\n")
    with pytest.raises(ValueError, match=r"records.jsonl:2: cannot read the image .*bad.png"):
        load_jsonl(data)


def test_bad_generate_arguments_are_one_line():
    """patch_size=0 and families=[] raised ZeroDivisionError, n=-1 returned [] silently, and
    families='count' was read letter by letter."""
    for kwargs, message in (({"n": -1}, "n must be a whole number >= 0, got -1"),
                            ({"n": 2, "patch_size": 0}, "patch_size must be a whole number >= 1, got 0"),
                            ({"n": 2, "families": []}, "families must be a non-empty list of family names"),
                            ({"n": 2, "families": "count"}, "families must be a non-empty list of family names")):
        with pytest.raises(ValueError, match=message):
            generate("test", **kwargs)
