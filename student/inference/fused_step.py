"""The hybrid's decode step in few kernels per layer (issue 36): the same equations as the earlier step (mixer_step.py,
joint_state.step, transformers' decoder layer), regrouped so each layer makes

    1 GEMM   q, k, v, the gates and the output gate (fused_weights.py: stacked once per model)
    rope     q and k at p, q at the sinks' cache position, in one product ([q, q_sink] side by side per head)
    2 writes k, v into the ring slot and, while p < S, the sink row (one index_copy_ each: when no sink is
             written the second index repeats the window row, written with the same value)
    1 attn   window + sinks (window_step.py: one SDPA call, mask shared by every layer)
    2 + 1    Hedgehog features of q and k: one batched matmul (or rows of the GEMM after --qk-merge) and one softmax
             over [z, -z]; the mLSTM step as one op (mlstm_step.py: the Triton step kernel on CUDA)
    mix      sigmoid(o) and one lerp, then W_o; the MLP's gate and up in one GEMM (layers in fused_weights.LAYERS)

What every layer shares (the mask, the ring and sink rows, RoPE's cos / sin at p and at the sinks' position) is made
once per step (StepContext.advance). TCACHE_FUSED_STEP picks the step: on (default), mixer (the fused mixer inside
transformers' own layer forward: no MLP weight copy), off (the earlier step). tests/test_fused_step.py holds each
piece to the earlier one and the whole step to the full forward; step_profile.py counts what a step launches.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from tcache.student.inference import fused_weights, mlstm_step, window_step

FUSED_ENV = "TCACHE_FUSED_STEP"
"""on (default): the fused step, its layers run by the step where fused_weights.mlp_fusable; mixer: the fused mixer
inside each layer's own forward; off: the earlier step (mixer_step.py)."""
MODES = ("on", "mixer", "off")


def mode(model) -> str:
    """The step TCACHE_FUSED_STEP asks for, "off" where the fused one does not apply (not a hybrid; adapters on a
    projection the step would stack)."""
    from tcache.errors import TcacheError

    want = os.environ.get(FUSED_ENV, "on").lower()
    if want not in MODES:
        raise TcacheError(f"{FUSED_ENV}={want!r} is not a step; use one of {', '.join(MODES)}")
    if model.family != "hybrid" or not fused_weights.supported(model):
        return "off"
    return want


