"""The xLSTM student: the teacher's frozen embedding and LM head around trainable `xlstm` blocks.

    ids (B, T) -> embed (frozen) -> xLSTM blocks (trainable) -> RMSNorm (trainable) -> head (frozen)

Blocks come from the `xlstm` package's classic block stack (mLSTM: proj factor 2, no FFN; sLSTM:
gated FFN 1.3), the block type the Distil-xLSTM papers use: it reproduces the v2 paper's parameter
count (32 mLSTM blocks at D = 960: 184M trainable).

The final norm is an RMSNorm initialised from the teacher's final norm weight (when the cache has
one), so the frozen head sees inputs on the scale it was trained for; it is small and trainable.

The student runs at any sequence length: no weight depends on the length (mLSTM and sLSTM are
recurrent); only xlstm's parallel mLSTM kernel holds a length-sized causal mask, which `Student`
grows on demand (`set_context_length`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from tcache.errors import TcacheError
from tcache.student.models.mlstm_kernel import mlstm_kernel_fn, triton_available
from tcache.teachercache.schema import layer_groups

MLSTM_KERNELS = ("auto", "parallel", "chunkwise--native_autograd", "chunkwise--native_custbw",
                 "chunkwise--triton_xl_chunk", "chunkwise--triton_limit_chunk")
SLSTM_BACKENDS = ("auto", "vanilla", "cuda")
PARALLEL_MAX_CONTEXT = 1024


@dataclass
class StudentConfig:
    vocab_size: int
    """Vocabulary of the teacher (rows of the frozen embedding and head)."""
    hidden_size: int
    """Model width D = the teacher's hidden size (the frozen embedding fixes it)."""
    num_blocks: int
    """xLSTM blocks (--blocks)."""
    num_heads: int
    """Heads per block (--heads); must divide the hidden size (sLSTM) and 2x hidden (mLSTM)."""
    slstm_at: list[int] = field(default_factory=list)
    """Block indices that are sLSTM, the rest mLSTM (--slstm-at)."""
    context_length: int = 512
    """Sequence length the student is built for: the training seq_len (saved in student.json), or the eval
    length when `load_student` builds it for another. Picks the automatic mLSTM kernel and sizes the
    parallel kernel's causal mask; the forward still runs at any length."""
    mlstm_proj_factor: float = 2.0
    """mLSTM up-projection factor."""
    slstm_ffn_proj_factor: float = 1.3
    """sLSTM block gated-FFN factor."""
    conv_kernel: int = 4
    """Causal conv width in both block types."""
    norm_eps: float = 1e-5
    """Final RMSNorm epsilon (the teacher's)."""
    head_bias: bool = False
    """Whether the frozen head has a bias (from the cache)."""
    mlstm_kernel: str = "auto"
    """auto (parallel up to 1024 tokens of context, chunkwise--triton_xl_chunk beyond on CUDA) or a kernel
    name (--mlstm-kernel)."""
    slstm_backend: str = "auto"
    """auto (cuda on compute capability >= 8.0 with nvcc, vanilla otherwise), vanilla, cuda (--slstm-backend)."""
    recipe: str = "custom"
    """Which recipe produced the sizes (for the record)."""

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise TcacheError(f"--blocks must be at least 1, got {self.num_blocks}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise TcacheError(
                f"--heads {self.num_heads} does not divide the hidden size {self.hidden_size}; "
                f"pick a divisor of {self.hidden_size}"
            )
        inner = round(self.mlstm_proj_factor * self.hidden_size)
        if inner % self.num_heads or inner % 4:
            raise TcacheError(
                f"--heads {self.num_heads} does not divide the mLSTM inner size {inner} "
                f"({self.mlstm_proj_factor} x {self.hidden_size}); pick another --heads"
            )
        bad = [i for i in self.slstm_at if not 0 <= i < self.num_blocks]
        if bad:
            raise TcacheError(f"--slstm-at {bad} is outside blocks 0..{self.num_blocks - 1}; fix --slstm-at or --blocks")
        self.slstm_at = sorted(set(int(i) for i in self.slstm_at))
        if self.mlstm_kernel not in MLSTM_KERNELS:
            raise TcacheError(f"--mlstm-kernel {self.mlstm_kernel!r} is unknown; use one of {', '.join(MLSTM_KERNELS)}")
        if self.slstm_backend not in SLSTM_BACKENDS:
            raise TcacheError(f"--slstm-backend {self.slstm_backend!r} is unknown; use one of {', '.join(SLSTM_BACKENDS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def roundup(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


SMALL_GPU_BYTES = 32 * 2**30


def resolve_kernels(cfg: StudentConfig, device: torch.device, memory_budget: int | None = None) -> tuple[str, str]:
    """Pick the mLSTM kernel and sLSTM backend for this device; explicit choices are checked.
    `memory_budget`: bytes the run may use (--max-gpu-memory), else the GPU's total."""
    cuda = device.type == "cuda"
    mk = cfg.mlstm_kernel
    if mk == "auto":
        # Measured on an H100 (benchmarks/distill.py, seeds' scale: 32 blocks, D 960, 8 x 512, fp16): the
        # parallel form is the faster (34k vs 21k tok/s with CUDA graphs) but keeps S x S matrices per
        # head for the backward (peak 20-24 GiB vs 15-19 GiB). So: parallel on large GPUs, the chunkwise
        # Triton kernel on small ones (a 16 GB T4, or a --max-gpu-memory cap) and for long contexts.
        budget = memory_budget or (torch.cuda.get_device_properties(device).total_memory if cuda else None)
        small = budget is not None and budget < SMALL_GPU_BYTES
        long_context = cfg.context_length > PARALLEL_MAX_CONTEXT
        if cuda and (long_context or small) and triton_available():
            mk = "chunkwise--triton_xl_chunk"
        elif long_context:
            # Without Triton (any CPU, or a GPU lacking it) long contexts take the pure-PyTorch chunkwise
            # kernel. The parallel form would run too, but it materialises several (B, NH, S, S) fp32
            # matrices: at 4096 tokens, 8 heads, batch 8 that is 4 GiB each, growing with S^2, where the
            # chunkwise form's memory grows with S. Both compute the same function (tests/test_student.py,
            # tests/test_eval_length.py). On CPU the chunkwise forward was not slower at shorter lengths
            # either (2 blocks, D 384, batch 2, 2 busy cores: 0.16 vs 0.34 s at 512 tokens); parallel stays
            # the choice up to 1024 so CPU training keeps the kernel (and numbers) it always had.
            mk = "chunkwise--native_autograd"
        else:
            mk = "parallel"
    if "triton" in mk and not cuda:
        raise TcacheError(f"--mlstm-kernel {mk} needs a CUDA GPU; use parallel or chunkwise--native_autograd on CPU")
    sb = cfg.slstm_backend
    capability = torch.cuda.get_device_capability(device) if cuda else (0, 0)
    if sb == "auto":
        sb = "cuda" if cuda and capability >= (8, 0) and _nvcc_available() else "vanilla"
    if sb == "cuda" and (not cuda or capability < (8, 0)):
        raise TcacheError(
            "--slstm-backend cuda needs a GPU of compute capability >= 8.0 (not a T4) and nvcc; use vanilla"
        )
    return mk, sb


def _nvcc_available() -> bool:
    import shutil

    from torch.utils.cpp_extension import CUDA_HOME

    return shutil.which("nvcc") is not None or CUDA_HOME is not None


class Student(nn.Module):
    family = "xlstm"

    def __init__(self, cfg: StudentConfig, mlstm_kernel: str = "parallel", slstm_backend: str = "vanilla"):
        super().__init__()
        from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig,
                           sLSTMLayerConfig, xLSTMBlockStack, xLSTMBlockStackConfig)

        self.cfg = cfg
        self.kernels = {"mlstm": mlstm_kernel, "slstm": slstm_backend}
        D = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, D)
        has_m = len(cfg.slstm_at) < cfg.num_blocks
        stack_cfg = xLSTMBlockStackConfig(
            mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(
                conv1d_kernel_size=cfg.conv_kernel, qkv_proj_blocksize=4, num_heads=cfg.num_heads,
                proj_factor=cfg.mlstm_proj_factor)) if has_m else None,
            slstm_block=sLSTMBlockConfig(
                slstm=sLSTMLayerConfig(backend=slstm_backend, num_heads=cfg.num_heads,
                                       conv1d_kernel_size=cfg.conv_kernel, bias_init="powerlaw_blockdependent"),
                feedforward=FeedForwardConfig(proj_factor=cfg.slstm_ffn_proj_factor, act_fn="gelu"),
            ) if cfg.slstm_at else None,
            # xlstm sizes each mLSTM cell's causal mask (a non-persistent buffer, the only thing that depends
            # on the length) from this; the chunkwise kernels ignore the mask, so they get an empty one
            # rather than S x S bools per block.
            context_length=cfg.context_length if mlstm_kernel == "parallel" else 0,
            num_blocks=cfg.num_blocks, embedding_dim=D, slstm_at=list(cfg.slstm_at), add_post_blocks_norm=False,
        )
        self.checkpointing = False
        """Recompute each block in the backward instead of keeping its activations (--checkpointing)."""
        self.blocks = xLSTMBlockStack(stack_cfg)
        self.blocks.reset_parameters()
        self.mask_length = stack_cfg.context_length  # longest input the parallel kernel's masks cover now
        if mlstm_kernel != "parallel":
            self.use_kernel(mlstm_kernel)
        self.norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.vocab_size, bias=cfg.head_bias)
        self.embed.requires_grad_(False)
        self.head.requires_grad_(False)

    def load_teacher_parts(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the teacher's embedding, head (and final-norm weight) from the cache."""
        with torch.no_grad():
            self.embed.weight.copy_(tensors["embed_tokens"])
            self.head.weight.copy_(tensors["lm_head"])
            if self.cfg.head_bias:
                self.head.bias.copy_(tensors["lm_head_bias"])
            if "final_norm" in tensors:
                self.norm.weight.copy_(tensors["final_norm"])

    def forward(self, ids: torch.Tensor, groups: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, if groups > 0, the student's hidden states averaged in `groups`
        contiguous block groups, (B, T, G, D) — the mirror of the teacher's cached `hidden`:
        block outputs, the last one after the final norm (as transformers' hidden_states[1:])."""
        x, hidden = self.features(ids, groups)
        return self.head(x), hidden  # (B, T, V)

    def features(self, ids: torch.Tensor, groups: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What forward computes before the head: final normed states (B, T, D) and the group means."""
        if ids.shape[1] > self.mask_length and self.kernels["mlstm"] == "parallel":
            self.set_context_length(ids.shape[1])  # never at the training length: training is unchanged
        x = self.embed(ids)  # (B, T, D)
        outs = []
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks.blocks:
            # --checkpointing: keep only each block's input for the backward and recompute the block there
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)  # (B, T, D)
            outs.append(x)
        x = self.norm(x)  # (B, T, D)
        outs[-1] = x
        if not groups:
            return x, None
        hidden = torch.stack(
            [torch.stack(outs[a:b]).mean(0) for a, b in layer_groups(len(outs), groups)], dim=2
        )  # (B, T, G, D)
        return x, hidden

    def _mlstm_cells(self) -> list[nn.Module]:
        cells = (getattr(getattr(blk, "xlstm", None), "mlstm_cell", None) for blk in self.blocks.blocks)
        return [c for c in cells if c is not None]

    def set_context_length(self, length: int) -> None:
        """Make the parallel kernel's causal masks length x length, on their current device.

        xlstm builds the mask once at its context length and the parallel kernel fails on longer inputs
        (shorter ones get a fresh mask per call). The mask is not in the state dict and no weight depends
        on it, so this changes which lengths run, not the function computed. The chunkwise kernels use no
        mask: for them this is a no-op.
        """
        if self.kernels["mlstm"] != "parallel":
            return
        for cell in self._mlstm_cells():
            cell.causal_mask = torch.tril(torch.ones(length, length, dtype=torch.bool,
                                                     device=cell.causal_mask.device))  # (S, S)
        self.mask_length = length

    def use_kernel(self, name: str) -> None:
        """Run the mLSTM cells with another kernel (the same function: tests/test_student.py); the exported model
        switches to a chunkwise kernel for long inputs and on CUDA, as `resolve_kernels` would pick at load."""
        from xlstm.blocks.mlstm.backends import parallel_stabilized_simple

        fn = parallel_stabilized_simple if name == "parallel" else mlstm_kernel_fn(name)
        for cell in self._mlstm_cells():
            cell.backend_fn = fn
        self.kernels["mlstm"] = name
        if name == "parallel" and self.mask_length == 0:
            self.set_context_length(self.cfg.context_length)

    def set_stage(self, train: str, mode: str) -> None:
        """One stage only: the teacher's embedding and head stay frozen, the blocks and norm train."""

    def param_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "trainable": trainable, "frozen": total - trainable}
