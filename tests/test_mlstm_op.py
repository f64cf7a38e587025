"""The mLSTM kernel as a custom op (student/models/mlstm_kernel.py) and the hybrid's step compiled as one graph through
it: the op passes torch.library.opcheck, computes what mlstm_kernels' own autograd Function computes (forward and
gradients) and a float64 parallel mLSTM (forward), and the Trainer's whole stage I and stage II forward + loss compile
with fullgraph=True (no graph break) under activation checkpointing, giving the eager step's loss and gradients.
CPU runs the native kernels (in CI); CUDA the Triton ones (the GPU call)."""

from __future__ import annotations

import pytest
import torch

from tcache.student.models.mlstm_kernel import mlstm_chunkwise, mlstm_kernel_fn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OP_KERNEL = {"cpu": "chunkwise--native_custbw", "cuda": "chunkwise--triton_xl_chunk"}
TF32 = {"cpu": {}, "cuda": {"atol": 4e-3, "rtol": 1e-2}}
"""Tolerances against another computation: the Triton kernels multiply float32 in TF32 (tl.dot's default precision,
10-bit mantissa), measured on an H200 at up to 1.4e-3 from the float64 reference and 1.2e-3 between the op's eager
and AOT-compiled gradients (different launch configurations, other rounding); the CPU kernels are float32 exact."""


