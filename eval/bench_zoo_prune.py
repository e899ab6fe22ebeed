"""ZOO-Prune's scoring cost on LLaVA-1.5's projector shape (1024 -> 4096 -> 4096, GELU), 576 tokens, or
(``--projector qwen2_vl``) on Qwen2-VL-7B's merger (a LayerNorm over each of the four merged 1280-wide
patches, then 5120 -> 5120 -> 3584, GELU): the generic estimator (2m full projector passes), the same
estimator computed from the projector's structure (``zo_sensitivity_two_layer``: exact up to float32
rounding; on the merger the norm's per-copy scale is applied after the first layer), the same
in float16 (the official code's precision, ``precision="float16"``), and the official LLaVA-NeXT code's
rank-128 SVD proxy; time per image, FLOPs, and how far each selection agrees with the exact float32
estimator (overlap of the kept sets at 64 / 128 / 192 tokens).

``precision="mixed"`` (float32 differences, ``W2``'s product in the weights' dtype) is timed beside
them; with ``--weights bfloat16`` (or float16) the projector and the tokens are held in that dtype,
as a model of it holds them, and the float32 estimators run on exact float32 copies.

Random weights and inputs (unit-scale tokens, the projector initialised as transformers does), float32 by default,
``torch.set_num_threads(--threads)``. The generic estimator is timed on ``--generic-directions``
directions and scaled to m (its cost is linear in m; the output says so). Writes the Markdown file
``--out`` and the same name with ``.json`` beside it; refuses to replace either unless ``--overwrite``.

    python eval/bench_zoo_prune.py --out /tmp/zoo_prune_speed.md
    python eval/bench_zoo_prune.py --out eval/results/zoo_prune_speed.md --overwrite   # the committed result
    python eval/bench_zoo_prune.py --projector qwen2_vl --repeats 2 --out eval/results/zoo_prune_speed_qwen2_vl.md --overwrite
    python eval/bench_zoo_prune.py --weights bfloat16 --threads 2 --repeats 2 --out eval/results/zoo_prune_speed_bf16.md --overwrite
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vtoken import compat
from vtoken.accounting import ProjectorDims, projector_flops, projector_sensitivity_flops
from vtoken.projector_parts import two_layer_projector
from vtoken.strategies.zoo_prune import (
    default_chunk_size, float32_projector, normalise_sensitivity, random_directions, weighted_maxmin_order,
    zo_sensitivity, zo_sensitivity_two_layer,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import add_output_arguments, claim, command_line  # noqa: E402  (eval/output.py)


def llava_projector(d_in: int = 1024, hidden: int = 4096, seed: int = 0) -> torch.nn.Module:
    from transformers import LlavaConfig

    torch.manual_seed(seed)
    config = LlavaConfig(vision_config={"hidden_size": d_in, "num_attention_heads": 16},
                         text_config={"hidden_size": hidden, "num_attention_heads": 32})
    projector = compat.llava_projector(config).eval()
    for layer in (projector.linear_1, projector.linear_2):  # transformers' init: N(0, 0.02)
        torch.nn.init.normal_(layer.weight, std=0.02)
        torch.nn.init.zeros_(layer.bias)
    return projector


def qwen2_vl_merger(context: int = 1280, out: int = 3584, seed: int = 0) -> torch.nn.Module:
    """Qwen2-VL-7B's merger as ZOO-Prune calls it: on rows of four merged patches (``4 * context``)."""
    from vtoken.adapters.pipeline import MergingProjectorOnTokens

    torch.manual_seed(seed)
    merger = compat.qwen2_vl_patch_merger(out, context).eval()
    for layer in (merger.mlp[0], merger.mlp[2]):  # transformers' init: N(0, 0.02)
        torch.nn.init.normal_(layer.weight, std=0.02)
        torch.nn.init.zeros_(layer.bias)
    return MergingProjectorOnTokens(merger, context).eval()


#: --projector: (title, builder, its dimensions for the FLOPs model).
PROJECTORS = {
    "llava": ("LLaVA-1.5's projector shape", llava_projector, ProjectorDims(1024, 4096, 4096)),
    "qwen2_vl": ("Qwen2-VL-7B's merger shape", qwen2_vl_merger, ProjectorDims(5120, 5120, 3584, norm_groups=4)),
}


def timed(fn, repeats: int) -> tuple[torch.Tensor, list[float]]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times


