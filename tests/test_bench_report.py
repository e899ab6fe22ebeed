"""``vtoken bench``'s report: equal-cost comparison on curves whose values are known by construction,
the short terminal view, the plots, and files written row by row."""

import json
import math

import pytest

from vtoken.bench_report import BenchRow, at_cost, curves, matched_cost_summary, short_table


def row(method, budget, tflops, accuracy, in_llm=False, label="", recall=None):
    return BenchRow(method, budget, "llm:2" if in_llm else "projector", 10.0, 144, 1.0, 2.0, 8, 1e-4, tflops,
                    accuracy=accuracy, recall=recall, samples=100, label=label, prunes_in_llm=in_llm)


ROWS = [
    row("none", "1", 9.0, 0.90),
    row("random", "1/3", 4.0, 0.60), row("random", "1/9", 2.0, 0.45),
    row("oracle", "1/3", 4.0, 0.80), row("oracle", "1/9", 2.0, 0.70),
    # an in-LLM method: at "1/3" it costs 5 TFLOPs, at "1/9" 3 TFLOPs: it never reaches 2
    row("fastv", "1/3", 5.0, 0.88, in_llm=True), row("fastv", "1/9", 3.0, 0.84, in_llm=True),
    row("pool", "1/3", 4.0, 0.55), row("pool", "1/9", 2.0, 0.50),
    row("vflowopt", "1/9", 2.0, 0.62, label="vflowopt (tuned)"),
]


def test_interpolates_along_each_curve_from_the_unpruned_end():
    fastv = curves(ROWS)["fastv"]
    assert fastv == [(9.0, 0.90), (5.0, 0.88), (3.0, 0.84)]
    assert at_cost(fastv, 4.0) == pytest.approx(0.86)  # halfway between 5 -> 0.88 and 3 -> 0.84
    assert at_cost(fastv, 7.0) == pytest.approx(0.89)  # halfway between unpruned and "1/3"
    assert at_cost(fastv, 2.0) is None  # never that cheap: no extrapolation
    assert at_cost(fastv, 2.98) == pytest.approx(0.84)  # within 1% of its cheapest point counts as equal
    assert curves(ROWS, "recall") == {}  # no recall in these rows


def test_ranks_at_the_cost_of_the_reference_rows():
    text = matched_cost_summary(ROWS)
    first, second = text.split("- at ")[1:]
    assert first.startswith("4.00 TFLOPs (the cost of keeping 1/3 of the tokens before the LLM): random 60.0, oracle 80.0")
    assert "ranking: fastv * 86.0, pool 55.0" in first
    # (0.86 - 0.60) / (0.80 - 0.60) = 1.30; (0.55 - 0.60) / 0.20 = -0.25
    assert "between random (0) and oracle (1): fastv 1.30, pool -0.25" in first
    assert "does not reach this cost: vflowopt (tuned) (measured at 2.00 only)" in first
    assert "ranking: vflowopt (tuned) 62.0, pool 50.0" in second
    assert "fastv (cheapest 3.00)" in second


def test_no_place_between_random_and_an_oracle_that_does_not_beat_it():
    """With the oracle below random (a handful of questions), the scale ran backwards: the best
    method read -1.00 and a tie printed -0.00."""
    rows = [row("none", "1", 9.0, 0.90), row("random", "1/9", 2.0, 0.50), row("oracle", "1/9", 2.0, 0.25),
            row("pool", "1/9", 2.0, 0.75)]
    text = matched_cost_summary(rows)
    assert "between random (0) and oracle (1)" not in text
    assert "between random and oracle: not placed, the oracle (25.0) does not beat random (50.0) here" in text
    tied = matched_cost_summary([row("none", "1", 9.0, 0.90), row("random", "1/9", 2.0, 0.5),
                                 row("oracle", "1/9", 2.0, 0.7), row("pool", "1/9", 2.0, 0.4999999)])
    assert "pool 0.00" in tied and "-0.00" not in tied


def test_short_view_fits_a_terminal_and_marks_in_llm_methods():
    text = short_table(ROWS)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "fastv *" in text and "vflowopt (tuned)" in text
    assert "prunes inside the LLM" in text.splitlines()[-1]


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from vtoken.bench_plot import plot

    from PIL import Image

    rows = [*ROWS, row("random", "2/9", 3.0, 0.5, recall=0.3)]
    written = plot(rows, str(tmp_path))
    assert set(written) == {"accuracy", "recall"}
    for path in written.values():
        with Image.open(path) as image:  # figsize 8 x 5.5 inches at 120 dpi
            assert image.format == "PNG" and image.size == (960, 660)
    # the curves drawn are the report's: random's accuracy line runs from the unpruned star down
    from vtoken.bench_report import curves

    assert curves(rows)["random"] == [(9.0, 0.90), (4.0, 0.60), (3.0, 0.5), (2.0, 0.45)]
    # a later run into the same folder without recall takes the earlier recall plot away with it
    assert set(plot(ROWS, str(tmp_path))) == {"accuracy"} and not (tmp_path / "recall_vs_flops.png").exists()


