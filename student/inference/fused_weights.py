"""The weights of the fused hybrid decode step (fused_step.py), per converted layer: every projection of the layer
input the mixer needs, stacked once into one matrix so a step makes one GEMM of them, and the MLP's gate and up
projections likewise.

    rows of `w` (N, D)   q (H d) | k (Hkv d) | v (Hkv d) | i (Hm) | f (Hm) | o (H) | zq (H F/2) | zk (Hm F/2) | 0
                         o: the output gate's pre-activation, folded in (below); zq, zk: the merged feature maps'
                         pre-activations (after --qk-merge); zero rows pad N to a multiple of 8 (cuBLAS's aligned
                         kernels: mixer.gates says what an unaligned row cost)
    phi (H + Hm, d, F/2) the Hedgehog maps stacked (before --qk-merge): one batched matmul for the q and k features
    gate_up (2I, D)      the MLP's gate_proj over its up_proj

The output gate o = sigmoid(w_o [q0, k0, v] + b) per head is linear in x when the mLSTM reads the unrotated q0, k0
(no --mlstm-rope): w_o,h [W_q,h; W_k,kv(h); W_v,kv(h)] x + (w_o,h [b_q; b_k; b_v] + b_h), computed in float64 here
(the same fold qk_merge.py makes of the feature maps). With --mlstm-rope the step computes o from the rotated q, k.

The matrices are copies in the model's dtype (the model's own parameters are untouched, so training, LoRA and saving
see nothing new): they cost the projections' bytes once more on the device. In bf16 the folded output gate rounds its
pre-activation once to bf16, where the earlier step summed bf16 q0, k0, v in fp32: a difference of bf16's size.
`refresh` rebuilds them in place when a source parameter changed (its version counter or storage), so a decoder kept
across generate() calls never steps stale weights.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")
"""Decoder layers whose forward is residual + attention(norm(x)), then residual + mlp(norm(x)) with a gated MLP: the
fused step runs them itself (gate and up in one GEMM); any other layer runs its own forward around the fused mixer."""


@dataclass
class FusedLayer:
    """One converted layer's stacked weights and where each part sits (offsets into the projection's output)."""

    mx: nn.Module  # the HybridMixer
    layer: nn.Module  # its decoder layer
    w: Tensor  # (N, D) in the model's dtype
    b: Tensor  # (N,)
    at: dict  # part -> (start, stop) of the projection's output
    rows: Tensor  # (H + Hm,) long: the q heads, then each mLSTM key map's kv head (offset by H), of the q, k heads
    vheads: Tensor  # (Hm,) long: the kv head each mLSTM head reads its value from
    phi: Tensor | None = None  # (H + Hm, d, F/2) fp32: phi_q over phi_k (None after --qk-merge)
    gate_up: Tensor | None = None  # (2I, D): the MLP's gate over up projection (None: the layer runs its own MLP)
    gate_up_b: Tensor | None = None  # (2I,) or None
    log_share: Tensor | None = None  # (1, Hkv, rep, 1) fp32: --mix joint's log sigmoid(ogate_b), the window's share
    log_rest: Tensor | None = None  # (1, Hm, r, 1) fp32: log sigmoid(-ogate_b), the linear part's
    version: tuple = field(default_factory=tuple)  # the sources' (storage, version) when last built


def _plain(*mods) -> bool:
    return all(type(m) is nn.Linear for m in mods)  # a LoRA layer (peft) adds to W x: its W alone is not the map


def mlp_fusable(layer: nn.Module) -> bool:
    """Whether the step may run this decoder layer itself (LAYERS) with its gate and up projections stacked."""
    mlp = getattr(layer, "mlp", None)
    return (type(layer).__name__ in LAYERS and mlp is not None and hasattr(mlp, "act_fn")
            and _plain(getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)))


def supported(model) -> bool:
    """Whether every mixer's projections are plain nn.Linear (the stacked copies equal them)."""
    return all(_plain(mx.q_proj, mx.k_proj, mx.v_proj, mx.igate, mx.fgate)
               and (not mx.qk_merged or _plain(mx.mq_proj, mx.mk_proj)) for mx in model.mixers)


def folds_ogate(mx) -> bool:
    """The output gate's pre-activation is a row block of the projection (gate mix of both branches, unrotated)."""
    return mx.branches == "both" and mx.mix_form == "gate" and not mx.mlstm_rope


def _sources(mx, layer, mlp: bool) -> list[Tensor]:
    mods = [mx.q_proj, mx.k_proj, mx.v_proj, mx.igate, mx.fgate] + ([mx.mq_proj, mx.mk_proj] if mx.qk_merged else [])
    out = [t for m in mods for t in (m.weight, m.bias) if t is not None] + [mx.ogate_w, mx.ogate_b]
    if not mx.qk_merged:
        out += [mx.phi_q, mx.phi_k]
    if mlp:
        out += [t for m in (layer.mlp.gate_proj, layer.mlp.up_proj) for t in (m.weight, m.bias) if t is not None]
    return out


def _version(sources: list[Tensor]) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in sources)


def _bias(m: nn.Linear) -> Tensor:
    return m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])


