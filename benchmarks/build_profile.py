"""Where a build batch's GPU time goes: each stage of the teacher pass timed alone with CUDA events.

    python benchmarks/build_profile.py --teacher T [--smol]

Batch 64 x 512, bf16. Stages: bare forward; forward with the hidden-mean hooks; top-k log-probs
(chunked fp32 as built, full log_softmax + topk, topk on bf16 logits + fp32 logsumexp); int8 encode;
nf4 encode; pinned non-blocking device-to-host copy of the encoded fields.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness.results import write_json
from harness.timing import cuda_ms as ms
from tcache.hf import load_teacher
from tcache.teachercache.codecs import encode_hidden
from tcache.teachercache.teacher import TeacherPass, topk_logprobs

B, T, K = 64, 512, 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, _ = load_teacher(a.teacher, torch.device("cuda"), torch.bfloat16)
    V = model.get_output_embeddings().weight.shape[0]
    L = len(model.model.layers)
    ids = torch.randint(0, min(V, 16384), (B, T), device="cuda")
    res = {"teacher": a.teacher, "tokens_per_batch": B * T}
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        res["forward_ms"] = ms(lambda: model(input_ids=ids, use_cache=False))
        res["forward_hidden_states_ms"] = ms(lambda: model(input_ids=ids, use_cache=False, output_hidden_states=True))
        tp = TeacherPass(model, [(0, L)], K)
        D = model.config.hidden_size

        def hooked_forward():
            tp._acc = torch.zeros(B, T, 1, D, device="cuda")  # what TeacherPass.__call__ sets up
            model(input_ids=ids, use_cache=False)

        res["forward_with_hooks_ms"] = ms(hooked_forward)
        res["teacher_pass_ms"] = ms(lambda: tp(ids))
        tp.close()
        res["topk_chunked_fp32_ms"] = ms(lambda: topk_logprobs(logits, K))
        res["topk_full_logsoftmax_ms"] = ms(lambda: torch.topk(torch.log_softmax(logits.float(), -1), K, -1))
        res["topk_bf16_plus_lse_ms"] = ms(lambda: (torch.topk(logits, K, -1), torch.logsumexp(logits.float(), -1)))
        res["topk_bf16_only_ms"] = ms(lambda: torch.topk(logits, K, -1))
        res["logsumexp_fp32_ms"] = ms(lambda: torch.logsumexp(logits.float(), -1))
        h = torch.randn(B, T, 1, model.config.hidden_size, device="cuda")
        res["encode_int8_ms"] = ms(lambda: encode_hidden(h, "int8"))
        res["encode_nf4_ms"] = ms(lambda: encode_hidden(h, "nf4"))

        def two_stage():  # top-k of per-block top-k's: exact, fewer elements in the final selection
            n = logits.shape[-1] // 1024 * 1024
            blocks = logits[..., :n].reshape(B, T, -1, 1024)  # (B, T, V/1024, 1024)
            v, i = torch.topk(blocks, K, -1)  # (B, T, V/1024, K)
            i = i + torch.arange(0, n, 1024, device="cuda")[:, None]
            v2, j = torch.topk(v.reshape(B, T, -1), K, -1)
            return v2, torch.gather(i.reshape(B, T, -1), -1, j)

        if V % 1024 == 0:
            res["topk_two_stage_ms"] = ms(two_stage)
        enc = encode_hidden(h, "int8")
        lp, tid = topk_logprobs(logits, K)
        fields = {**enc, "lp": lp.half(), "ids": tid.int(), "in": ids}

        def d2h():
            for v in fields.values():
                torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)

        res["d2h_pinned_ms"] = ms(d2h)
        res["d2h_bytes"] = sum(v.numel() * v.element_size() for v in fields.values())
    for k, v in res.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if a.out:
        write_json(Path(a.out), res)


if __name__ == "__main__":
    main()
