"""tcache distill --shard fsdp (FSDP2) under torchrun, 2 CPU processes over gloo: the same global batch gives the
losses of one unsharded process (v2 and the hybrid), a sharded checkpoint resumes on 1 rank and on 2, and the saved
student is the unsharded run's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


T = 32
V2 = ("--recipe", "v2", "--steps", 4)
HYBRID = ("--recipe", "hybrid", "--steps", 2, "--stage1-tokens", 512)


@pytest.fixture(scope="module")
def cache(rank_cache):
    return rank_cache  # conftest's; T is its sequence length


def args_of(cache, out, *args) -> list[str]:
    return ["distill", str(cache), "--out", str(out), "--device", "cpu", "--precision", "fp32", "--grad-accum", "1",
            "--lr", "3e-3", "--seed", "0", *map(str, args)]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def distill(cache, out, *args) -> list[dict]:
    """`tcache distill` in one process: this one (a process's start is ~5 s of imports on this CPU)."""
    from click.testing import CliRunner

    from tcache.cli.main import main

    r = CliRunner().invoke(main, args_of(cache, out, *args))
    assert r.exit_code == 0, r.output[-3000:]
    return metrics(out)


# Several `tcache distill` commands, one after another in each of torchrun's processes (one process group, one
# start: 2 processes starting cost ~8 s each time on this 2-core machine); [args, [src, dst]]: copy src to dst first.
DRIVER = """
import json, shutil, sys
import torch.distributed
from tcache import dist
from tcache.cli.main import main
for args, copy in json.loads(sys.argv[1]):
    if copy and dist.is_main():
        shutil.copytree(*copy)
    if torch.distributed.is_initialized():
        dist.barrier()
    main(args, standalone_mode=False)
"""


def torchrun(tmp, commands: list) -> None:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(driver), json.dumps(commands)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "kd", "align", "match"):
            if k in ra or k in rb:
                assert ra[k] == pytest.approx(rb[k], abs=1e-5, rel=1e-5), (ra["step"], k)
        # the gradient norm to 1e-4: torch's fp32 norm of the hybrid's whole gradient (clip_grad_norm_, unsharded) is
        # itself 3.4e-5 off its float64 norm on this CPU, the sharded one (shard.clip_grad_norm_) 1e-7 (the gradients
        # themselves are equal to 1e-6 per parameter)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], abs=1e-5, rel=1e-4), ra["step"]
        assert ra["tokens"] == rb["tokens"]


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """v2 and the hybrid, one unsharded process at batch 8 and two FSDP2 ranks at batch 4 (v2 checkpoints at
    step 2): name -> (dir, metrics)."""
    root = tmp_path_factory.mktemp("runs")
    fsdp = ("--batch-size", 4, "--shard", "fsdp")
    torchrun(root, [[args_of(cache, root / "v2-fsdp", *V2, *fsdp, "--ckpt-every", 2), None],
                    # step 2's checkpoint, resumed sharded on 2 ranks (test_a_sharded_checkpoint_resumes...)
                    [args_of(cache, root / "v2-resumed", *V2, *fsdp, "--ckpt-every", 2, "--resume"),
                     [str(root / "v2-fsdp"), str(root / "v2-resumed")]],
                    [args_of(cache, root / "hybrid-fsdp", *HYBRID, *fsdp), None],
                    # each layer / block compiled (inductor) before fully_shard wraps it
                    [args_of(cache, root / "v2-fsdp-compiled", *V2, *fsdp, "--compile", "on"), None],
                    [args_of(cache, root / "hybrid-fsdp-compiled", *HYBRID, *fsdp, "--compile", "on"), None]])
    names = ("v2-fsdp", "v2-resumed", "hybrid-fsdp", "v2-fsdp-compiled", "hybrid-fsdp-compiled")
    out = {name: (root / name, metrics(root / name)) for name in names}
    for name, recipe in (("v2", V2), ("hybrid", HYBRID)):
        out[f"{name}-one"] = root / f"{name}-one", distill(cache, root / f"{name}-one", *recipe, "--batch-size", 8)
    return out


