"""The pixel fingerprint that seeds random's per-image draws (vtoken/fingerprint.py)."""

import hashlib

import numpy as np
import pytest
import torch

from vtoken.fingerprint import BLOCKS, update_with_tensor


def fingerprint(tensor: torch.Tensor) -> bytes:
    digest = hashlib.blake2b(digest_size=8)
    update_with_tensor(digest, tensor)
    return digest.digest()


def reference(tensor: torch.Tensor) -> bytes:
    """The module docstring's definition, in numpy's wrapping uint64 arithmetic, written out loop by
    loop: run sums, stride-class sums, then the bytes past the last whole run."""
    raw = tensor.detach().contiguous().numpy().tobytes()
    whole = len(raw) // (8 * BLOCKS) * (8 * BLOCKS)
    words = np.frombuffer(raw[:whole], dtype=np.uint64)
    run = len(words) // BLOCKS
    digest = hashlib.blake2b(digest_size=8)
    digest.update(len(raw).to_bytes(8, "little"))
    if whole:
        by_run = np.array([words[b * run:(b + 1) * run].sum(dtype=np.uint64) for b in range(BLOCKS)], dtype=np.uint64)
        by_stride = np.array([words[s::BLOCKS].sum(dtype=np.uint64) for s in range(BLOCKS)], dtype=np.uint64)
        digest.update(by_run.tobytes() + by_stride.tobytes())
    digest.update(raw[whole:])
    return digest.digest()


# LLaVA-1.5's 3 x 336 x 336 float32 pixels (runs of 41 words and a tail), Qwen2-VL-like [patches, 1176]
# rows (runs of 10 words and a tail) and a tensor too small for one run (only its bytes).
SHAPES = [(3, 336, 336), (72, 1176), (5, 7)]


@pytest.mark.parametrize("shape", SHAPES)
def test_equals_the_definition_written_out(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert fingerprint(x) == reference(x)


@pytest.mark.parametrize("shape", SHAPES)
def test_any_one_changed_value_changes_it(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    flat = x.reshape(-1)
    base = fingerprint(x)
    for index in (0, flat.numel() // 2, flat.numel() - 1):  # first run, middle, the tail
        y = flat.clone()
        y[index] = torch.nextafter(y[index], torch.tensor(float("inf")))  # the smallest change there is
        assert fingerprint(y.view(shape)) != base, index


def test_a_mirrored_image_differs():
    """A flip permutes values inside each run of consecutive words; the stride classes tell it."""
    x = torch.randn(3, 336, 336, generator=torch.Generator().manual_seed(2))
    assert fingerprint(x.flip(-1)) != fingerprint(x)
    flat = x.reshape(-1).clone()
    flat[[10, 11]] = flat[[11, 10]]  # two floats of one word swapped: a different word
    assert fingerprint(flat) != fingerprint(x)
    words = x.reshape(-1).clone().view(torch.int64)
    words[[100, 101]] = words[[101, 100]]  # two whole words of one run swapped
    assert fingerprint(words.view(torch.float32)) != fingerprint(x)


def test_only_the_bytes_count():
    x = torch.randn(3, 336, 336, generator=torch.Generator().manual_seed(3))
    assert fingerprint(x.permute(1, 2, 0).contiguous().permute(2, 0, 1)) == fingerprint(x)  # non-contiguous view
    assert fingerprint(x.view(torch.int32)) == fingerprint(x)  # same bytes, other dtype
    assert fingerprint(torch.cat([x.reshape(-1), torch.zeros(1)])) != fingerprint(x)  # a zero more: the length
    assert fingerprint(x.half()) != fingerprint(x)


@pytest.mark.parametrize("dtype,side", [(torch.float32, 105), (torch.bfloat16, 77)])
def test_an_image_starting_off_a_word_is_fingerprinted_as_its_bytes(dtype, side):
    """The second image of a batch of odd-sided float32 images (or bfloat16 ones)
    starts at a byte offset that is not a multiple of 8: its words cannot be read in place. Its
    fingerprint is that of the same bytes copied, and random at the vision site runs on such a batch
    (it raised a RuntimeError from torch's view)."""
    import vtoken
    from transformers import CLIPVisionConfig, CLIPVisionModel

    batch = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert batch[1].storage_offset() * batch.element_size() % 8
    copied = batch[1].clone()  # numpy has no bfloat16: the reference reads its bytes as int16
    assert fingerprint(batch[1]) == fingerprint(copied) == reference(copied.view(torch.int16) if dtype == torch.bfloat16 else copied)
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             image_size=side, patch_size=side // 7)).eval().to(dtype)
    with vtoken.pruned(model, "random", keep=0.5, site="vision", layer=0), torch.no_grad():
        out = model(pixel_values=batch).last_hidden_state
    assert out.shape[1] == 1 + round(0.5 * (side // (side // 7)) ** 2)
