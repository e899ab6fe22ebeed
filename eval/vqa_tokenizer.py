"""CLI and import shim: the tokenizer lives in ``vtoken.vqa.tokenizer`` (installed with vtoken, used
by ``vtoken bench``); this file keeps ``python eval/vqa_tokenizer.py ...`` and ``import vqa_tokenizer``
working."""

from vtoken.vqa import tokenizer as _module

globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})

if __name__ == "__main__":
    _module.main()
