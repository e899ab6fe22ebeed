"""Random model configurations and batches that no other test uses, every method on every family.

Each seed draws a family's model (depth, widths, GQA / MQA / MHA, head dims, tower and patch sizes,
the text model under LLaVA, AnyRes pinpoints, Qwen windows / DeepStack layers / videos), a left-padded
batch of samples holding 0, 1 or 2 images, a method's random options and sometimes bfloat16
(``eval/random_models.py``); ``eval/wrap_checks.py`` then checks that keep=1.0 is the plain model,
that a real budget runs every generate mode with greedy decoding equal across caches, that each
sample alone gets what it gets in the batch, that the batch right-padded gives the same last-token
logits, and that unwrap gives the model back bit for bit. The
seeds cycle through the families and, per family, through every method that runs there.
``python eval/fuzz_models.py --minutes 30`` runs the same checks on fresh seeds.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

from random_models import FAMILIES  # noqa: E402
from wrap_checks import check_seed, methods_for  # noqa: E402

CASES = 96  # 16 per family: every method of a family at least once


@pytest.mark.parametrize("seed", range(CASES))
def test_a_random_model_and_batch_keep_every_guarantee(seed):
    family = FAMILIES[seed % len(FAMILIES)]
    methods = methods_for(family)
    method = methods[(seed // len(FAMILIES)) % len(methods)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_seed(seed, family, method)
    assert not report.failures, report.summary()


VIT_CASES = 60  # 15 per vision-only kind: every method on each, several times


@pytest.mark.parametrize("seed", range(VIT_CASES))
def test_a_random_vision_only_model_keeps_every_guarantee(seed):
    """``eval/random_vits.py``: a random CLIP / SigLIP tower, timm or open_clip ViT and batch, a method
    that runs there with random options: keep-all is the plain model, the budget keeps its count of
    each image's patches and each image alone gets its batch output, unwrap gives the model back."""
    from random_vits import KINDS, METHODS as VIT_METHODS, check_vit_seed

    kind = KINDS[seed % len(KINDS)]
    method = VIT_METHODS[(seed // len(KINDS)) % len(VIT_METHODS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        failures = check_vit_seed(seed, kind, method)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("seed,method,options", [(3093, "vflowopt", {"keep": 0.25}),
                                                 (3177, "transprune", {"keep_tokens": 5, "ttv_only": True})])
def test_prompt_lookup_whose_first_candidates_are_rejected_decodes_as_greedy(seed, method, options):
    """Prompt-lookup decoding feeds candidate tokens after the prompt in its first forward; when they
    are rejected, generate crops them from the cache. vtoken counted them in the prompt and then
    crashed (a negative new-token count); it now forgets them (PruneRun.drop_prompt_tail). Two random
    cases of an unpadded sample where that happens: the tokens are greedy's."""
    import vtoken
    from random_models import PAD, SUPPRESS, RandomCase

    case = RandomCase.draw(seed)
    kwargs = dict(max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS, pad_token_id=PAD)
    with vtoken.pruned(case.model, method, **options), torch.no_grad():
        greedy = case.model.generate(**case.inputs, **kwargs)
        lookup = case.model.generate(**case.inputs, prompt_lookup_num_tokens=2, **kwargs)
    assert torch.equal(lookup, greedy)


def test_aif_evicting_reads_a_right_padded_prompts_logits_and_labels_at_its_own_slots():
    """AIF with ``mode="evict"`` compacts decoding's layout once the prompt has run; where that layout
    happened to be as long as the prompt, ``logits_to_keep`` positions and ``labels`` were mapped
    through it, not through the prompt's own slots: in a right-padded batch the padded samples got
    other tokens' logits (0.39 off here, a random Qwen3-VL case). By construction: each sample's
    last-token logits through ``logits_to_keep`` are the full logits at that slot, and the loss over
    the labels is the one computed from the full logits."""
    import torch.nn.functional as F

    import vtoken
    from random_models import RandomCase, right_padded

    case = RandomCase.draw(800199)
    x = right_padded(case.inputs)
    last = (x["attention_mask"].sum(-1) - 1)[:, None]
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    with vtoken.pruned(case.model, "aif", mode="evict", ratio="adaptive"), torch.no_grad():
        full = case.model(**x).logits
        assert full.shape[1] == x["input_ids"].shape[1]  # AIF keeps every token of the prompt
        picked = case.model(**x, logits_to_keep=last).logits[:, 0]
        loss = case.model(**x, labels=labels).loss
    torch.testing.assert_close(picked, full[torch.arange(len(last)), last[:, 0]], rtol=0, atol=0)
    expected = F.cross_entropy(full[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_a_tie_between_two_calls_is_one_kept_token_swapped_per_stage():
    """``wrap_checks._tie``, the rule that excuses a generate mode whose logits differ from greedy's:
    the two calls' selections differ, and only by one kept token swapped for another per stage of a
    sample; equal selections (the logits must then agree), two swaps or another count are no tie."""
    from wrap_checks import _tie

    def sel(*rows):
        return [{"llm:1": torch.tensor(r)} for r in rows]

    assert _tie(sel([1, 2, 3], [4, 5]), sel([1, 2, 7], [4, 5]))
    assert not _tie(sel([1, 2, 3], [4, 5]), sel([1, 2, 3], [4, 5]))
    assert not _tie(sel([1, 2, 3], [4, 5]), sel([1, 6, 7], [4, 5]))
    assert not _tie(sel([1, 2, 3], [4, 5]), sel([1, 2], [4, 5]))
    assert not _tie(sel([1, 2, 3]), sel([1, 2, 7], [4, 5]))
