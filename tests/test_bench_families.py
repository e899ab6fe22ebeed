"""``vtoken bench --model`` on a family other than LLaVA-1.5 and Qwen2-VL: a tiny LLaVA-NeXT saved with
a processor that carries a chat template answers the benchmark (accuracy, kept tokens, FLOPs), with
no relevant-patch recall (AnyRes tokens do not map onto the generated image's cells) and no oracle."""

import pytest
import torch

from vtoken.bench import default_model_path, run

PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from transformers import (AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor)

    shipped = AutoProcessor.from_pretrained(default_model_path())
    tokenizer = shipped.tokenizer
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=48, patch_size=8, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48},
                                              image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=shipped.chat_template)
    path = tmp_path_factory.mktemp("tiny-next")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_a_llava_next_directory_is_benchmarked(next_dir):
    rows = run(methods=["random", "fastv"], budgets=["1", "1/4"], model_path=next_dir, repeats=1, batch=2, limit=6,
               progress=lambda _: None)
    base, random, fastv = rows
    # a 48 px generated image on 48 px crops: the base view and one crop of 6 x 6 patches, unpadded, with
    # one newline token per row of the crop: 36 + 36 + 6 = 78 visual tokens
    assert base.visual_tokens == 78
    assert random.kept_tokens == round(78 / 4) and random.site == "projector"
    assert fastv.prunes_in_llm and 20 < fastv.kept_tokens < 78
    assert all(r.accuracy is not None and r.samples == 6 and r.recall is None for r in rows)
    assert base.tflops > random.tflops and base.tflops_llava_7b > random.tflops_llava_7b


def test_the_oracle_needs_tokens_that_map_onto_the_image(next_dir):
    with pytest.raises(ValueError, match="oracle reads the benchmark's boxes"):
        run(methods=["oracle"], budgets=["1/4"], model_path=next_dir, repeats=1, batch=1, limit=2,
            progress=lambda _: None)


def test_a_family_without_an_adapter_is_one_line_naming_the_supported_ones(tmp_path, capsys):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    from vtoken.cli import main

    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2),
        text_config=GemmaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        image_token_index=299, projection_dim=32,
    )
    PaliGemmaForConditionalGeneration(config).save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["bench", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no vtoken adapter handles PaliGemmaForConditionalGeneration" in err
    assert "supported families: " in err and "LlavaForConditionalGeneration" in err
