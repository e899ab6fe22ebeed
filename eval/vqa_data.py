"""CLI and import shim: the generator lives in ``vtoken.vqa.data`` (installed with vtoken, used by
``vtoken bench``); this file keeps ``python eval/vqa_data.py ...`` and ``import vqa_data`` working."""

from vtoken.vqa import data as _module

globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})

if __name__ == "__main__":
    _module._main()
