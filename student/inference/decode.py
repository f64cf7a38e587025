"""The one decode path, on every device: a static generation state and its step, as transformers' StaticCache is for a
transformer. Every tensor of the state is allocated once for (batch, dtype, device) and updated in place, so one step
is a fixed-shape function of (token ids, state); on CUDA it is captured once in a CUDA graph and replayed (one launch
per token instead of ~30 small kernels per layer from the host), on CPU it runs as it is.

    xLSTM (v1, v2)  per block: the buffers of prefill's state (mLSTM C, n, m; conv inputs; sLSTM state),
                    overwritten by xlstm's own `step` outputs with copy_
    hybrid          per layer: the sinks' keys / values (B, Hkv, S, d), the window's as a ring buffer (B, Hkv, W, d)
                    written at slot pos % W (sinks and window: views of one (B, Hkv, S + W, d) buffer each), the
                    mLSTM C, n, m; one position counter (a device tensor). Its step: fused_step.py (a few kernels
                    per layer; TCACHE_FUSED_STEP=off steps through mixer_step.py as before)

Positions not yet filled are masked, never sliced away: the window slot j holds position p - ((p - j) mod W) for the
token at position p, valid when that is >= 0; sink s is scored apart from the window once p - s >= W.

`StaticDecoder.load(state)` copies a prefilled prefill.DecodeState into the buffers (the prefill is the ordinary
parallel forward); `step(ids)` advances. tests/test_static_decode.py holds it to an independent concatenating step
(tests/decode_oracle.py) and, through generate(), to the full forward's logits at every step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tcache.student.inference import fused_step, fused_weights
from tcache.student.inference.prefill import DecodeState, MixerState
from tcache.student.inference.slstm_step import branch_free_slstm

GRAPH_ENV = "TCACHE_CUDA_GRAPH"
"""auto (default): on CUDA the step is captured in a CUDA graph and replayed; 0: it runs eagerly (to debug a kernel,
or to time the step without the graph)."""


COMPILE_ENV = "TCACHE_STATIC_COMPILE"
"""How the step is fused before it is captured: layer (default on CUDA: torch.compile of one decoder layer / block
step, reused by every layer), full (the whole step), off."""


def supported(model) -> bool:
    """Every recipe: the hybrid, mLSTM-only students (v2) and students with sLSTM blocks (v1) on xlstm's vanilla
    sLSTM cell (its pointwise step swapped for a branch-free one while stepping: slstm_step.py). xlstm's CUDA
    sLSTM cell is not captured: it steps eagerly."""
    if model.family == "hybrid" or not model.cfg.slstm_at:
        return True
    return all(getattr(blk.xlstm, "slstm_cell", None) is None or hasattr(blk.xlstm.slstm_cell, "pointwise")
               for blk in model.blocks.blocks)


def _layer_call(layer, h, position_embeddings, position_ids):
    out = layer(h, attention_mask=None, position_embeddings=position_embeddings, position_ids=position_ids,
                use_cache=False)
    return out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple


def _block_call(blk, x, st: dict):
    x, new = blk.step(x, **st)  # xlstm's recurrent step: (B, 1, D)
    for k, v in new.items():
        _copy(st[k], v)
    return x


_COMPILED: dict = {}


def _fused(fn, mode: str):
    """fn compiled once per process for `layer` mode (every layer of every student shares it), else fn."""
    if mode != "layer":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


@dataclass
class StaticMixer:
    """One hybrid layer's fixed buffers (keys / values keep the teacher's Hkv heads, RoPE applied)."""

    sink_k: torch.Tensor  # (B, Hkv, S, d)
    sink_v: torch.Tensor  # (B, Hkv, S, d)
    win_k: torch.Tensor  # (B, Hkv, W, d) ring buffer: position t at slot t % W
    win_v: torch.Tensor  # (B, Hkv, W, d)
    mlstm: tuple | None  # C (B, Hm, F, d), n (B, Hm, F), m (B, Hm, 1)
    pos: torch.Tensor  # (1,) int64, shared by all layers: the position of the token being stepped
    sink_rope: tuple | None = None  # cos, sin (B, 1, d) at min(pos, S + W - 1), set per step
    joint: tuple | None = None  # --mix joint: ring kf, i, lf and the linear C, n, m (joint_state.py)
    keys: torch.Tensor | None = None  # (B, Hkv, S + W, d): sink_k over win_k, the one buffer both view
    values: torch.Tensor | None = None  # (B, Hkv, S + W, d): sink_v over win_v
    joint_ring: torch.Tensor | None = None  # (B, Hm, W, F + 2): the joint ring's kf, i, lf side by side

    def forward(self, mx, x: torch.Tensor, position_embeddings) -> torch.Tensor:
        """HybridMixer.forward hands itself here while its `cache` is this state: one token's head outputs."""
        from tcache.student.inference.mixer_step import mixer_step

        return mixer_step(mx, x, position_embeddings, self)


