"""Inference speed and memory of students against their teacher, side by side in one process: prefill tokens/s at
each context length (batch 1), then decode tokens/s at batch 1 and 8 after a prefix of that length, with the memory
the generation state holds (KV cache for the teacher, tcache.student.decode's state for the students) and the peak
allocated while decoding. Every model runs through the exported transformers class (TcacheStudentForCausalLM), the
path `generate()` takes: prefill with logits_to_keep=1, then one forward per token from the cache.

    python benchmarks/speed.py --shape smollm2-360m --lengths 512,2k,8k,32k --out DIR      # the GPU run
    python benchmarks/speed.py --shape tiny --lengths 64,256 --device cpu --out DIR       # a CPU smoke run

Random weights at the shape of the seeds' teacher (SmolLM2-360M: 32 layers, D 960, 15 heads / 5 kv heads):
speed and memory do not depend on the values. Students: v2 (32 mLSTM blocks, 16 heads) and the hybrid (the
teacher with window 32 + 4 sinks + mLSTM in every layer). Writes DIR/speed.json and DIR/speed.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=65536,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}


def count(text: str) -> int:
    text = text.lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def build(name: str, shape: dict, device, dtype):
    """(model, kind) — the teacher as transformers' LlamaForCausalLM, students as the exported class."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tcache.student.config import _v2_sizes
    from tcache.student.hf import to_hf
    from tcache.student.hybrid import HybridConfig, HybridStudent
    from tcache.student.model import Student, StudentConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape)
    if name == "teacher":
        return LlamaForCausalLM(cfg).to(device, dtype).eval()
    if name == "hybrid":
        student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=32, sinks=4))
        student.lm.config._attn_implementation = "sdpa"
    else:
        blocks, heads, slstm_at = _v2_sizes(cfg.num_hidden_layers, cfg.num_attention_heads)
        student = Student(StudentConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_blocks=blocks,
                                        num_heads=heads, slstm_at=slstm_at, context_length=512, recipe="v2"))
    return to_hf(student, {"config": {"recipe": name}}).to(device, dtype).eval()


