"""Word-level tokenizer for the synthetic VQA benchmark, built locally (no downloads).

A ``transformers.PreTrainedTokenizerFast`` around a ``tokenizers`` WordLevel model whose
vocabulary is every word ``vqa_data`` can emit plus the prompt template's words.  Text
is lowercased and split like ``tokenizers``' Whitespace pre-tokenizer (words and
punctuation runs); ``<s>`` is prepended to every encoded sequence.

Prompt template (``prompt(question)``)::

    USER: <image>
    {question}
    ASSISTANT:

``<image>`` is one special token; expanding it into visual tokens is the model's job.

CLI: ``python eval/vqa_tokenizer.py --out eval/data/tokenizer`` saves it with
``save_pretrained``; reload with ``AutoTokenizer.from_pretrained(path)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from vtoken.vqa.data import vocabulary, words

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4 in this order
PROMPT_TEMPLATE = "USER: " + IMAGE + "\n{question}\nASSISTANT:"


def prompt(question: str) -> str:
    """The benchmark's chat prompt for one question (the answer follows it)."""
    return PROMPT_TEMPLATE.format(question=question)


def _template_words() -> list[str]:
    return words(PROMPT_TEMPLATE.replace(IMAGE, " ").replace("{question}", " "))


def build_tokenizer(save_dir: str | Path | None = None, extra_special_tokens: dict[str, str] | None = None
                    ) -> PreTrainedTokenizerFast:
    """Build the tokenizer; with ``save_dir`` also ``save_pretrained`` it there.

    ``extra_special_tokens`` (name -> token, e.g. ``{"vision_start_token": "<|vision_start|>"}`` for the
    tiny Qwen2-VL) are appended after the vocabulary, so every other id stays what it is without them."""
    vocab_words = sorted(set(vocabulary()) | set(_template_words()))
    extra = dict(extra_special_tokens or {})
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocab_words, *extra.values()])}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        pad_token=PAD, extra_special_tokens={"image_token": IMAGE, **extra},
        clean_up_tokenization_spaces=True)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build and save the VQA tokenizer.")
    parser.add_argument("--out", required=True, help="folder for save_pretrained")
    out = parser.parse_args(argv).out
    tok = build_tokenizer(out)
    print(f"saved tokenizer with {len(tok)} tokens to {out}")


if __name__ == "__main__":
    main()