def _copy(dst, src) -> None:
    """copy_ src into dst, through tuples."""
    if isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _copy(d, s)
    else:
        dst.copy_(src)


def _clone(x):
    return tuple(_clone(y) for y in x) if isinstance(x, (tuple, list)) else x.clone()


class StaticDecoder:
    """The fixed generation state of one student at one (batch, dtype, device), and its step."""

    def __init__(self, model, state: DecodeState, capture: bool | None = None):
        self.model = model
        first = next(model.parameters())
        self.device = first.device
        if capture is None:
            capture = (self.device.type == "cuda" and supported(model)
                       and os.environ.get(GRAPH_ENV, "auto").lower() not in ("0", "off", "false"))
        self.capture = capture
        self.compile = os.environ.get(COMPILE_ENV, "layer" if self.capture else "off").lower()
        self.fn = torch.compile(self._step, dynamic=False) if self.compile == "full" else self._step
        self.captures = 0  # CUDA graphs captured (once per decoder: a replay per token after that)
        self.graph = None
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # position of the next token
        self.fused = fused_step.mode(model)  # the hybrid's step: on / mixer (fused_step.py) or off (mixer_step.py)
        if model.family == "hybrid":
            self.layers = [self._mixer_buffers(mx, st) for mx, st in zip(model.mixers, state.layers)]
        else:  # prefill's tensors are fresh copies: they are the buffers from here on
            self.layers = [{k: _clone(v) for k, v in st.items()} for st in state.layers]
        if self.fused != "off":
            self.fused_layers = fused_weights.of(model, mlp=self.fused == "on")
            self.ctx = fused_step.StepContext(model, first.dtype, self.device)
            self.caches = ([fused_step.FusedCache(fl, self.ctx, st) for fl, st in zip(self.fused_layers, self.layers)]
                           if self.fused == "mixer" else None)
        # one layer's (block's) step, called once per layer (compiled once for all of them in `layer` mode);
        # step_profile.py wraps it to count what each layer launches
        fn = _block_call if model.family != "hybrid" else fused_step.layer_step if self.fused == "on" else _layer_call
        self.layer_fn = _fused(fn, self.compile)
        self.batch = self.batch_of(state)
        self.load(state)

    # -- buffers ---------------------------------------------------------------------------------------------
    @staticmethod
    def batch_of(state: DecodeState) -> int:
        st = state.layers[0]
        x = st.win_k if isinstance(st, MixerState) else next(iter(st.values()))
        while isinstance(x, (tuple, list)):
            x = x[0]
        return x.shape[0]

    def _mixer_buffers(self, mx, st: MixerState) -> StaticMixer:
        B, Hkv, _, d = st.win_k.shape
        S = mx.sinks
        from tcache.student.inference import joint_state

        # sinks and window in one buffer each (rows 0..S-1, then the ring's slots): the fused step attends over it in
        # one call; the state's bytes are those of four separate buffers
        keys, values = st.win_k.new_zeros(B, Hkv, S + mx.window, d), st.win_v.new_zeros(B, Hkv, S + mx.window, d)
        joint, ring = joint_state.buffers(st.joint, mx.window) if st.joint is not None else (None, None)
        # contiguous: the Triton step kernel writes the new state over them (mlstm_step.py)
        mlstm = tuple(t.clone(memory_format=torch.contiguous_format) for t in st.mlstm) if st.mlstm else None
        return StaticMixer(sink_k=keys[:, :, :S], sink_v=values[:, :, :S], win_k=keys[:, :, S:], win_v=values[:, :, S:],
                           mlstm=mlstm, pos=self.pos, joint=joint, keys=keys, values=values, joint_ring=ring)

    def load(self, state: DecodeState) -> "StaticDecoder":
        """Copy a prefilled state of this batch into the buffers (their storage never changes)."""
        if self.batch_of(state) != self.batch:
            raise ValueError(f"a state of batch {self.batch_of(state)} into buffers of batch {self.batch}")
        T = state.pos
        self.pos.fill_(T)
        if self.fused != "off":
            for fl in self.fused_layers:  # weights changed since the decoder was built (training between generations)
                fused_weights.refresh(fl)
        if self.model.family != "hybrid":
            for buf, st in zip(self.layers, state.layers):
                for k, v in st.items():
                    _copy(buf[k], v)
            return self
        for buf, st, mx in zip(self.layers, state.layers, self.model.mixers):
            n = st.sink_k.shape[2]  # min(T, S) sinks seen
            buf.sink_k.zero_(), buf.sink_v.zero_()
            buf.sink_k[:, :, :n].copy_(st.sink_k), buf.sink_v[:, :, :n].copy_(st.sink_v)
            w = st.win_k.shape[2]  # min(T, W): positions T - w .. T - 1, at slots t % W
            slots = torch.arange(T - w, T, device=self.device) % mx.window
            buf.win_k.zero_(), buf.win_v.zero_()
            buf.win_k[:, :, slots] = st.win_k
            buf.win_v[:, :, slots] = st.win_v
            if buf.mlstm is not None:
                _copy(buf.mlstm, st.mlstm)
            if buf.joint is not None:
                from tcache.student.inference import joint_state

                joint_state.load(buf.joint, st.joint, slots)
        return self

    def nbytes(self) -> int:
        seen = {}

        def walk(x):
            if isinstance(x, torch.Tensor):
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            elif isinstance(x, (tuple, list)):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                walk(list(x.values()))
            elif isinstance(x, StaticMixer):
                walk([x.sink_k, x.sink_v, x.win_k, x.win_v, x.mlstm, x.joint])
        walk([self.layers, self.pos])
        return sum(seen.values())

    # -- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of the next tokens ids (B, T), one step each; the state advances in place."""
        if ids.shape[1] > 1:
            return torch.cat([self.step(ids[:, t:t + 1]) for t in range(ids.shape[1])], 1)
        if not self.capture:
            return self._step(ids)
        if self.graph is None:
            self._capture(ids)
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits.clone()

    def _capture(self, ids: torch.Tensor) -> None:
        """Capture one step in a CUDA graph. The warm-up steps (cuBLAS handles, Triton autotuning: work that capture
        cannot hold) run the step for real, so the state is saved before and restored after them."""
        saved = _clone(self._tensors())
        self.ids = ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(self.ids)
        torch.cuda.current_stream().wait_stream(side)
        _copy(self._tensors(), saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn(self.ids)  # (B, 1, V): the graph's own output buffer
        self.captures += 1

    def _tensors(self) -> list:
        out = [self.pos]
        for st in self.layers:
            if isinstance(st, StaticMixer):
                out += [st.sink_k, st.sink_v, st.win_k, st.win_v, *(st.mlstm or ()), *(st.joint or ())]
            else:
                out += [t for v in st.values() for t in (v if isinstance(v, (tuple, list)) else (v,))]
        return out

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.fused != "off":
            logits = fused_step.hybrid_step(model, ids, self.layers, self.pos, self.fused_layers, self.ctx,
                                            self.layer_fn, self.caches, _fused(fused_step.StepContext.advance,
                                                                               self.compile))
        elif model.family == "hybrid":
            logits = _hybrid_step(model, ids, self.layers, self.pos, self.layer_fn)
        else:
            x = model.embed(ids)  # (B, 1, D)
            with branch_free_slstm(model):
                for blk, st in zip(model.blocks.blocks, self.layers):
                    x = self.layer_fn(blk, x, st)  # (B, 1, D)
            logits = model.head(model.norm(x))  # (B, 1, V)
        self.pos.add_(1)
        return logits


def _hybrid_step(model, ids: torch.Tensor, layers: list[StaticMixer], pos: torch.Tensor,
                 layer_call=_layer_call) -> torch.Tensor:
    """The converted teacher's own forward of one token with each mixer stepping its StaticMixer: (B, 1, V)."""
    lm, B = model.lm, ids.shape[0]
    position_ids = pos.view(1, 1).expand(B, 1)  # (B, 1)
    last = model.cfg.sinks + model.cfg.window - 1
    probe = lm.get_input_embeddings().weight[:1]
    sink_rope = lm.model.rotary_emb(probe, pos.clamp(max=last).view(1, 1).expand(B, 1))  # cos, sin (B, 1, d)
    for mx, st in zip(model.mixers, layers):
        st.sink_rope, mx.cache = sink_rope, st
    # The decoder layers called here rather than lm.model(...): its causal-mask builder may look at values (a host
    # sync, which a CUDA graph cannot hold), and the mixers take no mask.
    base = lm.model
    h = base.embed_tokens(ids)  # (B, 1, D)
    position_embeddings = base.rotary_emb(h, position_ids)
    try:
        for layer in base.layers[: base.config.num_hidden_layers]:
            h = layer_call(layer, h, position_embeddings, position_ids)  # (B, 1, D)
    finally:
        for mx in model.mixers:
            mx.cache = None
    return model.head(base.norm(h))  # (B, 1, V)
