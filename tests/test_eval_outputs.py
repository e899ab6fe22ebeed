"""Every eval script that writes results takes a required ``--out`` and refuses, in one line and before
any model loads or any timing starts, to replace a result already there unless ``--overwrite`` is
given (``eval/output.py``): running a script as its docstring says never rewrites a committed result
silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "eval"
sys.path.insert(0, str(EVAL))

import output  # noqa: E402  (eval/output.py)


class Forbidden:
    """Stands in for the first piece of real work of a script: calling it, or reading any attribute of
    it, fails the test (the refusal must come before)."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self._name} ran before the output was claimed")

    def __getattr__(self, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        raise AssertionError(f"{self._name}.{attribute} was used before the output was claimed")


# script: (how --out is given, the file a previous run left there (relative to --out's folder / stem),
#          the committed --out (relative to the repository), the work that must not start: a name in the
#          script's module, or "module:name" for one in a module of eval/ the script imports)
SCRIPTS = {
    "bench_kernels": ("file", "cpu.md", "eval/results/bench_kernels/cpu.md", ("run", "machine")),
    "bench_vit_speed": ("stem", "bench_vit_speed.md", "eval/results/tiny_clip/bench_vit_speed",
                        ("bench_model", "machine")),
    "bench_speed": ("file", "cpu.json", "eval/results/bench_speed/cpu.md", tuple(f"speed_shapes:{name}" for name in ("scaled_llava", "scaled_qwen2_vl", "scaled_anyres", "llava_7b"))),
    "prefill_phases": ("file", "cpu_repshift_llava_onevision.md", "eval/results/prefill_phases/cpu_repshift_llava_onevision.md",
                       tuple(f"speed_shapes:{name}" for name in ("scaled_llava", "scaled_qwen2_vl", "scaled_anyres", "llava_7b"))),
    "bench_zoo_prune": ("file", "zoo_prune_speed.json", "eval/results/zoo_prune_speed.md", ("llava_projector",)),
    "eval_tiny_clip": ("stem", "eval.json", "eval/results/tiny_clip/eval", ("evaluate", "load")),
    "eval_tiny_llava": ("file", "tiny_llava.md", "eval/results/tiny_llava.md", ("VQAModel", "evaluate")),
    "eval_tiny_qwen": ("file", "tiny_qwen.json", "eval/results/tiny_qwen.md", ("VQAModel", "bench", "unpruned")),
    "mutations": ("file", "mutations.md", "eval/results/mutations.md", ("clone_head",)),
    "malloc_effect": ("file", "malloc_effect.md", "eval/results/malloc_effect.md", ("measure",)),
    "flops_report": ("file", "flops.md", "eval/results/flops.md", ("build",)),
    "method_flops": ("file", "method_flops.md", "eval/results/method_flops.md", ("flops", "strategy_names")),
    "tune_vflowopt": ("folder", "vflowopt-tuned-1of9/vtoken_config.json", "eval/results", ("VQAModel",)),
    "repshift_schedule": ("folder", "vtoken_config.json", "eval/results/repshift_schedule", ("VQAModel",)),
    "train_tiny_llava": ("folder", "config.json", "vtoken/assets/tiny-llava", ("build_tokenizer", "build_model")),
    "train_tiny_clip": ("folder", "model.safetensors", "vtoken/assets/tiny-clip", ("C", "build_model")),
    "train_tiny_qwen": ("folder", "training_state.txt", "vtoken/assets/tiny-qwen2-vl",
                        ("build_qwen_tokenizer", "build_model")),
}

# bench_kernels sets TRITON_INTERPRET and glibc's mmap threshold when imported: it runs in a subprocess.
SUBPROCESS = {"bench_kernels"}


def out_argument(script: str, tmp_path: Path) -> tuple[str, Path]:
    """(--out for a run into ``tmp_path``, the file a previous run left there)."""
    kind, existing, _, _ = SCRIPTS[script]
    if kind == "folder":
        return str(tmp_path), tmp_path / existing
    if kind == "stem":
        return str(tmp_path / Path(existing).stem), tmp_path / existing
    if existing.endswith(".json"):  # the .json beside the Markdown file is claimed too
        return str((tmp_path / existing).with_suffix(".md")), tmp_path / existing
    return str(tmp_path / existing), tmp_path / existing


def run_main(script: str, argv: list[str], monkeypatch) -> tuple[int | str | None, str]:
    """(exit code or message, stderr) of ``script``'s ``main(argv)``, its work forbidden."""
    work = SCRIPTS[script][3]
    if script in SUBPROCESS:
        guards = "".join(f"M.{name} = F({name!r}); " for name in work)
        code = (f"import sys; sys.path[:0] = [{str(EVAL)!r}, {str(ROOT / 'tests')!r}]; "
                f"import {script} as M; from test_eval_outputs import Forbidden as F; {guards}M.main({argv!r})")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = done.stderr.strip().splitlines()
        if done.returncode == 1 and lines:
            return lines[-1], done.stdout + done.stderr
        return done.returncode, done.stdout + done.stderr
    module = __import__(script)
    for entry in work:
        owner, _, name = entry.rpartition(":")
        monkeypatch.setattr(__import__(owner) if owner else module, name, Forbidden(name))
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    return exit_.value.code, ""


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_names_out_and_overwrite(script, capsys):
    if script in SUBPROCESS:
        done = subprocess.run([sys.executable, str(EVAL / f"{script}.py"), "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        text = done.stdout
    else:
        with pytest.raises(SystemExit) as exit_:
            __import__(script).main(["--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
    assert "--out" in text and "--overwrite" in text


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_an_existing_result_is_refused_in_one_line_before_any_work(script, tmp_path, monkeypatch):
    out, existing = out_argument(script, tmp_path)
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_text("a previous result\n")
    message, log = run_main(script, ["--out", out], monkeypatch)
    assert isinstance(message, str), (message, log)
    assert "\n" not in message
    assert str(existing) in message and "--overwrite" in message
    assert existing.read_text() == "a previous result\n"
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == [existing]  # nothing else written


def committed_files(script: str) -> list[Path]:
    """The committed files a run with the committed ``--out`` would write over."""
    kind, existing, committed, _ = SCRIPTS[script]
    committed = ROOT / committed
    if kind == "stem":
        return [committed.with_suffix(".md"), committed.with_suffix(".json")]
    if kind == "file":
        return [committed, committed.with_suffix(".json")]
    if script == "tune_vflowopt":
        return [committed / "vflowopt_tune.md", committed / "vflowopt-tuned-1of9" / "vtoken_config.json"]
    return sorted(p for p in committed.rglob("*") if p.is_file())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_committed_result_is_refused(script, monkeypatch):
    files = [p for p in committed_files(script) if p.is_file()]
    if not files:
        pytest.skip(f"{SCRIPTS[script][2]} is not in this checkout")
    before = {p: p.read_bytes() for p in files}
    message, log = run_main(script, ["--out", str(ROOT / SCRIPTS[script][2])], monkeypatch)
    assert isinstance(message, str) and "\n" not in message, (message, log)
    assert any(str(p) in message for p in files) and "--overwrite" in message, message
    assert {p: p.read_bytes() for p in files} == before


def test_out_is_required(capsys):
    import flops_report

    with pytest.raises(SystemExit) as exit_:
        flops_report.main([])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


# ------------------------------------------------------------------------------ eval/output.py


def test_environment_prefix_names_the_settings_that_are_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1:x y")
    monkeypatch.delenv("VTOKEN_KERNELS", raising=False)
    prefix = output.environment_prefix(("OMP_NUM_THREADS", "VTOKEN_KERNELS", "GLIBC_TUNABLES"))
    assert prefix == "OMP_NUM_THREADS=1 GLIBC_TUNABLES='glibc.malloc.mmap_threshold=1:x y' "
    assert output.environment_prefix(("VTOKEN_KERNELS",)) == ""


def test_claim_a_file(tmp_path):
    target = tmp_path / "a" / "b" / "report.md"
    assert output.claim(str(target), False) == target and target.parent.is_dir()  # parents made
    target.write_text("x")
    with pytest.raises(SystemExit, match=r"report\.md already exists: pass --overwrite"):
        output.claim(target, False)
    assert output.claim(target, True) == target and target.read_text() == "x"  # allowed, not removed
    with pytest.raises(SystemExit, match="is a folder, not a file"):
        output.claim(tmp_path, True)


def test_claim_a_folder(tmp_path):
    folder = tmp_path / "run"
    assert output.claim(folder, False, "report.md", "sub/config.json") == folder and folder.is_dir()
    assert output.claim(folder, False, "*") == folder  # an empty folder is free
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"config\.json already exists"):
        output.claim(folder, False, "report.md", "sub/config.json")
    assert output.claim(folder, False, "report.md") == folder  # other files do not stand in the way
    with pytest.raises(SystemExit, match="already exists"):
        output.claim(folder, False, "*")
    assert output.claim(folder, True, "*") == folder
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        output.claim(folder / "sub" / "config.json", True, "x")


def test_claim_a_stem(tmp_path):
    stem = tmp_path / "eval"
    assert output.claim_stem(str(stem), False) == stem
    stem.with_suffix(".json").write_text("{}")
    with pytest.raises(SystemExit, match=r"eval\.json already exists"):
        output.claim_stem(stem, False)
    assert output.claim_stem(stem, True) == stem


def test_every_mutation_names_one_place_and_tests_that_exist():
    """``eval/mutations.py`` mutates by replacing ``old`` with ``new`` and refuses a mutation whose
    ``old`` is not found exactly once (it would be skipped, or mutate another line than its name says):
    each one's text is in its file once, it changes something, and its tests' files exist."""
    import mutations

    names = [m.name for m in mutations.MUTATIONS]
    assert len(set(names)) == len(names)
    for mutation in mutations.MUTATIONS:
        text = (ROOT / mutation.path).read_text()
        assert text.count(mutation.old) == 1, (mutation.name, text.count(mutation.old))
        assert mutation.new != mutation.old, mutation.name
        for test in mutation.tests:
            assert (ROOT / test.split("::")[0]).is_file(), (mutation.name, test)
