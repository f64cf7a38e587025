"""The untrained window cut: the teacher with every attention cut to its sliding window + sinks, and no training.

Every hybrid student starts from the teacher with its attention replaced; cutting that attention to the last W
tokens and the first S sinks (HybridConfig branches="window": no mLSTM, nothing new) and training nothing is
what the window alone costs. The hybrid rows of quality.py are measured against it: the share of this cut's
log-perplexity loss that training wins back (quality.py's recovery).

    python benchmarks/window_cut.py --teacher T --window 32 --out DIR [--sinks 4] [--seq-len 512]

DIR is written as a tcache student directory (student.json, model.safetensors, tokenizer, config.json), so
`tcache eval DIR` scores the cut on the same windows, in the same dtype and through the same code path as every
trained hybrid student: no second scoring loop to keep in step with `tcache eval`. With W >= the eval length the
cut is the teacher itself (window + sinks then cover the whole causal prefix): tests/test_quality_tables.py
holds its perplexity equal to the teacher's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import harness  # noqa: F401  (this checkout's tcache, as the other benchmarks)


def window_cut(teacher: str, window: int, sinks: int = 4):
    """The teacher (fp32, as `tcache distill` loads it for the hybrid recipe) with its attention cut to the
    window + sinks: a HybridStudent in eval mode."""
    from tcache.student.models.hybrid import HybridConfig, load_hybrid

    model = load_hybrid(teacher, HybridConfig(window=window, sinks=sinks, branches="window"))
    model.set_kernel(torch.device("cpu"))  # the window branch runs no mLSTM kernel; set it as a loaded student has
    return model.eval()


def save_window_cut(teacher: str, out: str | Path, window: int, sinks: int = 4, seq_len: int = 512) -> dict:
    """Write the cut to `out` as a tcache student directory; returns its student.json metadata. `seq_len` is
    recorded as the length it was "trained" at (the students' cache length), which eval only reports."""
    import tcache
    from tcache import ownership
    from tcache.student.models.io import save_student

    model = window_cut(teacher, window, sinks)
    out = Path(out)
    # claimed as a run, as `tcache distill` claims its --out: save_student lists every file in the marker
    ownership.claim(out, "run")
    meta = {
        "tcache_version": tcache.__version__,
        "cache": {"path": None, "teacher": str(teacher), "seq_len": seq_len},
        "trained": {"steps": 0, "tokens": 0, "seconds": 0.0},
        "params": model.param_counts(), "kernels": dict(model.kernels),
        "window_cut": {"window": window, "sinks": sinks, "untrained": True},
    }
    save_student(out, model, meta, teacher)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="HF model directory (the one `tcache eval` scores as teacher)")
    ap.add_argument("--window", type=int, required=True)
    ap.add_argument("--sinks", type=int, default=4, help="tcache distill's --sinks default")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    save_window_cut(a.teacher, a.out, a.window, a.sinks, a.seq_len)
    print(f"window cut W={a.window} S={a.sinks} of {a.teacher}: {a.out}")


if __name__ == "__main__":
    main()
