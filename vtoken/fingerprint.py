"""A cheap, device-independent fingerprint of a tensor's bytes: what seeds random's (and the oracle
fill's) per-image draws, so that an image is drawn from its own pixels and never from its batch.

Hashing every byte on the host cost as much as the whole of random's scoring (a blake2b of 10.8 MB of
float pixels on a Qwen2-VL image of 2304 patches: about 12 ms, 1% of the prefill on one CPU thread)
and, on a GPU, a copy of all the pixels to the host. Instead the bytes are read as 64-bit words where
they lie and reduced to two sets of ``BLOCKS`` sums (integer addition modulo 2**64: exact, so the same
on every device and in any summation order):

- ``by_run[b]``: the sum of the ``b``-th run of ``L`` consecutive words (``L = words // BLOCKS``);
- ``by_stride[s]``: the sum of the words whose index is ``s`` modulo ``BLOCKS``.

Only those ``2 * BLOCKS`` sums (64 KiB) and the bytes past the last whole run reach the host and the
hash. Any change of one word changes its run's sum; swapping two different words changes a sum too
as long as ``L < BLOCKS`` (two words in the same run are fewer than ``BLOCKS`` apart, so they fall in
different stride classes): true for any tensor under ``8 * BLOCKS**2`` bytes (128 MiB). What goes
undetected is a change whose differences cancel on every run and every stride class at once (four or
more words arranged just so): irrelevant for a seed, which must only depend on the image.
"""

from __future__ import annotations

import hashlib

import torch

#: Runs (and stride classes) the words of a tensor are summed over.
BLOCKS = 4096


def update_with_tensor(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    """Feed ``digest`` a fingerprint of ``tensor``'s bytes in memory order (its shape and dtype do not
    enter, only its byte length): equal bytes give equal updates on any device."""
    raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
    if raw.storage_offset() % 8:
        # A slice of a batch (one image's pixels) can start off a word: its bytes cannot be read as
        # 64-bit words in place (odd image sides in float32, bfloat16 sides not a multiple of 4).
        raw = raw.clone()
    whole = raw.numel() // (8 * BLOCKS) * (8 * BLOCKS)
    parts = [raw[whole:]]
    if whole:
        words = raw[:whole].view(torch.int64)
        sums = torch.cat([words.view(BLOCKS, -1).sum(1), words.view(-1, BLOCKS).sum(0)])
        parts.insert(0, sums.view(torch.uint8))
    digest.update(raw.numel().to_bytes(8, "little"))
    digest.update(torch.cat(parts).cpu().numpy())
