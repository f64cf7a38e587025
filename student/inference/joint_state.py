"""The joint mix's generation state (`--mix joint`, student/models/joint.py) and its step: LoLCATs' one softmax over
the window's scores and the linear scores of every key outside the window, carried as a recurrent state.

For the token at position t, the linear part covers keys S <= j <= t - W with weight phi(q_t).phi(k_j) D_tj, where
D_tj = exp(i_j + sum_{j < s <= t} lf_s) and lf = log sigmoid(f). Split the decay at t - W:

    D_tj = exp(i_j + sum_{j < s <= t-W} lf_s) * exp(G_t),        G_t = sum_{t-W < s <= t} lf_s

The first factor is an mLSTM state that runs W tokens behind the stream: a key enters it when it leaves the window,

    C_t = exp(lf_{t-W}) C_{t-1} + exp(i_{t-W}) phi(k_{t-W}) v_{t-W}^T       (n likewise, without v)

and G_t sums the forget gates the ring buffer holds. So the state is bounded: per layer the window's keys / values
(the ring buffer the gate mix keeps too), the window's key features and gates (kf, i, lf at the same slots), and C,
n with their stabiliser m, all over the mLSTM's Hm heads:

    ring   kf (B, Hm, W, F), i (B, Hm, W), lf (B, Hm, W)        slot s holds position p with p % W = s
    lin    C (B, Hm, F, d), n (B, Hm, F), m (B, Hm, 1)          C_true = C * exp(m)

tests/test_joint_decode.py holds the steps to the full forward (joint_attention) for prefixes inside, at and beyond
the window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prefill_state(mx, x: torch.Tensor, qm: torch.Tensor, km: torch.Tensor, v: torch.Tensor) -> tuple:
    """The state after a prompt (B, T, D) of the parallel forward: the last min(T, W) positions' kf, i, lf in
    order (B, Hm, w, ...), and C, n, m over the keys S <= j <= T - 1 - W."""
    S, W, r = mx.sinks, mx.window, mx.H // mx.Hm
    kf = mx.features(qm, km, x)[1][:, ::r].float()  # (B, Hm, T, F)
    i, f = (g.float().transpose(1, 2)[:, ::r] for g in mx.gates(x))  # (B, Hm, T) x2
    lf = F.logsigmoid(f)
    vh = v.repeat_interleave(mx.Hm // v.shape[1], 1).float()  # (B, Hm, T, d) from the Hkv heads
    T, last = kf.shape[2], kf.shape[2] - 1 - W  # the last key outside the window
    B, Hm, _, Fd = kf.shape
    C, n, m = kf.new_zeros(B, Hm, Fd, vh.shape[-1]), kf.new_zeros(B, Hm, Fd), kf.new_zeros(B, Hm, 1)
    if last >= S:
        cum = torch.cumsum(lf, -1)  # (B, Hm, T)
        w = i[..., S:last + 1] + cum[..., last:last + 1] - cum[..., S:last + 1]  # (B, Hm, n) log weights
        m = w.max(-1, keepdim=True).values  # (B, Hm, 1)
        e = torch.exp(w - m)  # (B, Hm, n)
        C = torch.einsum("bhj,bhjf,bhjd->bhfd", e, kf[:, :, S:last + 1], vh[:, :, S:last + 1])
        n = torch.einsum("bhj,bhjf->bhf", e, kf[:, :, S:last + 1])
    keep = slice(max(0, T - W), T)
    return (kf[:, :, keep].clone(), i[..., keep].clone(), lf[..., keep].clone(), C, n, m)


def buffers(state: tuple, window: int) -> tuple[tuple, torch.Tensor]:
    """Fixed buffers of a prefilled state's shapes: the ring W slots long, the linear state as it is. The ring's kf, i,
    lf are views of one (B, Hm, W, F + 2) buffer (returned second), so the fused step reads and writes a slot's three
    in one op each."""
    kf, i, lf, C, n, m = state
    B, Hm, _, Fd = kf.shape
    ring = kf.new_zeros(B, Hm, window, Fd + 2)  # [kf | i | lf] per slot
    return (ring[..., :Fd], ring[..., Fd], ring[..., Fd + 1], C.clone(), n.clone(), m.clone()), ring


def load(buf: tuple, state: tuple, slots: torch.Tensor) -> None:
    """A prefilled state into the buffers: the ring's positions at their slots, the rest zero (no decay)."""
    for b, s in zip(buf[:3], state[:3]):
        b.zero_()
        b[:, :, slots] = s
    for b, s in zip(buf[3:], state[3:]):
        b.copy_(s)


