"""Does torch.compile with torch.compiler.nested_compile_region (one compiled decoder layer stamped out per layer:
~5x less cold compile time for the hybrid's step, 199 -> 43 s at 16 layers on the CPU) give the eager gradients?
On torch 2.13's CPU inductor it does not, unless inductor's buffer reuse is off (what TCACHE_COMPILE_SCOPE=regions
does: student/training/runtime.py): this script prints, per backend, how many parameter gradients of a tiny
transformers Llama (cross-entropy loss) differ from eager, on the device it runs on.

    python benchmarks/region_grads.py [--layers 2]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tcache.student.training.runtime import mark_regions


def grads(layers: int, backend: str | None, region: bool, device: str) -> tuple[float, dict]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(device)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    if region:  # the layer class's forward as one nested compile region, as TCACHE_COMPILE_SCOPE=regions marks it
        mark_regions(model.model.layers)
    torch._dynamo.reset()

    def f(i):
        return model(input_ids=i, labels=i).loss

    loss = (torch.compile(f, backend=backend) if backend else f)(ids)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, want = grads(a.layers, None, False, device)
    print(f"torch {torch.__version__}, {device}, {a.layers} layers")
    rows = [("aot_eager_decomp_partition", False, True), ("aot_eager_decomp_partition", True, True),
            ("inductor", False, True), ("inductor", True, True), ("inductor", True, False)]  # (backend, region, reuse)
    for backend, region, reuse in rows:
        with torch._inductor.config.patch(allow_buffer_reuse=reuse):
            loss, got = grads(a.layers, backend, region, device)
            off = {n: (got[n] - want[n]).abs().max().item() for n in want
                   if not torch.allclose(got[n], want[n], atol=1e-4, rtol=1e-3)}
            worst = max(off.values(), default=0.0)
        print(f"{backend:28s} region={region!s:5s} buffer reuse={reuse!s:5s} loss {loss:.6f}  grads off: "
              f"{len(off)} of {len(want)}  (max |diff| {worst:.3g})")


if __name__ == "__main__":
    main()
