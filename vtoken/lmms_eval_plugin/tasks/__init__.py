"""Task folder of the plug-in, for lmms-eval's ``LMMS_EVAL_PLUGINS`` route: its CLI adds
``<plugin>.tasks`` to ``--include_path`` and fails when the package has none. vtoken ships no task
YAML here: ``vtoken.lmms_eval_plugin.vqa_task`` writes the offline VQA task where you ask, and the
real benchmarks (GQA, MME, POPE, TextVQA) are lmms-eval's own."""
