"""A prompt through a student once: `prefill` runs it through the parallel (chunkwise) kernels and keeps each layer's
state, which the static decoder (decode.py) then loads into its fixed buffers and steps. The state is bounded,
whatever the prompt's length:

    xLSTM (v1, v2)  per block: mLSTM (C, n, m) or sLSTM state, and the causal conv's last inputs
    hybrid          per layer: mLSTM (C, n, m), the window's last W keys / values and the S sinks' keys / values

An xLSTM prefill captures the state its parallel forward passes through (the conv's input, the kernel's last state),
in the convention of xlstm's own recurrent `step`, so a prompt costs one parallel forward, not T steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tcache.errors import TcacheError
from tcache.student.inference import slstm_cuda
@dataclass
class MixerState:
    """One hybrid layer's generation state (kv tensors keep the teacher's Hkv heads, RoPE applied)."""

    sink_k: torch.Tensor | None = None  # (B, Hkv, <=S, d)
    sink_v: torch.Tensor | None = None  # (B, Hkv, <=S, d)
    win_k: torch.Tensor | None = None  # (B, Hkv, <=W, d)
    win_v: torch.Tensor | None = None  # (B, Hkv, <=W, d)
    mlstm: tuple | None = None  # C (B, Hm, F, d), n (B, Hm, F), m (B, Hm, 1): Hm the mLSTM's heads, F its features
    pos: int = 0  # tokens consumed
    sink_rope: tuple | None = None  # cos, sin (B, 1, d) at min(pos, S + W - 1), set by the driver
    joint: tuple | None = None  # --mix joint: the last W positions' kf, i, lf and the linear C, n, m (joint_state.py)

    def forward(self, mx, x: torch.Tensor, position_embeddings) -> torch.Tensor:
        """The mixer `mx`'s head outputs (B, H, T, d) for a prompt x (B, T, D), through the parallel form, keeping
        this layer's state on the way (HybridMixer.forward hands itself here while its `cache` is this state)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope

        if self.pos:
            raise ValueError("a MixerState is filled by one prefill; step from the static decoder (decode.py)")
        cos, sin = position_embeddings  # (B, T, d) x2
        q, k, v = mx.qkv(x)  # (B, H, T, d), (B, Hkv, T, d) x2
        q0, k0 = q, k
        q, k = rope(q, k, cos, sin)
        rep = mx.H // mx.Hkv
        states: list = []
        qm, km = mx.mlstm_qk(q, q0, k, k0)  # (B, H, T, d) x2
        h = mx.mix(x, q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                   mx.sink_queries(q0, k0, cos, sin, rope), qm, km, states=states if mx.branches != "window" else None)
        # copies, not views: a view of the prompt's keys would keep all T of them alive (measured: 10 GiB at 32k x 8),
        # and the kernel's last state may view its per-chunk buffers (a state growing with T: tests/test_export.py)
        self.mlstm = tuple(t.clone() for t in mx.keep_state(states[0])) if states else None
        if mx.mix_form == "joint":  # its state is built from the same inputs (the parallel form hands none back)
            from tcache.student.inference.joint_state import prefill_state

            self.joint = prefill_state(mx, x, qm, km, v)
        self.sink_k, self.sink_v = k[:, :, :mx.sinks].clone(), v[:, :, :mx.sinks].clone()
        self.win_k, self.win_v = k[:, :, -mx.window:].clone(), v[:, :, -mx.window:].clone()
        return h


@dataclass
class DecodeState:
    """A student's whole generation state: one entry per block / converted layer, and the tokens consumed."""

    layers: list = field(default_factory=list)
    pos: int = 0

    def nbytes(self) -> int:
        """Bytes of the storage the state keeps alive (a view counts its whole base): constant in the prefix length
        once it exceeds the window (tests/test_export.py, benchmarks/speed.py)."""
        seen = {}

        def walk(x):
            if isinstance(x, torch.Tensor):
                st = x.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            elif isinstance(x, (list, tuple)):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for y in x.values():
                    walk(y)
            elif isinstance(x, MixerState):
                walk([x.sink_k, x.sink_v, x.win_k, x.win_v, x.mlstm, x.joint])

        walk(self.layers)
        return sum(seen.values())