def cache_kwarg(model) -> str:
    """transformers 5 names the cache `cache`, 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def state_bytes(cache) -> int:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):  # a student's DecodeState
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):  # transformers >= 4.56 DynamicCache
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    for t in list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", [])):  # older
        total += t.numel() * t.element_size()
    return total


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model, ids):
    kw = cache_kwarg(model)
    out = model(ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:], (out.cache if kw == "cache" and hasattr(out, "cache") else out.past_key_values)


@torch.no_grad()
def decode(model, cache, last_logits, steps: int):
    kw = cache_kwarg(model)
    nxt = last_logits.argmax(-1)  # (B, 1)
    for _ in range(steps):
        out = model(nxt, use_cache=True, **{kw: cache})
        cache = out.cache if kw == "cache" and hasattr(out, "cache") else out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)  # (B, 1)
    return cache


def measure(model, name, lengths, batches, steps, vocab, device) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    warm = torch.randint(0, vocab, (1, 64), generator=g).to(device)
    _, c = prefill(model, warm)
    decode(model, c, torch.zeros(1, 1, vocab, device=device), 2)  # kernels compiled / autotuned before timing
    for L in lengths:
        ids = torch.randint(0, vocab, (max(batches), L), generator=g).to(device)
        row = {"model": name, "context": L}
        try:
            prefill(model, ids[:1])  # warm this length's kernels
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            logits, cache = prefill(model, ids[:1])
            sync(device)
            row["prefill_tok_s"] = L / (time.perf_counter() - t0)
            if device.type == "cuda":
                row["prefill_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            for b in batches:
                logits, cache = prefill(model, ids[:b]) if b > 1 else (logits, cache)
                row[f"state_mib_b{b}"] = state_bytes(cache) / 2**20
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                cache = decode(model, cache, logits, steps)
                sync(device)
                row[f"decode_tok_s_b{b}"] = b * steps / (time.perf_counter() - t0)
                if device.type == "cuda":
                    row[f"decode_peak_gib_b{b}"] = torch.cuda.max_memory_allocated(device) / 2**30
                del cache
        except (torch.OutOfMemoryError, RuntimeError) as e:  # recorded per length; the other lengths still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict], batches) -> str:
    by = {(r["model"], r["context"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| model | context | prefill tok/s (x teacher) | " + " | ".join(
        f"decode tok/s b{b} (x teacher) | state MiB b{b} | decode peak GiB b{b}" for b in batches) + " |",
        "|---|---|---|" + "---|---|---|" * len(batches)]
    for m in models:
        for L in sorted({r["context"] for r in rows}):
            r, t = by.get((m, L), {}), by.get(("teacher", L), {})
            if "error" in r:
                lines.append(f"| {m} | {L} | {r['error']} |")
                continue

            def ratio(key):
                v, tv = r.get(key), t.get(key)
                return f"{v:,.0f}" + (f" ({v / tv:.2f}x)" if v and tv and m != "teacher" else "") if v else "-"
            cells = [ratio("prefill_tok_s")]
            for b in batches:
                cells += [ratio(f"decode_tok_s_b{b}"), f"{r.get(f'state_mib_b{b}', float('nan')):,.1f}",
                          f"{r.get(f'decode_peak_gib_b{b}', float('nan')):.2f}"]
            lines.append(f"| {m} | {L} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-360m", choices=sorted(SHAPES))
    ap.add_argument("--models", default="teacher,v2,hybrid")
    ap.add_argument("--lengths", default="512,2k,8k,32k")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per measurement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", default="speed-out")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--replot", metavar="SPEED_JSON", help="only draw the plot of an earlier run's speed.json")
    a = ap.parse_args()
    if a.replot:
        doc = json.loads(Path(a.replot).read_text())
        bs = sorted({int(k.rsplit("_b", 1)[1]) for r in doc["rows"] for k in r if k.startswith("decode_tok_s_b")})
        plot(doc["rows"], bs, Path(a.replot).with_suffix(".png"))
        return
    device, dtype = torch.device(a.device), {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    lengths, batches = [count(x) for x in a.lengths.split(",")], [int(x) for x in a.batches.split(",")]
    shape = SHAPES[a.shape]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import transformers

    meta = {"device": gpu, "torch": torch.__version__, "transformers": transformers.__version__, "dtype": a.dtype,
            "shape": a.shape, "steps": a.steps, "command": "python " + " ".join(sys.argv)}
    if a.one:  # a child process: one model, its rows as JSON
        rows = measure(build(a.models, shape, device, dtype), a.models, lengths, batches, a.steps,
                       shape["vocab_size"], device)
        (out / f"rows-{a.models}.json").write_text(json.dumps(rows))
        return
    rows = []
    for name in a.models.split(","):
        # one process per model: a fresh allocator for each, and a crash (a compiler abort) costs one model's rows
        args = [sys.executable, __file__, "--one", "--models", name] + [
            f"--{k}={getattr(a, k)}" for k in ("shape", "lengths", "batches", "steps", "device", "dtype", "out")]
        p = subprocess.run(args)
        f = out / f"rows-{name}.json"
        rows += json.loads(f.read_text()) if p.returncode == 0 and f.exists() else [
            {"model": name, "context": L, "error": f"process exited {p.returncode}"} for L in lengths]
        (out / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))  # what ran so far
    md = f"# Inference speed: {a.shape}, {a.dtype}, {gpu}\n\n`{meta['command']}`\n\n{table(rows, batches)}\n"
    (out / "speed.md").write_text(md)
    print(md)
    plot(rows, batches, out / "speed.png")


def plot(rows: list[dict], batches, path: Path) -> None:
    """Decode tokens/s and the generation state's memory against the prefix length, one line per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (python benchmarks/speed.py --replot DIR/speed.json draws it later)")
        return
    b = max(batches)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["context"], r) for r in rows if r["model"] == m and "error" not in r)
        xs = [x for x, _ in pts]
        ax1.plot(xs, [r[f"decode_tok_s_b{b}"] for _, r in pts], marker="o", label=m)
        ax2.plot(xs, [r[f"state_mib_b{b}"] for _, r in pts], marker="o", label=m)
    for ax, title in ((ax1, f"decode throughput, batch {b}"), (ax2, f"generation state (KV cache / recurrent), batch {b}")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prefix length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_ylabel("tokens / s")
    ax2.set_ylabel("MiB")
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
