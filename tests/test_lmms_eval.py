"""The lmms-eval plug-in (``vtoken[lmms]``): registered as ``vtoken``, bad ``--model_args`` refused in one
line before loading, and lmms-eval's own evaluator on vtoken's offline VQA task (written as a local
JSON task) gives the answers and accuracy vtoken's evaluator gives on the same records, in one process
and in two under ``accelerate launch``; the wrapped schedule's FLOPs land in the results. Fully
offline, on the shipped tiny LLaVA and tiny Qwen2-VL. Skipped when lmms-eval is not installed."""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("lmms_eval.models")

import vtoken  # noqa: E402
from vtoken.bench import default_model_path  # noqa: E402
from vtoken.lmms_eval_plugin import CLASS_PATH, manifest, register  # noqa: E402
from vtoken.lmms_eval_plugin.options import ModelArgsError  # noqa: E402
from vtoken.lmms_eval_plugin.stats import image_token_id  # noqa: E402
from vtoken.lmms_eval_plugin.stats import summary as stats_summary  # noqa: E402
from vtoken.lmms_eval_plugin.vqa_task import TASK, normalize, write_task  # noqa: E402
from vtoken.vqa.data import generate  # noqa: E402
from vtoken.vqa.evaluate import VQAModel, evaluate  # noqa: E402

TINY_LLAVA = default_model_path()
TINY_QWEN = os.path.join(os.path.dirname(TINY_LLAVA), "tiny-qwen2-vl")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _entry_point_installed() -> bool:
    return any(ep.name == "vtoken" for ep in importlib.metadata.entry_points(group="lmms_eval.models"))


def _needs_evaluator():
    """lmms-eval 0.7.3's simple_evaluate imports ``filelock._api``, which filelock 4 removed."""
    try:
        import filelock._api  # noqa: F401
    except ImportError:
        pytest.skip("lmms-eval 0.7.3 needs filelock<4 (it imports filelock._api); install vtoken[lmms]")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Offline, with the datasets cache in tmp_path; what importing lmms-eval's task index sets in
    os.environ (TORCHINDUCTOR_CACHE_DIR) is undone after the test."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    yield tmp_path
    if before is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _plugin_env(tmp_path) -> dict:
    """The environment of a fresh lmms-eval process: the entry point when installed, else the
    ``LMMS_EVAL_PLUGINS`` route (which needs no reinstall)."""
    env = {**os.environ, **OFFLINE, "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets")}
    env.pop("LMMS_EVAL_PLUGINS", None)
    if not _entry_point_installed():
        env["LMMS_EVAL_PLUGINS"] = "vtoken.lmms_eval_plugin"
    return env


# ---------------------------------------------------------------------- registration


def test_manifest_registers_the_model_class():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from vtoken.lmms_eval_plugin.models.vtoken import VTokenLMM

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())  # what lmms-eval does with the entry point's payload
    assert registry.get_model_class("vtoken") is VTokenLMM  # also checks lmms subclass and is_simple
    assert registry.resolve("vtoken").class_path == CLASS_PATH


