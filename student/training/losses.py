"""The three loss terms of Delta-distillation, each a small function returning a scalar tensor, and their mix.

All softmaxes run in fp32 whatever the autocast dtype. Conventions (see docs/distill.md):

- Position t of a cached row holds the teacher's distribution over token t+1, like the student's
  logits at t. CE uses positions 0..T-2 (the next token of position T-1 is not in the row); KD and
  alignment use all T positions.
- KD = T^2 * KL(p_teacher^T || p_student^T), averaged over positions, from the cached top-k
  log-probs. Two tail treatments:
    * "bucket" (default): k+1 outcomes, the k cached ids plus one bucket for the rest of the
      vocabulary. The student's bucket is its exact tempered mass outside the k ids. The teacher's
      tempered bucket assumes its tail mass m = 1 - sum(p_topk) is spread evenly over the V-k other
      ids: weight (V-k) * (m / (V-k))^(1/T). Exact at T = 1 (and for k = V); at T = 1 it equals the
      dense KL minus m * KL(teacher tail || student tail), the within-tail term the cache cannot know.
    * "renorm": both distributions restricted to the k cached ids and renormalised.
- Alignment = ||h_T - h_S||_F / sqrt(numel(h_S)) over the whole (B, T, G, D) batch: the RMS of the
  difference between the teacher's cached layer-group means and the student's block-group means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tcache import dist

KD_TAILS = ("bucket", "renorm")


def ce_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy. logits (B, T, V), input_ids (B, T)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), input_ids[:, 1:].reshape(-1).long())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both ends (Maechler, 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_log_probs(topk_logprobs: torch.Tensor, temperature: float, vocab_size: int,
                      tail: str = "bucket") -> torch.Tensor:
    """Tempered teacher log-probabilities over k (renorm) or k+1 (bucket) outcomes.

    topk_logprobs (B, T, k) at T = 1 -> (B, T, k[+1]) float32."""
    lp = topk_logprobs.float()  # (B, T, k)
    k = lp.shape[-1]
    scaled = lp / temperature  # (B, T, k): tempered weights p^(1/T), unnormalised
    if tail == "renorm" or k >= vocab_size:
        return torch.log_softmax(scaled, dim=-1)
    log_m = _log1mexp(torch.logsumexp(lp, dim=-1, keepdim=True))  # (B, T, 1) log tail mass at T=1
    n_tail = vocab_size - k
    tail_w = math.log(n_tail) + (log_m - math.log(n_tail)) / temperature  # (B, T, 1)
    return torch.log_softmax(torch.cat([scaled, tail_w], dim=-1), dim=-1)  # (B, T, k+1)


def student_log_probs(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float,
                      tail: str = "bucket") -> torch.Tensor:
    """The student's tempered log-probabilities on the same k (renorm) or k+1 (bucket) outcomes."""
    z = logits.float() / temperature  # (B, T, V)
    k, V = topk_ids.shape[-1], z.shape[-1]
    picked = torch.gather(z, -1, topk_ids.long())  # (B, T, k)
    if tail == "renorm" or k >= V:
        return torch.log_softmax(picked, dim=-1)
    lse_all = torch.logsumexp(z, dim=-1, keepdim=True)  # (B, T, 1)
    top = picked - lse_all  # (B, T, k) exact log-probs of the cached ids
    tail_lp = _log1mexp(torch.logsumexp(top, dim=-1, keepdim=True))  # (B, T, 1)
    return torch.cat([top, tail_lp], dim=-1)  # (B, T, k+1)


