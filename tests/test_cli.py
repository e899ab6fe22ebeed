"""The command line: every bench argument is checked before any model runs, lists may be space or
comma separated, and a mistake is one line naming the fix (exit status 2, no traceback)."""

import pytest

from vtoken.bench_args import split_list
from vtoken.cli import main


def test_lists_may_be_comma_or_space_separated():
    assert split_list(["1,1/9", "2/9", " 64 ,"]) == ["1", "1/9", "2/9", "64"]
    assert split_list(None) is None
    with pytest.raises(ValueError, match="--methods was given without a value"):
        split_list(["", ","], "--methods")


@pytest.mark.parametrize("argv,message", [
    (["--methods", "fastv,nosuch"], "unknown method 'nosuch'; known methods: "),
    (["--budgets", "1,x"], "budget 'x' is not a number; write fractions of the visual tokens (1/9, 0.25) or counts (64)"),
    (["--budgets", "0"], "budget '0' must be positive"),
    (["--budgets", "-1/9"], "budget '-1/9' must be positive"),  # argparse alone: "expected at least one argument"
    (["--budgets", "1/9", "-.5", "--methods", "fastv"], "budget '-.5' must be positive"),
    (["--trained", "tokenpacker"], "--trained 'tokenpacker': write METHOD=DIR"),
    (["--trained", "tokenpacker=/nonexistent"], "--trained 'tokenpacker=/nonexistent': no such directory"),
    (["--trained", "fastv=."], "--trained fastv: fastv is not a trained method"),
    (["--model", "/nonexistent"], "--model '/nonexistent': no such directory"),
    (["--model", "not a model id!"], "is neither a local directory nor a hub id"),
    (["--model", "."], "the directory holds no config.json"),
    (["--model", "some/hub-id", "--methods", "tokenpacker"], "tokenpacker needs trained weights for this model: "
     "add --trained tokenpacker=DIR"),
    (["--data", "/nonexistent.jsonl"], "--data '/nonexistent.jsonl': no such file"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--limit", str(10**23)], "--limit must be at most 1,000,000"),
    (["--repeats", str(10**20)], "--repeats must be at most 10,000"),
    (["--device", "nosuchdevice"], "--device 'nosuchdevice' is not a device"),
    (["--attn", "flash_attention_2"], "--attn flash_attention_2"),
    (["--configs", "x"], "--configs 'x': write LABEL=DIR"),
    (["--threads", "-1"], "--threads must be at least 1, got -1 (leave it out for torch's default)"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--threads", "100000"], "--threads must be at most"),
    (["--budgets", "1", "1e400"], "budget '1e400': no image has that many visual tokens; write a count up to 1,000,000"),
    (["--budgets", "1e-400"], "budget '1e-400' rounds to 0"),
])
def test_bad_bench_arguments_are_one_line_before_any_model_runs(argv, message, capsys, monkeypatch):
    import vtoken.bench

    def no_model(*args, **kwargs):  # a bad argument must be caught before the benchmark starts
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(vtoken.bench, "run", no_model)
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtoken bench: error: ") and message in err and err.count("\n") == 1


def test_a_hub_id_the_hub_cannot_serve_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """A hub id while the hub is unreachable and the model was never downloaded: one line naming the
    model, the reason and the fixes (transformers retried five times, a line each, for ~20 s). A hub
    id is let through where the hub answers, its config is in the cache, offline mode asks for the
    cache, or a proxy carries the requests (a direct probe says nothing then)."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    import vtoken.bench
    import vtoken.packer_training
    from vtoken.bench_args import hub_unreachable

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probes = []

    def unreachable(address, timeout=None):
        probes.append(address)
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(vtoken.bench, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    monkeypatch.setattr(vtoken.packer_training, "train_projector",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    for argv in (["bench", "--model", "some/hub-id"],
                 ["train-projector", "--model", "some/hub-id", "--data", "generated", "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--model 'some/hub-id' is no local directory and the Hugging Face hub " \
            "cannot download it: https://huggingface.co cannot be reached (Name or service not known); give a local " \
            "model directory" in err and "HF_HUB_OFFLINE=1" in err, err
    assert probes and probes[0][0] == "huggingface.co" and not (tmp_path / "o").exists()
    # An argument mistake is still named first (the probe is the last check).
    assert main(["bench", "--model", "some/hub-id", "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    assert hub_unreachable("some/hub-id") is None  # downloaded before: loading falls back to the cache
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub_unreachable("some/hub-id") is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable("some/hub-id") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: type("Open", (), {"close": lambda self: None})())
    assert hub_unreachable("some/hub-id") is None


def test_bench_paths_are_checked_before_any_model_runs(tmp_path, capsys, monkeypatch):
    import vtoken.bench

    monkeypatch.setattr(vtoken.bench, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    a_file, empty = tmp_path / "a_file", tmp_path / "empty"
    a_file.write_text("")
    empty.mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vtoken_config.json").write_text("{")
    cases = [
        (["--out", str(a_file)], f"--out '{a_file}': not a directory; give a directory (created if missing)"),
        (["--out", str(a_file / "sub")], f"--out '{a_file / 'sub'}': not a directory ('{a_file}' is)"),
        (["--configs", f"x={empty}"], f"--configs x={empty}: the directory holds no vtoken_config.json (write one "
         "with vtoken.save_config(model, DIR))"),
        (["--configs", f"x={tmp_path / 'bad'}"], f"--configs x={tmp_path / 'bad'}: not a usable config: "),
        (["--trained", f"tokenpacker={empty}"], f"--trained tokenpacker={empty}: the directory holds no "
         "packer_config.json"),
    ]
    for argv, message in cases:
        extra = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
        assert main(["bench", *argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vtoken bench: error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists() and a_file.read_text() == ""


def test_good_paths_pass_the_bench_checks(tmp_path):
    from vtoken.bench import shipped_tuned
    from vtoken.bench_args import check_configs, check_out

    check_out(str(tmp_path / "new" / "nested"))  # made when the first row is written
    assert not (tmp_path / "new").exists()  # the probe takes back the folders it made
    check_out(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # and the file it wrote
    check_configs(shipped_tuned(None))  # the shipped tuned configs load


@pytest.mark.parametrize("argv,message", [
    (["--steps", "-1"], "--steps must be at least 1, got -1 (leave it out to train --epochs over the data)"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--epochs", "-1"], "--epochs must be a positive number, got -1.0"),
    (["--epochs", "0"], "--epochs must be a positive number, got 0.0"),
    (["--scale", "7"], "--scale 7: write 2, 3 or 4"),
    (["--scale", "1"], "--scale 1: write 2, 3 or 4"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--threads", "100000"], "--threads must be at most"),
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--save-every", "-1"], "--save-every must be 0 (checkpoint at the end only) or more"),
    (["--init", "nosuch"], "--init 'nosuch': write random, projector or a packer directory"),
    (["--model", "/nonexistent"], "--model '/nonexistent': no such directory"),
    (["--model", "./nonexistent"], "--model './nonexistent': no such directory"),
    (["--data", "/nonexistent.jsonl"], "--data '/nonexistent.jsonl': no such file"),
])
def test_bad_train_projector_arguments_are_one_line_before_the_model_loads(argv, message, tmp_path, capsys,
                                                                          monkeypatch):
    import vtoken.packer_training
    from vtoken.bench import default_model_path

    monkeypatch.setattr(vtoken.packer_training, "train_projector",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    options = {"--model": default_model_path(), "--data": "generated", "--out": str(tmp_path / "out")}
    options.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["train-projector", *[x for pair in options.items() for x in pair]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtoken train-projector: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_train_projector_checks_its_init_directory_and_leaves_no_empty_out(tmp_path, capsys):
    """--init of a directory without packer weights is refused before the model loads; a refusal once
    the model has loaded (--layers past the tower) takes back the --out directory the call made."""
    from vtoken.bench import default_model_path

    (tmp_path / "empty").mkdir()
    base = ["train-projector", "--model", default_model_path(), "--data", "generated", "--n", "2", "--steps", "1",
            "--out", str(tmp_path / "out")]
    assert main([*base, "--init", str(tmp_path / "empty")]) == 2
    assert "holds no packer_config.json (give the --out directory of an earlier" in capsys.readouterr().err
    assert main([*base, "--layers", "99"]) == 2
    assert "layers [99] go past the 4-layer vision tower" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_train_projector_out_must_not_be_a_file(tmp_path, capsys):
    from vtoken.bench import default_model_path

    (tmp_path / "a_file").write_text("")
    argv = ["train-projector", "--model", default_model_path(), "--data", "generated", "--out", str(tmp_path / "a_file")]
    assert main(argv) == 2
    assert f"--out '{tmp_path / 'a_file'}': not a directory" in capsys.readouterr().err


def test_train_projector_refuses_no_steps_before_loading(tmp_path):
    from vtoken.packer_training import train_projector

    for options, message in (({"steps": 0}, "steps must be at least 1"), ({"epochs": -1}, "epochs must be a positive")):
        with pytest.raises(ValueError, match=message):  # raised before "/nonexistent" is loaded
            train_projector("/nonexistent", "generated", out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path, capsys, monkeypatch):
    import vtoken.bench

    monkeypatch.setattr(vtoken.bench, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "a.png", "question": "q", "answer": "a"}\n\n{"image": "a.png", question}\n')
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["bench", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: not valid JSON" in err and err.count("\n") == 1


def test_help_shows_defaults_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom vtoken.cli import main\ntry:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'vtoken --help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "(default: vtoken-bench)" in out.stdout and "(default: 500)" in out.stdout


def test_methods_prints_whole_sentences_without_markup(capsys):
    from dataclasses import dataclass

    from vtoken import registry
    from vtoken.strategies.random import RandomConfig, RandomStrategy

    @dataclass
    class InternalConfig(RandomConfig):
        method = "_internal_for_test_cli"

    class Internal(RandomStrategy):  # registered by a test or a benchmark, as eval/replay_strategy.py is
        name = "_internal_for_test_cli"
        Config = InternalConfig

    registry.register(Internal)
    try:
        assert main(["methods"]) == 0
    finally:
        registry._STRATEGIES.pop(Internal.name)
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and "**" not in out and "_internal_for_test_cli" not in out
    fastv = out.split("\nfastv\n")[1].split("\n\n")[0]
    assert "At LLM layer K, rank the visual tokens" in fastv
    assert " ".join(fastv.split()).count("averaged over heads.") == 1  # the sentence is not cut
    assert "runs on: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision" in fastv
    assert "needs each image to reach the LLM as one patch grid" in out  # a family's refusal, with why
    # ... and, where a family runs it, the models of the family it does not serve (vtoken.methods()'s limits).
    assert "on LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision: not on an LLM that rotates each layer type" in " ".join(
        fastv.split())


def test_methods_name_prints_one_method_with_its_options(capsys):
    assert main(["methods", "fastv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastv\n") and "    layer = 2" in out and "use_cache=False" in out
    assert main(["methods", "nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err


def test_every_public_name_and_submodule_resolves_from_the_lazy_package():
    import vtoken

    for name in vtoken.__all__:
        assert getattr(vtoken, name) is not None, name
    assert vtoken.accounting.flops is vtoken.flops and vtoken.api.wrap is vtoken.wrap
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        vtoken.nosuch


def test_bench_on_a_vision_only_model_says_what_bench_measures(tmp_path, capsys):
    """The shipped tiny CLIP given to vtoken bench: one line saying it is vision-only (not 'save a chat
    template on its processor'), exit status 2, nothing written."""
    from pathlib import Path

    import vtoken

    clip = Path(vtoken.__file__).parent / "assets" / "tiny-clip"
    assert main(["bench", "--model", str(clip), "--limit", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtoken bench: error: ") and err.count("\n") == 1
    assert "is a vision-only clip model: the benchmark asks a vision-language model questions" in err
    assert not (tmp_path / "out").exists()


def test_more_bad_bench_inputs_are_one_line(tmp_path, capsys, monkeypatch):
    """Inputs that reached the benchmark (or a traceback) before: an empty list given, --out where
    nothing can be written (checked at once, not when the first row is saved), a text-only model,
    records whose fields have the wrong type, and corrupt packer weights (any error, in fact)."""
    import json
    import os
    from pathlib import Path

    import vtoken
    import vtoken.bench
    from PIL import Image

    from vtoken.packer import CONFIG_NAME, WEIGHTS_NAME

    monkeypatch.setattr(vtoken.bench, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"image": "ok.png", "question": "q", "answer": ["a"]}) + "\n")
    family = tmp_path / "family.jsonl"
    family.write_text(json.dumps({"image": "ok.png", "question": "q", "answer": "a", "family": 5}) + "\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"image": "ok.png", "question": "caf\u00e9", "answer": "a"}).encode("utf-8").replace(
        b"\\u00e9", "\u00e9".encode("latin-1")) + b"\n")
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["--methods", ""], "--methods was given without a value"),
        (["--budgets", ","], "--budgets was given without a value"),
        (["--model", str(llama)], "holds a 'llama' model; vtoken needs a vision-language model"),
        (["--data", str(records)], "records.jsonl:1: answer must be a string"),
        # (these failed after the first rows: a TypeError in the report, a UnicodeDecodeError naming no file)
        (["--data", str(family)], "family.jsonl:1: family must be a string, got 5"),
        (["--data", str(latin)], "latin.jsonl: not UTF-8 text"),
        (["--device", "meta"], "--device meta: the bench runs on cpu, cuda or mps"),
    ]
    if os.path.isdir("/proc/self"):
        cases.append((["--out", "/proc/vtoken-out"], "--out '/proc/vtoken-out': cannot write there"))
    for argv, message in cases:
        assert main(["bench", *argv, *([] if "--out" in argv else out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vtoken bench: error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists()

    packer = tmp_path / "packer"
    packer.mkdir()
    shipped = Path(vtoken.__file__).parent / "assets" / "tiny-llava-trained" / "tokenpacker-s2" / CONFIG_NAME
    (packer / CONFIG_NAME).write_text(shipped.read_text())
    (packer / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    monkeypatch.undo()
    assert main(["bench", "--methods", "tokenpacker", "--trained", f"tokenpacker={packer}", "--limit", "1", *out]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        f"vtoken bench: error: --trained tokenpacker={packer}: cannot read weights from '{packer / WEIGHTS_NAME}'"), err


def test_an_unexpected_error_is_still_one_line(tmp_path, capsys, monkeypatch):
    import vtoken.bench

    def fails(*args, **kwargs):
        raise RuntimeError("deep inside\n  something broke")

    monkeypatch.setattr(vtoken.bench, "run", fails)
    assert main(["bench", "--limit", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "vtoken bench: error: RuntimeError: deep inside something broke (VTOKEN_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("VTOKEN_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["bench", "--limit", "1", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("out", ["new/..", "new/../..", "a/b/../../x"])
def test_the_out_probe_never_removes_a_folder_that_was_there(tmp_path, monkeypatch, out):
    """--out 'new/..' names the current folder, which exists: the probe made 'new' on the way and
    removed it, then (its path resolved to the current folder) removed the current folder's files.
    Only what the probe made goes; an empty --out is refused."""
    from vtoken.bench_args import check_out

    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    (tmp_path / "work" / "sibling.txt").write_text("mine too")
    monkeypatch.chdir(work)
    check_out(out)
    assert (work / "keep.txt").read_text() == "mine" and (tmp_path / "work" / "sibling.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"] and not (work / "new").exists() and not (work / "a").exists()
    with pytest.raises(ValueError, match="--out is empty; give a directory"):
        check_out("")
    assert (work / "keep.txt").exists()


@pytest.mark.parametrize("argv,message", [
    (["bench", "--limit", "1.5"], "vtoken bench: error: argument --limit: invalid int value: '1.5'; see vtoken bench --help"),
    (["bench", "--dtype", "fp16"], "vtoken bench: error: argument --dtype: invalid choice: 'fp16'"),
    (["bench", "--nosuch"], "vtoken: error: unrecognized arguments: --nosuch; see vtoken --help"),
    (["train-projector", "--steps"], "vtoken train-projector: error: argument --steps: expected one argument"),
    ([], "vtoken: error: the following arguments are required: command; see vtoken --help"),
])
def test_argparse_mistakes_are_one_line_too(argv, message, capsys):
    """A value argparse itself rejects is one line naming where the options are, exit status 2 (it
    printed the whole usage block first)."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_methods_with_an_empty_name_and_lists_named_twice(capsys):
    """`vtoken methods ''` is refused (it printed the whole list, status 0); a method or budget named
    twice in a list is one row (two identical rows before)."""
    from vtoken.bench_args import split_list

    assert main(["methods", ""]) == 2
    assert capsys.readouterr().err == "vtoken methods: error: an empty method name; name a method, or leave it out for the list\n"
    assert split_list(["random,fastv", "random", "fastv"], "--methods") == ["random", "fastv"]


def test_train_projector_refuses_a_model_it_cannot_train_from_its_config_before_loading(tmp_path, capsys,
                                                                                        monkeypatch):
    """A LLaVA-NeXT directory, or a LLaVA keeping its CLS token: refused from config.json in one line,
    before the model loads (train_projector refused them only once the weights were in memory)."""
    import json

    import vtoken.packer_training

    monkeypatch.setattr(vtoken.packer_training, "train_projector",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cases = [({"model_type": "llava_next", "vision_config": {}}, "holds a 'llava_next' model; train-projector "
              "trains TokenPacker for LLaVA-1.5-style models"),
             ({"model_type": "llava", "vision_config": {}, "vision_feature_select_strategy": "full"},
              "keeps the CLS token among its visual tokens (vision_feature_select_strategy='full')")]
    for i, (config, message) in enumerate(cases):
        model = tmp_path / f"model{i}"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(config))
        argv = ["train-projector", "--model", str(model), "--data", "generated", "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vtoken train-projector: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_the_shipped_models_are_found_from_any_directory(tmp_path, capsys, monkeypatch):
    """``--model vtoken/assets/tiny-qwen2-vl`` (as the help writes it) names the model the package
    ships from any working directory; a path that exists from here is taken as it is, and an unknown
    one under vtoken/assets is still refused as no such directory."""
    import os

    import vtoken
    from vtoken.bench_args import shipped_path

    monkeypatch.chdir(tmp_path)
    installed = os.path.join(os.path.dirname(vtoken.__file__), "assets", "tiny-qwen2-vl")
    assert shipped_path("vtoken/assets/tiny-qwen2-vl") == installed
    assert shipped_path("vtoken/assets/tiny-qwen2-vl/") == installed
    assert shipped_path("vtoken/assets/nothing-here") == "vtoken/assets/nothing-here"
    (tmp_path / "vtoken" / "assets" / "tiny-qwen2-vl").mkdir(parents=True)
    assert shipped_path("vtoken/assets/tiny-qwen2-vl") == "vtoken/assets/tiny-qwen2-vl"  # what exists here wins
    os.rmdir(tmp_path / "vtoken" / "assets" / "tiny-qwen2-vl")
    # The model passes its checks (the limit is the argument named), for bench and train-projector alike.
    assert main(["bench", "--model", "vtoken/assets/tiny-qwen2-vl", "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert main(["train-projector", "--model", "vtoken/assets/tiny-llava", "--data", "generated",
                 "--out", str(tmp_path / "o"), "--scale", "5"]) == 2
    assert "--scale 5" in capsys.readouterr().err
    assert main(["bench", "--model", "vtoken/assets/nothing-here"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_the_data_file_is_read_once_by_the_flags_check_and_run_check(tmp_path, monkeypatch):
    """``vtoken bench`` checks --data, then ``bench.run`` checks its data= again: the file (every
    record's image opened) was read twice. The second check now reuses the first's count unless the
    file changed."""
    import vtoken.vqa.data as data
    from vtoken.bench_args import check_data

    source = data.load_jsonl
    reads = []
    monkeypatch.setattr(data, "load_jsonl", lambda path: reads.append(path) or source(path))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    path = tmp_path / "d.jsonl"
    path.write_text('{"image": "a.png", "question": "q?", "answer": "a"}\n')
    check_data(str(path))
    check_data(str(path))
    assert len(reads) == 1
    path.write_text('{"image": "a.png", "question": "q?", "answer": "a"}\n' * 2)  # changed: read again
    check_data(str(path))
    assert len(reads) == 2
    path.write_text("")
    with pytest.raises(ValueError, match="holds no records"):
        check_data(str(path))