def test_the_cli_writes_every_row_as_it_finishes(tmp_path, monkeypatch, capsys):
    """A crash in the middle keeps the rows measured before it, in bench.json and bench.md."""
    import vtoken.bench
    from vtoken.cli import main

    real = vtoken.bench._flops
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(vtoken.bench, "_flops", crash_on_third)
    out = tmp_path / "out"
    assert main(["bench", "--methods", "random", "--budgets", "1,1/3,1/9", "--limit", "4", "--repeats", "1",
                 "--batch-size", "2", "--out", str(out)]) == 2
    assert "simulated failure" in capsys.readouterr().err
    rows = json.loads((out / "bench.json").read_text())
    assert [(r["method"], r["budget"]) for r in rows] == [("none", "1"), ("random", "1/3")]
    assert "| random | 1/3 |" in (out / "bench.md").read_text()
    assert math.isfinite(rows[1]["tflops_llava_7b"])


def test_a_trained_method_named_alone_runs_with_the_shipped_weights():
    from vtoken.bench import run

    rows = run(methods=["tokenpacker"], budgets=["1"], limit=2, repeats=1, batch=1, progress=lambda _: None)
    # the shipped packers: scale 2 (144 / 4 = 36 tokens) and scale 3 (144 / 9 = 16)
    assert [(r.method, r.budget, r.kept_tokens) for r in rows] == [
        ("none", "1", 144), ("tokenpacker", "1/4", 36), ("tokenpacker", "1/9", 16)]


