"""Token-pruning kernels: plain PyTorch references (the CPU path and the test oracle) and their dispatch.

Every public function here takes tensors and returns tensors; which implementation runs is decided per
call (a CUDA tensor and an importable Triton pick the Triton kernel), never at import time.
"""

from .reference import attention_rows, compact_index, gather_tokens, masked_topk, received_attention

__all__ = ["attention_rows", "compact_index", "gather_tokens", "masked_topk", "received_attention"]
