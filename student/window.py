"""The hybrid's sliding-window + sink attention in O(T·W): queries in blocks, each attending only to its keys' band
(the block and the W - 1 positions before it) and to the S sinks, so no (T, T) mask or score matrix exists.

    query i sees key j   when j <= i and i - j < W            (the window, scored with q)
    query i sees sink s  when s < S and i - s >= W            (outside the window: scored with q_sink, the query
                                                               rotated to its StreamingLLM cache position)

The same function as HybridMixer's dense-mask SDPA (tests/test_window.py holds them equal in float64 for T below,
at and far beyond W). Plain tensor ops, so it runs on every device, autograd included, and in float64 for the tests;
the CPU uses it. On CUDA the dense path stays until a block-sparse kernel (flex_attention with a BlockMask, or
FlashAttention's window with the sinks merged by log-sum-exp) is measured there against it (issue 23).
"""

from __future__ import annotations

import torch

BLOCK = 128
"""Queries per block: the band of keys a block reads is BLOCK + W - 1 wide."""


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sink: torch.Tensor | None, window: int,
                     sinks: int, scaling: float, block: int = BLOCK) -> torch.Tensor:
    """Softmax attention (B, H, T, d) of q over the window and the sinks outside it; k, v (B, H, T, d) already
    repeated to the query heads; q_sink None means q itself (no query is far enough for the rotations to differ)."""
    B, H, T, d = q.shape
    q_sink = q if q_sink is None else q_sink
    acc = torch.promote_types(q.dtype, torch.float32)  # scores and softmax in fp32 at least (float64 stays)
    out = torch.empty(B, H, T, v.shape[-1], dtype=v.dtype, device=v.device)
    sink_k, sink_v = k[:, :, :sinks].to(acc), v[:, :, :sinks].to(acc)  # (B, H, S, d)
    for a in range(0, T, block):
        b = min(a + block, T)
        lo = max(0, a - window + 1)  # the band's first key
        i = torch.arange(a, b, device=q.device)[:, None]  # (n, 1) query positions
        j = torch.arange(lo, b, device=q.device)[None, :]  # (1, m) key positions
        in_window = (j <= i) & (i - j < window)  # (n, m)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, a:b].to(acc), k[:, :, lo:b].to(acc)) * scaling
        scores = scores.masked_fill(~in_window, float("-inf"))  # (B, H, n, m)
        values = v[:, :, lo:b].to(acc)  # (B, H, m, d)
        far = i - torch.arange(sinks, device=q.device)[None, :] >= window  # (n, S)
        if sinks and bool(far.any()):
            s = torch.einsum("bhqd,bhkd->bhqk", q_sink[:, :, a:b].to(acc), sink_k) * scaling  # (B, H, n, S)
            scores = torch.cat([s.masked_fill(~far, float("-inf")), scores], -1)  # (B, H, n, S + m)
            values = torch.cat([sink_v, values], 2)  # (B, H, S + m, d)
        out[:, :, a:b] = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, -1), values).to(v.dtype)
    return out
