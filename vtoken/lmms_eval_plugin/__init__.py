"""lmms-eval model plug-in: ``lmms-eval --model vtoken --model_args pretrained=...,method=fastv,keep=0.25``.

lmms-eval 0.7 finds models outside its own tree in two ways (``lmms_eval/models/__init__.py``), and
this package serves both:

- the Python entry-point group ``lmms_eval.models`` (the documented route): vtoken's ``pyproject.toml``
  declares ``vtoken = "vtoken.lmms_eval_plugin:manifest"``; lmms-eval loads every entry of the group
  when ``lmms_eval.models`` is imported and registers the ``ModelManifest`` it returns;
- the environment variable ``LMMS_EVAL_PLUGINS=vtoken.lmms_eval_plugin`` (deprecated there, but it
  works without reinstalling): ``models/__init__.py`` holds the ``AVAILABLE_MODELS`` it reads.

``register()`` does the same from Python, for a process that imported lmms-eval before vtoken was
installed with the extra (``lmms_eval.evaluator.simple_evaluate(model="vtoken", ...)``).

Modules: ``options`` (``--model_args`` checked before loading), ``prompts`` (chat templates),
``stats`` (visual tokens and FLOPs into the results), ``models/vtoken.py`` (the model),
``vqa_task`` (vtoken's offline VQA benchmark as a local lmms-eval task).
"""

from __future__ import annotations

MODEL_NAME = "vtoken"
CLASS_PATH = "vtoken.lmms_eval_plugin.models.vtoken.VTokenLMM"


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's manifest for the ``vtoken`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Add ``vtoken`` to the running lmms-eval's model registry (idempotent)."""
    from lmms_eval import models

    models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    models.AVAILABLE_SIMPLE_MODELS[MODEL_NAME] = CLASS_PATH
    models.AVAILABLE_MODELS[MODEL_NAME] = CLASS_PATH.rsplit(".", 1)[-1]
