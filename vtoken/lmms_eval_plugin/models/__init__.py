"""The layout lmms-eval's older plug-in route expects: ``LMMS_EVAL_PLUGINS=vtoken.lmms_eval_plugin``
imports ``vtoken.lmms_eval_plugin.models`` and registers each ``AVAILABLE_MODELS`` entry as
``vtoken.lmms_eval_plugin.models.<name>.<class>`` (hence the module ``models/vtoken.py``). Nothing is
imported here, so listing the models does not load torch or lmms-eval."""

AVAILABLE_MODELS = {"vtoken": "VTokenLMM"}
