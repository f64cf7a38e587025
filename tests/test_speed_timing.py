"""benchmarks/speed.py's decode timing (issue 36): the end-to-end rate from two whole generate() calls against the same
arithmetic done here by hand, the profiled pair's per-step subtraction, and a CPU smoke on tiny random models: the
timed calls carry no logits processor or stopping criterion of ours, every row is timed by the same calls, and
speed.json / speed.md say how the cells were measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness.decode_timing import decode_rate, per_step, tally  # noqa: E402


def test_decode_rate_is_the_difference_of_the_medians():
    t1 = [0.30, 0.20, 0.25]  # generate(1), seconds: median 0.25
    tn = [1.45, 1.25, 1.05]  # generate(1 + 32): median 1.25
    r = decode_rate(8, 32, t1, tn)
    # by hand: 1.25 - 0.25 = 1.0 s for 32 steps of 8 tokens
    assert r["decode_s"] == pytest.approx(1.0)
    assert r["decode_tok_s"] == pytest.approx(256.0)
    assert r["step_ms"] == pytest.approx(31.25)
    assert r["prefill_s"] == pytest.approx(0.25)
    assert r["prefill_over_decode"] == pytest.approx(0.25)
    # the pairs' own differences 1.15, 1.05, 0.80: (1.15 - 0.80) / 1.05
    assert r["decode_spread"] == pytest.approx(0.35 / 1.05)
    assert r["reps"] == 3 and r["t1_s"] == t1 and r["tn_s"] == tn
    assert r["decode_tok_s"] == pytest.approx(8 * 1e3 / r["step_ms"])  # = batch / step


def test_decode_rate_of_one_pair_and_of_a_difference_lost_in_noise():
    one = decode_rate(1, 4, [2.0], [2.5])
    assert one["decode_tok_s"] == pytest.approx(8.0) and one["decode_spread"] is None
    assert one["prefill_over_decode"] == pytest.approx(4.0)
    lost = decode_rate(64, 32, [30.0], [29.9])  # prefill-dominated: the longer call came out shorter
    assert lost["decode_tok_s"] is None and lost["step_ms"] is None and lost["prefill_over_decode"] is None
    assert lost["decode_s"] == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        decode_rate(1, 4, [1.0, 1.1], [2.0])


def test_per_step_subtracts_the_one_token_call():
    one = {"gemm": [10, 100.0], "Memcpy DtoD": [2, 4.0], "prefill_only": [1, 50.0]}
    full = {"gemm": [50, 420.0], "Memcpy DtoD": [10, 20.0], "prefill_only": [1, 50.0], "argmax": [4, 8.0]}
    s = per_step(one, full, 4)
    assert s["per_step"] == pytest.approx((40 + 8 + 0 + 4) / 4)
    assert s["us_per_step"] == pytest.approx((320 + 16 + 0 + 8) / 4)
    assert [t["name"] for t in s["top"]] == ["gemm", "Memcpy DtoD", "argmax"]  # by time; the prefill's op left out
    assert s["top"][0]["per_step"] == 10 and s["top"][0]["us_per_step"] == 80


def test_tally_counts_cuda_activities_with_their_device_time():
    def avg(key, kind, count, us):
        return SimpleNamespace(key=key, device_type=SimpleNamespace(name=kind), count=count,
                               self_device_time_total=us)

    prof = SimpleNamespace(key_averages=lambda: [avg("aten::mm", "CPU", 3, 0.0), avg("sm90_gemm", "CUDA", 3, 30.0),
                                                 avg("Memset (Device)", "CUDA", 1, 1.0)])
    assert tally(prof, cuda=True) == {"sm90_gemm": [3, 30.0], "Memset (Device)": [1, 1.0]}


def test_tally_counts_the_cpu_ops_the_code_calls():
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.matmul(x, x).relu()
        torch.matmul(x, x)
    t = tally(prof, cuda=False)
    assert set(t) == {"aten::matmul", "aten::relu"}  # not again as the mm / clamp_min they run inside
    assert t["aten::matmul"][0] == 2 and t["aten::relu"][0] == 1


# --- the CPU smoke: one row's Runner in this process, then speed.py's parent over one row ----------------------------


def runner(row: str, monkeypatch, *flags: str):
    """A Runner over the tiny shape on CPU whose model records every generate call: its new tokens, whether a
    logits processor or stopping criterion was passed in, and the logits processors generate built itself."""
    import speed
    from harness.timing import Dev
    from speed_measure import Runner
    from speed_models import SHAPES, build

    a = speed.arguments(["--shape", "tiny", "--device", "cpu", "--lengths", "48", "--batches", "2", "--steps", "3",
                         "--reps", "2", "--profile-steps", "2", *flags])
    dev = Dev(torch.device("cpu"))
    model = build(row, SHAPES["tiny"], dev.device, torch.bfloat16)
    calls, built = [], []
    generate, get_processors = model.generate, model._get_logits_processor

    def recording_generate(ids, **kw):
        calls.append((kw["max_new_tokens"], "logits_processor" in kw or "stopping_criteria" in kw))
        return generate(ids, **kw)

    def recording_processors(*args, **kw):
        out = get_processors(*args, **kw)
        built.append(len(out))
        return out

    monkeypatch.setattr(model, "generate", recording_generate)
    monkeypatch.setattr(model, "_get_logits_processor", recording_processors)
    run = Runner(row, model, dev, a)
    run.profile_cell = speed.profile_cell(row, a)
    return run, calls, built


@pytest.mark.parametrize("row", ["teacher-static", "v2"])
def test_a_decode_cell_is_timed_by_whole_generate_calls_without_hooks(row, monkeypatch):
    monkeypatch.setattr("speed_measure.REPEAT_BELOW_S", 1e9)  # every prefill short: --reps pairs, on a busy CPU too
    run, calls, built = runner(row, monkeypatch)
    assert run.profile_cell == (2, 48)
    res = run.decode(2, 48)
    # warm-up (4 tokens), the untimed generate(1), two timed pairs (1, 1 + 3), the profiled pair (1, 1 + 2)
    assert [n for n, _ in calls] == [4, 1, 1, 4, 1, 4, 1, 3]
    assert not any(hooked for _, hooked in calls)
    assert set(built) == {0}  # greedy, eos_token_id=None: generate adds no logits processor of its own either
    assert res["reps"] == 2 and len(res["t1_s"]) == len(res["tn_s"]) == 2
    decode = sum(res["tn_s"]) / 2 - sum(res["t1_s"]) / 2  # the median of two calls is their mean
    if decode > 0:  # a shared CPU can leave the difference in the noise; then the cell says so (None)
        assert res["decode_tok_s"] == pytest.approx(2 * 3 / decode)
        assert res["gbps"] == pytest.approx((run.params + res["state_bytes"]) / (decode / 3 * 1e3) / 1e6)
    else:
        assert res["decode_tok_s"] is None
    assert res[{"teacher-static": "recompiles", "v2": "captures"}[row]] in (0, None)
    assert res["state_bytes"] > 0
    prof = run.profile
    assert isinstance(prof, dict), prof
    assert prof["batch"] == 2 and prof["context"] == 48 and prof["steps"] == 2
    assert prof["kernels_per_step"] is None and prof["cpu_ops_per_step"] > 0  # CPU: ops counted, no kernels
    assert prof["top"] and all(t["per_step"] >= 0 for t in prof["top"])


def test_a_long_prefill_is_timed_once_and_says_how_long(monkeypatch):
    monkeypatch.setattr("speed_measure.REPEAT_BELOW_S", 0.0)  # every prefill long: one pair
    run, calls, _ = runner("teacher-static", monkeypatch, "--profile-steps", "0")
    assert run.profile_cell is None
    res = run.decode(2, 48)
    assert [n for n, _ in calls] == [4, 1, 1, 4]  # warm-up, untimed generate(1), one timed pair; no profile
    assert res["reps"] == 1 and res["decode_spread"] is None and run.profile is None
    t1, tn = res["t1_s"][0], res["tn_s"][0]
    if tn > t1:
        assert res["prefill_over_decode"] == pytest.approx(t1 / (tn - t1))


def test_speed_py_writes_the_method_and_the_profile(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--shape", "tiny", "--device", "cpu",
                        "--models", "teacher-eager", "--lengths", "32", "--batches", "2", "--steps", "2",
                        "--eager-steps", "2", "--budget", "0", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((out / "speed.json").read_text())
    assert doc["method"].startswith("end-to-end") and doc["reps"] == 3 and doc["profile_steps"] == 4
    row = doc["rows"]["teacher-eager"]
    for key in ("decode_tok_s", "t1_s", "tn_s", "prefill_over_decode", "reps", "step_ms", "peak_gib"):
        assert "32" in row[f"{key}_b2"], key
    assert row["decode_profile"]["cpu_ops_per_step"] > 0 and row["decode_profile"]["steps"] == 2
    md = (out / "speed.md").read_text()
    assert "t(generate 1 + N new tokens) - t(generate 1)" in md and "CPU ops (b2 32)" in md
