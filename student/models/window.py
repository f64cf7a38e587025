"""The hybrid's sliding-window + sink attention in O(T·W): queries in blocks, each attending only to its keys' band
(the block and the W - 1 positions before it) and to the S sinks, so no (T, T) mask or score matrix exists.

    query i sees key j   when j <= i and i - j < W            (the window, scored with q)
    query i sees sink s  when s < S and i - s >= W            (outside the window: scored with q_sink, the query
                                                               rotated to its StreamingLLM cache position)

The same function as a dense-mask attention (tests/test_window.py holds them equal in float64 for T below, at and
far beyond W). All blocks at once: the bands are gathered from the padded keys, so the work is a fixed
handful of batched kernels whatever T is, on every device, autograd included, and in float64 for the tests. Written
with tensor ops rather than flex_attention because it must also run on the CPU and on a T4 (sm 7.5), and the same
code serving every device is the code the float64 test covers.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

WINDOW_ENV = "TCACHE_WINDOW"
"""blocked (default): window_attention, O(T·W) on every device; dense: dense_window_attention, one SDPA call over a
(T, S + T) mask (the earlier CUDA path, O(T^2)); flex: flex_window_attention, block-sparse; for benchmarks that compare
them in one process."""
BLOCK = 64
"""Queries per block: the band of keys a block reads is BLOCK + W - 1 wide, rounded up to a multiple of 8 (at W = 32,
96 keys per query)."""


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sink: torch.Tensor | None, window: int,
                     sinks: int, scaling: float, block: int = BLOCK) -> torch.Tensor:
    """Softmax attention (B, H, T, d) of q over the window and the sinks outside it; k, v (B, H, T, d) already
    repeated to the query heads; q_sink None means q itself (no query is far enough for the rotations to differ)."""
    B, H, T, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    far_sinks = sinks if sinks and T > window else 0  # some query has a sink outside its window
    # P >= W - 1 keys before a block's first query that its band holds, a multiple of 8, and blocks of a multiple of
    # 8 queries: each GEMM then spans a multiple of 8 elements per row (block + P keys), which the tensor-core
    # kernels need for aligned loads (at W = 32: 96 keys instead of 95). Unaligned, cuBLAS fell back to cutlass's
    # "align1/2" kernels (5.2 of the 67 GPU ms of a stage II step, H200, benchmarks/results/distill-step-h200). The
    # S sinks stay out of the GEMMs (their scores and values are products and sums the compiler fuses): a band of
    # S + block + P keys cannot be aligned for both the score and the value GEMM at S = 4 (the score GEMM was 100
    # keys wide when the sinks' 4 made 104: tests/test_window.py's GEMM test). The keys added are masked like any key
    # outside the window.
    P = -(-(window - 1) // 8) * 8
    block = max(-(-block // 8) * 8, P)  # a band = the block and the previous block's last P keys
    n = -(-T // block)  # blocks
    pad = n * block - T

    def bands(x):  # (B, H, T, e) -> (B, H, n, P + block, e): block b's keys, positions b*block - P ...
        # Built from reshapes, slices and a concatenation (zeros before position 0, masked below). Tensor.unfold's
        # overlapping view and an index gather gave wrong key gradients through torch.compile (inductor, torch
        # 2.13: unfold's backward; the gather under activation checkpointing; tests/test_hybrid_compile.py).
        xb = F.pad(x, (0, 0, 0, pad)).view(B, H, n, block, x.shape[-1])  # (B, H, n, block, e)
        prev = torch.cat([torch.zeros_like(xb[:, :, :1]), xb[:, :, :-1]], 2)[:, :, :, block - P:]  # (B, H, n, P, e)
        return torch.cat([prev, xb], 3)

    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n, block, d).to(acc)  # (B, H, n, block, d)
    # scores and the softmax in fp32 at least (float64 stays): .to(acc) after the GEMM, which bf16 autocast runs in
    # bf16 (it casts matmuls, not our .to()); fp32 GEMMs would cost ~3 ms of a 66 ms stage II step (H100)
    scores = torch.einsum("bhnqd,bhnkd->bhnqk", qb, bands(k).to(acc)).to(acc) * scaling  # (B, H, n, block, block + P)
    i = torch.arange(n * block, device=q.device).view(n, block, 1)  # query positions
    j = i[:, :1] - P + torch.arange(block + P, device=q.device).view(1, 1, -1)  # (n, 1, block + P) key positions
    scores = scores.masked_fill(~((j <= i) & (i - j < window) & (j >= 0)), float("-inf"))
    # the softmax over [sinks, band] by hand, so neither GEMM sees the sinks: exp against the row's max (detached:
    # softmax does not depend on the shift; every row holds its own key, so the max is finite), one sum for both
    top = scores.amax(-1, keepdim=True)  # (B, H, n, block, 1)
    if far_sinks:
        qs = q if q_sink is None else q_sink
        qs = F.pad(qs, (0, 0, 0, pad)).view(B, H, n, block, d).to(acc)
        ks = k[:, :, None, None, :sinks].to(acc)  # (B, H, 1, 1, S, d)
        s = (qs.unsqueeze(-2) * ks).sum(-1) * scaling  # (B, H, n, block, S)
        far = i - torch.arange(sinks, device=q.device) >= window  # (n, block, S)
        s = s.masked_fill(~far, float("-inf"))
        top = torch.maximum(top, s.amax(-1, keepdim=True))
    top = top.detach()
    e = torch.exp(scores - top)  # (B, H, n, block, block + P)
    out = torch.einsum("bhnqk,bhnkd->bhnqd", e, bands(v).to(acc)).to(acc)  # (B, H, n, block, d)
    total = e.sum(-1, keepdim=True)  # (B, H, n, block, 1)
    if far_sinks:
        es = torch.exp(s - top)  # (B, H, n, block, S)
        out = out + (es.unsqueeze(-1) * v[:, :, None, None, :sinks].to(acc)).sum(-2)  # (B, H, n, block, d)
        total = total + es.sum(-1, keepdim=True)
    return (out / total).reshape(B, H, n * block, -1)[:, :, :T].to(v.dtype)


def dense_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sink: torch.Tensor | None,
                           window: int, sinks: int, scaling: float) -> torch.Tensor:
    """window_attention's function as one SDPA call over a dense (T, S + T) mask, O(T^2): the hybrid's CUDA path
    before the blocked one, kept so benchmarks compare the two in one process (TCACHE_WINDOW=dense). A sink outside
    a query's window is scored with q_sink: the keys are [sink keys; all keys] and the head dimension is doubled,
    [q, q_sink] against [0, k_sink] for the sink entries and [k, 0] for the window entries."""
    T, S = q.shape[2], sinks
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    in_window = (j <= i) & (i - j < window)  # (T, T)
    if q_sink is None:
        allowed = in_window | ((j <= i) & (j < S))  # (T, T): no query is far enough for the rotations to differ
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    zeros = torch.zeros_like(k[:, :, :S])  # (B, H, S, d)
    keys = torch.cat([torch.cat([zeros, k[:, :, :S]], -1), torch.cat([k, torch.zeros_like(k)], -1)], 2)
    values = torch.cat([v[:, :, :S], v], 2)  # (B, H, S + T, d)
    far_sink = i - torch.arange(S, device=q.device)[None, :] >= window  # (T, S)
    mask = torch.cat([far_sink, in_window], 1)  # (T, S + T)
    return F.scaled_dot_product_attention(torch.cat([q, q_sink], -1), keys, values, attn_mask=mask,
                                          scale=scaling)  # (B, H, T, d)


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sink: torch.Tensor | None,
                          window: int, sinks: int, scaling: float) -> torch.Tensor:
    """window_attention's function through PyTorch's flex_attention (a fused kernel under torch.compile on GPUs of
    compute capability >= 8.0) with a block-sparse mask, so only the band's blocks and the sinks' are computed. The
    keys are [sink keys; all keys] as in dense_window_attention, the head dimension doubled when the sinks take the
    rotated queries: [q, q_sink] against [0, k_sink] and [k, 0]. TCACHE_WINDOW=flex; measured against the blocked
    default in benchmarks/distill_hybrid.py."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, S = q.shape[2], sinks if sinks and q.shape[2] > window else 0
    if S and q_sink is not None:
        zeros = torch.zeros_like(k[:, :, :S])  # (B, H, S, d)
        keys = torch.cat([torch.cat([zeros, k[:, :, :S]], -1), torch.cat([k, torch.zeros_like(k)], -1)], 2)
        queries = torch.cat([q, q_sink], -1)  # (B, H, T, 2d)
    else:  # no query is far enough for the rotations to differ: the sinks take q itself
        keys, queries = torch.cat([k[:, :, :S], k], 2), q  # (B, H, S + T, d)
    values = torch.cat([v[:, :, :S], v], 2)  # (B, H, S + T, d)

    def allowed(b, h, i, j):  # query i, key slot j: a far sink, or a key of the window
        p = j - S
        return torch.where(j < S, i - j >= window, (p <= i) & (i - p < window))

    mask = create_block_mask(allowed, None, None, T, S + T, device=q.device)
    return flex_attention(queries, keys, values, block_mask=mask, scale=scaling)  # (B, H, T, d)


ATTENTION = {"blocked": window_attention, "dense": dense_window_attention, "flex": flex_window_attention}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sink: torch.Tensor | None, window: int, sinks: int,
           scaling: float) -> torch.Tensor:
    """The window + sinks attention (B, H, T, d) by the kernel TCACHE_WINDOW picks (blocked by default)."""
    return ATTENTION[os.environ.get(WINDOW_ENV, "blocked")](q, k, v, q_sink, window, sinks, scaling)
