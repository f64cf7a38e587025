"""One hybrid mixer (student/models/hybrid.py converts each teacher attention into one): the window + sinks branch, the
mLSTM branch over Hedgehog features, and their mix (the output gate, or LoLCATs' joint form: student/models/joint.py).

    x (B, T, D) -> q, k, v (the teacher's projections and RoPE), kv heads repeated to the query heads
      swa   = window + sinks softmax attention (student/models/window.py, O(T·W))
      mlstm = mLSTM(phi_q(qm), phi_k(km), v; gates from x)   (mlstm_kernels' chunkwise kernel)
      out   = o * mlstm + (1 - o) * swa, o = sigmoid(w_o [qm, km, v])  per head, before the teacher's W_o

After step 3 (--qk-merge, student/models/qk_merge.py) phi's linear maps live in the mLSTM's own projections of x.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tcache.errors import TcacheError
from tcache.student.models.match_loss import stage_one_losses

MLSTM_HEADS = ("query", "kv")
"""--mlstm-heads: the mLSTM's states per query head or per key / value head."""
MIXES = ("gate", "joint")
"""--mix: the output gate between the branches, or LoLCATs' joint normalisation (joint.py)."""

if TYPE_CHECKING:
    from tcache.student.models.hybrid import HybridConfig

MLSTM_INPUTS_ENV = "TCACHE_MLSTM_INPUTS"
"""unset (default): the mLSTM kernel gets q, k, v in the layer's compute dtype; fp32: always fp32 (the earlier path),
for benchmarks."""


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map per head: (B, H, T, d) with weight (H, d, F/2) -> (B, H, T, F), each half a
    softmax over the feature dimension (fp32)."""
    z = torch.einsum("bhtd,hde->bhte", x.float(), weight.float())  # (B, H, T, F/2)
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)  # (B, H, T, F)


def feature_dim(cfg: HybridConfig, head_dim: int) -> int:
    """The mLSTM's q / k features per head: cfg.feature_dim, else 2d."""
    return cfg.feature_dim if cfg.feature_dim is not None else 2 * head_dim


def init_igate_bias(head_dim: int, given: float | None = None, features: int | None = None) -> float:
    """The input gate's bias at init. xLSTM's is ~0, made for learned q, k of norm ~sqrt(d); here the mLSTM sees
    Hedgehog features (two softmaxes, phi(q) . phi(k) ~ 2/d at the identity init) and the kernel still scales by
    (2d)^-1/2, so one token adds only ~2/(d sqrt(2d)) ~ 0.003 (d = 64) to n . q: the normaliser's floor
    max(|n . q|, 1) held at 90-99% of positions of the shared teacher, leaving the branch an unnormalised,
    nearly silent sum. ln(d sqrt(2d) / 2) (5.9 at d = 64) makes one token's share ~1, so the mLSTM starts as the
    normalised linear attention that Hedgehog / LoLCATs train (the floor only guards a near-empty memory).
    With F features (--feature-dim) the same reasoning gives phi(q) . phi(k) ~ 4/F and a scale F^-1/2, so
    ln(F sqrt(F) / 4), which is the formula above at F = 2d."""
    if given is not None:
        return given
    F_ = features if features is not None else 2 * head_dim
    return math.log(F_ * math.sqrt(F_) / 4)