def kd_loss(logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor,
            temperature: float, tail: str = "bucket") -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), mean over positions."""
    if tail not in KD_TAILS:
        raise ValueError(f"tail must be one of {KD_TAILS}, got {tail!r}")
    t_lp = teacher_log_probs(topk_logprobs, temperature, logits.shape[-1], tail)  # (B, T, k[+1])
    s_lp = student_log_probs(logits, topk_ids, temperature, tail)  # (B, T, k[+1])
    kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)  # (B, T)
    return temperature**2 * kl.mean()


def align_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """||h_T - h_S||_F / sqrt(numel(h_S)); both (B, T, G, D). Under torchrun the norm is the global batch's (not
    a mean of the ranks' norms, which would differ from one process's)."""
    diff = teacher_hidden.float() - student_hidden.float()
    if dist.world() == 1:
        return torch.linalg.vector_norm(diff) / math.sqrt(diff.numel())
    return torch.sqrt(dist.sum_grad(diff.square().sum()) / (diff.numel() * dist.world()))


def _chunk_terms(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 topk_logprobs: torch.Tensor, topk_ids: torch.Tensor, temperature: float,
                 tail: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over one chunk of positions: CE (targets -100 are skipped) and the KL of kd_loss (no T^2)."""
    logits = F.linear(x, weight, bias)[None]  # (1, n, V)
    ce = F.cross_entropy(logits[0].float(), targets, ignore_index=-100, reduction="sum")
    t_lp = teacher_log_probs(topk_logprobs[None], temperature, logits.shape[-1], tail)  # (1, n, k[+1])
    s_lp = student_log_probs(logits, topk_ids[None], temperature, tail)  # (1, n, k[+1])
    return ce, (t_lp.exp() * (t_lp - s_lp)).sum()


def ce_kd_chunked(x: torch.Tensor, head: torch.nn.Linear, input_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                  topk_ids: torch.Tensor, temperature: float, tail: str = "bucket",
                  chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """ce_loss and kd_loss of head(x) without materialising the (B, T, V) logits: `chunk` positions at a
    time, each chunk's logits recomputed in the backward pass (activation checkpointing), so memory holds
    one chunk's fp32 logits instead of the batch's. The price is one more head matmul per chunk.
    x (B, T, D): the student's final (normed) hidden states.

    Written here rather than taken from liger-kernel: its fused linear distillation losses (LigerFusedLinearJSD and
    kin) take the teacher's hidden states and head to form its full logits, and the cache holds only top-k
    log-probs; its fused linear CE covers the CE term alone, while this loop shares one log-softmax per chunk between
    CE and KD. Under the hybrid's compiled step inductor fuses each chunk's softmax, CE and KL (one graph)."""
    from torch.utils.checkpoint import checkpoint

    if tail not in KD_TAILS:
        raise ValueError(f"tail must be one of {KD_TAILS}, got {tail!r}")
    B, T, D = x.shape
    k = topk_ids.shape[-1]
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1).reshape(-1).long()  # (B*T,)
    xf, lp, ti = x.reshape(-1, D), topk_logprobs.reshape(-1, k), topk_ids.reshape(-1, k)  # (N, D), (N, k) x2
    ce_sum = kl_sum = x.new_zeros((), dtype=torch.float32)
    for s in range(0, B * T, chunk):
        ce, kl = checkpoint(_chunk_terms, xf[s:s + chunk], head.weight, head.bias, targets[s:s + chunk],
                            lp[s:s + chunk], ti[s:s + chunk], temperature, tail, use_reentrant=False)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    return ce_sum / (B * (T - 1)), temperature**2 * kl_sum / (B * T)


@dataclass(frozen=True)
class Weights:
    """The mix of one optimizer step: alpha (KD), beta (alignment), CE gets the rest; T tempers KD."""

    alpha: float
    beta: float
    temperature: float


def mix(terms: dict[str, torch.Tensor], w: Weights) -> torch.Tensor:
    """Delta-distillation's loss: (1 - alpha - beta) * CE + alpha * KD + beta * alignment; a hidden-state
    matching stage (the hybrid's stage I) has the one term."""
    if "match" in terms:
        return terms["match"]
    return (1 - w.alpha - w.beta) * terms["ce"] + w.alpha * terms["kd"] + w.beta * terms["align"]
