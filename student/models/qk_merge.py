"""Step 3 of Hauzenberger et al. (2026), "merging the Q/K projections": between stage I and stage II each mixer's
Hedgehog adapters (the per-head linear maps phi_q, phi_k that stage I trained on the teacher's q, k) are folded into
query / key projections of the layer input that the mLSTM branch owns from then on.

The paper's pipeline figure (Fig. 2) names four steps: "(1) transfer the teacher's weights and introduce adapters and
gates, (2) hidden-state matching, (3) merging the Q/K projections, (4) knowledge distillation"; its feature maps are
head-wise, a linear map per head followed by a softmax over the feature dimension. With q_h = W_q,h x + b_q,h the
teacher's (unrotated) query of head h and A_h = phi_q[h] (d, F/2), the mLSTM's features are

    phi(q_h) = [softmax(z_h), softmax(-z_h)],   z_h = A_h^T q_h = (A_h^T W_q,h) x + A_h^T b_q,h

so step 3 stores W'_q,h = A_h^T W_q,h (F/2, D) and b'_q,h = A_h^T b_q,h, and likewise W'_k,j = B_j^T W_k,kv(j) for
key map j = phi_k[j] over the kv head kv(j) it reads. The fold is exact (the merged student's logits equal the
unmerged one's: tests/test_qk_merge.py); what changes is stage II, where the mLSTM's query / key projections train
apart from the window's. Not defined with --mlstm-rope (RoPE sits between the projection and the map).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tcache.student.models.mixer import HybridMixer


def key_heads(mx: "HybridMixer") -> list[int]:
    """The kv head each of the mLSTM's Hm key maps reads: query-head key j repeats kv head j // (H / Hkv); with
    --mlstm-heads kv, map j is kv head j."""
    rep = mx.H // mx.Hkv
    return [(j * (mx.H // mx.Hm)) // rep for j in range(mx.Hm)]


def folded(phi: torch.Tensor, proj: nn.Module, heads: list[int], d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(A_h^T W_h stacked (n F/2, D), A_h^T b_h (n F/2,) or None) in float64 for maps phi (n, d, F/2) over the heads
    `heads` of projection `proj` (its weight (heads d, D))."""
    w = proj.weight.detach().double()
    W = w.view(-1, d, w.shape[-1])[heads]  # (n, d, D)
    out = torch.einsum("hde,hdc->hec", phi.detach().double(), W).reshape(-1, w.shape[-1])  # (n F/2, D)
    if proj.bias is None:
        return out, None
    b = proj.bias.detach().double().view(-1, d)[heads]  # (n, d)
    return out, torch.einsum("hde,hd->he", phi.detach().double(), b).reshape(-1)  # (n F/2,)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def merge_mixer(mx: "HybridMixer") -> None:
    """Fold mx's phi_q, phi_k into mq_proj, mk_proj (in place; computed in float64, stored in phi's dtype)."""
    d = mx.head_dim
    wq, bq = folded(mx.phi_q, mx.q_proj, list(range(mx.H)), d)
    wk, bk = folded(mx.phi_k, mx.k_proj, key_heads(mx), d)
    like = mx.phi_q
    del mx.phi_q, mx.phi_k
    mx.mq_proj, mx.mk_proj = _linear(wq, bq, like), _linear(wk, bk, like)
    mx.qk_merged = True


def _two_softmaxes(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)  # (B, n, T, F)


def merged_features(mx: "HybridMixer", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mLSTM's features (B, H, T, F) x2 from the layer input x (B, T, D) through the merged projections, in fp32
    as hedgehog() computes them; kv-head keys repeated to their group's query heads."""
    B, T, D = x.shape

    def pre(lin: nn.Linear, n: int) -> torch.Tensor:
        z = torch.einsum("btc,hec->bhte", x.float(), lin.weight.float().view(n, -1, D))  # (B, n, T, F/2)
        return z if lin.bias is None else z + lin.bias.float().view(1, n, 1, -1)

    qf, kf = _two_softmaxes(pre(mx.mq_proj, mx.H)), _two_softmaxes(pre(mx.mk_proj, mx.Hm))  # (B, H | Hm, T, F)
    r = mx.H // mx.Hm
    return qf, kf if r == 1 else kf.repeat_interleave(r, 1)  # (B, H, T, F) x2


def merge_counts(mixers: list) -> dict:
    """What step 3 changes per student: parameters of the adapters it removes and of the projections it adds, and
    the multiply-adds per token of the mLSTM's feature pre-activations before and after (the window's q, k
    projections are computed either way)."""
    before = after = 0
    for mx in mixers:
        half, D = mx.mq_proj.weight.shape[0] // mx.H, mx.mq_proj.weight.shape[1]
        before += (mx.H + mx.Hm) * mx.head_dim * half
        after += (mx.H + mx.Hm) * half * D
    return {"adapter_params_removed": before, "projection_params_added": after,
            "feature_macs_per_token_before": before, "feature_macs_per_token_after": after}
