"""The hybrid xLSTM student (Hauzenberger et al., 2026): the teacher itself, each attention replaced by a mixer
of sliding-window attention (the last W tokens plus the first S sink tokens) and an mLSTM over the whole prefix.

    x (B, T, D) -> q, k, v (the teacher's W_q, W_k, W_v and RoPE, frozen copies)
      swa   = softmax attention of q over k, v at positions j <= i with i - j < W or j < S
      mlstm = mLSTM(phi_q(q), phi_k(k), v; i = exp(x w_i), f = sigmoid(x w_f))
      o     = sigmoid(w_o [q, k, v])                      per head
      out   = W_o (o * mlstm + (1 - o) * swa)             the teacher's W_o

Everything but the feature maps phi and the gates is the teacher's (transformers' own decoder layers, norms,
MLPs, embedding and head, loaded from the cache's teacher/ directory). phi is Hedgehog's: per head a learned
d x d map (identity at init) followed by [softmax(z), softmax(-z)] over the feature dimension, so phi(q) .
phi(k) >= 0 and the mLSTM normaliser stays positive. Grouped-query teachers repeat their kv heads.

The mixer itself is student/models/mixer.py. Modes of a mixer: "hybrid" (the student), "match" (stage I: returns the
teacher's own attention so every layer sees the teacher's input, and keeps the --match-loss terms of student/models/match_loss.py), "teacher" (the teacher's full
causal attention: the converted model before any change).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tcache.errors import TcacheError
from tcache.student.models.lora import adapter_parameters
from tcache.student.models.match_loss import MATCH_LOSSES
from tcache.student.models.mixer import HybridMixer

MODES = ("hybrid", "match", "teacher")
BRANCHES = ("both", "mlstm", "window")


@dataclass
class HybridConfig:
    window: int = 32
    """Tokens of the sliding window, the current one included (--window)."""
    sinks: int = 4
    """First tokens every position also attends to (--sinks)."""
    full_attention_layers: list[int] = field(default_factory=list)
    """Layers that keep the teacher's full attention (--full-attention-layers)."""
    fgate_bias: tuple[float, float] = (3.0, 6.0)
    """Forget-gate bias at init, spread over the heads from the first to the second value (xLSTM's init)."""
    mlstm_kernel: str = "auto"
    """mLSTM kernel of mlstm_kernels: auto (chunkwise Triton on CUDA, native chunkwise elsewhere)."""
    branches: str = "both"
    """both (the hybrid), mlstm (no window branch) or window (no mLSTM): the ablations (--branches)."""
    igate_bias: float | None = None
    """Input-gate bias at init (mean of N(., 0.1)); None: ln(d sqrt(2d) / 2), see init_igate_bias (--igate-bias)."""
    feature_dim: int | None = None
    """Hedgehog features per head fed to the mLSTM as q and k (--feature-dim): two softmaxes of F/2 each over a
    learned (d, F/2) map. None: 2d (the map square, identity at init). The mLSTM state C is (F, d) per head, so F
    sets its size: the state of the quality / state frontier (benchmarks/frontier.py)."""
    mlstm_heads: str = "query"
    """The mLSTM's heads (--mlstm-heads): query (one state per query head, H) or kv (one per key / value head, Hkv,
    as GQA shares keys: the key feature map and the gates per kv head, each query head reading its group's state;
    the decode state H / Hkv times smaller)."""
    mix: str = "gate"
    """How the branches combine (--mix): gate (a per-head output gate between the two normalised branches) or
    joint (LoLCATs' one denominator over the window's softmax and the linear scores outside it: student/models/joint.py;
    its recurrent decode state: student/inference/joint_state.py)."""
    mlstm_rope: bool = False
    """Feed the mLSTM branch and the output gate RoPE-rotated q, k (--mlstm-rope); by default they get the
    unrotated projections, so nothing outside the window depends on absolute position (see docs/hybrid.md)."""
    qk_merged: bool = False
    """Whether step 3 has run (--qk-merge, student/models/qk_merge.py): the mLSTM reads its features through its own
    q / k projections of the layer input, the Hedgehog maps folded into them."""

    def to_dict(self) -> dict:
        return asdict(self)

def resolve_mlstm_kernel(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    from tcache.student.models.mlstm_kernel import triton_available

    return "chunkwise--triton_xl_chunk" if device.type == "cuda" and triton_available() else "chunkwise--native_autograd"


def convert(lm: nn.Module, cfg: HybridConfig) -> list[HybridMixer]:
    """Replace each attention module of a transformers Llama / Qwen2-family causal LM by a HybridMixer (in
    place; layers listed in cfg.full_attention_layers keep the teacher's). Returns the mixers."""
    c = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise TcacheError(f"the teacher ({type(lm).__name__}) has no model.layers; the hybrid recipe converts "
                          "Llama- and Qwen2-family causal LMs (q_proj/k_proj/v_proj/o_proj attention with RoPE)")
    bad = [i for i in cfg.full_attention_layers if not 0 <= i < len(layers)]
    if bad:
        raise TcacheError(f"--full-attention-layers {bad} is outside layers 0..{len(layers) - 1}; fix it")
    mixers = []
    for idx, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
                   if not hasattr(attn, n)]
        if missing:
            raise TcacheError(f"layer {idx} of the teacher ({type(lm).__name__}) lacks {', '.join(missing)} in its "
                              "attention; the hybrid recipe converts Llama- and Qwen2-family causal LMs")
        if idx in cfg.full_attention_layers:
            continue
        mixer = HybridMixer(attn, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, cfg)
        layer.self_attn = mixer
        mixers.append(mixer)
    return mixers


