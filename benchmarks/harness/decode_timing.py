"""Decode speed timed end to end through generate(): the rate from two whole calls, generate(1 + N new tokens) minus
generate(1), each call's clock closed by one synchronize; and the decode step's kernels from a separate profiled pair.

Nothing hooks into the calls that are timed (no logits processor, no per-step event or synchronize), so a row is
timed as its users run it and every row alike: the subtraction leaves the N decode forwards (with generate's own
per-token work: argmax, stopping criteria, cache bookkeeping) and cancels the prefill, the first token and the call's
setup, which both calls share. Where the prefill is much longer than the decode (a large batch x context), the
difference is a small number left from two large ones: `prefill_over_decode` says how small, and `decode_spread`
how much it moved between repeated pairs.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from harness.timing import Dev


def timed_call(fn: Callable[[], object], dev: Dev) -> tuple[float, object]:
    """(seconds, fn()): a synchronize before (earlier work out of the clock) and after (fn's queued GPU work in it),
    none inside."""
    dev.sync()
    t0 = time.perf_counter()
    out = fn()
    dev.sync()
    return time.perf_counter() - t0, out


def decode_rate(batch: int, steps: int, t1: list[float], tn: list[float]) -> dict:
    """The decode cell from timed generate() calls: t1 the seconds of generate(1 new token) (prefill + first token),
    tn those of generate(1 + steps) (the same, then `steps` decode forwards), one or more of each.

        decode_s             median(tn) - median(t1): the `steps` forwards after the first token
        decode_tok_s         batch * steps / decode_s (None when the difference is not positive: lost in the noise)
        step_ms              decode_s / steps, the mean step seen end to end (= batch / decode_tok_s)
        prefill_s            median(t1)
        prefill_over_decode  prefill_s / decode_s: how large the subtracted part was against what is left
        decode_spread        (max - min) / median of the pairs' own differences tn[i] - t1[i]; None for one pair
    """
    if not t1 or len(t1) != len(tn):
        raise ValueError(f"need as many generate(1) as generate(1 + N) times, got {len(t1)} and {len(tn)}")
    prefill, full = statistics.median(t1), statistics.median(tn)
    decode = full - prefill
    ok = decode > 0
    pairs = [b - a for a, b in zip(t1, tn)]
    mid = statistics.median(pairs)
    spread = (max(pairs) - min(pairs)) / mid if len(pairs) > 1 and mid > 0 else None
    return {"decode_s": decode, "decode_tok_s": batch * steps / decode if ok else None,
            "step_ms": decode / steps * 1e3 if ok else None, "prefill_s": prefill,
            "prefill_over_decode": prefill / decode if ok else None, "decode_spread": spread,
            "reps": len(t1), "t1_s": list(t1), "tn_s": list(tn)}


# --- the profiled pair: what one decode step is made of ---------------------------------------------------------------


def tally(prof, cuda: bool) -> dict[str, list[float]]:
    """name -> [count, microseconds] of what one profiled call ran. CUDA: every device activity (kernels, and the
    memcpy / memset a step also issues), with its device time. CPU: the aten ops the model's code called, i.e. those
    not inside another aten op (matmul once, not again as the mm and the views it runs), with their CPU time."""
    out: dict[str, list[float]] = {}
    if cuda:
        for k in prof.key_averages():
            if k.device_type.name == "CUDA":
                out[k.key] = [k.count, k.self_device_time_total]
        return out
    for e in prof.events():
        if e.device_type.name == "CPU" and e.name.startswith("aten::") and not aten_parent(e):
            item = out.setdefault(e.name, [0, 0.0])
            item[0] += 1
            item[1] += e.cpu_time_total
    return out


def aten_parent(event) -> bool:
    """Whether a profiled op runs inside another aten op (then that op's count holds it)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def per_step(one: dict[str, list[float]], full: dict[str, list[float]], steps: int, top: int = 12) -> dict:
    """One decode step from the tallies of generate(1) and generate(1 + steps): (full - one) / steps, the same
    subtraction as the timed rate, per name; totals and the `top` names by time."""
    names = set(one) | set(full)
    diff = {n: [(full.get(n, [0, 0])[i] - one.get(n, [0, 0])[i]) / steps for i in (0, 1)] for n in names}
    ranked = sorted(((n, c, us) for n, (c, us) in diff.items() if c or us), key=lambda x: (-x[2], x[0]))
    return {"per_step": sum(c for c, _ in diff.values()), "us_per_step": sum(us for _, us in diff.values()),
            "top": [{"name": n[:90], "per_step": c, "us_per_step": us} for n, c, us in ranked[:top]]}


def profile_decode(gen: Callable[[int], object], dev: Dev, steps: int) -> dict:
    """A decode step under torch.profiler, after the timed calls and apart from them (the profiler's own cost stays
    out of every rate): gen(1) and gen(1 + steps) each profiled, their difference per step. `gen(n)` runs generate
    with n new tokens at the cell's shapes (already warm, nothing compiles here).

        kernels_per_step    CUDA: device activities per generated token (kernels, memcpy, memset); None on CPU
        copies_per_step     CUDA: the memcpy / memset among them
        kernel_us_per_step  CUDA: their device time per token
        cpu_ops_per_step    CPU: aten ops the model calls per generated token (tally()); None on CUDA, whose profile
                            records device activity only (recording every host op would slow the host-bound rows)
        profiled_step_ms    the pair's wall-time difference per step, under the profiler (its overhead included)
        top                 the costliest kernels (ops) per step
    """
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if dev.cuda else ProfilerActivity.CPU
    tallies, walls = [], []
    for n in (1, 1 + steps):
        with profile(activities=[activity]) as prof:
            seconds, out = timed_call(lambda: gen(n), dev)
        del out
        tallies.append(tally(prof, dev.cuda))
        walls.append(seconds)
    step = per_step(tallies[0], tallies[1], steps)
    copies = per_step({k: v for k, v in tallies[0].items() if k.startswith("Mem")},
                      {k: v for k, v in tallies[1].items() if k.startswith("Mem")}, steps)["per_step"]
    return {"steps": steps, "kernels_per_step": step["per_step"] if dev.cuda else None,
            "copies_per_step": copies if dev.cuda else None,
            "kernel_us_per_step": step["us_per_step"] if dev.cuda else None,
            "cpu_ops_per_step": None if dev.cuda else step["per_step"],
            "profiled_step_ms": (walls[1] - walls[0]) / steps * 1e3, "top": step["top"]}
