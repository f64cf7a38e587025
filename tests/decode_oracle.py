"""An independent decode step for tests: the concatenating recurrent step that tcache shipped before the static state
became its one decode path. It keeps the state as growing / sliced tensors (no ring buffer, no masks, no fixed
buffers, no device-side position), so the static decoder (student/inference/decode.py) is held to a step computed
another way:

    xLSTM (v1, v2)  xlstm's own `xLSTMBlock.step` on prefill's state dicts
    hybrid          keys / values concatenated and sliced to the last W, the sinks that left the window scored apart
                    with a list of Python ints, mlstm_kernels' native recurrent step

`step(model, ids, state)` continues a prefill.prefill state in place.
"""

from __future__ import annotations

import torch

from tcache.student.inference.mixer_step import mix_step
from tcache.student.inference.prefill import DecodeState, MixerState, run_hybrid


@torch.no_grad()
def step(model, ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Logits (B, T, V) of the next tokens ids (B, T) given a prefilled state (updated in place), one at a time."""
    if state.pos == 0:
        raise ValueError("step() needs a prefilled state; call prefill() first")
    if ids.shape[1] > 1:
        return torch.cat([step(model, ids[:, t:t + 1], state) for t in range(ids.shape[1])], 1)
    if model.family == "hybrid":
        state.layers = [st if isinstance(st, ConcatMixer) else ConcatMixer(**vars(st)) for st in state.layers]
        return run_hybrid(model, ids, state)
    x = model.embed(ids)  # (B, 1, D)
    for blk, st in zip(model.blocks.blocks, state.layers):
        x, new = blk.step(x, **st)  # xlstm's recurrent step: (B, 1, D)
        st.update(new)
    state.pos += 1
    return model.head(model.norm(x))  # (B, 1, V)


class ConcatMixer(MixerState):
    """A hybrid layer's state stepped by concatenation."""

    def forward(self, mx, x: torch.Tensor, position_embeddings) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope

        if x.shape[1] != 1:
            raise ValueError("a prefilled mixer steps one token at a time")
        cos, sin = position_embeddings  # (B, 1, d) x2
        q, k, v = mx.qkv(x)  # (B, H, 1, d), (B, Hkv, 1, d) x2
        q0, k0 = q, k
        q, k = rope(q, k, cos, sin)
        pos = self.pos  # this token's position
        if pos < mx.sinks:
            self.sink_k, self.sink_v = torch.cat([self.sink_k, k], 2), torch.cat([self.sink_v, v], 2)
        self.win_k = torch.cat([self.win_k, k], 2)[:, :, -mx.window:]  # (B, Hkv, <=W, d)
        self.win_v = torch.cat([self.win_v, v], 2)[:, :, -mx.window:]
        return mix_step(mx, x, q, q0, k0, k, v, lambda: self._window(mx, q, q0, pos),
                        lambda qm, km, vr: self._mlstm(mx, x, qm, km, vr))

    def _window(self, mx, q, q0, pos: int) -> torch.Tensor:
        """Softmax of one query over the window's keys and the sinks outside it: (B, H, 1, d)."""
        from transformers.models.llama.modeling_llama import rotate_half

        rep = mx.H // mx.Hkv
        kw, vw = self.win_k.repeat_interleave(rep, 1), self.win_v.repeat_interleave(rep, 1)  # (B, H, <=W, d) x2
        scores = [torch.einsum("bhqd,bhkd->bhqk", q.float(), kw.float()) * mx.scaling]  # (B, H, 1, <=W)
        values = [vw]
        far = [s for s in range(self.sink_k.shape[2]) if pos - s >= mx.window]  # sinks that left the window
        if far:
            cos, sin = self.sink_rope  # (B, 1, d)
            q_sink = q0 * cos[:, None] + rotate_half(q0) * sin[:, None]  # (B, H, 1, d)
            ks = self.sink_k[:, :, far].repeat_interleave(rep, 1)  # (B, H, n, d)
            scores.insert(0, torch.einsum("bhqd,bhkd->bhqk", q_sink.float(), ks.float()) * mx.scaling)
            values.insert(0, self.sink_v[:, :, far].repeat_interleave(rep, 1))
        p = torch.softmax(torch.cat(scores, -1), -1)  # (B, H, 1, n + <=W)
        return torch.einsum("bhqk,bhkd->bhqd", p, torch.cat(values, 2).float()).to(q.dtype)  # (B, H, 1, d)

    def _mlstm(self, mx, x, qm, km, v) -> torch.Tensor:
        """One mLSTM step with mlstm_kernels' native recurrent step: (B, H, 1, d)."""
        from mlstm_kernels.torch.recurrent.native_step import mlstm_recurrent_step__native

        qf, kf = (t[:, :, 0] for t in mx.features(qm, km, x))  # (B, H, F) x2
        i, f = (g.float()[:, 0, :, None] for g in mx.gates(x))  # (B, H, 1) x2
        c, n, m = mx.head_state(self.mlstm)
        h, new = mlstm_recurrent_step__native(qf, kf, v[:, :, 0].float(), i, f, c, n, m, eps=1e-12)
        self.mlstm = mx.keep_state(new)
        return h[:, :, None]  # (B, H, 1, d)
