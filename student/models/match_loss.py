"""Stage I's attention-weight objective for the hybrid (--match-loss weights): Hedgehog's cross-entropy between the
teacher's causal softmax attention and the feature maps' linear attention (Zhang et al., 2024), in chunks of queries
with its gradient written out, so its memory stays O(B·H·chunk·T) per layer. HybridMixer's match mode calls it;
tests/test_hybrid_match_loss.py holds it to a float64 loop."""

from __future__ import annotations

import math

import torch

MATCH_LOSSES = ("output", "weights", "both")
"""Stage I's per-layer objective (--match-loss): output, the MSE of the attention output (before W_o); weights,
Hedgehog's cross-entropy of the attention weights (attention_weights_ce); both, their sum."""
WEIGHTS_CHUNK = 128
"""Queries per chunk of attention_weights_ce: its memory is O(B·H·chunk·T) in the forward and the backward."""


def _weights_ce_rows(fq, fk, q, k, a: int, b: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """Queries a..b-1 (c of them) of attention_weights_ce over keys 0..b-1: the teacher's weights A and the
    feature maps' scores s (B, H, c, b), their row sums Z (B, H, c), the causal mask (c, b) and the rows' summed
    cross-entropy (a scalar)."""
    i = torch.arange(a, b, device=q.device)[:, None]
    causal = torch.arange(b, device=q.device)[None, :] <= i  # (c, b)
    logits = (q[:, :, a:b] @ k[:, :, :b].transpose(-1, -2)) * scaling  # (B, H, c, b)
    A = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)  # (B, H, c, b), exactly 0 above the diagonal
    s = (fq[:, :, a:b] @ fk[:, :, :b].transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, c, b)
    Z = s.sum(-1)  # (B, H, c)
    # -sum_j A log(s / Z) = log Z - sum_j A log s, as sum_j A = 1; masked keys have A = 0 and log 1 = 0 there,
    # and the floor keeps an underflowed score from giving 0 * -inf
    logs = s.masked_fill(~causal, 1.0).clamp_min(torch.finfo(s.dtype).tiny).log()  # (B, H, c, b)
    return A, s, Z, causal, (Z.log() - (A * logs).sum(-1)).sum()


class _AttentionWeightsCE(torch.autograd.Function):
    """attention_weights_ce with its gradient written out, both in chunks of queries: autograd through the
    chunks would keep every chunk's (c, T) scores and weights for the backward, O(T^2) per layer again."""

    @staticmethod
    def forward(ctx, fq, fk, q, k, scaling: float, chunk: int):
        B, H, T, _ = q.shape
        total = fq.new_zeros(())
        for a in range(0, T, chunk):
            total = total + _weights_ce_rows(fq, fk, q, k, a, min(a + chunk, T), scaling)[-1]
        ctx.save_for_backward(fq, fk, q, k)
        ctx.scaling, ctx.chunk = scaling, chunk
        return total / (B * H * T)

    @staticmethod
    def backward(ctx, grad):
        fq, fk, q, k = ctx.saved_tensors
        B, H, T, _ = q.shape
        dfq, dfk = torch.zeros_like(fq), torch.zeros_like(fk)  # (B, H, T, F) x2
        with torch.autocast(q.device.type, enabled=False):  # as the forward: fp32 matmuls
            for a in range(0, T, ctx.chunk):
                b = min(a + ctx.chunk, T)
                A, s, Z, causal, _ = _weights_ce_rows(fq, fk, q, k, a, b, ctx.scaling)
                # d/ds_ij of log Z_i - sum_j A_ij log s_ij = 1 / Z_i - A_ij / s_ij on j <= i
                G = (1 / Z[..., None] - A / s.clamp_min(torch.finfo(s.dtype).tiny)).masked_fill(~causal, 0.0)
                G = G * (grad / (B * H * T))  # (B, H, c, b)
                dfq[:, :, a:b] = G @ fk[:, :, :b]  # (B, H, c, F)
                dfk[:, :, :b] += G.transpose(-1, -2) @ fq[:, :, a:b]  # (B, H, b, F)
        return dfq, dfk, None, None, None, None


def attention_weights_ce(fq: torch.Tensor, fk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scaling: float,
                         chunk: int = WEIGHTS_CHUNK) -> torch.Tensor:
    """Hedgehog's attention-weight matching (Zhang et al., 2024), a scalar: the mean over (b, h, i) of
    -sum_{j <= i} A_ij log Â_ij, A = softmax_j(q_i . k_j * scaling) the teacher's causal attention and
    Â_ij = fq_i . fk_j / sum_{j' <= i} fq_i . fk_j' the feature maps' linear attention. fq, fk (B, H, T, F) are
    phi(q), phi(k) (positive: hedgehog()); q, k (B, H, T, d) the teacher's rotated ones, the target (no gradient
    to them). Compute O(B·H·T^2·(d + F)); memory O(B·H·chunk·T): queries `chunk` at a time, forward and backward,
    in fp32 (fp64 inputs stay fp64) whatever the autocast."""
    dt = torch.promote_types(fq.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # matmuls in fp32: bf16 would round the target weights
        return _AttentionWeightsCE.apply(fq.to(dt), fk.to(dt), q.detach().to(dt), k.detach().to(dt), scaling,
                                         chunk)


def stage_one_losses(kind: str, h: torch.Tensor, full: torch.Tensor, features, q: torch.Tensor, k: torch.Tensor,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One layer's stage-I terms: (the MSE of the mixer's output h against the teacher's attention output full,
    attention_weights_ce or None, the one --match-loss `kind` trains on). `features()` gives phi(q), phi(k), called
    only when the weights term is needed."""
    mse = torch.nn.functional.mse_loss(h.float(), full.float())
    if kind == "output":
        return mse, None, mse
    ce = attention_weights_ce(*features(), q, k, scaling)
    return mse, ce, ce if kind == "weights" else mse + ce