class StepContext:
    """What every layer's step shares: constants of the recipe (made once per decoder) and the tensors of the
    token being stepped (made once per step by `advance`, before the layers)."""

    def __init__(self, model, dtype: torch.dtype, device):
        mx = model.mixers[0]
        self.S, self.W, self.d = mx.sinks, mx.window, mx.head_dim
        joint = mx.mix_form == "joint"
        self.attn_dtype = torch.float32 if joint else window_step.attention_dtype(dtype)
        self.half = window_step.half_mask(self.S, self.W, self.d, self.attn_dtype, device)
        self.ones = window_step.joint_constants(self.S, self.W, self.d, device) if joint else None
        half = self.d // 2
        self.sign = torch.tensor([-1.0] * half + [1.0] * half, dtype=dtype, device=device)  # rotate_half's sign
        self.cos = self.sin = self.mask = self.rows = self.slot = self.enters = None
        self.position_embeddings = self.position_ids = None

    def advance(self, model, h: Tensor, pos: Tensor) -> None:
        """The shared tensors for the token at position pos (1,), h its embedding (B, 1, D)."""
        base, B, S, W = model.lm.model, h.shape[0], self.S, self.W
        self.position_ids = pos.view(1, 1).expand(B, 1)  # (B, 1)
        self.position_embeddings = cos, sin = base.rotary_emb(h, self.position_ids)  # (B, 1, d) x2
        if S:  # the sinks' queries at min(p, S + W - 1), their cache position (mixer.sink_queries)
            cos_s, sin_s = base.rotary_emb(h, pos.clamp(max=S + W - 1).view(1, 1).expand(B, 1))
            cos, sin = torch.stack([cos, cos_s], 2), torch.stack([sin, sin_s], 2)  # (B, 1, 2, d) x2
        else:
            cos, sin = cos[:, :, None], sin[:, :, None]  # (B, 1, 1, d) x2
        self.cos, self.sin = cos, sin * self.sign
        self.slot = pos % W  # (1,): this token's ring slot
        # rows written: the window's, and the sink's while p < S (else the window's again: same row, same value)
        self.rows = torch.cat([S + self.slot, torch.where(pos < S, pos, S + self.slot)])  # (2,)
        self.mask = window_step.step_mask(pos, S, W, self.attn_dtype)  # (1, 1, 1, S + W)
        self.enters = (pos - W >= S).view(1, 1, 1)  # --mix joint: a key leaves the window for the linear state


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x cos + rotate_half(x) sin (transformers' apply_rotary_pos_emb) with rotate_half's sign already in sin."""
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)  # [x2, x1]
    return torch.addcmul(x * cos, swapped, sin)


def features(fl, P: Tensor, src: Tensor) -> tuple[Tensor, Tensor]:
    """The mLSTM's Hedgehog features (mixer.features) qf (B, H, F), kf (B, Hm, F) in fp32, from the q, k heads src
    (B, H + Hkv, d) through the stacked maps, or after --qk-merge from the projection's zq, zk rows of P (B, N)."""
    mx, B = fl.mx, P.shape[0]
    if fl.phi is None:
        z = P[:, fl.at["zq"][0]:fl.at["zk"][1]].view(B, mx.H + mx.Hm, -1).float()  # (B, H + Hm, F/2)
    else:
        heads = src.transpose(0, 1).index_select(0, fl.rows).float()  # (H + Hm, B, d)
        z = torch.bmm(heads, fl.phi).transpose(0, 1)  # (B, H + Hm, F/2)
    e = torch.stack([z, -z], -2).softmax(-1).flatten(-2)  # (B, H + Hm, F): [softmax(z), softmax(-z)] per head
    return e[:, :mx.H], e[:, mx.H:]


def _ogate(fl, P: Tensor, Y: Tensor, v: Tensor) -> Tensor:
    """The output gate's pre-activation (B, H) fp32: rows of P if folded, else mixer.gate_mix's from the rotated q, k."""
    mx = fl.mx
    if "o" in fl.at:
        return P[:, fl.at["o"][0]:fl.at["o"][1]].float()
    kv = fl.rows[:mx.H] // (mx.H // mx.Hkv)  # (H,) each query head's kv head
    qkv = torch.cat([Y[:, :mx.H, 0], Y[:, mx.H:, 0][:, kv], v[:, kv]], -1).float()  # (B, H, 3d)
    return torch.einsum("bhc,hc->bh", qkv, mx.ogate_w.float()) + mx.ogate_b.float()


def mixer(fl, x: Tensor, ctx: StepContext, st) -> Tensor:
    """One token through a converted layer's mixer from its StaticMixer st: the head outputs (B, 1, H d) before W_o,
    for x (B, 1, D) the layer's normed input."""
    mx, B = fl.mx, x.shape[0]
    H, Hkv, d = mx.H, mx.Hkv, mx.head_dim
    P = F.linear(x[:, 0], fl.w, fl.b)  # (B, N): every projection of x
    qk0 = P[:, :(H + Hkv) * d].view(B, H + Hkv, 1, d)  # q, k heads before RoPE
    v = P[:, fl.at["v"][0]:fl.at["v"][1]].view(B, Hkv, d)
    Y = rope(qk0.expand(-1, -1, ctx.cos.shape[2], -1), ctx.cos, ctx.sin)  # (B, H + Hkv, 1 | 2, d): at p[, at sinks]
    old_v = st.values.index_select(2, ctx.rows[:1]) if mx.mix_form == "joint" else None  # the value leaving
    st.keys.index_copy_(2, ctx.rows, Y[:, H:, :1].expand(-1, -1, 2, -1))  # (B, Hkv, S + W, d)
    st.values.index_copy_(2, ctx.rows, v[:, :, None].expand(-1, -1, 2, -1))
    q2 = Y[:, :H].reshape(B, Hkv, H // Hkv, -1)  # (B, Hkv, rep, 2d | d): [q, q_sink] per query head
    src = Y[:, :, 0] if mx.mlstm_rope else qk0[:, :, 0]  # (B, H + Hkv, d): what the mLSTM's maps read
    if mx.mix_form == "joint":  # LoLCATs' one softmax, its linear part a state W tokens behind (joint_state.py)
        from tcache.student.inference import joint_state

        return joint_state.fused_step(fl, P, q2, features(fl, P, src), old_v, ctx, st).to(x.dtype)
    swa = None
    if mx.branches != "mlstm":
        swa = window_step.attend(q2, st.keys, st.values, ctx.mask, ctx.half, mx.scaling, ctx.attn_dtype)
        if mx.branches == "window":
            return swa.reshape(B, 1, H * d).to(x.dtype)
    qf, kf = features(fl, P, src)  # (B, H, F), (B, Hm, F)
    g = P[:, fl.at["i"][0]:fl.at["f"][1]].float().unsqueeze(-1)  # (B, 2Hm, 1): input, forget gates
    hm = mlstm_step.step(qf, kf, v.index_select(1, fl.vheads).float(), g[:, :mx.Hm], g[:, mx.Hm:], st.mlstm,
                         H // mx.Hm)  # (B, H, d) fp32
    if swa is None:
        return hm.to(x.dtype).reshape(B, 1, H * d)
    o = torch.sigmoid(_ogate(fl, P, Y, v))  # (B, H)
    mixed = torch.lerp(swa.reshape(B, H, d).float(), hm, o[..., None])  # o mlstm + (1 - o) window
    return mixed.to(x.dtype).reshape(B, 1, H * d)


def layer_step(fl, h: Tensor, ctx: StepContext, st) -> Tensor:
    """One decoder layer (LAYERS' forward: residual + mixer(norm(h)), then residual + MLP(norm(h))): (B, 1, D)."""
    layer = fl.layer
    h = h + fl.mx.o_proj(mixer(fl, layer.input_layernorm(h), ctx, st))
    x = layer.post_attention_layernorm(h)
    if fl.gate_up is None:
        return h + layer.mlp(x)
    g, u = F.linear(x, fl.gate_up, fl.gate_up_b).chunk(2, -1)  # (B, 1, I) x2
    return h + layer.mlp.down_proj(layer.mlp.act_fn(g) * u)


class FusedCache:
    """Mode "mixer": a mixer's `cache` while transformers' layer forward runs (HybridMixer.forward hands itself here)."""

    def __init__(self, fl, ctx: StepContext, st):
        self.fl, self.ctx, self.st = fl, ctx, st

    def forward(self, mx, x: Tensor, position_embeddings) -> Tensor:
        B, H = x.shape[0], mx.H
        return mixer(self.fl, x, self.ctx, self.st).view(B, 1, H, -1).transpose(1, 2)  # (B, H, 1, d)


def hybrid_step(model, ids: Tensor, layers: list, pos: Tensor, fused: list, ctx: StepContext, layer_fn,
                caches: list | None = None, advance=StepContext.advance) -> Tensor:
    """Logits (B, 1, V) of one token through the converted teacher, each layer by layer_fn: layer_step(fl, h, ctx, st)
    or, with `caches` (mode "mixer"), decode._layer_call(layer, h, position_embeddings, position_ids); `advance`:
    StepContext.advance, or its compiled twin."""
    base = model.lm.model
    h = base.embed_tokens(ids)  # (B, 1, D)
    advance(ctx, model, h, pos)
    if caches is None:
        for fl, st in zip(fused, layers):
            h = layer_fn(fl, h, ctx, st)  # (B, 1, D)
        return model.head(base.norm(h))  # (B, 1, V)
    for fl, cache in zip(fused, caches):
        fl.mx.cache = cache
    try:
        for fl in fused:
            h = layer_fn(fl.layer, h, ctx.position_embeddings, ctx.position_ids)  # (B, 1, D)
    finally:
        for fl in fused:
            fl.mx.cache = None
    return model.head(base.norm(h))  # (B, 1, V)