@torch.no_grad()
def _ogate_fold(mx) -> tuple[Tensor, Tensor]:
    """(U (H, D), c (H,)) in float64: o_pre = U x + c, the output gate's pre-activation as a projection of x."""
    H, d, rep = mx.H, mx.head_dim, mx.H // mx.Hkv
    kv = torch.arange(H, device=mx.ogate_w.device) // rep  # the kv head each query head's km, v repeat
    wo = mx.ogate_w.double()  # (H, 3d): over [q0, k0, v]
    parts = [(mx.q_proj, torch.arange(H, device=kv.device)), (mx.k_proj, kv), (mx.v_proj, kv)]
    U, c = 0, mx.ogate_b.double()
    for j, (proj, heads) in enumerate(parts):
        w = proj.weight.double().view(-1, d, proj.weight.shape[1])[heads]  # (H, d, D)
        b = _bias(proj).double().view(-1, d)[heads]  # (H, d)
        U = U + torch.einsum("hd,hdc->hc", wo[:, j * d:(j + 1) * d], w)
        c = c + (wo[:, j * d:(j + 1) * d] * b).sum(-1)
    return U, c


@torch.no_grad()
def _stack(mx, layer, mlp: bool) -> dict:
    """Every stacked tensor of one layer, freshly computed."""
    parts = [("q", mx.q_proj.weight, _bias(mx.q_proj)), ("k", mx.k_proj.weight, _bias(mx.k_proj)),
             ("v", mx.v_proj.weight, _bias(mx.v_proj)), ("i", mx.igate.weight, mx.igate.bias),
             ("f", mx.fgate.weight, mx.fgate.bias)]
    dtype = mx.q_proj.weight.dtype
    if folds_ogate(mx):
        U, c = _ogate_fold(mx)
        parts.append(("o", U.to(dtype), c.to(dtype)))
    if mx.qk_merged:
        parts += [("zq", mx.mq_proj.weight, _bias(mx.mq_proj)), ("zk", mx.mk_proj.weight, _bias(mx.mk_proj))]
    at, start = {}, 0
    for name, w, _ in parts:
        at[name] = (start, start + w.shape[0])
        start += w.shape[0]
    pad = -start % 8
    w = torch.cat([p[1].to(dtype) for p in parts] + [parts[0][1].new_zeros(pad, parts[0][1].shape[1])])  # (N, D)
    b = torch.cat([p[2].to(dtype) for p in parts] + [parts[0][2].new_zeros(pad)])  # (N,)
    out = {"w": w, "b": b, "at": at}
    if not mx.qk_merged:
        out["phi"] = torch.cat([mx.phi_q, mx.phi_k]).float()  # (H + Hm, d, F/2)
    if mlp:
        g, u = layer.mlp.gate_proj, layer.mlp.up_proj
        out["gate_up"] = torch.cat([g.weight, u.weight])  # (2I, D)
        out["gate_up_b"] = torch.cat([g.bias, u.bias]) if g.bias is not None else None
    if mx.mix_form == "joint":
        rep, r = mx.H // mx.Hkv, mx.H // mx.Hm
        share = mx.ogate_b.float()  # (H,) the window's share before the sigmoid
        out["log_share"] = F.logsigmoid(share).view(1, mx.Hkv, rep, 1)
        out["log_rest"] = F.logsigmoid(-share).view(1, mx.Hm, r, 1)
    return out


def build(mx, layer, mlp: bool) -> FusedLayer:
    from tcache.student.models.qk_merge import key_heads

    kh = torch.tensor(key_heads(mx), device=mx.q_proj.weight.device)  # (Hm,)
    rows = torch.cat([torch.arange(mx.H, device=kh.device), mx.H + kh])  # (H + Hm,)
    fl = FusedLayer(mx=mx, layer=layer, rows=rows, vheads=kh, **_stack(mx, layer, mlp))
    fl.version = _version(_sources(mx, layer, mlp))
    return fl


def refresh(fl: FusedLayer) -> None:
    """Rebuild fl's tensors in place (their storage kept: a captured CUDA graph reads them) if a source changed."""
    mlp = fl.gate_up is not None
    now = _version(_sources(fl.mx, fl.layer, mlp))
    if now == fl.version:
        return
    with torch.no_grad():
        for name, t in _stack(fl.mx, fl.layer, mlp).items():
            if isinstance(t, Tensor):
                getattr(fl, name).copy_(t)
    fl.version = now


_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def of(model, mlp: bool) -> list[FusedLayer]:
    """The fused weights of every converted layer of `model` (in the order of model.mixers), built once per model
    (every decoder of every batch size shares them) and refreshed if the model's weights changed since."""
    base = model.lm.model
    layer_of = {id(layer.self_attn): layer for layer in base.layers[: base.config.num_hidden_layers]}
    key = (mlp, next(model.parameters()).device, next(model.parameters()).dtype)
    got = _BUILT.get(model)
    if got is None or got[0] != key:
        got = (key, [build(mx, layer_of[id(mx)], mlp and mlp_fusable(layer_of[id(mx)])) for mx in model.mixers])
        _BUILT[model] = got
    for fl in got[1]:
        refresh(fl)
    return got[1]
