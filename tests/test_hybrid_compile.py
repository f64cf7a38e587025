"""The hybrid's compiled step as a user runs it (--compile on with the default scope, the whole forward and loss one
graph; inductor on the CPU): `tcache distill --compile on` follows the eager run's losses through both stages. The
step's graph, loss and gradients under checkpointing, on CPU and CUDA, are held at the Trainer in
tests/test_mlstm_op.py. The hybrid's per-layer scope (TCACHE_COMPILE_SCOPE=layer, the step before issue 32) is now
an opt-out, measured by benchmarks/distill.py --hybrid (hybrid_stage2_before); per-layer compile as the xLSTM recipes
run it is held by test_distill's compiled-blocks test."""

from __future__ import annotations

import pytest
import torch


def test_distill_with_compile_on_follows_the_eager_run_through_both_stages(tmp_path, one_layer_cache, valid_jsonl,
                                                                           monkeypatch):
    """`tcache distill --recipe hybrid --compile on` as a user runs it (on a GPU the default replays this graph as CUDA
    graphs; forced here on CPU):
    it completes both stages, its loss at every step equals the --compile off run's, and the saved student
    evaluates."""
    from test_hybrid import metrics, run

    cache = one_layer_cache
    monkeypatch.delenv("TCACHE_COMPILE_SCOPE", raising=False)  # the default scope, whatever the caller's shell set
    losses = {}
    for mode in ("off", "on"):
        out = tmp_path / f"run-{mode}"
        r = run("distill", cache, "--out", out, "--recipe", "hybrid", "--steps", 2, "--stage1-tokens", 256,
                "--batch-size", 2, "--grad-accum", 1, "--window", 16, "--sinks", 2, "--compile", mode)
        assert r.exit_code == 0, r.output
        assert ("compile: on, step scope; the first step" in r.output) == (mode == "on"), r.output  # not a hang
        losses[mode] = [m["loss"] for m in metrics(out)]
    assert len(losses["on"]) == len(losses["off"]) == 4  # two stage-I steps, two stage-II steps
    for got, want in zip(losses["on"], losses["off"]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    r = run("eval", tmp_path / "run-on", "--data", valid_jsonl, "--tokens", 256, "--seq-len", 64, "--json")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("capability,want", [((9, 0), "cudagraphs"), ((7, 5), "cudagraphs"), ((7, 0), "off")])
def test_the_hybrids_compile_auto_by_compute_capability(monkeypatch, capability, want):
    """--compile auto for the hybrid: CUDA graphs from a T4 (sm 7.5) up, so the 16 GiB emulation on a larger GPU
    runs what a T4 runs (`on`, without CUDA graphs, under activation checkpointing); off below Triton's tensor-core
    floor and on the CPU; an explicit choice always wins."""
    from tcache.student.training.families import hybrid_compile

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert hybrid_compile("auto", torch.device("cuda")) == want
    assert hybrid_compile("auto", torch.device("cuda"), checkpointing=True) == ("on" if want != "off" else "off")
    assert hybrid_compile("on", torch.device("cuda")) == "on"
    assert hybrid_compile("auto", torch.device("cpu")) == "off"


def test_compile_auto_goes_on_eagerly_when_the_backend_cannot_compile():
    """A backend that fails (as Triton would on a GPU it does not support): under --compile auto one warning and the
    eager result; under an explicit --compile the error stands."""
    from tcache.student.training.runtime import compile_step

    def broken(gm, example_inputs):
        raise RuntimeError("no kernel for sm_75")

    def terms(batch, temperature):
        return {"x": batch["a"] * temperature}

    torch._dynamo.reset()
    step = compile_step(terms, fallback=True, backend=broken)
    with pytest.warns(UserWarning, match="--compile auto: torch.compile failed"):
        got = step({"a": torch.arange(3.0)}, 2.0)
    torch.testing.assert_close(got["x"], torch.arange(3.0) * 2)
    torch.testing.assert_close(step({"a": torch.ones(2)}, 3.0)["x"], torch.full((2,), 3.0))  # eager from then on
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        compile_step(terms, backend=broken)({"a": torch.arange(3.0)}, 2.0)


def test_an_activation_budget_replaces_per_layer_checkpointing(one_layer_cache, tmp_path, monkeypatch):
    """--activation-budget: no checkpoint wrapper on the layers, the budget handed to the step's compile (and
    recorded), and a one-line TcacheError for a share outside [0, 1], an uncompiled step and the xLSTM recipes."""
    from tcache.errors import TcacheError
    from tcache.student.training import train
    from tcache.student.training.config import DistillConfig

    got = {}
    real = train.compile_step
    monkeypatch.setattr(train, "compile_step", lambda *a, **k: got.update(k) or real(*a, **k))

    def cfg(**kw):
        base = dict(cache=str(one_layer_cache), out=str(tmp_path / "run"), recipe="hybrid", steps=2, batch_size=2,
                    grad_accum=1, device="cpu", precision="fp32", compile="on", checkpointing="on",
                    activation_budget=0.3)
        return DistillConfig(**{**base, **kw})

    tr = train.setup(cfg())
    assert not tr.model.lm.is_gradient_checkpointing and got["memory_budget"] == 0.3
    assert tr.plan.info["activation_budget"] == 0.3 and tr.plan.info["checkpointing"] is False
    assert train.setup(cfg(activation_budget=None)).model.lm.is_gradient_checkpointing  # the per-layer default
    for bad in (dict(activation_budget=1.5), dict(compile="off"), dict(recipe="v2")):
        with pytest.raises(TcacheError, match="--activation-budget") as e:
            train.setup(cfg(**bad))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_regions_compile_one_layer_for_all_and_keep_the_eager_gradients(device, two_layer_cache, tmp_path,
                                                                        monkeypatch):
    """TCACHE_COMPILE_SCOPE=regions as the library wires it (--compile on, inductor): the step stays one graph in
    which both decoder layers call one nested compile region, and stage II's loss and every gradient equal the eager
    step's (float32). Inductor's buffer reuse made those gradients wrong (benchmarks/region_grads.py); the scope
    turns it off. Under activation checkpointing or an activation budget the scope is refused in one line."""
    from test_mlstm_op import step_grads, two_rows_gates_moved

    from tcache.errors import TcacheError
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.train import setup

    torch._dynamo.reset()
    monkeypatch.setenv("TCACHE_COMPILE_SCOPE", "regions")
    kernel = {"cpu": "chunkwise--native_custbw", "cuda": "chunkwise--triton_xl_chunk"}[device]
    base = dict(cache=str(two_layer_cache), recipe="hybrid", steps=2, batch_size=2, grad_accum=1, device=device,
                precision="fp32", compile="on", mlstm_kernel=kernel, window=16, sinks=2, loss_chunk=48)
    for bad, says in ((dict(checkpointing="on"), "activation checkpointing"),  # dynamo's internal error
                      (dict(checkpointing="off", activation_budget=0.0), "--activation-budget")):  # wrong gradients
        with pytest.raises(TcacheError, match=f"TCACHE_COMPILE_SCOPE=regions does not run under {says}") as e:
            setup(DistillConfig(out=str(tmp_path / "refused"), **bad, **base))
        assert "\n" not in str(e.value)
    graphs, compile_ = [], torch.compile

    def capturing(fn, **kw):  # the library's torch.compile call, its backend seeing the graph first
        backend = torch._dynamo.lookup_backend(kw.pop("backend"))

        def capture(gm, example_inputs):
            graphs.append(gm)
            return backend(gm, example_inputs)

        return compile_(fn, backend=capture, **kw)

    monkeypatch.setattr(torch, "compile", capturing)
    tr = setup(DistillConfig(out=str(tmp_path / "run"), checkpointing="off", **base))
    assert tr.plan.info["compile_scope"] == "regions"
    tr.begin_stage(tr.plan.stages[-1])  # stage II: CE + KD through every parameter
    batch = two_rows_gates_moved(tr, two_layer_cache, device)
    want, got = step_grads(tr, tr._terms, batch), step_grads(tr, tr.compiled, batch)
    calls = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(graphs) == 1 and len(calls) == 2  # one graph; each layer a call
    assert len({n.args[0].target for n in calls}) == 1  # of one region, compiled once
    assert len(want) > 10
    tol = {"atol": 1e-5, "rtol": 1e-4} if device == "cpu" else {"atol": 4e-3, "rtol": 1e-2}  # TF32 on CUDA
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"{name}: {m}")