# mlstm_kernels' chunkwise Triton kernels put (T / 64 chunks) x B x heads on one grid dimension, which CUDA caps at
# 65,535: beyond it they fail with "Triton Error [CUDA]: invalid argument" (v2 at 8 x 32k, both students at 64 x 8k
# on an H200). A prefill is split into rows that fit, and an xLSTM prompt into chunks of CHUNK tokens.
GRID_LIMIT = 65_535
KERNEL_CHUNK = 64
CHUNK = 8192


def _rows_per_call(model, ids: torch.Tensor) -> int:
    if ids.device.type != "cuda":
        return ids.shape[0]
    heads = model.mixers[0].H if model.family == "hybrid" else model.cfg.num_heads
    T = ids.shape[1] if model.family == "hybrid" else min(ids.shape[1], CHUNK)
    return max(1, GRID_LIMIT // (-(-T // KERNEL_CHUNK) * heads))


@torch.no_grad()
def prefill(model, ids: torch.Tensor, keep: int = 0) -> tuple[torch.Tensor, DecodeState]:
    """Logits (B, T, V) of the prompt (of its last `keep` positions if keep > 0: a long prompt's full logits
    would dwarf the state) and the state after its last token."""
    rows = _rows_per_call(model, ids)
    if rows < ids.shape[0]:  # the rows are independent: their states are stacked
        parts = [prefill(model, ids[i:i + rows], keep) for i in range(0, ids.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), _stacked([p[1] for p in parts])
    if model.family == "hybrid":
        state = DecodeState(layers=[MixerState() for _ in model.mixers])
        return run_hybrid(model, ids, state, keep), state
    if ids.device.type == "cuda" and ids.shape[1] > CHUNK:
        from tcache.student.inference.chunked_prefill import chunked_prefill

        return chunked_prefill(model, ids, keep, CHUNK)
    return _xlstm_prefill(model, ids, keep)


def _stacked(states: list[DecodeState]) -> DecodeState:
    """One state of the rows of `states` (each a prefill of some rows of one batch, in order)."""
    def cat(xs, dim=0):
        if isinstance(xs[0], (tuple, list)):
            return tuple(cat([x[i] for x in xs], dim) for i in range(len(xs[0])))
        return torch.cat(xs, dim) if xs[0] is not None else None

    layers = []
    for parts in zip(*(s.layers for s in states)):
        if isinstance(parts[0], MixerState):
            layers.append(MixerState(**{f: cat([getattr(p, f) for p in parts])
                                        for f in ("sink_k", "sink_v", "win_k", "win_v", "mlstm", "joint")},
                                     pos=parts[0].pos))
        else:
            # the sLSTM cell's state is (4, B, D): its rows on dim 1; every other tensor leads with the batch
            layers.append({k: cat([p[k] for p in parts], 1 if k == "slstm_state" else 0) for k in parts[0]})
    return DecodeState(layers=layers, pos=states[0].pos)


# --- xLSTM students --------------------------------------------------------------------------------------------


def _xlstm_prefill(model, ids: torch.Tensor, keep: int = 0) -> tuple[torch.Tensor, DecodeState]:
    from tcache.student.models.hybrid import resolve_mlstm_kernel
    from tcache.student.models.mlstm_kernel import mlstm_kernel_fn

    kernel = mlstm_kernel_fn(resolve_mlstm_kernel("auto", ids.device))
    layers = [blk.xlstm for blk in model.blocks.blocks]
    states: list[dict] = [{} for _ in layers]
    with slstm_cuda.cuda_cells(model, ids.device, model.embed.weight.dtype):  # CUDA sLSTM cells where they run
        x = _xlstm_features_keeping_states(model, ids, layers, states, kernel)  # (B, T, D)
    return model.head(x[:, -keep:]), DecodeState(layers=states, pos=ids.shape[1])  # (B, keep or T, V)


def _xlstm_features_keeping_states(model, ids, layers, states, kernel) -> torch.Tensor:
    """model.features(ids) (B, T, D), each block's final state kept in `states` on the way."""
    hooks, swapped = [], []
    for st, layer in zip(states, layers):
        if layer.conv1d.config.kernel_size > 0:
            hooks.append(layer.conv1d.register_forward_hook(_keep_conv_input(st)))
        cell = getattr(layer, "mlstm_cell", None)
        if cell is not None:
            swapped.append((cell, cell.backend_fn))
            cell.backend_fn = _keep_mlstm_state(st, kernel)
        else:
            hooks.append(layer.slstm_cell.register_forward_hook(_keep_slstm_state(st)))
    try:
        x, _ = model.features(ids)  # (B, T, D): the ordinary forward, its states captured on the way
    finally:
        for h in hooks:
            h.remove()
        for cell, fn in swapped:
            cell.backend_fn = fn
    return x


def _keep_conv_input(st: dict):
    def hook(module, args, out):
        x, ks = args[0], module.config.kernel_size  # (B, T, F)
        last = x[:, -ks:]  # (B, <=ks, F)
        # xlstm's conv step keeps the last ks inputs (rolled, the oldest dropped as the new one comes in)
        st["conv_state"] = (F.pad(last, (0, 0, ks - last.shape[1], 0)).clone(),)  # (B, ks, F), not a view of x
    return hook


def _keep_mlstm_state(st: dict, kernel):
    def fn(queries, keys, values, igate_preact, fgate_preact, **_):
        h, (c, n, m) = kernel(queries, keys, values, igate_preact, fgate_preact, return_last_states=True)
        # mlstm_kernels scales q by DH^-1/2, xlstm's recurrent step scales k: C and n differ by that factor
        scale = queries.shape[-1] ** -0.5
        # copies (C, n are products; m is copied): the kernel's outputs may view per-chunk buffers
        st["mlstm_state"] = ((c * scale).to(queries.dtype),  # (B, NH, DH, DH)
                             (n * scale).unsqueeze(-1).to(queries.dtype),  # (B, NH, DH, 1)
                             m.unsqueeze(-1).to(queries.dtype, copy=True))  # (B, NH, 1, 1)
        return h.to(queries.dtype)  # (B, NH, S, DH)
    return fn


def _keep_slstm_state(st: dict):
    def hook(module, args, out):
        st["slstm_state"] = out[1].clone()  # the final state (a copy: the cell's may view all T steps' states)
    return hook


# --- hybrid students -------------------------------------------------------------------------------------------


def run_hybrid(model, ids: torch.Tensor, state: DecodeState, keep: int = 0) -> torch.Tensor:
    """The converted teacher's own forward (transformers' layers, norms, MLPs) with each mixer reading and
    writing its MixerState; RoPE positions continue from the state."""
    if not model.recurrent:
        raise TcacheError("generation with a recurrent state is not built for --full-attention-layers (their KV "
                          "cache grows with the prefix); generate with use_cache=False")
    lm, B, T = model.lm, ids.shape[0], ids.shape[1]
    pos = torch.arange(state.pos, state.pos + T, device=ids.device)[None].expand(B, -1)  # (B, T)
    last = model.cfg.sinks + model.cfg.window - 1
    sink_pos = torch.full((B, 1), min(state.pos, last), device=ids.device)
    probe = lm.get_input_embeddings().weight[:1]
    sink_rope = lm.model.rotary_emb(probe, sink_pos)  # cos, sin (B, 1, d)
    for mx, st in zip(model.mixers, state.layers):
        st.sink_rope, mx.cache = sink_rope, st
    try:
        out = lm.model(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        for mx in model.mixers:
            mx.cache = None
    state.pos += T
    for st in state.layers:
        st.pos = state.pos
    return model.head(out.last_hidden_state[:, -keep:])  # (B, keep or T, V)