def step(mx, x, q, q0, qf, kf, old_v, st) -> torch.Tensor:
    """One token's joint-mix head outputs (B, H, 1, d) from a StaticMixer `st` whose window ring buffer already
    holds this token (slot p % W) and whose joint ring does not yet: the key leaving the window (its value old_v
    (B, Hkv, 1, d), read from the slot before this token's overwrote it) enters C, n, m, then this token's kf, i, lf
    take its slot. q, q0 the window's query, RoPE'd and not; qf, kf (B, H, 1, F) the mLSTM's features."""
    from tcache.student.inference.mixer_step import window_scores

    S, W, p = mx.sinks, mx.window, st.pos
    r, rep = mx.H // mx.Hm, mx.Hm // mx.Hkv
    ring_kf, ring_i, ring_lf, C, n, m = st.joint
    slot = p % W
    i_new, f_new = (g.float().transpose(1, 2)[:, ::r] for g in mx.gates(x))  # (B, Hm, 1) x2
    # the key leaving the window: position p - W, at this slot
    old_kf, old_i, old_lf = (t.index_select(2, slot) for t in (ring_kf, ring_i, ring_lf))  # (B, Hm, 1, F), (B, Hm, 1)
    old_v = old_v.float().repeat_interleave(rep, 1)  # (B, Hm, 1, d)
    enters = (p - W >= S).view(1, 1, 1)  # a key outside both the window and the sinks
    m_new = torch.maximum(old_lf + m, old_i)  # (B, Hm, 1)
    a, b = torch.exp(old_lf + m - m_new), torch.exp(old_i - m_new)
    kv = old_kf[:, :, 0, :, None] * old_v  # (B, Hm, F, d)
    C.copy_(torch.where(enters[..., None], a[..., None] * C + b[..., None] * kv, C))
    n.copy_(torch.where(enters, a * n + b * old_kf[:, :, 0], n))
    m.copy_(torch.where(enters, m_new, m))
    ring_kf.index_copy_(2, slot, kf[:, ::r].float())
    ring_i.index_copy_(2, slot, i_new)
    ring_lf.index_copy_(2, slot, F.logsigmoid(f_new))
    # the window's and the sinks' log weights, and the linear part's numerator and denominator in C's scale
    scores, values = window_scores(mx, q, q0, st)  # (B, H, 1, n), (B, H, n, d)
    share = mx.ogate_b.float().view(1, -1, 1, 1)
    scores = scores + F.logsigmoid(share)
    G = ring_lf.sum(-1, keepdim=True)  # (B, Hm, 1): the forget gates of positions p - W + 1 .. p
    Ch, nh, mh, Gh = (t.repeat_interleave(r, 1) for t in (C, n, m, G))  # over the H query heads
    log_rest = F.logsigmoid(-mx.ogate_b.float()).view(1, -1, 1)  # (1, H, 1): 1 - the window's share
    scale = mh + Gh + log_rest - 0.5 * math.log(kf.shape[-1])  # (B, H, 1): the linear terms' log factor
    q_lin = qf[:, :, 0].float()  # (B, H, F)
    num = torch.einsum("bhf,bhfd->bhd", q_lin, Ch)  # (B, H, d)
    den = torch.einsum("bhf,bhf->bh", q_lin, nh)[..., None].clamp_min(torch.finfo(torch.float32).tiny)  # (B, H, 1)
    lin_log = scale + torch.log(den)  # (B, H, 1)
    top = torch.maximum(scores.amax(-1), lin_log)  # (B, H, 1)
    ew = torch.exp(scores - top[..., None])  # (B, H, 1, n)
    el = torch.exp(scale - top)  # (B, H, 1): the linear terms' factor
    y = (ew @ values.float())[:, :, 0] + el * num  # (B, H, d)
    z = ew.sum(-1)[:, :, 0:1] + el * den  # (B, H, 1)
    return (y / z)[:, :, None].to(q.dtype)  # (B, H, 1, d)