def test_the_compiled_bf16_step_is_kept_in_aotautograds_cache(one_layer_cache, tmp_path, monkeypatch):
    """The hybrid's stage II step compiled (inductor) under bf16 autocast, as a GPU run trains it: autocast is entered
    around the compiled call, not inside it, so AOTAutograd's cache keeps the graph (a graph that entered autocast
    itself was bypassed, "_enter_autocast": every cold start re-ran AOTAutograd), and the loss equals the eager
    step's within bf16 rounding."""
    from torch._dynamo.utils import counters

    from tcache.student.training.config import DistillConfig
    from tcache.student.training.data import CacheRows
    from tcache.student.training.train import setup

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.delenv("TCACHE_COMPILE_SCOPE", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold cache: a miss, then a save
    cfg = DistillConfig(cache=str(one_layer_cache), out=str(tmp_path / "run"), recipe="hybrid", steps=2, batch_size=2,
                        grad_accum=1, device="cpu", precision="bf16", compile="on", checkpointing="off", window=16,
                        sinks=2, loss_chunk=48)
    tr = setup(cfg)
    tr.begin_stage(tr.plan.stages[-1])
    rows = CacheRows(str(one_layer_cache), with_hidden=tr.plan.groups > 0)
    batch = {key: torch.stack([rows[r][key] for r in (0, 1)]) for key in rows[0]}
    w = tr.weights(0, 0)
    got = sum(tr.terms(batch, w).values())
    got.backward()  # the entry is saved once the backward is compiled too
    aot = dict(counters["aot_autograd"])
    assert aot.get("autograd_cache_saved", 0) >= 1 and "autograd_cache_bypass" not in aot, aot
    compiled, tr.compiled = tr.compiled, None
    want = sum(tr.terms(batch, w).values())  # the eager step, autocast entered the same way
    torch.testing.assert_close(got.detach(), want.detach(), atol=0.0, rtol=2e-2)
    tr.compiled = compiled
