"""One token through a hybrid mixer from its fixed buffers (decode.StaticMixer): the window + sinks attention over the
ring buffer, the mLSTM's recurrent step, their output-gate mix (or, for --mix joint, joint_state.step). The same
equations as the parallel form's last row (HybridMixer.mix); every shape fixed, so the step can be captured."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tcache.student.inference.decode import StaticMixer


def mixer_step(mx, x: torch.Tensor, position_embeddings, st: "StaticMixer") -> torch.Tensor:
    """One token through a HybridMixer from its StaticMixer: head outputs (B, H, 1, d). The same equations as
    the parallel form's last row (HybridMixer.mix), on fixed buffers."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope

    cos, sin = position_embeddings  # (B, 1, d) x2
    q, k, v = mx.qkv(x)  # (B, H, 1, d), (B, Hkv, 1, d) x2
    q0, k0 = q, k
    q, k = rope(q, k, cos, sin)
    p = st.pos  # (1,): this token's position
    if mx.sinks:  # the first S positions are the sinks: written while p < S, kept as they are after
        s = p.clamp(max=mx.sinks - 1)
        first = p < mx.sinks  # (1,)
        st.sink_k.index_copy_(2, s, torch.where(first, k, st.sink_k.index_select(2, s)))
        st.sink_v.index_copy_(2, s, torch.where(first, v, st.sink_v.index_select(2, s)))
    slot = p % mx.window
    old_v = st.win_v.index_select(2, slot)  # (B, Hkv, 1, d): the value leaving the window (the joint mix's)
    st.win_k.index_copy_(2, slot, k)
    st.win_v.index_copy_(2, slot, v)
    if mx.mix_form == "joint":  # LoLCATs' one softmax, its linear part a state W tokens behind (joint_state.py)
        from tcache.student.inference import joint_state

        qf, kf = mx.features(*mx.mlstm_qk(q, q0, k, k0), x)  # (B, H, 1, F) x2
        return joint_state.step(mx, x, q, q0, qf, kf, old_v, st)
    return mix_step(mx, x, q, q0, k0, k, v, lambda: _window(mx, q, q0, st),
                    lambda qm, km, vr: _mlstm(mx, x, qm, km, vr, st))


def _window(mx, q, q0, st: "StaticMixer") -> torch.Tensor:
    """Softmax attention of one query over the ring buffer's valid slots and the sinks outside the window:
    (B, H, 1, d). Written out rather than SDPA: the sink entries take the query rotated to its cache position."""
    scores, values = window_scores(mx, q, q0, st)  # (B, H, 1, S + W), (B, H, S + W, d)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, -1), values.float()).to(q.dtype)  # (B, H, 1, d)


def window_scores(mx, q, q0, st: "StaticMixer") -> tuple[torch.Tensor, torch.Tensor]:
    """The window's and the far sinks' scores (B, H, 1, S + W), -inf where nothing is held, and their values."""
    from transformers.models.llama.modeling_llama import rotate_half

    W, S, rep, p = mx.window, mx.sinks, mx.H // mx.Hkv, st.pos
    j = torch.arange(W, device=p.device)
    held = p - torch.remainder(p - j, W)  # (W,) the position slot j holds
    kw, vw = st.win_k.repeat_interleave(rep, 1), st.win_v.repeat_interleave(rep, 1)  # (B, H, W, d) x2
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), kw.float()) * mx.scaling  # (B, H, 1, W)
    scores = scores.masked_fill(held < 0, float("-inf"))
    values = vw
    if S:
        cos, sin = st.sink_rope  # (B, 1, d)
        q_sink = q0 * cos[:, None] + rotate_half(q0) * sin[:, None]  # (B, H, 1, d)
        ks, vs = st.sink_k.repeat_interleave(rep, 1), st.sink_v.repeat_interleave(rep, 1)  # (B, H, S, d)
        far = p - torch.arange(S, device=p.device) >= W  # (S,) sinks that left the window
        sink_scores = torch.einsum("bhqd,bhkd->bhqk", q_sink.float(), ks.float()) * mx.scaling  # (B, H, 1, S)
        scores = torch.cat([sink_scores.masked_fill(~far, float("-inf")), scores], -1)  # (B, H, 1, S + W)
        values = torch.cat([vs, vw], 2)  # (B, H, S + W, d)
    return scores, values


def _mlstm(mx, x, qm, km, v, st: "StaticMixer") -> torch.Tensor:
    """One mLSTM step (mlstm_kernels' recurrent step, the chunkwise kernel's equations) into the fixed C, n, m."""
    from mlstm_kernels.torch.recurrent.native_step import mlstm_recurrent_step__native

    qf, kf = (t[:, :, 0] for t in mx.features(qm, km, x))  # (B, H, F) x2
    i, f = (g.float()[:, 0, :, None] for g in mx.gates(x))  # (B, H, 1) x2
    c, n, m = mx.head_state(st.mlstm)  # (B, H, F, d), ...: views of the fixed buffers, or their groups repeated
    h, new = mlstm_recurrent_step__native(qf, kf, v[:, :, 0].float(), i, f, c, n, m, eps=1e-12)
    for buf, t in zip(st.mlstm, mx.keep_state(new)):  # C, n, m in place
        buf.copy_(t)
    return h[:, :, None]  # (B, H, 1, d)


def mix_step(mx, x, q, q0, k0, k, v, window, mlstm) -> torch.Tensor:
    """One token's head outputs (B, H, 1, d) from its branches, as HybridMixer.mix mixes them: `window()` the window
    + sinks attention, `mlstm(qm, km, v)` the mLSTM step."""
    rep = mx.H // mx.Hkv
    vr = v.repeat_interleave(rep, 1)  # (B, H, 1, d)
    qm, km = mx.mlstm_qk(q, q0, k, k0)  # (B, H, 1, d) x2
    swa = window() if mx.branches != "mlstm" else None  # (B, H, 1, d)
    if mx.branches == "window":
        return swa
    m = mlstm(qm, km, vr)  # (B, H, 1, d)
    if mx.branches == "mlstm":
        return m.to(q.dtype)
    return mx.gate_mix(qm, km, vr, m, swa)
