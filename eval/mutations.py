"""Does the suite catch a real change of a formula? Each mutation below is one edit of a method's
formula or default (the issue "Faithful by test" lists most of them). The script makes it in a fresh
clone of this checkout's HEAD, runs the test files that should catch it, one at a time with ``-x``,
records the first test that fails (or "NOT CAUGHT"), and restores the clone before the next one.

    OMP_NUM_THREADS=1 python eval/mutations.py --out /tmp/mutations.md
    OMP_NUM_THREADS=1 python eval/mutations.py --out eval/results/mutations.md --overwrite   # the committed result

A mutation whose text is no longer in its file is reported as "stale" (the code moved: update the
edit), never silently skipped. The clone runs on the installed packages (``PYTHONPATH`` points at it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import add_output_arguments, claim, command_line  # noqa: E402  (eval/output.py)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments, run in order: a file, or "file::-k expression"


MUTATIONS = (
    Mutation("TransPrune: L1 normalisation over the whole batch, not per image", "vtoken/strategies/transprune.py",
             "return x / (x.sum(dim=-1, keepdim=True) + _EPS)", "return x / (x.sum() + _EPS)",
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: default positions switched", "vtoken/strategies/transprune.py",
             'positions: str = "contiguous"', 'positions: str = "original"',
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: counts rounded, not floored (int)", "vtoken/strategies/transprune.py",
             'rounding: str = "floor"', 'rounding: str = "round"',
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: direction-change softmax over the whole batch", "vtoken/strategies/transprune.py",
             'weights = torch.softmax(turn.masked_fill(~valid, float("-inf")), dim=-1)',
             'weights = torch.softmax(turn.masked_fill(~valid, float("-inf")).flatten(), dim=-1).view_as(turn)',
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("VFlowOpt: in-LLM stages keep the least important tokens", "vtoken/strategies/vflowopt.py",
             "return Reduction(keep=masked_topk(importance, rows.valid, rows.budget))",
             'return Reduction(keep=masked_topk(-importance if ctx.stage.site == "llm" else importance, '
             "rows.valid, rows.budget))",
             ("tests/test_parity_vflowopt.py", "tests/test_vflowopt.py")),
    Mutation("VFlowOpt: recycling cells twice as large", "vtoken/strategies/vflowopt.py",
             "return recycle_rows(rows, importance, self.config.a)",
             "return recycle_rows(rows, importance, 2 * self.config.a)",
             ("tests/test_parity_vflowopt.py", "tests/test_vflowopt.py")),
    Mutation("VFlowOpt: default positions switched (original -> pre_llm)", "vtoken/strategies/vflowopt.py",
             "    recycle: bool = True\n", '    recycle: bool = True\n    positions: str = "pre_llm"\n',
             ("tests/test_parity_vflowopt.py", "tests/test_vflowopt.py")),
    Mutation("Representation Shift: default score MLP branch -> residual form", "vtoken/strategies/repshift.py",
             '    shift: str = "branch"\n', '    shift: str = "residual"\n',
             ("tests/test_parity_repshift.py", "tests/test_repshift.py")),
    Mutation("Representation Shift: merge by plain sizes instead of the saliency", "vtoken/strategies/repshift.py",
             'merge_weight: str = "shift"', 'merge_weight: str = "size"',
             ("tests/test_parity_repshift.py", "tests/test_repshift.py")),
    Mutation("AIF: keep the high-entropy tokens", "vtoken/strategies/aif.py",
             "keep = masked_topk(-entropy, valid, budget)", "keep = masked_topk(entropy, valid, budget)",
             ("tests/test_parity_aif.py", "tests/test_aif.py")),
    Mutation("AIF: a never-attended token gets entropy 0 instead of log L", "vtoken/strategies/aif.py",
             "torch.where(total[..., 0] > 0, entropy, math.log(dynamics.shape[-1]))",
             "torch.where(total[..., 0] > 0, entropy, 0.0)",
             ("tests/test_parity_aif.py", "tests/test_aif.py")),
    Mutation("FastV: the last slot of a padded row scores, not the last real token", "vtoken/adapters/hf_decoder.py",
             "query_slots = layout.last_slot(layout.prompt_slots(prompt_end))[:, None]",
             "query_slots = layout.last_slot(torch.ones_like(layout.valid, dtype=torch.bool))[:, None]",
             ("tests/test_parity_fastv.py", "tests/test_generation.py::-k right_padding")),
    Mutation("FastV: heads combined by max instead of mean", "vtoken/strategies/fastv.py",
             "return probs.mean(dim=1)[:, 0]", "return probs.amax(dim=1)[:, 0]",
             ("tests/test_parity_fastv.py",)),
    Mutation("ZOO-Prune: central difference divided by h, not 2h (two-layer path)", "vtoken/strategies/zoo_prune.py",
             "(difference @ out.T).float(), dim=-1) / (2 * step)", "(difference @ out.T).float(), dim=-1) / step",
             ("tests/test_parity_zoo_prune.py", "tests/test_zoo_prune.py")),
    Mutation("ZOO-Prune: central difference divided by h, not 2h (generic path)", "vtoken/strategies/zoo_prune.py",
             "torch.linalg.vector_norm(out[:n] - out[n:], dim=-1) / (2 * step)",
             "torch.linalg.vector_norm(out[:n] - out[n:], dim=-1) / step",
             ("tests/test_parity_zoo_prune.py", "tests/test_zoo_prune.py")),
    Mutation("ZOO-Prune mixed: the quotient meeting W2 divided by h, not 2h", "vtoken/strategies/zoo_prune.py",
             "quotient = (difference * (0.5 / step))", "quotient = (difference * (1.0 / step))",
             ("tests/test_zoo_prune.py",)),
    Mutation("ZOO-Prune mixed: W2's product left in float32 (the weights' dtype ignored)", "vtoken/strategies/zoo_prune.py",
             'matmul_dtype = parts.weight_dtype if config.precision == "mixed" else dtype', "matmul_dtype = dtype",
             ("tests/test_zoo_prune.py",)),
    Mutation("ZOO-Prune: the projector's cached structure keyed by weight versions alone", "vtoken/projector_parts.py",
             "versions = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in projector.parameters())",
             "versions = tuple(p._version for p in projector.parameters())",
             ("tests/test_zoo_prune.py",)),
    Mutation("random: seeded by the image's place in the batch, not the image", "vtoken/request.py",
             "return row_seed(self.seed, self.image_key(crops), *place)",
             "return row_seed(self.seed, crops[0], *place)",
             ("tests/test_strategies.py", "tests/test_generation.py::-k random")),
    Mutation("random: the pixels' fingerprint without its stride-class sums", "vtoken/fingerprint.py",
             "sums = torch.cat([words.view(BLOCKS, -1).sum(1), words.view(-1, BLOCKS).sum(0)])",
             "sums = words.view(BLOCKS, -1).sum(1)",
             ("tests/test_fingerprint.py",)),
    Mutation("ZOO-Prune: a merger's norm skipped in its first layer", "vtoken/projector_parts.py",
             "x = self.norm(x.reshape(-1, self.norm_width)).reshape(x.shape)", "x = x",
             ("tests/test_zoo_prune.py",)),
    Mutation("ZOO-Prune FLOPs: a merger's per-pair norm terms not counted", "vtoken/accounting.py",
             "per_pair = 2 * p.hidden * second + (2 * p.in_dim + (8 * p.norm_groups + 4) * p.hidden if p.norm_groups else 0)",
             "per_pair = 2 * p.hidden * second",
             ("tests/test_zoo_prune.py",)),
    Mutation("Quantized KV cache: refused again under in-LLM stages", "vtoken/adapters/hf_decoder.py",
             "quantized = cache is not None and self.masking is None and compat.is_quantized_cache(cache)",
             "quantized = False", ("tests/test_generate_options.py",)),
    Mutation("Quantized KV cache: served under a mask stage too", "vtoken/adapters/hf_decoder.py",
             "quantized = cache is not None and self.masking is None and compat.is_quantized_cache(cache)",
             "quantized = cache is not None and compat.is_quantized_cache(cache)", ("tests/test_generate_options.py",)),
    Mutation("Custom-method checks: a candidate kept twice passes", "vtoken/reduction_checks.py",
             "    if found[1]:", "    if False:", ("tests/test_custom_strategy_checks.py",)),
    Mutation("Custom-method checks: padding kept before valid candidates passes", "vtoken/reduction_checks.py",
             "    if found[2]:", "    if False:", ("tests/test_custom_strategy_checks.py",)),
    Mutation("VFlowOpt FLOPs: the map's column sums per head not counted", "vtoken/accounting.py",
             " + 2 * heads * pairs +", " +",
             ("tests/test_flops_scoring.py", "tests/test_vflowopt.py", "tests/test_flops_vit.py")),
    Mutation("VFlowOpt FLOPs: a window layer's context row scored against every patch", "vtoken/accounting.py",
             "row_keys = n if pairs is None else pairs // max(patches, 1)", "row_keys = n",
             ("tests/test_flops_scoring.py",)),
    Mutation("VFlowOpt: Qwen-VL's map projects the values of its fused qkv too", "vtoken/adapters/qwen_vision.py",
             "compat.FusedSlice(attention.qkv, 0, 2 * hidden.shape[-1])(hidden)",
             "attention.qkv(hidden)[..., : 2 * hidden.shape[-1]]",
             ("tests/test_flops_scoring.py",)),
    Mutation("VisionZip FLOPs: its merged tokens' second projector pass not counted", "vtoken/strategies/visionzip.py",
             'costs.append(ScoringCost("projector_rows", rows=contextual))', "pass",
             ("tests/test_flops_scoring.py", "tests/test_visionzip.py")),
    Mutation("ZOO-Prune: a merger's LayerNorm not centred in the first layer moved outside", "vtoken/strategies/zoo_prune.py",
             "    if form.centred:\n        xg, ug =", "    if False:\n        xg, ug =",
             ("tests/test_zoo_prune.py",)),
    Mutation("ZOO-Prune: the norm's cross term with one sign for both copies", "vtoken/strategies/zoo_prune.py",
             "squares = (xx[t, None] + uu[None, j])[:, :, None] + signs * cross[:, :, None]",
             "squares = (xx[t, None] + uu[None, j])[:, :, None] + cross[:, :, None]",
             ("tests/test_zoo_prune.py",)),
    Mutation("ToMe: proportional attention's log(size) bias dropped", "vtoken/adapters/vision_site.py",
             "bias = self._size_bias(images, hidden) if proportional else None", "bias = None",
             ("tests/test_tome.py",)),
    Mutation("VisionZip: contextual tokens merged by sum instead of mean", "vtoken/strategies/visionzip.py",
             "merged = features[targets].float() + sums / counts[:, None]",
             "merged = features[targets].float() + sums",
             ("tests/test_visionzip.py",)),
    # --- more terms of each formula (added at the stop after stop 53) ---------------------------------
    Mutation("TransPrune: alpha weighs IGA, not TTV (Eq. 6 swapped)", "vtoken/strategies/transprune.py",
             "return alpha * l1_normalise(ttv, valid) + (1.0 - alpha) * l1_normalise(iga, valid)",
             "return (1.0 - alpha) * l1_normalise(ttv, valid) + alpha * l1_normalise(iga, valid)",
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: magnitude change ||T_in|| / ||T_out|| (Eq. 1 inverted)", "vtoken/strategies/transprune.py",
             "magnitude, turn = token_shifts(x_out, x_in,", "magnitude, turn = token_shifts(x_in, x_out,",
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: IGA's heads combined by max (Eq. 5)", "vtoken/strategies/transprune.py",
             "per_row = probs.float().mean(dim=1)", "per_row = probs.float().amax(dim=1)",
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: TTV accumulated from the first pruning layer, not the one before (Eq. 4)",
             "vtoken/strategies/transprune.py",
             "return tuple(range(max(0, layers[0] - 1), layers[-1]))", "return tuple(range(layers[0], layers[-1]))",
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: default direction the paper's 1 - |cos|", "vtoken/strategies/transprune.py",
             '    direction: str = "signed"\n    rounding:', '    direction: str = "abs"\n    rounding:',
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("FastV: default layer K=3, not 2", "vtoken/strategies/fastv.py",
             "layer: int | None = 2", "layer: int | None = 3",
             ("tests/test_parity_fastv.py", "tests/test_strategies.py")),
    Mutation("FastV: default ratio R keeps 25%, not 50%", "vtoken/strategies/fastv.py",
             "default_keep = 0.5", "default_keep = 0.25",
             ("tests/test_parity_fastv.py", "tests/test_strategies.py")),
    Mutation("VisionZip: dominant and contextual counts swapped", "vtoken/strategies/visionzip.py",
             "return dominant, budget - dominant", "return budget - dominant, dominant",
             ("tests/test_visionzip.py",)),
    Mutation("VisionZip: contextual targets the first tokens, not evenly spaced", "vtoken/strategies/visionzip.py",
             "step = max(1, total // count)", "step = 1",
             ("tests/test_visionzip.py",)),
    Mutation("VisionZip: each token merged into its least similar target", "vtoken/strategies/visionzip.py",
             "assign = similarity.argmax(dim=-1)", "assign = similarity.argmin(dim=-1)",
             ("tests/test_visionzip.py",)),
    Mutation("VisionZip: similarity of raw keys, not cosine", "vtoken/strategies/visionzip.py",
             "metric = F.normalize(keys.float(), dim=-1)", "metric = keys.float()",
             ("tests/test_visionzip.py",)),
    Mutation("VisionZip: attention read at the tower's last layer, not the one the projector reads",
             "vtoken/strategies/visionzip.py",
             'layer = depths.get("vision_read", max(vision - 2, 0))', "layer = max(vision - 1, 0)",
             ("tests/test_visionzip.py",)),
    Mutation("ToMe: the weakest edges merge first", "vtoken/strategies/tome.py",
             "ranking = best.argsort(dim=-1, descending=True)", "ranking = best.argsort(dim=-1, descending=False)",
             ("tests/test_tome.py",)),
    Mutation("ToMe: merged tokens an unweighted mean of their members", "vtoken/strategies/tome.py",
             "x = fold(x * size) / total", "x = fold(x) / fold(torch.ones_like(size))",
             ("tests/test_tome.py",)),
    Mutation("ToMe: a protected slot in A may merge away", "vtoken/strategies/tome.py",
             "similarity[:, :prefix_a, :] = -math.inf", "similarity[:, :prefix_a, :] = similarity[:, :prefix_a, :]",
             ("tests/test_tome.py",)),
    Mutation("Representation Shift: default distance L1, not L2", "vtoken/strategies/repshift.py",
             '    distance: str = "l2"\n', '    distance: str = "l1"\n',
             ("tests/test_parity_repshift.py", "tests/test_repshift.py")),
    Mutation("Representation Shift: default operation the attention, not the MLP", "vtoken/strategies/repshift.py",
             '    operation: str = "mlp"\n', '    operation: str = "attention"\n',
             ("tests/test_parity_repshift.py", "tests/test_repshift.py")),
    Mutation("AIF: Eq. 2's largest text attention taken as the mean over queries", "vtoken/strategies/aif.py",
             "    return per_head.amax(dim=1)\n", "    return per_head.mean(dim=1)\n",
             ("tests/test_parity_aif.py", "tests/test_aif.py")),
    Mutation("AIF: Eq. 5's gap signed, not |S(r) - S_0|", "vtoken/strategies/aif.py",
             "gaps.append((distribution_entropy(mean, remaining) - s0).abs())",
             "gaps.append(distribution_entropy(mean, remaining) - s0)",
             ("tests/test_parity_aif.py", "tests/test_aif.py")),
    Mutation("AIF: Eq. 5 masks ceil(r N), not floor(r N)", "vtoken/strategies/aif.py",
             "masked = torch.floor(torch.as_tensor(r, dtype=torch.float64) * counts.double()).long()",
             "masked = torch.ceil(torch.as_tensor(r, dtype=torch.float64) * counts.double()).long()",
             ("tests/test_parity_aif.py", "tests/test_aif.py")),
    Mutation("VFlowOpt: the context set ignores t (above the mean)", "vtoken/strategies/vflowopt.py",
             "chosen = received > t * mean", "chosen = received > mean",
             ("tests/test_parity_vflowopt.py", "tests/test_vflowopt.py")),
    Mutation("VFlowOpt: patch entropy in nats, not bits", "vtoken/strategies/vflowopt.py",
             "prob * torch.log2(prob.clamp(min=1e-30))", "prob * torch.log(prob.clamp(min=1e-30))",
             ("tests/test_parity_vflowopt.py", "tests/test_vflowopt.py")),
    Mutation("VFlowOpt: gray level from the red channel, not the channel mean", "vtoken/strategies/vflowopt.py",
             "gray = pixels.float().mean(dim=-3)", "gray = pixels.float()[..., 0, :, :]",
             ("tests/test_parity_vflowopt.py", "tests/test_vflowopt.py")),
    Mutation("ZOO-Prune: default 32 directions, not 64", "vtoken/strategies/zoo_prune.py",
             "directions: int = 64", "directions: int = 32",
             ("tests/test_parity_zoo_prune.py", "tests/test_zoo_prune.py")),
    Mutation("FLOPs (paper convention): the n^2 d attention term halved", "vtoken/accounting.py",
             "return 4 * visual * d.hidden**2 + 2 * visual**2 * d.hidden + mlp_macs",
             "return 4 * visual * d.hidden**2 + visual**2 * d.hidden + mlp_macs",
             ("tests/test_flops.py",)),
    Mutation("FLOPs: an LLM layer's value projection not counted", "vtoken/accounting.py",
             "projections = 2 * queries * d.hidden * (2 * d.q_dim + 2 * d.kv_dim)",
             "projections = 2 * queries * d.hidden * (2 * d.q_dim + d.kv_dim)",
             ("tests/test_flops.py",)),
    Mutation("FLOPs: an LLM layer's attention products counted once, not twice", "vtoken/accounting.py",
             "attention = 4 * queries * keys * d.q_dim", "attention = 2 * queries * keys * d.q_dim",
             ("tests/test_flops.py",)),
    Mutation("FLOPs: a vision layer's attention products counted once", "vtoken/accounting.py",
             "attention = 4 * attention_pairs * v.hidden", "attention = 2 * attention_pairs * v.hidden",
             ("tests/test_flops.py", "tests/test_flops_vit.py")),
    Mutation("KV cache: values not counted", "vtoken/accounting.py",
             "per_token = 2 * d.kv_dim * itemsize", "per_token = d.kv_dim * itemsize",
             ("tests/test_flops.py",)),
    Mutation("TransPrune: IGA from the last token's row, not the instruction's", "vtoken/strategies/transprune.py",
             'iga = instruction_guided_attention(attention(query="instruction", layer="current"))',
             'iga = instruction_guided_attention(attention(query="last", layer="current"))',
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: IGA from the layer before the pruning layer", "vtoken/strategies/transprune.py",
             'iga = instruction_guided_attention(attention(query="instruction", layer="current"))',
             'iga = instruction_guided_attention(attention(query="instruction", layer="previous"))',
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("FastV: default scores from the pruning layer's own attention", "vtoken/strategies/fastv.py",
             'score_layer: str = "previous"', 'score_layer: str = "current"',
             ("tests/test_parity_fastv.py", "tests/test_strategies.py")),
    Mutation("AIF: default heads combined by mean", "vtoken/strategies/aif.py",
             '    heads: str = "max"\n', '    heads: str = "mean"\n',
             ("tests/test_parity_aif.py", "tests/test_aif.py")),
    Mutation("AIF: default query rows the next token's", "vtoken/strategies/aif.py",
             '    query: str = "instruction"\n', '    query: str = "next"\n',
             ("tests/test_parity_aif.py", "tests/test_aif.py")),
    Mutation("ZOO-Prune: default step 0.1, not 0.01", "vtoken/strategies/zoo_prune.py",
             "step: float = 0.01", "step: float = 0.1",
             ("tests/test_parity_zoo_prune.py", "tests/test_zoo_prune.py")),
    Mutation("pool: windows max-pooled, not averaged", "vtoken/strategies/pool.py",
             "band = F.adaptive_avg_pool2d(image[:, top:bottom], (1, cols))",
             "band = F.adaptive_max_pool2d(image[:, top:bottom], (1, cols))",
             ("tests/test_strategies.py", "tests/test_all_methods.py::-k pool")),
    Mutation("oracle: the relevant patches not preferred", "vtoken/strategies/oracle.py",
             "scores[r] += hit.float()", "scores[r] += 0.0 * hit.float()",
             ("tests/test_generation.py::-k annotations", "tests/test_vqa_evaluate.py::-k oracle")),
    Mutation("FLOPs: a gated MLP counted as two matrices", "vtoken/model_dims.py",
             "return 2 * self.mlp_matrices * self.hidden * self.intermediate",
             "return 2 * 2 * self.hidden * self.intermediate",
             ("tests/test_flops.py",)),
    Mutation("FLOPs: an ungated FFN counted as gated", "vtoken/model_dims.py",
             "mlp_matrices=2 if getattr(text, \"model_type\", None) in TWO_MATRIX_MLP_MODEL_TYPES else 3,",
             "mlp_matrices=3,", ("tests/test_flops_llms.py",)),
    Mutation("FLOPs: a mixture-of-experts layer's router not counted", "vtoken/model_dims.py",
             "router = 2 * hidden * self.experts", "router = 0", ("tests/test_flops_llms.py",)),
    Mutation("FLOPs: one expert per token, not top-k", "vtoken/model_dims.py",
             "routed = self.top_k * 6 * hidden * self.intermediate", "routed = 6 * hidden * self.intermediate",
             ("tests/test_flops_llms.py",)),
    Mutation("FLOPs: Qwen-MoE's sparse layers picked off by one", "vtoken/model_dims.py",
             "if i not in dense and (i + 1) % step == 0)", "if i not in dense and i % step == 0)",
             ("tests/test_flops_llms.py",)),
    Mutation("LLM attention: q/k norms under other names not refused", "vtoken/compat.py",
             'if "norm" in type(child).__name__.lower() and not any(child is norm for norm in applied)]', "if False]",
             ("tests/test_llm_backbones.py::-k cannot_reproduce",)),
    Mutation("LLM attention: an attention module's own parameters (sinks) not refused", "vtoken/compat.py",
             "own = [name for name, _ in attention.named_parameters(recurse=False)]", "own = []",
             ("tests/test_llm_backbones.py::-k cannot_reproduce",)),
    Mutation("LLM attention: a rotary embedding other than cos/sin not refused", "vtoken/compat.py",
             "if attention_rotates(attention) and decoder_rotary_function(attention) is None:", "if False:",
             ("tests/test_llm_backbones.py::-k cannot_reproduce",)),
    Mutation("In-LLM stages: a layer's second token mixer (FalconH1's mamba) not refused", "vtoken/compat.py",
             "            and next(child.parameters(), None) is not None]", "            and False]",
             ("tests/test_llm_backbones.py::-k mixing_tokens",)),
    Mutation("Static cache: recurrent (Mamba) layers handed a mask padded to the slots", "vtoken/compat.py",
             "    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in getattr(cache, \"layers\", None) or [])",
             "    return False", ("tests/test_llm_backbones.py::-k recurrent_state",)),
    Mutation("TransPrune: GraniteMoE's MLP branch (block_sparse_moe) not observed", "vtoken/compat.py",
             '_DECODER_MLP_ATTRIBUTES = ("mlp", "block_sparse_moe")', '_DECODER_MLP_ATTRIBUTES = ("mlp",)',
             ("tests/test_llm_backbones.py::-k mlp_branch",)),
    Mutation("FLOPs: the projector's second layer not counted", "vtoken/accounting.py",
             "return 2 * tokens * (p.in_dim * p.hidden + p.hidden * p.out_dim)", "return 2 * tokens * p.in_dim * p.hidden",
             ("tests/test_flops.py",)),
    Mutation("TransPrune: default alpha 0.6, not the paper's 0.5", "vtoken/strategies/transprune.py",
             "    alpha: float = 0.5\n", "    alpha: float = 0.6\n",
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("TransPrune: the released schedule's second stage at 10 of 32 layers", "vtoken/strategies/transprune.py",
             "PAPER_PRUNE_LAYERS = (7, 9, 12)", "PAPER_PRUNE_LAYERS = (7, 10, 12)",
             ("tests/test_parity_transprune.py", "tests/test_transprune.py")),
    Mutation("VisionZip: dominant share 48 of 64, not 54", "vtoken/strategies/visionzip.py",
             "PAPER_DOMINANT_SHARE = 54 / 64", "PAPER_DOMINANT_SHARE = 48 / 64",
             ("tests/test_visionzip.py",)),
    Mutation("Representation Shift: the paper's blocks 1, 4, 8", "vtoken/strategies/repshift.py",
             "PAPER_BLOCKS = (1, 4, 7)", "PAPER_BLOCKS = (1, 4, 8)",
             ("tests/test_parity_repshift.py", "tests/test_repshift.py")),
    Mutation("Representation Shift: 70% kept per stage, not 80%", "vtoken/strategies/repshift.py",
             "PAPER_KEEP_PER_STAGE = 0.8", "PAPER_KEEP_PER_STAGE = 0.7",
             ("tests/test_parity_repshift.py", "tests/test_repshift.py")),
    Mutation("VFlowOpt: default t 30, not 34.76", "vtoken/strategies/vflowopt.py",
             "t: float = 34.76", "t: float = 30.0",
             ("tests/test_parity_vflowopt.py", "tests/test_vflowopt.py")),
    Mutation("VFlowOpt: default recycling side 12, not 15.58", "vtoken/strategies/vflowopt.py",
             "a: float = 15.58", "a: float = 12.0",
             ("tests/test_parity_vflowopt.py", "tests/test_vflowopt.py")),
    Mutation("FastV: default positions renumbered (the official code keeps the original ids)", "vtoken/strategies/fastv.py",
             '    score_layer: str = "previous"\n', '    score_layer: str = "previous"\n    positions: str = "contiguous"\n',
             ("tests/test_parity_fastv.py",)),
    Mutation("Contiguous positions start at 0, not at a sample's first valid position", "vtoken/layout.py",
             "positions = start + (self.valid.long().cumsum(-1) - 1).clamp(min=0)",
             "positions = (self.valid.long().cumsum(-1) - 1).clamp(min=0)",
             ("tests/test_layout.py",)),
    Mutation("Decoding positions not shifted by what renumbering dropped (1-D, generate's own ids)",
             "vtoken/adapters/hf_decoder.py",
             "            return run.new_positions - dropped[:, None, :]\n", "            return run.new_positions\n",
             ("tests/test_generation.py", "tests/test_random_models.py")),
    Mutation("Decoding positions not shifted by what renumbering dropped (no ids from the caller)",
             "vtoken/adapters/hf_decoder.py",
             "        return run.new_positions - dropped\n", "        return run.new_positions\n",
             ("tests/test_generation.py", "tests/test_still_the_model.py", "tests/test_random_models.py")),
    Mutation("Keys handed to layer K: a new pad slot gets the dropped token's key, not the key of 0",
             "vtoken/adapters/key_reuse.py",
             "pads = selected_from < 0", "pads = selected_from < -1",
             ("tests/test_key_reuse.py", "tests/test_random_models.py")),
    Mutation("AIF eviction: the stage's own layer keeps the masked tokens' keys and values",
             "vtoken/adapters/mask_stage.py",
             "for layer in range(stage.layer, compat.num_cache_layers(cache)):",
             "for layer in range(stage.layer + 1, compat.num_cache_layers(cache)):",
             ("tests/test_aif.py", "tests/test_random_models.py")),
    Mutation("Compaction pads on the right, not the left", "vtoken/kernels/reference.py",
             "dest = keep.long().cumsum(dim=-1) - 1 + (width - counts)[:, None]",
             "dest = keep.long().cumsum(dim=-1) - 1",
             ("tests/test_kernels_reference.py", "tests/test_generation.py")),
    Mutation("M-RoPE renumbering: text after an image starts at the image's largest id, not one past it",
             "vtoken/layout.py",
             "first = min(largest + 1, first - shift)", "first = min(largest, first - shift)",
             ("tests/test_layout.py", "tests/test_all_families.py")),
    Mutation("Scoring rows: a query does not attend to itself", "vtoken/adapters/hf_decoder.py",
             "causal = torch.arange(length, device=hidden.device)[None, None, :] <= query_slots[:, :, None]",
             "causal = torch.arange(length, device=hidden.device)[None, None, :] < query_slots[:, :, None]",
             ("tests/test_scoring_context.py", "tests/test_all_families.py::-k eager_map")),
    Mutation("Scoring rows: rotary's first half with the wrong sign", "vtoken/adapters/hf_decoder.py",
             "out[..., :half].sub_(x2 * sin[..., :half])", "out[..., :half].add_(x2 * sin[..., :half])",
             ("tests/test_parity_fastv.py", "tests/test_scoring_rows.py", "tests/test_llm_backbones.py::-k fast_rotary")),
    Mutation("TokenPacker: region count rounded down at a ragged edge", "vtoken/packer.py",
             "return -(-height // self.scale) * -(-width // self.scale)", "return (height // self.scale) * (width // self.scale)",
             ("tests/test_tokenpacker.py", "tests/test_parity_tokenpacker.py")),
    Mutation("Static cache: a layer's keys and values read over its whole buffer, unwritten slots too",
             "vtoken/compat.py", "return entry.keys[:, :, :held], entry.values[:, :, :held]",
             "return entry.keys, entry.values",
             ("tests/test_key_reuse.py", "tests/test_still_the_model.py::-k static")),
    Mutation("Static cache: scoring reads the prompt's keys from the end of the buffer, not its written slots",
             "vtoken/compat.py", "    keys = cache_layer_kv(cache, layer)[0]\n", "    keys = entry.keys\n",
             ("tests/test_key_reuse.py",)),
    Mutation("AIF: the next-token probe decodes from each row's last slot, not its last prompt token",
             "vtoken/adapters/mask_stage.py", "        last = layout.last_slot(prompt)\n",
             "        last = layout.last_slot(torch.ones_like(prompt))\n",
             ("tests/test_generation.py::-k next_token_probe",)),
    Mutation("Static cache: a prefill's 4-D mask read for padding by its last row alone (a sliding window's misses early tokens)",
             "vtoken/adapters/hf_decoder.py", "        padding = padding | allowed(mask[:, 0, index, index])\n", "        pass\n",
             ("tests/test_llm_backbones.py::-k past_the_sliding_window_equal",)),
    Mutation("Static cache: a pruned mask longer than a sliding layer's slots cut to them",
             "vtoken/adapters/hf_decoder.py",
             "if capacity is not None and padding is not None and padding.shape[1] < capacity:",
             "if capacity is not None and padding is not None:",
             ("tests/test_llm_backbones.py::-k past_the_sliding_window_equal",)),
    Mutation("Scoring rows: every LLM rotated with the rotate-half convention (Cohere's and GLM's pairs are interleaved)",
             "vtoken/adapters/hf_decoder.py", "    if function is None or _rotates_as_llama(function):\n",
             "    if True:\n", ("tests/test_llm_backbones.py::-k eager_map",)),
    Mutation("Scoring rows: q/k norms always per head (OLMo2's normalise the whole projection first)",
             "vtoken/adapters/hf_decoder.py", "    if norm is not None and compat.norm_before_head_split(norm, head_dim):\n",
             "    if False:\n", ("tests/test_llm_backbones.py::-k eager_map",)),
    Mutation("Scoring rows: StableLM's per-head q/k LayerNorms left out", "vtoken/compat.py",
             '    if q_norm is None and getattr(attn, "qk_layernorm", False):', "    if False:",
             ("tests/test_llm_backbones.py::-k eager_map",)),
    Mutation("Scoring rows: layers without rotary (NoPE: SmolLM3, EXAONE 4, Cohere2) rotated anyway",
             "vtoken/adapters/hf_decoder.py", "    if not compat.attention_rotates(attention):", "    if False:",
             ("tests/test_llm_backbones.py::-k eager_map",)),
    Mutation("AIF: next-token probe written into a static cache with no slot left", "vtoken/adapters/mask_stage.py",
             "        full = compat.is_static_cache(cache) and compat.static_cache_free_slots(cache) < 1\n",
             "        full = False\n", ("tests/test_still_the_model.py::-k no_slot_left",)),
    Mutation("FLOPs: AIF's rerun on several images leaves out the images after the first", "vtoken/strategies/aif.py",
             'ScoringCost("llm_rerun_rows", layer=0, rows=instruction, later_images=True)',
             'ScoringCost("llm_rerun_rows", layer=0, rows=instruction)', ("tests/test_flops_scoring.py",)),
    Mutation("FLOPs: AIF's next-token probe without its LM head row", "vtoken/strategies/aif.py",
             '            costs.append(ScoringCost("lm_head_rows", rows=1))\n', "",
             ("tests/test_flops_scoring.py::-k next_token_probe",)),
    Mutation("FLOPs: AIF's probe step leaves out its own key", "vtoken/strategies/aif.py",
             'ScoringCost("llm_rerun_rows", layer=0, rows=1, own_keys=1)', 'ScoringCost("llm_rerun_rows", layer=0, rows=1)',
             ("tests/test_flops_scoring.py::-k next_token_probe",)),
    Mutation("FLOPs: the attention rows' own keys not scored", "vtoken/accounting.py",
             "        keys = text_tokens + visual + cost.own_keys\n", "        keys = text_tokens + visual\n",
             ("tests/test_flops_scoring.py::-k next_token_probe",)),
    Mutation("FLOPs: ZOO-Prune's sensitivity over every crop's patches, not the packed tokens it scores",
             "vtoken/accounting.py", "    if geo.newlines and not _vision_stages(schedule):\n",
             "    if False:\n", ("tests/test_flops_scoring.py",)),
    Mutation("FLOPs: ZOO-Prune's diverse selection left out", "vtoken/accounting.py",
             "selection = 0 if stage is None else 2 * stage.keep_tokens * per_image * dims.projector.out_dim",
             "selection = 0", ("tests/test_flops_scoring.py", "tests/test_zoo_prune.py")),
    Mutation("FLOPs: ZOO-Prune's directions through the first layer left out", "vtoken/accounting.py",
             "return 2 * (tokens + directions) * p.in_dim * p.hidden + directions * tokens * per_pair",
             "return 2 * tokens * p.in_dim * p.hidden + directions * tokens * per_pair",
             ("tests/test_flops_scoring.py", "tests/test_zoo_prune.py")),
    Mutation("FLOPs: the merger's shift term of ZOO-Prune's normed pre-activations left out", "vtoken/accounting.py",
             "(8 * p.norm_groups + 4) * p.hidden", "8 * p.norm_groups * p.hidden",
             ("tests/test_flops_scoring.py", "tests/test_zoo_prune.py")),
    Mutation("Qwen-VL's merging projector rebuilt at every call (ZOO-Prune's cached structure lost)",
             "vtoken/adapters/pipeline.py", "        return self._merging_projector\n",
             "        return MergingProjectorOnTokens(spec.module, self.description.vision.width)\n",
             ("tests/test_flops_scoring.py",)),
    Mutation("AIF's observed rows projected again (the layer's own query projection not used)",
             "vtoken/adapters/hf_decoder.py", "            queries = run.layer_queries.pop(index, None)\n",
             "            queries = run.layer_queries.pop(index, None) and None\n",
             ("tests/test_aif.py::-k query_rows_from",)),
    Mutation("AIF's observed rows taken from the layer's query projection of the wrong slots",
             "vtoken/adapters/hf_decoder.py", "        projected = query_rows(queries)\n",
             "        projected = query_rows(queries.roll(1, dims=1))\n",
             ("tests/test_aif.py",)),
    Mutation("FLOPs: a kept query projection counted as scoring (queries_cached ignored)", "vtoken/accounting.py",
             "queried = 0 if cost.queries_cached and not d.fused_qkv else cost.rows",
             "queried = cost.rows", ("tests/test_flops_scoring.py", "tests/test_flops.py")),
)


def first_failure(clone: Path, test: str) -> str | None:
    """The first failing test of ``test`` (``file`` or ``file::-k expr``) in ``clone``, or None."""
    path, _, select = test.partition("::")
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider", path]
    if select:
        argv += select.split(" ", 1)
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode == 0:
        return None
    found = re.search(r"^FAILED (\S+)", done.stdout, re.M) or re.search(r"^ERROR (\S+)", done.stdout, re.M)
    return found.group(1) if found else f"exit {done.returncode}: {done.stdout.strip().splitlines()[-1:]}"


def clone_head(into: Path) -> Path:
    clone = into / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run the mutations whose name contains this text")
    add_output_arguments(parser, "Markdown file (e.g. eval/results/mutations.md)")
    args = parser.parse_args(argv)
    out = claim(args.out, args.overwrite)
    chosen = [m for m in MUTATIONS if args.only is None or args.only.lower() in m.name.lower()]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    lines, start, caught = [], time.time(), 0
    with tempfile.TemporaryDirectory() as scratch:
        clone = clone_head(Path(scratch))
        for mutation in chosen:
            target = clone / mutation.path
            original = target.read_text()
            if original.count(mutation.old) != 1:
                lines.append(f"| {mutation.name} | `{mutation.path}` | **stale**: the text to change is not there once |")
                continue
            target.write_text(original.replace(mutation.old, mutation.new))
            began = time.time()
            try:
                failure = next((f for f in (first_failure(clone, t) for t in mutation.tests) if f), None)
            finally:
                target.write_text(original)
                shutil.rmtree(clone / "tests" / "__pycache__", ignore_errors=True)
            caught += failure is not None
            verdict = f"`{failure}`" if failure else "**NOT CAUGHT**"
            lines.append(f"| {mutation.name} | `{mutation.path}` | {verdict} ({time.time() - began:.0f} s) |")
            print(lines[-1], flush=True)
    text = "\n".join([
        "# Mutations of the methods' formulas and the first test that catches each",
        "",
        f"Produced by `{command_line('mutations', argv)}` on commit {head} ({(time.time() - start) / 60:.1f} min): "
        f"{caught} of {len(chosen)} caught. Each mutation is one edit (see `MUTATIONS` in the script), made alone "
        "in a fresh clone; the test files named there run in order with `-x`.",
        "",
        "| mutation | file | first failing test |",
        "|---|---|---|",
        *lines,
    ]) + "\n"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