def select(z: torch.Tensor, s, k: int) -> set[int]:
    """The ``k`` tokens ZOO-Prune keeps for sensitivity ``s``, given the projected tokens ``z`` ``[N, d]``."""
    weight, _ = normalise_sensitivity(s[None], torch.ones(1, len(s), dtype=torch.bool))
    z = z[None]
    scores = weighted_maxmin_order(z, weight, torch.ones_like(weight, dtype=torch.bool),
                                   torch.ones_like(weight, dtype=torch.bool), torch.tensor([k]))
    return set(scores[0].topk(k).indices.tolist())


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--projector", choices=sorted(PROJECTORS), default="llava")
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--directions", type=int, default=64)
    parser.add_argument("--generic-directions", type=int, default=4)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="perturbed copies per block (default: the strategy's, default_chunk_size of the CPU)")
    parser.add_argument("--weights", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the projector's weight dtype, as a model of that dtype holds it (the tokens too): "
                             "precision='mixed' multiplies W2 in it")
    add_output_arguments(parser, "Markdown file (e.g. eval/results/zoo_prune_speed.md); a .json is written beside it")
    args = parser.parse_args(argv)
    out = claim(args.out, args.overwrite)
    claim(out.with_suffix(".json"), args.overwrite)
    torch.set_num_threads(args.threads)
    title, build, dims = PROJECTORS[args.projector]
    d = dims.in_dim
    weights = getattr(torch, args.weights)
    chunk = args.chunk_size if args.chunk_size is not None else default_chunk_size(torch.device("cpu"))
    projector = build().to(weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, d, generator=g).to(weights).float()  # the vision tower's output, as the model holds it
    u = random_directions(args.directions, d, g)
    step = 0.01
    exact_parts = two_layer_projector(projector)
    proxy_parts = two_layer_projector(projector, rank=args.rank)
    with torch.no_grad():
        s_exact, t_structure = timed(lambda: zo_sensitivity_two_layer(exact_parts, x, u, step, chunk), args.repeats)
        s_proxy, t_proxy = timed(lambda: zo_sensitivity_two_layer(proxy_parts, x, u, step, chunk), args.repeats)
        s_half, t_half = timed(lambda: zo_sensitivity_two_layer(exact_parts, x, u, step, chunk, dtype=torch.float16),
                               args.repeats)
        s_mixed, t_mixed = timed(lambda: zo_sensitivity_two_layer(exact_parts, x, u, step, chunk, matmul_dtype=weights),
                                 args.repeats)
        m_generic = args.generic_directions
        s_generic_part, t_generic = timed(
            lambda: zo_sensitivity(float32_projector(projector), x, u[:m_generic], step, chunk), args.repeats)
        s_structure_part = zo_sensitivity_two_layer(exact_parts, x, u[:m_generic], step, chunk)
    generic_scaled = [t * args.directions / m_generic for t in t_generic]
    n, m = args.tokens, args.directions
    flops = {  # the FLOPs model's counts (vtoken.accounting)
        "generic": 2 * m * projector_flops(dims, n),
        "structure": projector_sensitivity_flops(dims, n, m),
        "half": projector_sensitivity_flops(dims, n, m),
        "mixed": projector_sensitivity_flops(dims, n, m),
        "rank": projector_sensitivity_flops(dims, n, m, args.rank),
    }
    rows = []
    for name, times in (("generic (2m projector passes)", generic_scaled), ("from structure (exact)", t_structure),
                        ("from structure, float16 passes", t_half),
                        (f"from structure, mixed (W2 in {args.weights})", t_mixed), (f"rank-{args.rank} SVD proxy", t_proxy)):
        rows.append((name, statistics.median(times), min(times), max(times)))
    kept = [k for k in (64, 128, 192) if k < args.tokens]
    with torch.no_grad():
        z = float32_projector(projector)(x)  # the same projected tokens for every estimator's selection
    exact_sets = {k: select(z, s_exact, k) for k in kept}
    overlap = {k: len(select(z, s_proxy, k) & exact_sets[k]) / k for k in kept}
    overlap_half = {k: len(select(z, s_half, k) & exact_sets[k]) / k for k in kept}
    overlap_mixed = {k: len(select(z, s_mixed, k) & exact_sets[k]) / k for k in kept}
    half_error = float(((s_half - s_exact).abs() / s_exact).max())
    mixed_error = float(((s_mixed - s_exact).abs() / s_exact).max())
    agreement = float(((s_generic_part - s_structure_part).abs() / s_generic_part).max())
    machine = f"CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s); no GPU"
    lines = [
        f"# ZOO-Prune scoring cost on {title}",
        "",
        f"Produced by `{command_line('bench_zoo_prune', argv)}` (tokens {n}, m "
        f"{args.directions}, h {step}, rank {args.rank}, {args.repeats} repeats, blocks of {chunk} perturbed copies; "
        f"the projector's weights and the tokens "
        f"in {args.weights}). Machine: {machine}.",
        "",
        f"The generic estimator was timed with {m_generic} directions and scaled to m = {args.directions} (linear in m).",
        f"Structure vs generic sensitivity on those directions: largest relative difference {agreement:.1e} (float32).",
        f"float16 passes vs float32: largest relative difference of S {half_error:.1e}; "
        f"{statistics.median(t_half):.2f} s against {statistics.median(t_structure):.2f} s per image on this CPU "
        "(its speed on a GPU, where the official code runs fp16, is not measured yet).",
        f"mixed (float32 differences, W2's product in {args.weights}) vs float32: largest relative difference of S "
        f"{mixed_error:.1e}" + (" (float32 weights: the same computation)." if weights == torch.float32 else "."),
        "",
        "| estimator | seconds per image (median) | min | max | speed-up vs generic | GFLOPs per image |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0][1]
    for (name, median, low, high), cost in zip(rows, flops.values()):
        lines.append(f"| {name} | {median:.3f} | {low:.3f} | {high:.3f} | {base / median:.1f}x | {cost / 1e9:.0f} |")
    lines += ["", "Kept sets against the exact float32 estimator's (same directions):", "",
              f"| tokens kept | rank-{args.rank} proxy | float16 passes | mixed |", "|---|---|---|---|"]
    lines += [f"| {k} | {100 * overlap[k]:.1f}% | {100 * overlap_half[k]:.1f}% | {100 * overlap_mixed[k]:.1f}% |"
              for k in kept]
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"rows": rows, "gflops": {k: v / 1e9 for k, v in flops.items()}, "overlap": overlap,
         "overlap_float16": overlap_half, "float16_max_rel": half_error, "overlap_mixed": overlap_mixed,
         "mixed_max_rel": mixed_error,
         "structure_vs_generic_max_rel": agreement, "machine": machine, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