class HybridMixer(nn.Module):
    """Replaces one transformers attention module; same call signature, same return (output, None)."""

    def __init__(self, attn: nn.Module, hidden_size: int, num_heads: int, num_kv_heads: int, cfg: HybridConfig):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.layer_idx = getattr(attn, "layer_idx", None)
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        if cfg.mlstm_heads not in MLSTM_HEADS:  # DistillConfig checks the flags; this, a HybridConfig built in code
            raise TcacheError(f"--mlstm-heads {cfg.mlstm_heads!r} is unknown; use one of {', '.join(MLSTM_HEADS)}")
        if cfg.mix not in MIXES or (cfg.mix == "joint" and cfg.branches != "both"):
            raise TcacheError(f"--mix {cfg.mix!r} with --branches {cfg.branches}: use --mix gate or joint, joint with "
                              "--branches both (it mixes both branches)")
        self.H, self.Hkv = num_heads, num_kv_heads
        self.Hm = num_kv_heads if cfg.mlstm_heads == "kv" else num_heads  # heads of the mLSTM state
        self.window, self.sinks, self.branches, self.mlstm_rope = cfg.window, cfg.sinks, cfg.branches, cfg.mlstm_rope
        self.mix_form = cfg.mix
        d = self.head_dim
        # the only parameters that do not come from the teacher
        half = feature_dim(cfg, d) // 2
        self.qk_merged = cfg.qk_merged
        if cfg.qk_merged:  # step 3 done: phi's maps folded into the mLSTM's own q / k projections (qk_merge.py)
            self.mq_proj = nn.Linear(hidden_size, num_heads * half, bias=self.q_proj.bias is not None)
            self.mk_proj = nn.Linear(hidden_size, self.Hm * half, bias=self.k_proj.bias is not None)
        else:  # identity at init (the first F/2 of the head's dims when F/2 < d; zero columns beyond d when F/2 > d)
            self.phi_q = nn.Parameter(torch.eye(d, half).repeat(num_heads, 1, 1))  # (H, d, F/2)
            self.phi_k = nn.Parameter(torch.eye(d, half).repeat(self.Hm, 1, 1))  # (Hm, d, F/2)
        self.igate = nn.Linear(hidden_size, self.Hm)
        self.fgate = nn.Linear(hidden_size, self.Hm)
        self.ogate_w = nn.Parameter(torch.zeros(num_heads, 3 * d))  # (H, 3d)
        self.ogate_b = nn.Parameter(torch.zeros(num_heads))  # (H,)
        with torch.no_grad():  # xLSTM's gate init (zero weights, forget bias 3..6), input bias raised: see below
            nn.init.zeros_(self.igate.weight)
            nn.init.normal_(self.igate.bias, mean=init_igate_bias(d, cfg.igate_bias, 2 * half), std=0.1)
            nn.init.zeros_(self.fgate.weight)
            self.fgate.bias.copy_(torch.linspace(*cfg.fgate_bias, self.Hm))
        self.mode = "hybrid"
        self.mlstm_fn = None  # set by HybridStudent.set_kernel
        # --window-dropout: set per micro-batch by HybridStudent.drop_windows (a buffer, so a compiled step reads it
        # without recompiling); only training reads it
        self.register_buffer("drop_window", torch.zeros((), dtype=torch.bool), persistent=False)
        self.window_dropout = False
        self.cache = None  # while generating: a state object of inference/ (prefill.MixerState, decode.StaticMixer)
        self.last_mse: torch.Tensor | None = None
        self.match_loss = "output"  # stage I's objective (MATCH_LOSSES): HybridStudent.set_match_loss
        self.last_weights_ce: torch.Tensor | None = None  # kept in match mode unless match_loss is "output"
        self.last_match: torch.Tensor | None = None  # the chosen objective of the last match-mode forward

    def new_parameters(self) -> list[nn.Parameter]:
        maps = [*self.mq_proj.parameters(), *self.mk_proj.parameters()] if self.qk_merged else [self.phi_q, self.phi_k]
        return [*maps, *self.igate.parameters(), *self.fgate.parameters(), self.ogate_w, self.ogate_b]

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and forget gate pre-activations (..., H) x2 of x (..., D), from one projection. Each gate is H wide
        (15 at SmolLM2's shape): an output row of H elements is not 16-byte aligned, so cuBLAS falls back to an
        align-1 kernel, 24 us a call at batch 8 on an H200, a third of the captured decode step's time
        (benchmarks/results/speed-h200-static/run3's step profile). Stacked and padded with zero rows to a multiple
        of 8 outputs, the two weights make one aligned GEMM; the parameters (and checkpoints) stay igate / fgate."""
        H, pad = self.Hm, -(2 * self.Hm) % 8
        w = torch.cat([self.igate.weight, self.fgate.weight, self.igate.weight.new_zeros(pad, x.shape[-1])])
        b = torch.cat([self.igate.bias, self.fgate.bias, self.igate.bias.new_zeros(pad)])
        g = F.linear(x, w, b)  # (..., 2Hm + pad)
        i, f = g[..., :H], g[..., H:2 * H]  # (..., Hm) x2
        if self.Hm != self.H:  # kv heads: each query head of a group gets its group's gates
            i, f = (t.repeat_interleave(self.H // self.Hm, -1) for t in (i, f))  # (..., H) x2
        return i, f

    def features(self, qm: torch.Tensor, km: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mLSTM's Hedgehog features (B, H, T, F) x2 of its q, k (B, H, T, d); with kv heads the key map runs
        once per group (km repeats the kv head's keys within a group) and its features are repeated to the group's
        query heads, so the group's H / Hkv mLSTM states are equal: decode keeps one (keep_state). After step 3
        they come from the layer input x (B, T, D) through the merged projections instead (qk_merge.py)."""
        if self.qk_merged:
            from tcache.student.models.qk_merge import merged_features

            return merged_features(self, x)  # (B, H, T, F) x2
        qf = hedgehog(qm, self.phi_q)  # (B, H, T, F)
        if self.Hm == self.H:
            return qf, hedgehog(km, self.phi_k)
        r = self.H // self.Hm
        return qf, hedgehog(km[:, ::r], self.phi_k).repeat_interleave(r, 1)  # (B, H, T, F)

    def mlstm_qk(self, q, q0, k, k0) -> tuple[torch.Tensor, torch.Tensor]:
        """The mLSTM branch's query and key (B, H, T, d) x2 from the rotated q, k and the unrotated q0, k0 (keys over
        the Hkv kv heads): rotated with --mlstm-rope, unrotated otherwise; keys repeated to the query heads."""
        rep = self.H // self.Hkv
        return (q, k.repeat_interleave(rep, 1)) if self.mlstm_rope else (q0, k0.repeat_interleave(rep, 1))

    def keep_state(self, state: tuple) -> tuple:
        """The mLSTM state decode keeps: C (B, Hm, F, d), n, m of a state over the H heads (one per group)."""
        r = self.H // self.Hm
        return state if r == 1 else tuple(t[:, ::r] for t in state)

    def head_state(self, state: tuple) -> tuple:
        """keep_state's inverse: the kept state over the H heads (each group's repeated)."""
        r = self.H // self.Hm
        return state if r == 1 else tuple(t.repeat_interleave(r, 1) for t in state)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        x = hidden_states  # (B, T, D)
        B, T, _ = x.shape
        if self.cache is not None:  # generation: the state object (student/inference/) runs this layer's forward
            h = self.cache.forward(self, x, position_embeddings)  # (B, H, T, d)
            return self.o_proj(h.transpose(1, 2).reshape(B, T, -1)), None
        q, k, v = self.qkv(x)  # (B, H, T, d), (B, Hkv, T, d) x2
        cos, sin = position_embeddings  # (B, T, d) x2
        q_sink = self.sink_queries(q, k, cos, sin, apply_rotary_pos_emb)  # (B, H, T, d) or None
        q0, k0 = q, k  # unrotated
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = self.H // self.Hkv
        kr, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, T, d) x2
        if self.mode == "teacher":
            h = F.scaled_dot_product_attention(q, kr, v, is_causal=True, scale=self.scaling)  # (B, H, T, d)
        else:
            qm, km = self.mlstm_qk(q, q0, k, k0)  # (B, H, T, d) x2
            h = self.mix(x, q, kr, v, q_sink, qm, km)  # (B, H, T, d)
            if self.mode == "match":
                with torch.no_grad():
                    full = F.scaled_dot_product_attention(q, kr, v, is_causal=True, scale=self.scaling)
                # the feature maps of the mLSTM branch, on its own q, k (B, H, T, 2d), if the loss needs them
                features = lambda: self.features(qm, km, x)  # noqa: E731
                self.last_mse, self.last_weights_ce, self.last_match = stage_one_losses(
                    self.match_loss, h, full, features, q, kr, self.scaling)
                h = full  # teacher forcing: the next layer sees the teacher's own input
        return self.o_proj(h.transpose(1, 2).reshape(B, T, -1)), None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's projections of x (B, T, D), before RoPE: q (B, H, T, d), k and v (B, Hkv, T, d). One GEMM
        over the three weights concatenated (N = (H + 2 Hkv) d; one GEMM in each backward too, where three plus
        two sums were: the issue-32 step), while they are plain nn.Linear; adapters (peft's LoRA layers) keep their
        own forwards. The concatenation is a copy of the weights a call (in training fused by the compiler with
        autocast's weight cast): paid over T tokens, not per decoded token (T = 1: three GEMMs, as the unfused decode
        step ran; the default decode step stacks its weights once, inference/fused_weights.py)."""
        B, T, _ = x.shape
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if T > 1 and all(type(p) is nn.Linear for p in projs):
            w = torch.cat([p.weight for p in projs])  # ((H + 2 Hkv) d, D)
            b = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
            q, k, v = F.linear(x, w, b).split([p.out_features for p in projs], -1)  # (B, T, H d), (B, T, Hkv d) x2
        else:
            q, k, v = (p(x) for p in projs)
        q = q.view(B, T, self.H, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.Hkv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(B, T, self.Hkv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        return q, k, v

    def sink_queries(self, q, k, cos, sin, rope) -> torch.Tensor | None:
        """Queries rotated for the sink keys as StreamingLLM places them (Xiao et al., 2023: positions within
        the cache, not the text): a query never sits more than sinks + window - 1 positions after a sink, so
        RoPE sees no distance it was not trained on at any length. None when no query is that far."""
        T, last = q.shape[2], self.sinks + self.window - 1
        if self.sinks == 0 or T <= last or self.branches == "mlstm":
            return None
        p = torch.arange(T, device=q.device).clamp(max=last)  # (T,) the query's position in the cache
        return rope(q, k, cos[:, p], sin[:, p])[0]  # (B, H, T, d)

    def window_attention(self, q, k, v, q_sink) -> torch.Tensor:
        """Softmax attention over the window and the sinks: (B, H, T, d), blocked in O(T·W) on every device
        (student/models/window.py); TCACHE_WINDOW=dense selects the earlier single SDPA call over a dense mask. A sink
        outside a query's window is scored with the query rotated to its cache position (sink_queries)."""
        from tcache.student.models.window import attend

        return attend(q, k, v, q_sink, self.window, self.sinks, self.scaling)  # (B, H, T, d)

    def mix(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            q_sink: torch.Tensor | None = None, qm: torch.Tensor | None = None,
            km: torch.Tensor | None = None, states: list | None = None) -> torch.Tensor:
        """The hybrid head outputs before W_o: (B, H, T, d) from x (B, T, D), q, k, v (B, H, T, d) for the window,
        and the mLSTM's and output gate's q, k (default: the window's). `states`: a list that receives the
        mLSTM's state after the last position (generation's prefill)."""
        qm = q if qm is None else qm
        km = k if km is None else km
        if self.mix_form == "joint":  # LoLCATs' one denominator; no recurrent state to hand back
            from tcache.student.models.joint import joint_attention

            qf, kf = self.features(qm, km, x)  # (B, H, T, F) x2
            i, f = (g.float().transpose(1, 2) for g in self.gates(x))  # (B, H, T) x2
            return joint_attention(q, k, v, q_sink, qf, kf, i, f, self.ogate_b, self.window, self.sinks,
                                   self.scaling)  # (B, H, T, d)
        if self.branches != "mlstm":
            swa = self.window_attention(q, k, v, q_sink)  # (B, H, T, d)
            if self.branches == "window":
                return swa
        # q, k, v reach the kernel in the layer's compute dtype (bf16 / fp16 under autocast: half the bytes the
        # chunkwise kernel reads; fp32 stays fp32), the gates in fp32 as mlstm_kernels expects; the kernel
        # accumulates in fp32 either way. TCACHE_MLSTM_INPUTS=fp32 feeds fp32 as before (for benchmarks).
        dt = torch.float32 if os.environ.get(MLSTM_INPUTS_ENV) == "fp32" else v.dtype
        qf, kf = (t.to(dt) for t in self.features(qm, km, x))  # (B, H, T, F) x2
        i, f = (g.float().transpose(1, 2) for g in self.gates(x))  # (B, H, T) x2
        if states is None:
            m = self.mlstm_fn(qf, kf, v.to(dt), i.unsqueeze(-1), f.unsqueeze(-1))  # (B, H, T, d)
        else:
            m, state = self.mlstm_fn(qf, kf, v.to(dt), i.unsqueeze(-1), f.unsqueeze(-1), return_last_states=True)
            states.append(state)
        if self.branches == "mlstm":
            return m.to(q.dtype)
        return self.gate_mix(qm, km, v, m, swa)

    def gate_mix(self, qm, km, v, m, swa) -> torch.Tensor:
        """o * mlstm + (1 - o) * window with the output gate o = sigmoid(w_o [q, k, v]) per head: (B, H, T, d)."""
        # A product and a sum, not an einsum: under autocast the einsum became a bf16 bmm of one output column per
        # head, which cuBLAS ran as cutlass align-1 / align-2 kernels in the forward and both backward GEMMs (H100
        # profile of a stage II step, benchmarks/results/distill-step-h100-anchor); this stays fp32 and the
        # compiler fuses it into one reduction.
        qkv = torch.cat([qm, km, v], -1).float()  # (B, H, T, 3d)
        o = torch.sigmoid((qkv * self.ogate_w.float()[:, None]).sum(-1)
                          + self.ogate_b.float()[None, :, None]).unsqueeze(-1)  # (B, H, T, 1)
        mixed = (o * m + (1 - o) * swa.float()).to(qm.dtype)
        if self.training and self.window_dropout:  # a dropped layer trains on its mLSTM branch alone
            mixed = torch.where(self.drop_window, m.to(qm.dtype), mixed)
        return mixed
