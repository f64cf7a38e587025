"""The window + sinks attention of one decode step as one kernel: a single torch scaled_dot_product_attention call over
a layer's key / value buffers (decode.StaticMixer.keys / values: the sinks at rows 0..S-1, the window's ring slot j
at row S + j), with an additive mask built once per step for every layer: -inf on the slots not yet written and on
the sinks still inside the window (scored there as window keys), 0 elsewhere.

Why SDPA, not flex_attention: SDPA is one op on every device and in every mode the decoder runs (eager on the CPU,
where flex_attention outside torch.compile is an unfused reference; on CUDA from sm 7.5 up, where flex needs sm 8.0
and the T4 path runs on sm 7.5; inside the step's torch.compile and its CUDA graph). With a float mask on CUDA it
takes the memory-efficient kernel, whose bias rows must start 16-element aligned: `aligned` gives the mask padded
storage (a view of the first L columns), so the kernel does not pad a copy per call.

A sink outside the window is scored with the query rotated to its cache position (mixer.sink_queries), the window's
keys with the query at its own position. One call holds both by doubling the head dimension, as
models/window.dense_window_attention does: queries [q, q_sink], keys [k, 0] on window rows and [0, k_sink] on sink
rows. The doubled keys are a product of the buffer with a constant half mask made per step (one fused kernel under
compile), so the state keeps d per key (the bytes benchmarks/frontier.py counts). Grouped-query heads need no
repeat: query head h = g rep + j reads kv head g, so the H queries are (B, Hkv, rep, .), rep rows per group against
the group's keys (one query per head: the rows never see each other).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_ENV = "TCACHE_STEP_ATTENTION"
"""fp32 (default): the step's window attention in fp32, as the parallel form (models/window.py) and the earlier step
compute it; model: in the model's dtype (bf16 reads half the bytes; the kernel's softmax stays fp32), to measure
against it. --mix joint always runs in fp32 (its output subtracts two probabilities)."""
ALIGN = 16
"""Mask rows start at multiples of this many elements (the memory-efficient kernel's bias alignment)."""
EXTRA = 8
"""--mix joint: columns added to the values (a column of ones, then zeros to keep the width a multiple of 8)."""


def attention_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if os.environ.get(ATTN_ENV, "fp32") == "model" else torch.promote_types(dtype, torch.float32)


def aligned(mask: Tensor) -> Tensor:
    """mask (..., L) as a view of padded storage whose rows start at multiples of ALIGN elements."""
    pad = -mask.shape[-1] % ALIGN
    return F.pad(mask, (0, pad))[..., :mask.shape[-1]] if pad else mask


def half_mask(S: int, W: int, d: int, dtype: torch.dtype, device) -> Tensor | None:
    """(1, 1, S + W, 2d): 1 on the half of a row its key occupies ([0, k_sink] on sink rows, [k, 0] on window rows),
    0 on the other; None without sinks (the keys keep width d)."""
    if not S:
        return None
    half = torch.zeros(S + W, 2, d, dtype=dtype, device=device)
    half[:S, 1], half[S:, 0] = 1, 1
    return half.view(1, 1, S + W, 2 * d)


def step_mask(p: Tensor, S: int, W: int, dtype: torch.dtype) -> Tensor:
    """Additive (1, 1, 1, S + W) for the token at position p (1,): sink s is scored once it left the window (p - s >= W),
    window slot j once it holds a position (p - ((p - j) mod W) >= 0, the current token's slot always)."""
    s, j = torch.arange(S, device=p.device), torch.arange(W, device=p.device)
    keep = torch.cat([p - s >= W, p - torch.remainder(p - j, W) >= 0])  # (S + W,)
    mask = torch.where(keep, 0.0, float("-inf")).to(dtype)  # (S + W,)
    return aligned(mask.view(1, 1, 1, S + W))


def _keys(K: Tensor, half: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The keys the call scores: (B, Hkv, S + W, 2d) [k, 0] / [0, k_sink] with sinks, else K, in dtype."""
    return (K if half is None else torch.cat([K, K], -1) * half).to(dtype)  # bf16 K * fp32 half: fp32 already


def attend(q2: Tensor, K: Tensor, V: Tensor, mask: Tensor, half: Tensor | None, scaling: float,
           dtype: torch.dtype) -> Tensor:
    """Softmax attention (B, Hkv, rep, d) of the queries q2 (B, Hkv, rep, 2d) ([q, q_sink]; (B, Hkv, rep, d) without
    sinks) over the keys / values K, V (B, Hkv, S + W, d), in dtype."""
    return F.scaled_dot_product_attention(q2.to(dtype), _keys(K, half, dtype), V.to(dtype), attn_mask=mask,
                                          scale=scaling)


def joint_constants(S: int, W: int, d: int, device) -> Tensor:
    """--mix joint: (1, 1, S + W + 1, d + EXTRA) fp32, 1 in column d of every key row and 0 elsewhere (the linear
    part's row last)."""
    ones = torch.zeros(S + W + 1, d + EXTRA, device=device)
    ones[:S + W, d] = 1
    return ones.view(1, 1, S + W + 1, d + EXTRA)


def attend_joint(q2: Tensor, K: Tensor, V: Tensor, mask: Tensor, half: Tensor | None, ones: Tensor,
                 scaling: float) -> Tensor:
    """--mix joint's one softmax over the window, the far sinks and the linear part, in fp32: (B, Hkv, rep, d + EXTRA).
    The linear part is one more key row (a zero key: its score is the mask's last column, the log of its total
    weight) whose value is zero but for a ones column on every other row: column d of the output is then the window's
    and sinks' share of the softmax, and 1 minus it the linear part's (joint_state.fused_step takes the rest)."""
    keys = F.pad(_keys(K, half, torch.float32), (0, 0, 0, 1))  # (B, Hkv, S + W + 1, 2d | d)
    values = F.pad(V.float(), (0, EXTRA, 0, 1)) + ones  # (B, Hkv, S + W + 1, d + EXTRA)
    return F.scaled_dot_product_attention(q2.float(), keys, values, attn_mask=mask, scale=scaling)
