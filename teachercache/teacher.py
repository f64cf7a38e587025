"""The teacher's per-token targets a cache stores: top-k log-probs and layer-group hidden means."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tcache.errors import TcacheError


@dataclass
class Targets:
    hidden: torch.Tensor | None  # (B, T, G, D) float32: group means of hidden_states[1:]; None if G = 0
    topk_logprobs: torch.Tensor  # (B, T, k) float32, descending
    topk_ids: torch.Tensor       # (B, T, k) int64


@torch.no_grad()
def teacher_targets(model, input_ids: torch.Tensor, groups: list[tuple[int, int]], top_k: int) -> Targets:
    """One teacher forward: layer-group means of the hidden states and the top-k log-probs at T=1.

    The reference implementation (any HF causal LM): output_hidden_states keeps all L + 1 states."""
    out = model(input_ids=input_ids, output_hidden_states=bool(groups), use_cache=False)
    hidden = None
    if groups:
        layers = out.hidden_states[1:]  # L tensors (B, T, D); see schema.HIDDEN_SOURCE
        hidden = torch.stack(
            [torch.stack(layers[a:b]).float().mean(0) for a, b in groups], dim=2
        )  # (B, T, G, D)
    values, ids = topk_logprobs(out.logits, top_k)
    return Targets(hidden=hidden, topk_logprobs=values, topk_ids=ids)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(logits) over the full vocabulary, in fp32: top-k of the logits in their own
    dtype (the order is the same; the values convert exactly), minus an fp32 logsumexp over all of them.
    Measured on an H100 (benchmarks/build_profile.py, 64 x 512 x 16384 bf16): 3.9 ms for the top-k
    against 9.6 ms for log_softmax(fp32) + top-k."""
    top = torch.topk(logits, k, dim=-1, sorted=True)  # (B, T, k)
    return top.values.float() - row_logsumexp(logits), top.indices


_compiled_lse = None


def _lse_fp32(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1, keepdim=True)


def row_logsumexp(logits: torch.Tensor, rows_per_chunk: int = 8) -> torch.Tensor:
    """fp32 logsumexp over the last axis, (B, T, 1). On CUDA, torch.compile fuses the fp32 upcast into the
    reduction, so bf16 logits are read once instead of copied to fp32 first; elsewhere (or if compiling
    fails) a few rows at a time in eager mode, to bound the fp32 copy."""
    global _compiled_lse
    if logits.is_cuda and logits.dtype != torch.float32:
        if _compiled_lse is None:
            try:
                _compiled_lse = torch.compile(_lse_fp32, dynamic=True)
                _compiled_lse(logits[:1])
            except Exception:  # no Triton / compiler: stay correct, just slower
                _compiled_lse = _lse_fp32
        return _compiled_lse(logits)
    return torch.cat([_lse_fp32(chunk) for chunk in logits.split(rows_per_chunk)])


def _decoder_parts(model):
    """(decoder layers, final norm) of a Llama-style model (model.model.layers / .norm), else None."""
    base = getattr(model, "model", None) or getattr(model, "base_model", None)
    layers, norm = getattr(base, "layers", None), getattr(base, "norm", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 and isinstance(norm, torch.nn.Module):
        return layers, norm
    return None


class TeacherPass:
    """The build's teacher forward: the same targets as teacher_targets, without keeping L + 1 hidden
    states. Forward hooks add each layer's output into its group's running sum as the layers run (the
    last layer's entry is the final norm's output, as in transformers' hidden_states). Models whose
    layers cannot be found fall back to teacher_targets."""

    def __init__(self, model, groups: list[tuple[int, int]], top_k: int):
        self.model, self.groups, self.top_k = model, groups, top_k
        self._hidden_size = model.get_input_embeddings().weight.shape[1]
        parts = _decoder_parts(model) if groups else None
        self.hooked = parts is not None
        self._acc: torch.Tensor | None = None
        self._handles = []
        if self.hooked:
            layers, norm = parts
            group_of = {layer: g for g, (a, b) in enumerate(groups) for layer in range(a, b)}
            self._counts = torch.tensor([b - a for a, b in groups], dtype=torch.float32)
            for i, layer in enumerate(layers[:-1]):
                self._handles.append(layer.register_forward_hook(self._adder(group_of[i])))
            self._handles.append(norm.register_forward_hook(self._adder(group_of[len(layers) - 1])))

    def close(self) -> None:
        """Remove the hooks (the model is the caller's)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _adder(self, group: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output  # (B, T, D)
            self._acc[:, :, group].add_(h)  # fp32 += bf16 converts in the kernel: no fp32 copy of h
        return hook

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> Targets:
        if not self.hooked:
            return teacher_targets(self.model, input_ids, self.groups, self.top_k)
        B, T = input_ids.shape
        self._acc = torch.zeros(B, T, len(self.groups), self._hidden_size, device=input_ids.device)  # (B, T, G, D)
        out = self.model(input_ids=input_ids, use_cache=False)
        if self._counts.device != input_ids.device:  # once: a host-to-device copy each batch would wait for the GPU
            self._counts = self._counts.to(input_ids.device)
        hidden = self._acc / self._counts[:, None]  # (B, T, G, D)
        self._acc = None
        values, ids = topk_logprobs(out.logits, self.top_k)
        return Targets(hidden=hidden, topk_logprobs=values, topk_ids=ids)
