"""The error each compact cache field adds to the KD and alignment losses, against fp32 targets.

    python benchmarks/field_error.py --teacher T --student RUN --data VALID.jsonl [--rows 32 --seq-len 256]

Held-out rows packed as a build packs them; the teacher computes fp32 targets (the values a build
starts from); each storage dtype is applied with the cache's own encode/decode; a trained student's
KD (both tails, T = 1 and 2) and alignment losses are compared with the fp32-target losses.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

import harness  # noqa: F401  (this checkout's tcache)
from tcache.hf import load_teacher
from tcache.student.models.io import load_student
from tcache.student.training import losses
from tcache.teachercache import schema
from tcache.teachercache.codecs import decode_hidden, encode_hidden
from tcache.teachercache.teacher import TeacherPass
from tcache.text import DataSpec, iter_texts, pack_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cpu")
    teacher, tok = load_teacher(a.teacher, dev, torch.float32)
    student, _ = load_student(a.student, dev)
    rows = np.stack(list(itertools.islice(pack_rows(iter_texts(DataSpec(a.data)), tok, a.seq_len, tok.eos_token_id),
                                          a.rows)))
    tp = TeacherPass(teacher, schema.layer_groups(len(teacher.model.layers), 1), a.top_k)
    acc: dict[str, list[float]] = {}
    with torch.no_grad():
        for ids_np in np.array_split(rows, max(len(rows) // 8, 1)):
            ids = torch.from_numpy(ids_np).long()  # (B, T)
            tgt = tp(ids)
            logits, h_s = student(ids, groups=1)  # (B, T, V), (B, T, 1, D)
            ref = {"align": float(losses.align_loss(h_s, tgt.hidden))}
            for T in (1.0, 2.0):
                for tail in losses.KD_TAILS:
                    ref[f"kd_T{T:g}_{tail}"] = float(losses.kd_loss(logits, tgt.topk_logprobs, tgt.topk_ids, T, tail))
            for name, dtype in schema.HIDDEN_DTYPES.items():
                enc = {k: v.numpy() for k, v in encode_hidden(tgt.hidden, dtype).items()}
                h = torch.from_numpy(decode_hidden(enc, dtype)).reshape(tgt.hidden.shape)
                err = abs(float(losses.align_loss(h_s, h)) - ref["align"]) / ref["align"]
                acc.setdefault(f"hidden={name}: align", []).append(err)
                acc.setdefault(f"hidden={name}: hidden rel. RMS error", []).append(
                    float((h - tgt.hidden).norm() / tgt.hidden.norm()))
            for name, dtype in schema.LOGPROB_DTYPES.items():
                lp = tgt.topk_logprobs.to(getattr(torch, dtype)).float()
                for key, value in ref.items():
                    if key.startswith("kd"):
                        _, t, tail = key.split("_")
                        got = float(losses.kd_loss(logits, lp, tgt.topk_ids, float(t[1:]), tail))
                        acc.setdefault(f"logprobs={name}: {key}", []).append(abs(got - value) / value)
            for key, value in ref.items():
                acc.setdefault(f"reference {key}", []).append(value)
    result = {k: float(np.mean(v)) for k, v in acc.items()}
    result["rows"], result["seq_len"], result["top_k"] = a.rows, a.seq_len, a.top_k
    print("| what | mean relative error (reference: value) |\n|---|---|")
    for k, v in result.items():
        if isinstance(v, float):
            print(f"| {k} | {v:.3g} |")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