def fused_step(fl, P: torch.Tensor, q2: torch.Tensor, feats: tuple, old_v: torch.Tensor, ctx, st) -> torch.Tensor:
    """step()'s equations through the fused path (fused_step.py): head outputs (B, 1, H d) fp32. P (B, N) the layer's
    stacked projection, q2 (B, Hkv, rep, 2d | d) its queries for the window call, feats the mLSTM's qf (B, H, F) and kf
    (B, Hm, F), old_v (B, Hkv, 1, d) the value leaving the window; st's buffers already hold this token's key / value.
    The linear state's update is mlstm_step.update_ (with gates that change nothing while no key leaves), and the
    window, the sinks and the linear part are one softmax in one SDPA call (window_step.attend_joint): the linear part
    a key row of log weight scale + log(phi(q) . n), its output num / den taken by 1 minus the others' share."""
    from tcache.student.inference import window_step
    from tcache.student.inference.mlstm_step import update_

    mx, (qf, kf) = fl.mx, feats
    B, Hm, Fd = kf.shape
    H, Hkv, d, r = mx.H, mx.Hkv, mx.head_dim, mx.H // mx.Hm
    g = P[:, fl.at["i"][0]:fl.at["f"][1]].float().unsqueeze(-1)  # (B, 2Hm, 1): input, forget gates
    ring, (C, n, m) = st.joint_ring, st.joint[3:]
    old = ring.index_select(2, ctx.slot)[:, :, 0]  # (B, Hm, F + 2): kf, i, lf of position p - W
    ring.index_copy_(2, ctx.slot, torch.cat([kf, g[:, :Hm], F.logsigmoid(g[:, Hm:])], -1)[:, :, None])
    i_old = torch.where(ctx.enters, old[..., Fd:Fd + 1], float("-inf"))  # (B, Hm, 1): -inf, 0: no key enters
    lf_old = torch.where(ctx.enters, old[..., Fd + 1:], 0.0)
    update_(C, n, m, old[..., :Fd], old_v[:, :, 0].index_select(1, fl.vheads).float(), i_old, lf_old)
    G = ring[..., Fd + 1].sum(-1, keepdim=True)  # (B, Hm, 1): the forget gates of positions p - W + 1 .. p
    qg = qf.reshape(B, Hm, r, Fd)  # (B, Hm, r, F): the query heads of each linear state
    num = qg @ C  # (B, Hm, r, d)
    den = (qg @ n[..., None]).clamp_min(torch.finfo(torch.float32).tiny)  # (B, Hm, r, 1)
    lin_log = (m + G)[:, :, None] + fl.log_rest - 0.5 * math.log(Fd) + torch.log(den)  # (B, Hm, r, 1)
    mask = torch.cat([(ctx.mask + fl.log_share).expand(B, -1, -1, -1), lin_log.reshape(B, Hkv, H // Hkv, 1)], -1)
    out = window_step.attend_joint(q2, st.keys, st.values, window_step.aligned(mask), ctx.half, ctx.ones,
                                   mx.scaling).reshape(B, H, -1)  # (B, H, d + EXTRA)
    y = out[..., :d] + (1 - out[..., d:d + 1]) * (num / den).reshape(B, H, d)  # (B, H, d)
    return y.reshape(B, 1, H * d)