def test_the_shipped_tuned_config_is_the_committed_tuning_result():
    """The bench's tuned VFlowOpt row loads a copy of eval/tune_vflowopt.py's committed output."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shipped = root / "vtoken" / "assets" / "tiny-llava-tuned" / "vflowopt-1of9" / "vtoken_config.json"
    committed = root / "eval" / "results" / "vflowopt-tuned-1of9" / "vtoken_config.json"
    assert shipped.read_bytes() == committed.read_bytes()


def test_a_config_whose_budget_is_not_keep_runs_at_what_it_kept(tmp_path):
    """A saved config with no keep / keep_tokens of its own (the method's default budget, explicit
    stages, ToMe's r) is a row at what it kept; the bench stopped with a TypeError on its None budget
    after the other rows had run."""
    import vtoken
    from vtoken.bench import default_model_path, load_model, run

    model = load_model(default_model_path())
    saved = []
    for name, options in (("fastv", {}), ("random", {"stages": [{"site": "projector", "keep": 0.25}]})):
        vtoken.wrap(model, name, **options)
        vtoken.save_config(model, tmp_path / name)
        vtoken.unwrap(model)
        saved.append((f"{name} saved", str(tmp_path / name)))
    rows = run(methods=["random"], budgets=["1/3"], limit=2, repeats=1, batch=1, configs=saved, progress=lambda _: None)
    assert [r.label for r in rows[2:]] == ["fastv saved", "random saved"]
    assert rows[3].kept_tokens == 36 and rows[3].budget == "1/4"


def test_run_checks_its_arguments_before_any_model_loads(monkeypatch):
    """vtoken.bench.run (the README's Python route) refuses, in one line naming the argument, what the
    CLI refuses: before, limit=0 / repeats=0 / batch=0 died in the sweep with an IndexError or a
    StatisticsError, methods='fastv' asked for method 'f', and methods=[] ran every method."""
    import vtoken.bench as bench

    monkeypatch.setattr(bench, "_vqa_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model loaded")))
    cases = [({"limit": 0}, "limit must be a whole number from 1 to 1,000,000, got 0"),
             ({"repeats": 0}, "repeats must be a whole number from 1 to 10,000, got 0"),
             ({"batch": 0}, "batch must be a whole number from 1 to 4,096, got 0"),
             ({"batch": 2.0}, "batch must be a whole number"),
             ({"dtype": "float8"}, "dtype must be one of float32, float16, bfloat16"),
             ({"attn": "flash"}, "attn must be one of sdpa, eager, flash_attention_2"),
             ({"methods": "fastv"}, r"methods must be a list, e.g. methods=\['fastv', 'pool'\], got 'fastv'"),
             ({"methods": []}, r"methods=\[\] names nothing"),
             ({"methods": ["nosuch"]}, "unknown method 'nosuch'"),
             ({"budgets": "1/9"}, "budgets must be a list"),
             ({"budgets": ["0"]}, "budget '0' must be positive"),
             ({"model_path": "/nonexistent"}, "model_path='/nonexistent': no such directory"),
             ({"data": "/nonexistent.jsonl"}, "no such file"),
             ({"trained": [("tokenpacker",)]}, "trained must be a list of \\(name, directory\\) pairs")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            bench.run(progress=lambda _: None, **options)
        assert "\n" not in str(error.value)


def test_config_labels_are_distinct_and_not_a_method_name(tmp_path):
    """A config labelled as a method, or two configs under one label, shared one curve (the ranking
    printed fastv's point as pool's); a '|' split bench.md's table."""
    import vtoken
    from vtoken.bench import run
    from vtoken.bench_args import check_configs
    from tiny import tiny_llava

    model = vtoken.wrap(tiny_llava(), "fastv", keep=0.25)
    path = vtoken.save_config(model, tmp_path / "c")
    directory = str(tmp_path / "c")
    for configs, message in (([("pool", directory)], "'pool' is a method's own name"),
                             ([("x", directory), ("x", directory)], "the label 'x' is given twice"),
                             ([("a|b", directory)], "give a label without '\\|'")):
        with pytest.raises(ValueError, match=message):
            check_configs(configs)
        with pytest.raises(ValueError, match=message):
            run(methods=["random"], configs=configs, progress=lambda _: None)
    assert path.endswith("vtoken_config.json")


def test_a_batch_larger_than_the_data_is_timed_as_the_data(capsys):
    """--batch-size 64 on 2 questions timed a batch of 2 and reported b=64."""
    from vtoken.bench import run

    said = []
    rows = run(methods=["random"], budgets=["1/9"], limit=2, repeats=1, batch=64, progress=said.append, configs=[])
    assert all(r.batch == 2 for r in rows)
    assert "batch 64: the data holds 2 question(s); timing batches of 2" in said


def test_the_oracle_refuses_data_without_boxes_and_in_a_config(tmp_path):
    """An oracle named on data none of whose records has boxes ranked random filling as the oracle; an
    oracle in --configs failed after the other rows had run, naming vtoken.annotate."""
    import json

    import vtoken
    from vtoken.bench import run
    from vtoken.vqa.data import generate

    records = generate("test", 3, seed=0, image_size=96, patch_size=8)
    data = tmp_path / "no_boxes.jsonl"
    with open(data, "w") as f:
        for i, r in enumerate(records):
            r["pil"].save(tmp_path / f"{i}.png")
            f.write(json.dumps({"image": str(tmp_path / f"{i}.png"), "question": r["question"], "answer": r["answer"],
                                "family": r["family"]}) + "\n")
    with pytest.raises(ValueError, match="oracle reads the benchmark's boxes, and no question of the data has any"):
        run(methods=["oracle"], budgets=["1/9"], data=str(data), repeats=1, batch=1, progress=lambda _: None)
    from tiny import tiny_llava

    vtoken.save_config(vtoken.wrap(tiny_llava(), "oracle", keep=0.25), tmp_path / "oracle")
    with pytest.raises(ValueError, match="oracle reads the benchmark's boxes"):
        run(methods=["random"], budgets=["1/9"], model_path=_bare_llava(tmp_path), configs=[("o", str(tmp_path / "oracle"))],
            repeats=1, batch=1, progress=lambda _: None)


def _bare_llava(tmp_path) -> str:
    """The shipped LLaVA's weights saved without tokenizer or processor (no questions can be asked)."""
    from vtoken.bench import default_model_path, load_model

    path = tmp_path / "bare"
    load_model(default_model_path()).save_pretrained(path)
    return str(path)


def test_the_default_model_named_by_its_path_runs_as_the_default(tmp_path):
    """--model vtoken/assets/tiny-llava (the default, named) refused tokenpacker for want of weights the
    package ships for it."""
    from argparse import Namespace

    from vtoken.bench import default_model_path, run
    from vtoken.bench_args import check_bench_arguments

    args = Namespace(methods=["tokenpacker"], budgets=["1"], trained=None, configs=None, model=default_model_path(),
                     limit=1, repeats=1, batch=1, threads=None, out=str(tmp_path / "o"), data=None, device=None,
                     attn=None)
    assert check_bench_arguments(args)[0] == ["tokenpacker"] and args.model is None
    rows = run(methods=["tokenpacker"], budgets=["1"], model_path=default_model_path(), limit=2, repeats=1, batch=1,
               progress=lambda _: None)
    assert [r.kept_tokens for r in rows] == [144, 36, 16]


def test_points_not_measured_are_named_in_bench_md(tmp_path, capsys):
    """A budget a method cannot meet was said on stderr only; bench.md kept no trace of the skip."""
    from vtoken.cli import main

    out = tmp_path / "out"
    assert main(["bench", "--methods", "tome", "--budgets", "1/3", "1/9", "--limit", "2", "--repeats", "1",
                 "--out", str(out)]) == 0
    text = (out / "bench.md").read_text()
    assert "Not measured: tome @ 1/9: skipped: tome cannot merge 144 patch tokens down to 16" in text
    assert "| tome | 1/3 |" in text and "| tome | 1/9 |" not in text
    assert "tome @ 1/9: skipped" in capsys.readouterr().err
