"""Loss terms against independent float64 numpy computations of the documented formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcache.student.training import losses
def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def dense_kl(t_logits, s_logits, T):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over positions, float64."""
    p, q = softmax(t_logits / T), softmax(s_logits / T)
    return T**2 * (p * (np.log(p) - np.log(q))).sum(-1).mean()


def cached_topk(t_logits, k):
    """What a cache stores: top-k of the T=1 log-softmax over the full vocabulary, descending."""
    lp = torch.log_softmax(torch.from_numpy(t_logits), -1)
    top = torch.topk(lp, k, dim=-1)
    return top.values.float(), top.indices


@pytest.fixture
def logits():
    g = np.random.default_rng(0)
    t = g.normal(size=(2, 5, 40)) * 3  # (B, T, V) peaked enough that top-k matters
    s = g.normal(size=(2, 5, 40)) * 2
    return t, s


@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_kd_with_k_equal_vocab_is_the_dense_kl(logits, T, tail):
    t, s = logits
    lp, ids = cached_topk(t, k=t.shape[-1])
    got = losses.kd_loss(torch.from_numpy(s).float(), lp, ids, T, tail)
    assert float(got) == pytest.approx(dense_kl(t, s, T), rel=1e-4)


def test_bucket_at_t1_is_dense_kl_minus_within_tail_term(logits):
    """Chain rule of KL: dense = bucketed + m * KL(teacher tail || student tail), all at T=1."""
    t, s = logits
    k = 8
    lp, ids = cached_topk(t, k)
    got = float(losses.kd_loss(torch.from_numpy(s).float(), lp, ids, 1.0, "bucket"))
    p, q = softmax(t), softmax(s)
    mask = np.ones_like(p, dtype=bool)
    np.put_along_axis(mask, ids.numpy(), False, -1)
    m_p = np.where(mask, p, 0).sum(-1)
    m_q = np.where(mask, q, 0).sum(-1)
    within = np.where(mask, (p / m_p[..., None]) * (np.log(p / m_p[..., None]) - np.log(q / m_q[..., None])), 0).sum(-1)
    expected = dense_kl(t, s, 1.0) - (m_p * within).mean()
    assert got == pytest.approx(expected, rel=1e-4)
    assert got <= dense_kl(t, s, 1.0) + 1e-6


@pytest.mark.parametrize("T", [2.0, 0.5])
def test_bucket_tempered_matches_documented_formula(logits, T):
    t, s = logits
    k, V = 8, t.shape[-1]
    lp, ids = cached_topk(t, k)
    got = float(losses.kd_loss(torch.from_numpy(s).float(), lp, ids, T, "bucket"))
    p1 = np.exp(lp.double().numpy())  # (B, T, k)
    m = 1 - p1.sum(-1, keepdims=True)
    w = np.concatenate([p1 ** (1 / T), (V - k) * (m / (V - k)) ** (1 / T)], -1)
    pt = w / w.sum(-1, keepdims=True)  # teacher over k + 1 outcomes
    qs = softmax(s / T)
    q_top = np.take_along_axis(qs, ids.numpy(), -1)
    qt = np.concatenate([q_top, 1 - q_top.sum(-1, keepdims=True)], -1)
    expected = T**2 * (pt * (np.log(pt) - np.log(qt))).sum(-1).mean()
    assert got == pytest.approx(expected, rel=1e-4)


def test_renorm_is_kl_of_restricted_distributions(logits):
    t, s = logits
    k, T = 8, 2.0
    lp, ids = cached_topk(t, k)
    got = float(losses.kd_loss(torch.from_numpy(s).float(), lp, ids, T, "renorm"))
    pt = softmax(np.take_along_axis(t, ids.numpy(), -1) / T)  # log-softmax shift cancels
    qs = softmax(np.take_along_axis(s, ids.numpy(), -1) / T)
    assert got == pytest.approx(T**2 * (pt * np.log(pt / qs)).sum(-1).mean(), rel=1e-4)


def test_kd_is_zero_when_student_equals_teacher(logits):
    t, _ = logits
    for tail, k in (("bucket", 8), ("renorm", 8), ("bucket", 40)):
        lp, ids = cached_topk(t, k)
        assert abs(float(losses.kd_loss(torch.from_numpy(t).float(), lp, ids, 1.0, tail))) < 1e-5


def test_kd_in_fp16_logits_stays_close_to_fp32(logits):
    t, s = logits
    lp, ids = cached_topk(t, 8)
    s32 = torch.from_numpy(s).float()
    a = losses.kd_loss(s32, lp, ids, 2.0)
    b = losses.kd_loss(s32.half(), lp, ids, 2.0)
    assert float(b) == pytest.approx(float(a), rel=2e-3)


def test_align_is_frobenius_over_sqrt_numel():
    g = np.random.default_rng(1)
    h_s, h_t = g.normal(size=(2, 5, 3, 8)), g.normal(size=(2, 5, 3, 8))
    got = float(losses.align_loss(torch.from_numpy(h_s), torch.from_numpy(h_t)))
    assert got == pytest.approx(np.linalg.norm((h_t - h_s).ravel()) / np.sqrt(h_s.size), rel=1e-6)


def test_ce_is_next_token_nll(logits):
    _, s = logits
    ids = np.random.default_rng(2).integers(0, 40, size=(2, 5))
    got = float(losses.ce_loss(torch.from_numpy(s).float(), torch.from_numpy(ids)))
    logp = np.log(softmax(s))
    expected = -np.mean([logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4)])
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("chunk", [3, 7, 1000])
def test_chunked_ce_kd_equals_the_full_losses_and_their_gradients(tail, chunk):
    """The chunked path (logits never materialised for the batch) against ce_loss + kd_loss on full
    logits: same values and same gradients for the hidden states, the head being frozen."""
    g = torch.Generator().manual_seed(0)
    B, T, D, V, k = 2, 9, 16, 50, 6
    head = torch.nn.Linear(D, V, bias=True).double().requires_grad_(False)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    t_lp, t_ids = cached_topk(torch.randn(B, T, V, generator=g, dtype=torch.float64).numpy() * 3, k)
    t_lp = t_lp.double()
    temp = 1.7
    ce_ref = losses.ce_loss(head(x), ids)
    kd_ref = losses.kd_loss(head(x), t_lp, t_ids, temp, tail)
    g_ref = torch.autograd.grad(0.3 * ce_ref + 0.7 * kd_ref, x)[0]
    ce, kd = losses.ce_kd_chunked(x, head, ids, t_lp, t_ids, temp, tail, chunk=chunk)
    grad = torch.autograd.grad(0.3 * ce + 0.7 * kd, x)[0]
    # the loss functions compute in float32 whatever the input; compare at float32 precision
    assert float(ce.detach()) == pytest.approx(float(ce_ref.detach()), rel=1e-6)
    assert float(kd.detach()) == pytest.approx(float(kd_ref.detach()), rel=1e-5)
    torch.testing.assert_close(grad, g_ref, rtol=1e-4, atol=1e-6)
