"""LoLCATs' form of the hybrid mixer (`--mix joint`): the window's softmax scores and the mLSTM's linear-attention
scores normalised together, over one denominator, the linear part covering only the tokens outside the window
(Zhang et al. 2024, "LoLCATs", its sliding-window hybrid attention), with the mLSTM's gates as the linear part's
decay. For query i:

    w_ij = share_h       * exp(q_i . k_j * scaling)                        j in the window (0 <= i - j < W) or a sink
                                                                           (j < S, scored with q_sink as there)
    w_ij = (1 - share_h) * phi(q_i) . phi(k_j) / sqrt(F) * D_ij            S <= j <= i - W (outside both)
    D_ij = exp(i_j + sum_{j < t <= i} log sigmoid(f_t))                    (the mLSTM's decay: input, forget gates)
    y_i  = sum_j w_ij v_j / sum_j w_ij

share_h = sigmoid(ogate_b_h) is LoLCATs' learned window factor per head (0.5 at init; the output gate's weights
play no part in this form). All weights are positive (Hedgehog features), so y is a softmax over the log-weights,
computed stably that way.

Computed as LoLCATs trains its hybrid attention: quadratic in T, here in blocks of queries so memory stays
O(block x T); mlstm_kernels cannot serve it, since its kernels return the normalised mLSTM output, not the
numerator and denominator in a scale the window's can join. Generation runs from a recurrent state
(student/inference/joint_state.py: an mLSTM state W tokens behind the stream, and the window's features and gates).
tests/test_hybrid.py holds it to the equations written out in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 64
"""Queries per block."""


def joint_attention(q, k, v, q_sink, qf, kf, i, f, share_logit, window: int, sinks: int, scaling: float,
                    block: int = BLOCK) -> torch.Tensor:
    """The joint mix (B, H, T, d). q, k, v (B, H, T, d) the window's (RoPE'd, kv heads repeated); q_sink (B, H, T, d)
    or None (q itself); qf, kf (B, H, T, F) the mLSTM's features; i, f (B, H, T) its gate pre-activations;
    share_logit (H,) the window's share before the sigmoid."""
    B, H, T, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = q if q_sink is None else q_sink
    cum = torch.cumsum(F.logsigmoid(f.to(acc)), -1)  # (B, H, T)
    key_term = i.to(acc) - cum  # (B, H, T): the key's part of log D_ij
    log_share = F.logsigmoid(share_logit.to(acc)).view(1, H, 1, 1)
    log_rest = F.logsigmoid(-share_logit.to(acc)).view(1, H, 1, 1)
    log_norm = -0.5 * math.log(qf.shape[-1])
    pos = torch.arange(T, device=q.device)
    kT, kfT = k.to(acc).transpose(-1, -2), kf.to(acc).transpose(-1, -2)  # (B, H, d, T), (B, H, F, T)
    out = []
    for a in range(0, T, block):
        b = min(a + block, T)
        dist = pos[a:b, None] - pos[None, :b]  # (bq, b)
        win = (dist >= 0) & (dist < window)
        sink = (pos[None, :b] < sinks) & (dist >= window)
        lin = (pos[None, :b] >= sinks) & (dist >= window)
        s = torch.where(win, q[:, :, a:b].to(acc) @ kT[..., :b], qs[:, :, a:b].to(acc) @ kT[..., :b]) * scaling
        dot = (qf[:, :, a:b].to(acc) @ kfT[..., :b]).clamp_min(torch.finfo(acc).tiny)  # (B, H, bq, b), > 0
        lw = torch.log(dot) + log_norm + cum[:, :, a:b, None] + key_term[:, :, None, :b] + log_rest
        logits = torch.where(lin, lw, torch.where(win | sink, s + log_share, float("-inf")))  # (B, H, bq, b)
        out.append(torch.softmax(logits, -1) @ v[:, :, :b].to(acc))  # (B, H, bq, d)
    return torch.cat(out, 2).to(q.dtype)  # (B, H, T, d)