def inputs(device: str, B=2, H=3, S=128, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Hedgehog-like features (softmax: positive, summing to 1) as the hybrid feeds them, v and gates at random
    q, k = (torch.softmax(torch.randn(B, H, S, D, generator=g), -1) for _ in range(2))
    v = torch.randn(B, H, S, D, generator=g)
    i, f = torch.randn(B, H, S, generator=g), torch.randn(B, H, S, generator=g) + 3
    return [t.to(device).requires_grad_() for t in (q, k, v, i, f)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_pass_opcheck(device):
    q, k, v, i, f = inputs(device)
    torch.library.opcheck(torch.ops.tcache.mlstm_chunkwise.default, (q, k, v, i, f, 64, 1e-6, 0.25), **TF32[device])
    h, n, m = mlstm_chunkwise(q, k, v, i, f, 64, 1e-6, 0.25)
    dh = torch.randn_like(h)
    args = (*(t.detach() for t in (q, k, v, i, f, n, m)), dh, 64, 1e-6, 0.25)
    torch.library.opcheck(torch.ops.tcache.mlstm_chunkwise_bw.default, args, **TF32[device])


@pytest.mark.parametrize("device", DEVICES)
def test_the_op_computes_mlstm_kernels_own_function(device, monkeypatch):
    """Through the adapter (the hybrid's eps, a length the kernel pads): the op's output and gradients equal those
    of mlstm_kernels' autograd Function for the same kernel, called the way the adapter called it before."""
    from mlstm_kernels.torch import get_mlstm_kernel

    monkeypatch.setenv("TCACHE_MLSTM_OP", "1")  # the default, whatever the caller's shell set
    q, k, v, i, f = inputs(device, S=100)
    op = mlstm_kernel_fn(OP_KERNEL[device], eps=1e-12)(q, k, v, i[..., None], f[..., None])  # (B, H, S, D)
    g = torch.randn_like(op)
    got = torch.autograd.grad((op * g).sum(), (q, k, v, i, f))
    from tcache.student.models.mlstm_kernel import pad_end, padded_length

    pad = padded_length(100, 64) - 100 if device == "cuda" else 12  # the adapter's padding: 128 / 112 positions
    cs = 64 if device == "cuda" else 16
    ref = get_mlstm_kernel(OP_KERNEL[device])(*[t for t in pad_end(q, k, v, i, f, pad)][:3],
                                              i=pad_end(q, k, v, i, f, pad)[3], f=pad_end(q, k, v, i, f, pad)[4],
                                              chunk_size=cs, eps=1e-12, autocast_kernel_dtype=torch.float32)
    ref = ref[:, :, :100]
    want = torch.autograd.grad((ref * g).sum(), (q, k, v, i, f))
    torch.testing.assert_close(op, ref, atol=1e-6, rtol=1e-6)
    for name, a, b in zip("qkvif", got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_the_op_forward_equals_a_float64_parallel_mlstm(device):
    """The independent reference: mlstm_kernels' quadratic parallel form in float64 on the CPU."""
    from mlstm_kernels.torch import get_mlstm_kernel

    q, k, v, i, f = inputs(device)
    h = mlstm_chunkwise(q, k, v, i, f, 64, 1e-6, 16 ** -0.5)[0]  # (B, H, S, D)
    ref = get_mlstm_kernel("parallel--native_autograd")(*(t.detach().cpu().double() for t in (q, k, v)),
                                                         i=i.detach().cpu().double(), f=f.detach().cpu().double(),
                                                         eps=1e-6)
    torch.testing.assert_close(h.detach().cpu().double(), ref, **({"atol": 2e-5, "rtol": 1e-4} | TF32[device]))


def two_rows_gates_moved(tr, cache, device: str) -> dict:
    """A batch of the cache's first two rows on `device`, with the Trainer's mixers' output gates and query feature
    maps moved away from their init, so every branch carries gradient."""
    from tcache.student.training.data import CacheRows

    with torch.no_grad():
        for mx in tr.model.mixers:
            mx.ogate_w.normal_(0, 0.3), mx.phi_q.add_(torch.randn_like(mx.phi_q) * 0.1)
    rows = CacheRows(str(cache), with_hidden=tr.plan.groups > 0)
    return {key: torch.stack([rows[r][key] for r in (0, 1)]).to(device) for key in rows[0]}


def step_grads(tr, terms, batch: dict) -> dict:
    """The loss (all terms summed, temperature 2) and every trainable gradient of one step of `terms` (the Trainer's
    _terms or a compiled twin) on `batch`."""
    tr.opt.zero_grad(set_to_none=False)
    loss = sum(terms(batch, 2.0).values())
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in tr.model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("device", DEVICES)
def test_the_hybrid_step_compiles_as_one_graph_and_computes_the_eager_step(device, one_layer_cache, tmp_path,
                                                                            monkeypatch):
    """Trainer._terms (the hybrid's forward and every loss term) through torch.compile(fullgraph=True) under
    activation checkpointing: no graph break in stage I or stage II, and the loss and every trainable gradient equal
    the eager step's (float32)."""
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.runtime import compile_step
    from tcache.student.training.train import setup

    torch._dynamo.reset()
    monkeypatch.setenv("TCACHE_MLSTM_OP", "1")
    cfg = DistillConfig(cache=str(one_layer_cache), out=str(tmp_path / "run"), recipe="hybrid", steps=2, batch_size=2,
                        grad_accum=1, device=device, precision="fp32", compile="off", checkpointing="on",
                        mlstm_kernel=OP_KERNEL[device], window=16, sinks=2, loss_chunk=48)
    tr = setup(cfg)
    batch = two_rows_gates_moved(tr, one_layer_cache, device)
    # on CPU through dynamo and AOTAutograd without inductor's C++ code generation (minutes on 2 cores; the CPU
    # inductor path runs end to end in test_hybrid_compile.py), on CUDA through inductor as training runs it
    compiled = compile_step(tr._terms, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    for sp in tr.plan.stages:  # stage I (match), then stage II (CE + KD)
        tr.begin_stage(sp)
        want, got = step_grads(tr, tr._terms, batch), step_grads(tr, compiled, batch)
        assert len(want) > 5, sp.stage.name
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{sp.stage.name} {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_the_v2_step_compiles_as_one_graph_and_computes_the_eager_step(device, one_layer_cache, tmp_path):
    """The Distil-xLSTM v2 step (xlstm's mLSTM blocks through the op, CE + KD + the hidden-state alignment) through
    torch.compile(fullgraph=True): no graph break (the layer groups' bounds once came from numpy, which dynamo traced
    as data-dependent tensors), and the loss and every trainable gradient equal the eager step's (float32). It is
    what TCACHE_COMPILE_SCOPE=step compiles for the xLSTM recipes (benchmarks/distill.py's v2_step_whole)."""
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.data import CacheRows
    from tcache.student.training.runtime import compile_step
    from tcache.student.training.train import setup

    torch._dynamo.reset()
    cfg = DistillConfig(cache=str(one_layer_cache), out=str(tmp_path / "run"), recipe="v2", steps=2, batch_size=2,
                        grad_accum=1, device=device, precision="fp32", compile="off", checkpointing="off",
                        mlstm_kernel=OP_KERNEL[device], blocks=2, loss_chunk=48)
    tr = setup(cfg)
    assert tr.plan.groups > 0 and tr.cfg.uses_alignment  # the alignment term is in the graph
    rows = CacheRows(str(one_layer_cache), with_hidden=True)
    batch = {key: torch.stack([rows[r][key] for r in (0, 1)]).to(device) for key in rows[0]}
    compiled = compile_step(tr._terms, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    want, got = step_grads(tr, tr._terms, batch), step_grads(tr, compiled, batch)
    assert len(want) > 5
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("env,inputs_dtype,want", [(None, torch.bfloat16, torch.bfloat16),
                                                     (None, torch.float16, torch.float32),
                                                     (None, torch.float32, torch.float32),
                                                     ("fp32", torch.bfloat16, torch.float32),
                                                     ("fp16", torch.float32, torch.float16)])
def test_the_kernel_computes_bf16_inputs_in_bf16_unless_told(monkeypatch, env, inputs_dtype, want):
    """The op receives q, k, v in the kernel's compute dtype: by default bf16 ones stay bf16 (a bf16 step on a GPU;
    quality measured equal to fp32's) and everything else runs in fp32; TCACHE_MLSTM_KERNEL_DTYPE overrides, and a
    value it does not know is a one-line error naming the choices."""
    from tcache.errors import TcacheError
    from tcache.student.models import mlstm_kernel

    seen = []

    def spy(q, k, v, i, f, *rest):
        seen.append((q.dtype, k.dtype, v.dtype, i.dtype, f.dtype))
        return orig(q, k, v, i, f, *rest)

    orig = mlstm_kernel.mlstm_chunkwise
    monkeypatch.setattr(mlstm_kernel, "mlstm_chunkwise", spy)
    if env is None:
        monkeypatch.delenv(mlstm_kernel.KERNEL_DTYPE_ENV, raising=False)
    else:
        monkeypatch.setenv(mlstm_kernel.KERNEL_DTYPE_ENV, env)
    q, k, v, i, f = (t.detach() for t in inputs("cpu", S=64))
    fn = mlstm_kernel_fn(OP_KERNEL["cpu"])
    h = fn(q.to(inputs_dtype), k.to(inputs_dtype), v.to(inputs_dtype), i.unsqueeze(-1), f.unsqueeze(-1))
    assert seen == [(want, want, want, torch.float32, torch.float32)]
    assert h.dtype == inputs_dtype  # handed back in the layer's dtype
    monkeypatch.setenv(mlstm_kernel.KERNEL_DTYPE_ENV, "half")
    with pytest.raises(TcacheError, match=r"TCACHE_MLSTM_KERNEL_DTYPE='half' is not one of auto, fp32, bf16, fp16"):
        fn(q, k, v, i.unsqueeze(-1), f.unsqueeze(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-precision Triton builds need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_half_precision_cuda_kernel_against_a_float64_parallel_mlstm(dtype):
    """TCACHE_MLSTM_KERNEL_DTYPE=bf16 | fp16: the Triton kernels with q, k, v in half precision (gates fp32) pass
    opcheck, and their forward and gradients stay within half precision's error of the float64 parallel form's
    (relative error of the whole tensor; printed, so the GPU call's output records it)."""
    from mlstm_kernels.torch import get_mlstm_kernel

    q, k, v, i, f = inputs("cuda", S=256, D=64)
    qh, kh, vh = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    i32, f32 = (t.detach().clone().requires_grad_() for t in (i, f))
    torch.library.opcheck(torch.ops.tcache.mlstm_chunkwise.default, (qh, kh, vh, i32, f32, 64, 1e-6, 0.125))
    h = mlstm_chunkwise(qh, kh, vh, i32, f32, 64, 1e-6, 64 ** -0.5)[0]  # (B, H, S, D) in dtype
    assert h.dtype == dtype
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to("cuda")
    got = torch.autograd.grad((h.float() * dh).sum(), (qh, kh, vh, i32, f32))
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (qh, kh, vh, i32, f32)]  # the same rounded inputs
    ref = get_mlstm_kernel("parallel--native_autograd")(*ref_in[:3], i=ref_in[3], f=ref_in[4], eps=1e-6)
    want = torch.autograd.grad((ref * dh.cpu().double()).sum(), ref_in)

    def rel(a, b):
        return ((a.detach().cpu().double() - b).norm() / b.norm()).item()

    errors = {"h": rel(h, ref.detach()), **{f"d{n}": rel(a, b) for n, a, b in zip("qkvif", got, want)}}
    print(f"{dtype}: relative error against float64: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))
    assert errors["h"] < 2e-2, errors  # bf16 keeps 8 bits of mantissa (eps 7.8e-3); fp32 accumulation inside
    assert max(errors.values()) < 5e-2, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("accum", [1, 2])
def test_training_steps_as_cuda_graphs_equal_the_eager_steps(one_layer_cache, tmp_path, monkeypatch, accum):
    """--compile cudagraphs (the hybrid's default on a GPU) over three optimizer steps of stage I and stage II, with
    one micro-batch a step (.grad set to None between steps) and two (.grad accumulated in place): the losses and
    the trained weights equal those of the same steps run eagerly (float32; TF32 tolerances)."""
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.data import CacheRows
    from tcache.student.training.train import setup

    monkeypatch.setenv("TCACHE_MLSTM_OP", "1")
    rows = CacheRows(str(one_layer_cache), with_hidden=True)
    batches = [{key: torch.stack([rows[r][key] for r in (2 * j, 2 * j + 1)]).to("cuda") for key in rows[0]}
               for j in range(4)]
    runs = {}
    for mode in ("off", "cudagraphs"):
        torch._dynamo.reset()
        cfg = DistillConfig(cache=str(one_layer_cache), out=str(tmp_path / mode), recipe="hybrid", steps=3,
                            batch_size=2, grad_accum=accum, device="cuda", precision="fp32", compile=mode,
                            mlstm_kernel=OP_KERNEL["cuda"], window=16, sinks=2, loss_chunk=48, seed=0)
        tr = setup(cfg)
        losses = []
        for sp in tr.plan.stages:
            tr.begin_stage(sp)
            w = tr.weights(0, 0)
            for step in range(3):
                for m in range(accum):
                    losses.append(tr.micro_step(batches[(step * accum + m) % 4], w, step * accum + m)["loss"].item())
                tr.optimizer_step(1e-4)
        runs[mode] = (losses, {n: p.detach().clone() for n, p in tr.model.named_parameters()})
    torch.testing.assert_close(torch.tensor(runs["cudagraphs"][0]), torch.tensor(runs["off"][0]), **TF32["cuda"])
    for name, want in runs["off"][1].items():
        torch.testing.assert_close(runs["cudagraphs"][1][name], want, **TF32["cuda"], msg=lambda m: f"{name}: {m}")


def test_an_activation_budget_keeps_fewer_activations_and_computes_the_eager_step(one_layer_cache, tmp_path,
                                                                                  monkeypatch):
    """--activation-budget (compile_step's memory_budget): the stage II step compiled through AOTAutograd's min-cut
    partitioner (aot_eager_decomp_partition: the partitioner inductor uses, without its C++ code generation) saves
    fewer activation bytes (parameters not counted) for the backward at budget 0 than at 1, and its loss and
    gradients still equal the eager step's (float32)."""
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.runtime import compile_step
    from tcache.student.training.train import setup

    monkeypatch.setenv("TCACHE_MLSTM_OP", "1")
    cfg = DistillConfig(cache=str(one_layer_cache), out=str(tmp_path / "run"), recipe="hybrid", steps=2, batch_size=2,
                        grad_accum=1, device="cpu", precision="fp32", compile="off", checkpointing="off",
                        mlstm_kernel=OP_KERNEL["cpu"], window=16, sinks=2, loss_chunk=48)
    tr = setup(cfg)
    batch = two_rows_gates_moved(tr, one_layer_cache, "cpu")
    tr.begin_stage(tr.plan.stages[-1])  # stage II: CE + KD over the whole student
    params = [p for p in tr.model.parameters() if p.requires_grad]
    weights = {p.data_ptr() for p in tr.model.parameters()}

    def run(fn) -> tuple[int, list[torch.Tensor]]:
        saved = []

        def pack(t):
            if t.data_ptr() not in weights:
                saved.append(t.numel() * t.element_size())
            return t

        fn(batch, 2.0)  # compiles (and warms) outside the count
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sum(fn(batch, 2.0).values())
        return sum(saved), [loss.detach(), *torch.autograd.grad(loss, params)]

    _, want = run(tr._terms)
    got = {}
    for share in (1.0, 0.0):
        torch._dynamo.reset()  # the budget is read when a graph compiles: a fresh compile for each
        got[share] = run(compile_step(tr._terms, backend="aot_eager_decomp_partition", memory_budget=share))
    assert got[0.0][0] < got[1.0][0], (got[0.0][0], got[1.0][0])
    for a, b in zip(got[0.0][1], want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