def test_registered_in_a_fresh_lmms_eval_process(tmp_path):
    """``lmms_eval.models.get_model("vtoken")`` in a new process, through the entry point if installed,
    else through ``LMMS_EVAL_PLUGINS=vtoken.lmms_eval_plugin``."""
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from lmms_eval.models import get_model, list_available_models\n"
            "assert 'vtoken' in list_available_models(), list_available_models()\n"
            "cls = get_model('vtoken'); print(cls.__module__ + '.' + cls.__name__)")
    out = _run(code, _plugin_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == CLASS_PATH


def test_entry_point_route(tmp_path):
    """lmms-eval's documented route, in a fresh process: a distribution declaring the entry point
    ``vtoken = "vtoken.lmms_eval_plugin:manifest"`` in group ``lmms_eval.models`` (the line pyproject.toml
    gives vtoken; a stand-in distribution here, so the test does not need a reinstall) makes
    ``--model vtoken`` resolve without LMMS_EVAL_PLUGINS."""
    if _entry_point_installed():
        ep = next(ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "vtoken")
        assert ep.load()().simple_class_path == CLASS_PATH
    else:
        info = tmp_path / "site" / "vtoken_lmms_entry_point-0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vtoken-lmms-entry-point\nVersion: 0\n")
        (info / "entry_points.txt").write_text('[lmms_eval.models]\nvtoken = vtoken.lmms_eval_plugin:manifest\n')
    env = {**_plugin_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    env.pop("LMMS_EVAL_PLUGINS", None)
    out = _run("from lmms_eval.models import get_model; c = get_model('vtoken'); print(c.__module__ + '.' + c.__name__)", env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == CLASS_PATH


# ---------------------------------------------------------------------- --model_args


@pytest.mark.parametrize("args, words", [
    ({"method": "fastvv"}, ["unknown method 'fastvv'", "fastv", "method=none"]),
    ({"method": "fastv", "keep": 2.0}, ["keep", "(0, 1]", "keep_tokens"]),
    ({"method": "fastv", "keep": "a quarter"}, ["keep='a quarter' is not a number", "keep=1/9"]),
    ({"method": "fastv", "keeep": 0.25}, ["unknown argument(s) keeep", "keep_tokens", "pretrained"]),
    ({}, ["method= is missing"]),
    ({"method": "fastv", "batch_size": "auto"}, ["--batch_size auto", "--batch_size 8"]),
    ({"method": "fastv", "dtype": "half"}, ["dtype='half'", "bfloat16"]),
    ({"method": "none", "keep": 0.5}, ["method=none takes no method options"]),
    # (these loaded the model first, or passed: the oracle's every request failed, a missing config
    # was read after loading, int('abc') named no fix, use_cache=no read as True, 2.5 became 2)
    ({"method": "oracle", "keep": 0.25}, ["oracle reads per-input annotations", "lmms-eval does not give"]),
    ({"config": "/nonexistent/config"}, ["config='/nonexistent/config'", "no vtoken config"]),
    ({"method": "fastv", "max_new_tokens": "abc"}, ["max_new_tokens='abc' is not a whole number"]),
    ({"method": "fastv", "max_new_tokens": 0}, ["max_new_tokens=0 must be at least 1"]),
    ({"method": "fastv", "use_cache": "maybe"}, ["use_cache='maybe' is not true or false"]),
    ({"method": "fastv", "batch_size": 2.5}, ["batch_size=2.5 is not a whole number"]),
])
def test_bad_model_args_fail_in_one_line_before_loading(args, words):
    from vtoken.lmms_eval_plugin.models.vtoken import VTokenLMM

    with pytest.raises(ModelArgsError) as err:
        VTokenLMM(pretrained="/nonexistent/checkpoint", **args)  # a load would fail differently
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_model_that_cannot_load_fails_in_one_line_before_loading(tmp_path, monkeypatch):
    """A missing directory, a directory without config.json and a hub id the hub cannot serve (and
    the cache does not hold) are named in one line, before transformers prints five retries."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    from vtoken.lmms_eval_plugin.models.vtoken import VTokenLMM

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError(-2, "no route")))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    cases = {str(tmp_path / "missing"): "no such directory", str(tmp_path): "holds no config.json",
             "some/hub-id": "is no local directory and the Hugging Face hub cannot download it"}
    for pretrained, words in cases.items():
        with pytest.raises(ModelArgsError) as err:
            VTokenLMM(pretrained=pretrained, method="fastv")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"vtoken --model_args: pretrained={pretrained!r}")
        assert words in message, message


def test_keep_fractions_from_the_command_line():
    from vtoken.lmms_eval_plugin.options import parse

    text = {"text_only": "passthrough"}  # the plug-in's default: a text-only question runs unpruned
    assert parse("m", "fastv", None, {"keep": "1/9", "layer": 3}).options == {"keep": 1 / 9, "layer": 3, **text}
    assert parse("m", "tome", None, {"r": "(16, 1)"}).options == {"r": (16, 1), **text}
    assert parse("m", "fastv", None, {"text_only": "error"}).options == {"text_only": "error"}
    assert parse("m", "none", None, {}).method is None
    # stages as the module's docstring writes it, quotes kept (they were refused: a string, not a list)
    stages = [{"site": "llm", "layer": 2, "keep": 0.5}]
    assert parse("m", "fastv", None, {"stages": "'" + json.dumps(stages) + "'"}).options["stages"] == stages


# ---------------------------------------------------------------------- the evaluator


def _records(vqa, n):
    image_size, patch, _ = vqa.grid
    return generate("test", n, seed=0, image_size=image_size, patch_size=patch)


def _answer(sample: dict) -> str:
    """A logged sample's answer as vtoken reads it (``filtered_resps``: a string in the samples file,
    a one-item list in memory)."""
    value = sample["filtered_resps"]
    while isinstance(value, list):
        value = value[0]
    return normalize(value)


def _wrapped(vqa, method, **options):
    """``vqa.model`` wrapped with ``method`` for a block (``None``: left as it is)."""
    return contextlib.nullcontext() if method is None else vtoken.pruned(vqa.model, method, **options)


def _vtoken_answers(vqa, records, method, **options):
    """What vtoken's own evaluator gets on ``records`` with ``method``: accuracy and the answers."""
    with _wrapped(vqa, method, **options):
        accuracy = evaluate(vqa, records, batch_size=len(records)).accuracy
        answers = vqa.answer(vqa.encode(records))
    return accuracy, answers


@pytest.mark.parametrize("path, method", [(TINY_LLAVA, "fastv"), (TINY_QWEN, "pool"), (TINY_LLAVA, None)],
                         ids=["tiny-llava-fastv", "tiny-qwen2-vl-pool", "tiny-llava-unpruned"])
def test_simple_evaluate_matches_vtoken_evaluator(offline, path, method):
    _needs_evaluator()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    register()
    vqa = VQAModel.load(path)
    records = _records(vqa, 6)
    yaml = write_task(offline / "task", records)
    tasks = TaskManager("WARNING", include_path=str(yaml.parent), include_defaults=False)
    budget = "method=none" if method is None else f"method={method},keep=0.25"
    results = simple_evaluate(model="vtoken", model_args=f"pretrained={path},{budget}",
                              tasks=[TASK], task_manager=tasks, batch_size=4, device="cpu", log_samples=True)
    accuracy, answers = _vtoken_answers(vqa, records, method, keep=0.25)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert [_answer(s) for s in samples] == answers
    assert results["results"][TASK]["vqa_accuracy,none"] == pytest.approx(accuracy)

    # the schedule's cost in lmms-eval's results: per request, as vtoken.flops counts that request
    throughput = results["throughput"]
    token = image_token_id(vqa.model)
    with _wrapped(vqa, method, keep=0.25):
        expected, unpruned = [], []
        for record in records:
            ids = vqa.encode([record])["input_ids"][0]
            visual = int((ids == token).sum())
            size = (vqa.grid[0], vqa.grid[0])
            unpruned.append(vtoken.flops(vqa.model.config, text_tokens=len(ids) - visual, image_size=size,
                                         visual_tokens=visual).prefill / 1e12)
            if method is None:
                expected.append(unpruned[-1])
                continue
            schedule = vtoken.schedule_of(vqa.model, visual_tokens=visual)
            expected.append(vtoken.flops(vqa.model, schedule=schedule, text_tokens=len(ids) - visual,
                                         image_size=size).prefill / 1e12)
    assert throughput["avg_vtoken_requests"] == len(records)
    assert throughput["avg_vtoken_text_only_requests"] == 0
    assert throughput["avg_vtoken_visual_tokens"] == visual == 144
    assert throughput["avg_vtoken_visual_tokens_kept"] == (144 if method is None else 36)
    assert throughput["avg_vtoken_prefill_tflops"] == pytest.approx(sum(expected) / len(records), rel=1e-9)
    assert throughput["avg_vtoken_prefill_tflops_unpruned"] == pytest.approx(sum(unpruned) / len(records), rel=1e-6)
    if method is not None:
        assert throughput["avg_vtoken_prefill_tflops"] < throughput["avg_vtoken_prefill_tflops_unpruned"]


def test_loglikelihood_scores_the_continuation(offline):
    """Multiple-choice tasks: the continuation's log-probability from the wrapped model's logits equals a
    forward pass on prompt + answer computed by hand, and the greedy answer is flagged greedy."""
    import torch
    from lmms_eval.api.instance import Instance

    from vtoken.lmms_eval_plugin.models.vtoken import VTokenLMM
    from vtoken.lmms_eval_plugin.vqa_task import doc_to_visual

    vqa = VQAModel.load(TINY_LLAVA)
    records = _records(vqa, 2)
    yaml = write_task(offline / "task", records)
    docs = [json.loads(line) for line in (yaml.parent / f"{TASK}.jsonl").read_text().splitlines()]
    lm = VTokenLMM(pretrained=TINY_LLAVA, method="fastv", keep=0.25, device="cpu")
    lm.task_dict = {TASK: {"test": docs}}
    _, answers = _vtoken_answers(vqa, records, "fastv", keep=0.25)
    requests = [Instance("loglikelihood", (d["question"], " " + choice, doc_to_visual, i, TASK, "test"), idx=0,
                         metadata={"task": TASK, "doc_id": i, "repeats": 1})
                for i, d in enumerate(docs) for choice in (answers[i], "banana")]
    scores = lm.loglikelihood(requests)
    with vtoken.pruned(vqa.model, "fastv", keep=0.25), torch.no_grad():
        for i, record in enumerate(records):
            inputs = vqa.encode([record])
            answer = vqa.tokenizer(answers[i], add_special_tokens=False)["input_ids"]
            ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
            logits = vqa.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"]).logits
            expected = torch.log_softmax(logits[0, -2].float(), -1)[answer[0]]
            assert scores[2 * i][0] == pytest.approx(float(expected), abs=1e-4)
            assert scores[2 * i][1] is True
            assert scores[2 * i + 1][0] < scores[2 * i][0] and scores[2 * i + 1][1] is False


def test_text_only_request_in_a_batch_of_image_requests(offline):
    """A benchmark's question without an image runs unpruned (the plug-in's ``text_only="passthrough"``)
    beside pruned image questions in one batch; it is counted apart from them."""
    import torch
    from lmms_eval.api.instance import Instance

    from vtoken.lmms_eval_plugin.prompts import render

    from vtoken.lmms_eval_plugin.models.vtoken import VTokenLMM
    from vtoken.lmms_eval_plugin.vqa_task import doc_to_visual

    vqa = VQAModel.load(TINY_LLAVA)
    records = _records(vqa, 3)
    yaml = write_task(offline / "task", records)
    docs = [json.loads(line) for line in (yaml.parent / f"{TASK}.jsonl").read_text().splitlines()]
    lm = VTokenLMM(pretrained=TINY_LLAVA, method="fastv", keep=0.25, device="cpu", batch_size=3)
    lm.task_dict = {TASK: {"test": docs}}
    visuals = [doc_to_visual, lambda doc: [], doc_to_visual]
    requests = [Instance("generate_until", (d["question"], {"max_new_tokens": 2, "until": ["\n"]}, visuals[i], i, TASK,
                                            "test"), idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})
                for i, d in enumerate(docs)]
    got = lm.generate_until(requests)
    _, answers = _vtoken_answers(vqa, records, "fastv", keep=0.25)
    assert [normalize(got[0]), normalize(got[2])] == [answers[0], answers[2]]
    plain = lm.processor(text=[render(lm.processor, lm.template, docs[1]["question"], 0)], return_tensors="pt")
    with torch.no_grad():  # the unwrapped model on the same text-only prompt, alone
        out = vqa.model.generate(**plain, max_new_tokens=2, do_sample=False)
    assert got[1] == lm.tokenizer.decode(out[0, plain["input_ids"].shape[1] :], skip_special_tokens=True)
    rows = lm.tally.take()["rows"]
    summary = stats_summary(rows)
    assert summary["vtoken_requests"] == 2 and summary["vtoken_text_only_requests"] == 1
    assert summary["vtoken_visual_tokens_kept"] == 36


