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
])
def test_bad_bench_arguments_are_one_line_before_any_model_runs(argv, message, capsys, monkeypatch):
    import vtoken.bench

    def no_model(*args, **kwargs):  # a bad argument must be caught before the benchmark starts
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(vtoken.bench, "run", no_model)
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtoken bench: error: ") and message in err and err.count("\n") == 1


def test_methods_lists_where_each_method_runs(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fastv: " in out and "    LLaVA-NeXT: runs" in out
    assert "LLaVA-NeXT: needs each image to reach the LLM as one patch grid" in out
