"""A wrapped model in ``transformers.pipeline("image-text-to-text")``, on the tiny LLaVA shipped in the
package, with standard chat messages: the shipped processor's chat template renders the prompt the model
was trained on (``vtoken.vqa.tokenizer.prompt``) and its tokenizer pads on the left, so a batched pipeline
answers what ``vtoken.vqa.evaluate`` answers for the same records and method (the same model under the
same method gives the same greedy answer through both routes), at batch size 8 and at batch size 1."""

import pytest
import torch
from transformers import AutoProcessor, pipeline

import vtoken
from vtoken.bench import default_model_path
from vtoken.vqa.data import generate
from vtoken.vqa.evaluate import VQAModel, annotations_for, evaluate
from vtoken.vqa.tokenizer import prompt

N = 8
# Measured when written: the unpruned model answers 7 of these 8 test records right (it says "yes" to
# an "is there ...?" whose answer is "no"); pool at 1/4 changes 3 of the 8 answers, FastV at 1/4 none.
MIN_CORRECT_UNPRUNED = 6
GENERATE = {"max_new_tokens": 2, "do_sample": False}  # the answer word and </s>, as VQAModel.answer


@pytest.fixture(scope="module")
def vqa():
    path = default_model_path()
    assert path is not None, "vtoken/assets/tiny-llava is missing"
    return VQAModel.load(path)


@pytest.fixture(scope="module")
def processor():
    # loaded on its own from the shipped files (VQAModel.load sets left padding itself; a pipeline does not)
    return AutoProcessor.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def records():
    return generate("test", N, seed=0, image_size=96, patch_size=8)


def chat(record):
    return [{"role": "user", "content": [{"type": "image", "image": record["pil"]},
                                         {"type": "text", "text": record["question"]}]}]


def ask(model, processor, records, batch_size):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(text=[chat(r) for r in records], generate_kwargs=GENERATE, return_full_text=False,
               batch_size=batch_size)
    return [o[0]["generated_text"].strip() for o in out]


def evaluate_route(vqa, records):
    """The greedy answers ``vtoken.vqa.evaluate`` scores (its encode -> answer calls, annotated as it does)."""
    with annotations_for(vqa, records):
        return vqa.answer(vqa.encode(records))


def test_the_shipped_processor_renders_the_trained_prompt_and_pads_left(vqa, processor, records):
    assert processor.tokenizer.padding_side == "left"
    for record in records:
        text = processor.apply_chat_template(chat(record), add_generation_prompt=True)
        assert text == prompt(record["question"]) == "USER: <image>\n" + record["question"] + "\nASSISTANT:"
    batch = processor.apply_chat_template([chat(r) for r in records], add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
    expected = vqa.encode(records)  # <s>, the prompt with <image> expanded to 144 tokens, left-padded
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(batch[key], expected[key]), key


def test_the_unpruned_pipeline_answers_like_evaluate(vqa, processor, records):
    assert not vtoken.is_wrapped(vqa.model)
    expected = evaluate_route(vqa, records)
    for batch_size in (N, 1):
        answers = ask(vqa.model, processor, records, batch_size)
        assert answers == expected, batch_size
    assert all(answers)
    correct = sum(a == r["answer"] for a, r in zip(answers, records))
    assert correct >= MIN_CORRECT_UNPRUNED, (answers, [r["answer"] for r in records])
    assert correct == sum(evaluate(vqa, records).correct.values())


def test_a_wrapped_model_keeping_every_token_answers_like_the_plain_model(vqa, processor, records):
    plain = ask(vqa.model, processor, records, N)
    with vtoken.pruned(vqa.model, "fastv", keep=1.0) as wrapped:
        assert ask(wrapped, processor, records, N) == plain


@pytest.mark.parametrize("method", ["fastv", "pool"])
def test_a_wrapped_pipeline_answers_what_evaluate_predicts_for_the_method(vqa, processor, records, method):
    plain = ask(vqa.model, processor, records, N)
    wrapped = vtoken.wrap(vqa.model, method, keep=1 / 4)
    try:
        expected = evaluate_route(vqa, records)
        for batch_size in (N, 1):
            answers = ask(wrapped, processor, records, batch_size)
            assert answers == expected, (method, batch_size)
            kept = [len(list(s.values())[-1]) for s in vtoken.selection(wrapped)]
            assert kept == [36] * (1 if batch_size == 1 else N)  # a quarter of 144: the pipeline ran pruned
        assert all(answers)
        assert sum(a == r["answer"] for a, r in zip(answers, records)) == sum(evaluate(vqa, records).correct.values())
    finally:
        vtoken.unwrap(vqa.model)
    assert ask(vqa.model, processor, records, N) == plain  # unwrapped, the pipeline is the plain model's again