class HybridStudent(nn.Module):
    """The converted teacher, with the interface of the xLSTM Student: forward(ids) -> (logits, None),
    features(ids) -> (final normed hidden, None), head."""

    def __init__(self, lm: nn.Module, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.lm = lm
        self.mixers = convert(lm, cfg)
        self.kernels = {"mlstm": cfg.mlstm_kernel, "window": "sdpa"}
        self.qk_merge_at_stage2 = False  # --qk-merge: step 3 runs when stage II (mode "hybrid") begins

    family = "hybrid"

    @property
    def recurrent(self) -> bool:
        """Whether generation can run from a bounded recurrent state (inference/): not with full-attention layers
        (their KV cache grows)."""
        return not self.cfg.full_attention_layers

    @property
    def head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def set_kernel(self, device: torch.device) -> str:
        from tcache.student.models.mlstm_kernel import mlstm_kernel_fn

        name = resolve_mlstm_kernel(self.cfg.mlstm_kernel, device)
        # eps: the kernels add it to the normaliser in their stabilised units, where 1e-6 (xLSTM's) moved the
        # output by 4e-5 relative against the float64 equations (tests/test_hybrid.py); Hedgehog features keep
        # n . q > 0, so the normaliser needs no eps to stay away from zero.
        fn = mlstm_kernel_fn(name, eps=1e-12)
        for m in self.mixers:
            m.mlstm_fn = fn
        self.kernels["mlstm"] = name
        return name

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for m in self.mixers:
            m.mode = mode

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.mixers for p in m.new_parameters()]

    def set_trainable(self, which: str) -> None:
        """'new': only the feature maps and gates (stage I); 'mixer': those and the copied q/k/v/o projections;
        'lora': those and the LoRA adapters (student/models/lora.py); 'all': every parameter (stage II)."""
        self.requires_grad_(which == "all")
        extra = adapter_parameters(self) if which == "lora" else []
        if which == "mixer":
            extra = [p for m in self.mixers for proj in (m.q_proj, m.k_proj, m.v_proj, m.o_proj)
                     for p in proj.parameters()]
        for p in [*self.new_parameters(), *extra] if which != "all" else []:
            p.requires_grad_(True)

    def set_stage(self, train: str, mode: str) -> None:
        if mode == "hybrid" and self.qk_merge_at_stage2 and not self.cfg.qk_merged:
            self.merge_qk()  # step 3, between stage I and stage II: before the new projections' trainable set
        self.set_trainable(train)
        self.set_mode(mode)

    def merge_qk(self) -> None:
        """Step 3 (student/models/qk_merge.py): every mixer's Hedgehog maps folded into its own q / k projections."""
        from dataclasses import replace

        from tcache.student.models.qk_merge import merge_mixer

        if self.cfg.mlstm_rope or self.cfg.branches == "window":
            raise TcacheError("--qk-merge folds the feature maps into the projections; it is exact only without "
                              "--mlstm-rope and needs the mLSTM branch (not --branches window): drop one of them")
        for m in self.mixers:
            merge_mixer(m)
        self.cfg = replace(self.cfg, qk_merged=True)

    def features(self, ids: torch.Tensor, groups: int = 0):
        out = self.lm.model(input_ids=ids, use_cache=False)
        return out.last_hidden_state, None  # (B, T, D)

    def forward(self, ids: torch.Tensor, groups: int = 0):
        x, _ = self.features(ids)
        return self.head(x), None  # (B, T, V)

    def set_match_loss(self, kind: str) -> None:
        """Stage I's objective per layer (MATCH_LOSSES): output (the default), weights or both."""
        if kind not in MATCH_LOSSES:
            raise ValueError(f"match loss must be one of {MATCH_LOSSES}, got {kind!r}")
        for m in self.mixers:
            m.match_loss = kind

    def match_loss(self) -> torch.Tensor:
        """Stage I: the sum over converted layers of the objective kept by the last forward in "match" mode:
        the output MSE (default), the attention weights' cross-entropy, or both summed (set_match_loss)."""
        return torch.stack([m.last_match for m in self.mixers]).sum()

    def param_counts(self) -> dict:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        new = sum(p.numel() for p in self.new_parameters())
        return {"total": total, "trainable": trainable, "frozen": total - trainable, "new": new}

    def enable_checkpointing(self) -> None:
        """Recompute each decoder layer's activations in the backward: transformers' own mechanism (renamed
        activation_checkpointing_enable in 5.x), non-reentrant so stage I's per-layer losses keep their graph."""
        enable = getattr(self.lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers also hooks the embedding to mark its output requires_grad_() (for reentrant checkpointing and
        # PEFT); non-reentrant checkpointing needs none of it, and torch.compile refuses a step built on it
        if hasattr(self.lm, "disable_input_require_grads"):
            self.lm.disable_input_require_grads()

    def drop_windows(self, p: float, seed: int) -> None:
        """--window-dropout: each mixer's window branch dropped with probability p for the next forward, the draw a
        function of `seed` alone (the same on every rank, and again after a resume)."""
        g = torch.Generator().manual_seed(seed)
        drop = torch.rand(len(self.mixers), generator=g) < p
        for mx, d in zip(self.mixers, drop.tolist()):
            mx.window_dropout = True
            mx.drop_window.fill_(d)

    def set_context_length(self, T: int) -> None:
        """Nothing depends on the length (the window mask is built per call)."""


def load_hybrid(teacher_dir: str, cfg: HybridConfig, dtype: torch.dtype = torch.float32) -> HybridStudent:
    """The teacher from a cache's teacher/ directory (full weights), converted."""
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise TcacheError(f"{teacher_dir}: the cache holds no loadable teacher weights ({str(e).splitlines()[0][:120]}); "
                          "rebuild the cache with this tcache (it stores the teacher's full weights)") from None
    return HybridStudent(lm, cfg)