@pytest.mark.parametrize("compiled", ["", "-compiled"])
@pytest.mark.parametrize("recipe", ["v2", "hybrid"])
def test_fsdp_at_two_ranks_trains_as_one_process_at_twice_the_batch(runs, recipe, compiled):
    """Sharded, eager or with each layer compiled (--compile on under --shard: sharded_compile), the losses and
    gradient norms of one unsharded eager process at twice the batch."""
    (one_dir, one), (two_dir, two) = runs[f"{recipe}-one"], runs[f"{recipe}-fsdp{compiled}"]
    assert one[0]["loss"] != one[-1]["loss"]
    if recipe == "hybrid":
        assert {r["stage"] for r in one} == {"1", "2"}
    assert_same(two, one)
    config = json.loads((two_dir / "distill_config.json").read_text())
    assert config["shard"] == "fsdp"


@pytest.mark.parametrize("recipe", ["v2", "hybrid"])
def test_the_sharded_run_saves_the_unsharded_runs_student(runs, recipe):
    import torch
    from safetensors import safe_open

    def weights(run):
        with safe_open(str(run / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    (one, one_meta), (two, two_meta) = weights(runs[f"{recipe}-one"][0]), weights(runs[f"{recipe}-fsdp"][0])
    assert one.keys() == two.keys() and one_meta == two_meta
    doc = [json.loads((runs[f"{recipe}-{run}"][0] / "student.json").read_text()) for run in ("one", "fsdp")]
    assert doc[0]["params"] == doc[1]["params"] and doc[0]["config"] == doc[1]["config"]
    # atol 1e-5: the sharded run sums gradients in another order, and Adam turns those fp32 rounding differences
    # into steps of the full learning rate where a gradient is near zero (the zero-initialised gate weights: up to
    # 2e-6 apart after 4 steps, transformers 5.25); a missing or doubled gradient reduction moves weights by ~lr
    # (3e-3 here), far beyond this
    for k in one:
        assert two[k].dtype == one[k].dtype and torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_sharded_checkpoint_resumes_on_one_rank_and_on_two(cache, runs, tmp_path, ranks):
    """The FSDP2 run's step-2 checkpoint (torch.distributed.checkpoint's shards) continues at the same global batch
    unsharded on 1 rank, and sharded on 2, retraining steps 3 and 4 with the same losses."""
    run_dir, two = runs["v2-fsdp"]
    assert (run_dir / "checkpoints" / "step-0000002" / "sharded").is_dir()
    if ranks == 2:  # the runs fixture's, from a copy of the run taken before anything resumed it
        resumed = runs["v2-resumed"][1]
    else:
        shutil.copytree(run_dir, tmp_path / "run")
        resumed = distill(cache, tmp_path / "run", *V2, "--batch-size", 8, "--ckpt-every", 2, "--resume")
    assert_same(resumed, two)
    assert len(resumed) == 4 and resumed[-1]["loss"] != resumed[1]["loss"]


def test_shard_refusals_are_one_line(cache, tmp_path):
    import torch

    from tcache.errors import TcacheError
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.shard import resolve_shard
    from tcache.teachercache.manifest import load_manifest

    with pytest.raises(TcacheError) as e:
        DistillConfig(cache=str(cache), out=str(tmp_path / "a"), recipe="hybrid", train="lora", shard="fsdp")
    assert "--train lora" in str(e.value) and "; " in str(e.value) and "\n" not in str(e.value)
    cfg = DistillConfig(cache=str(cache), out=str(tmp_path / "b"), recipe="v2", shard="fsdp")
    with pytest.raises(TcacheError, match="torchrun") as e:  # one process: nothing to shard over
        resolve_shard(cfg, load_manifest(cache), torch.device("cpu"), None, torch.float32)
    assert "; " in str(e.value) and "\n" not in str(e.value)
    assert not resolve_shard(DistillConfig(cache=str(cache), out=str(tmp_path / "c"), recipe="v2"),
                             load_manifest(cache), torch.device("cpu"), None, torch.float32)  # auto on CPU: none
    from click.testing import CliRunner

    from tcache.cli.main import main

    for extra in (["--recipe", "v2"], ["--recipe", "hybrid", "--qk-merge"]):  # the CLI: one line, exit status 1
        r = CliRunner().invoke(main, args_of(cache, tmp_path / "d", *extra, "--shard", "fsdp"))
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "--shard none" in r.output, r.output


def test_plan_prints_bytes_per_rank_and_trains_nothing(cache, runs, tmp_path):
    """`distill --plan`: the student's parameters counted on the meta device are the trained student's; weights,
    gradients and AdamW state split over the ranks, activations do not; the fewest GPUs that fit."""
    from click.testing import CliRunner

    from tcache.cli.main import main
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.shard import FIT_FRACTION, plan
    from tcache.teachercache.manifest import load_manifest

    cfg = DistillConfig(cache=str(cache), out=str(tmp_path / "p"), recipe="hybrid", batch_size=8)
    p = plan(cfg, load_manifest(cache), 2**40)
    trained = json.loads((runs["hybrid-one"][0] / "student.json").read_text())["params"]  # at stage I's start
    assert p["params"] == trained["total"] and p["trainable"] == trained["total"]  # stage II trains every one
    v2 = plan(DistillConfig(cache=str(cache), out=str(tmp_path / "q"), recipe="v2"), load_manifest(cache), 2**40)
    trained = json.loads((runs["v2-one"][0] / "student.json").read_text())["params"]
    assert (v2["params"], v2["trainable"]) == (trained["total"], trained["trainable"])
    one, two = p["per_rank"][1], p["per_rank"][2]
    assert two["weights"] == -(-p["params"] * 4 // 2) and two["optimizer"] == -(-p["trainable"] * 8 // 2)
    assert two["activations"] == one["activations"] and p["smallest_world"] == 1
    capacity = int(sum(two.values()) / FIT_FRACTION) + 1  # 2 sharded ranks fit, 1 unsharded does not
    assert plan(cfg, load_manifest(cache), capacity)["smallest_world"] == 2
    r = CliRunner().invoke(main, ["distill", str(cache), "--out", str(tmp_path / "p"), "--recipe", "hybrid", "--plan",
                                  "--max-gpu-memory", str(capacity)])
    assert r.exit_code == 0, r.output
    assert "2 GPUs (--shard fsdp)" in " ".join(r.output.split()) and not (tmp_path / "p").exists()


def test_a_gathered_state_dict_saves_tied_weights_as_the_model_does(tmp_path):
    """A full state dict holds its own copy of each name of a tied weight (a hybrid's embedding and head); the
    saved file stores it once, under the name and with the metadata that safetensors' save_model writes."""
    import torch
    from safetensors import safe_open

    from tcache.student.models.io import _save_weights

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    _save_weights(model, tmp_path / "model.safetensors", None)
    _save_weights(model, tmp_path / "gathered.safetensors", {k: v.clone() for k, v in model.state_dict().items()})
    files = [safe_open(str(tmp_path / name), "pt") for name in ("model.safetensors", "gathered.safetensors")]
    assert list(files[0].keys()) == list(files[1].keys()) and len(files[0].keys()) == 1
    assert files[0].metadata() == files[1].metadata()
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in files[0].keys())


@pytest.mark.parametrize("recipe", ["v2", "hybrid"])
def test_under_sharding_each_layer_is_compiled_on_its_own(cache, tmp_path, recipe):
    """--compile on with --shard: each decoder layer / xLSTM block compiled in place (layer scope, whatever
    TCACHE_COMPILE_SCOPE says), no whole-step graph, before shard_model wraps them; --compile auto's CUDA graphs
    become `on` (FSDP2's collectives run between the layers). The runs fixture trains such runs."""
    import torch

    from tcache.student.training import families, shard
    from tcache.student.training.config import DistillConfig
    from tcache.teachercache.manifest import load_manifest

    cfg = DistillConfig(cache=str(cache), out=str(tmp_path / "r"), recipe=recipe, compile="on", device="cpu",
                        precision="fp32")
    build = families.FAMILIES["hybrid" if recipe == "hybrid" else "xlstm"]
    model, info = build(cfg, load_manifest(cache), torch.device("cpu"), None, sharded=True)
    assert info["compile"] == "on" and info["compile_scope"] == "layer" and "step_compile" not in info
    assert all(block._compiled_call_impl is not None for block in shard.blocks(model))
    assert families.sharded_compile("cudagraphs") == "on" and families.sharded_compile("off") == "off"
