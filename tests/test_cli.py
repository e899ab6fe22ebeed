"""The command line: every bench argument is checked before any model runs, lists may be space or
comma separated, and a mistake is one line naming the fix (exit status 2, no traceback)."""

import pytest

from vtoken.cli import main, split_list


def test_lists_may_be_comma_or_space_separated():
    assert split_list(["1,1/9", "2/9", " 64 ,"]) == ["1", "1/9", "2/9", "64"]
    assert split_list(None) is None


@pytest.mark.parametrize("argv,message", [
    (["--methods", "fastv,nosuch"], "unknown method 'nosuch'; known methods: "),
    (["--budgets", "1,x"], "budget 'x' is not a number; write fractions of the visual tokens (1/9, 0.25) or counts (64)"),
    (["--budgets", "0"], "budget '0' must be positive"),
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
    (["--device", "nosuchdevice"], "--device 'nosuchdevice' is not a device"),
    (["--attn", "flash_attention_2"], "--attn flash_attention_2"),
    (["--configs", "x"], "--configs 'x': write LABEL=DIR"),
])
def test_bad_bench_arguments_are_one_line_before_any_model_runs(argv, message, capsys, monkeypatch):
    import vtoken.bench

    def no_model(*args, **kwargs):  # a bad argument must be caught before the benchmark starts
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(vtoken.bench, "run", no_model)
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtoken bench: error: ") and message in err and err.count("\n") == 1


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
    from vtoken import registry
    from vtoken.strategies.random import RandomStrategy

    class Internal(RandomStrategy):  # registered by a test or a benchmark, as eval/replay_strategy.py is
        name = "_internal_for_test_cli"

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
