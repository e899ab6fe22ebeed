"""Every script in ``examples/`` runs offline as written (in a scratch directory, small sizes where
the script takes them) and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: Per script: extra arguments that keep it small, and a line its output must hold.
RUNS = {
    # FastV at 1/9 of the built-in model's 144 tokens keeps 16 (its selection printed as 16 indices)
    "quickstart.py": ([], "{'llm:2': tensor(["),
    # a quarter of the tiny CLIP's 144 patch tokens: 36 leave the encoder
    "zero_shot_clip.py": (["--n", "20"], "schedule 36 patch tokens out"),
    # ViT-S/16 has DeiT-S's shape: 4.6 GMACs, 2.3 under ToMe r=16 (ToMe's published DeiT-S figure)
    "vit_tome.py": (["--batch", "1", "--model", "vit_small_patch16_224"], "4.6 -> 2.3 GMACs per image (ToMe r=16)"),
    # FastV at 1/9 drops 128 of 144 tokens before LLM layer 2 of 4 (layers 0-1 see 144, 2-3 see 16):
    # (2 x 144 + 2 x 16) / 4 = 80 tokens on average over the layers
    "compare_methods.py": (["--limit", "8", "--methods", "random,fastv"],
                           "fastv at 1/9 keeps 80 of 144 tokens on average over the LLM's layers"),
    # FastV and pool at 1/4 of the tiny LLaVA's 144 visual tokens, through transformers.pipeline: 36 reach the LLM
    "pipeline.py": (["--n", "8"], "fastv keep=1/4: 36 of 144 visual tokens"),
    # a TokenPacker at scale 2 (one token per 2x2 patches, 3 training steps here): 144 / 4 = 36 tokens
    "train_tokenpacker.py": (["--steps", "3"], "trained here (3 steps): 36 of 144 visual tokens"),
}


def test_every_example_is_listed():
    assert sorted(RUNS) == sorted(p.name for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script, tmp_path):
    arguments, expected = RUNS[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *arguments], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
