"""The accuracy harness and the oracle on a random-weight LLaVA saved with the benchmark's tokenizer."""

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vtoken
from vtoken.bench import run
from vtoken.vqa.data import generate
from vtoken.vqa.evaluate import VQAModel, evaluate
from vtoken.vqa.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vqa-model")
    tokenizer = build_tokenizer(path)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=96, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=144,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96}).save_pretrained(path)
    return str(path)


def test_oracle_keeps_every_relevant_patch_when_the_budget_allows(vqa_dir):
    vqa = VQAModel.load(vqa_dir)
    records = [r for r in generate("test", 30, image_size=96, patch_size=8) if r["boxes"]]
    with vtoken.pruned(vqa.model, "oracle", keep_tokens=48):
        result = evaluate(vqa, records, batch_size=8)
    assert max(len(vqa.relevant(r)) for r in records) <= 48
    assert result.recall == 1.0 and result.kept == [48] * len(records)


def test_random_recall_is_near_the_budget_and_keep_all_accuracy_is_unchanged(vqa_dir):
    vqa = VQAModel.load(vqa_dir)
    records = generate("test", 40, image_size=96, patch_size=8)
    unpruned = evaluate(vqa, records)
    with vtoken.pruned(vqa.model, "random", keep=1.0):
        same = evaluate(vqa, records)
    assert same.correct == unpruned.correct and same.recall == 1.0
    with vtoken.pruned(vqa.model, "random", keep=1 / 3):
        third = evaluate(vqa, records)
    assert 0.2 < third.recall < 0.47  # 1/3 of the patches, so about 1/3 of the relevant ones
    assert sum(unpruned.total.values()) == 40


def test_bench_reports_accuracy_rows(vqa_dir):
    rows = run(methods=["random", "oracle"], budgets=["1", "1/9"], model_path=vqa_dir, repeats=1, batch=2, limit=20,
               progress=lambda _: None)
    assert [(r.method, r.budget) for r in rows] == [("none", "1"), ("random", "1/9"), ("oracle", "1/9")]
    assert rows[2].recall > rows[1].recall and rows[2].kept_tokens == 16
    assert all(r.accuracy is not None and set(r.families) for r in rows)


def test_oracle_gap_summary_measures_the_benchmark_itself():
    """The gap between oracle and random per budget (where methods land between them is ranked at equal
    cost: tests/test_bench_report.py)."""
    from vtoken.bench import BenchRow, oracle_gap_summary

    def row(method, budget, accuracy):
        return BenchRow(method, budget, "projector", 16, 144, 1.0, 1.0, 8, 0.0, 0.0, accuracy=accuracy)

    rows = [row("none", "1", 0.9), row("oracle", "1/9", 0.8), row("random", "1/9", 0.5),
            row("fastv", "1/9", 0.6), row("pool", "1/9", 0.4), row("oracle", "1/3", 0.85), row("random", "1/3", 0.8)]
    text = oracle_gap_summary(rows)
    assert "budget 1/9: oracle 80.0, random 50.0: gap +30.0 points (meets" in text
    assert "budget 1/3: oracle 85.0, random 80.0: gap +5.0 points (misses" in text
    assert oracle_gap_summary(rows[:1]) == ""