def test_two_processes_under_accelerate_launch(tmp_path):
    """The CLI under ``accelerate launch`` with two CPU processes (``--multi_gpu`` on a machine without
    GPUs starts two processes and a gloo group; ``--cpu`` would start one): every record answered once,
    lmms-eval's rank padding not counted, the FLOPs summed over both ranks. About 20-40 s on 2 cores."""
    _needs_evaluator()
    vqa = VQAModel.load(TINY_LLAVA)
    records = _records(vqa, 5)  # odd: lmms-eval pads rank 1 with a copy of a request
    yaml = write_task(tmp_path / "task", records)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "lmms_eval", "--model", "vtoken", "--model_args", f"pretrained={TINY_LLAVA},method=fastv,keep=0.25",
           "--tasks", TASK, "--include_path", str(yaml.parent), "--batch_size", "2", "--device", "cpu",
           "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    env = {**_plugin_env(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(out / "*" / "*_results.json"))[0]).read_text())
    samples_file = Path(glob.glob(str(out / "*" / f"*_samples_{TASK}.jsonl"))[0])
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    accuracy, answers = _vtoken_answers(vqa, records, "fastv", keep=0.25)
    assert sorted(s["doc_id"] for s in samples) == list(range(len(records)))
    assert [_answer(s) for s in sorted(samples, key=lambda s: s["doc_id"])] == answers
    assert results["results"][TASK]["vqa_accuracy,none"] == pytest.approx(accuracy)
    assert results["throughput"]["avg_vtoken_requests"] == len(records)
    assert results["throughput"]["avg_vtoken_visual_tokens_kept"] == 36


def test_a_task_max_new_tokens_of_none_takes_the_plugin_default():
    """gen_kwargs {"max_new_tokens": None} (a task leaving it open) raised int(None)'s TypeError; it
    takes the plug-in's max_new_tokens, as a None temperature or num_beams takes the default."""
    from types import SimpleNamespace

    from vtoken.lmms_eval_plugin.models.vtoken import VTokenLMM

    lm = VTokenLMM.__new__(VTokenLMM)  # (no model: only the generation arguments are read)
    lm.max_new_tokens, lm.use_cache = 7, True
    lm.processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=2))
    kwargs, until = lm._generation_kwargs({"max_new_tokens": None, "until": "\n", "temperature": None})
    assert kwargs["max_new_tokens"] == 7 and until == ["\n"] and kwargs["do_sample"] is False
    assert lm._generation_kwargs({"max_new_tokens": 3})[0]["max_new_tokens"] == 3
