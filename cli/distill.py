"""`tcache distill`: options -> DistillConfig -> tcache.student.training.train.distill, with a rich progress bar."""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tcache.cli.format import human_count
from tcache.cli.interrupts import stops_cleanly
from tcache.cli.errors import friendly_errors
from tcache.cli.options import config_file_option, config_from, config_options
from tcache.student.training.config import DistillConfig

LOG_EVERY_S = 10.0  # seconds between loss lines above the bar


@click.command()
@config_file_option(DistillConfig)
@config_options(DistillConfig)
@friendly_errors
@stops_cleanly
def distill(**options) -> None:
    """Train an xLSTM student from a cache alone (the teacher is never loaded)."""
    from tcache.student.training.train import distill as run_distill

    cfg = config_from(DistillConfig, options)
    if cfg.plan:
        return print_plan(cfg)
    if cfg.export:  # before hours of training, not after
        from tcache.student.inference.hf import check_export_target

        check_export_target(cfg.export, cfg.overwrite, "--export")
    out = cfg.out
    targets = None
    if cfg.online_teacher:  # comparison runs: the teacher computes each batch's targets now
        from tcache.device import resolve_device
        from tcache.teachercache.manifest import load_manifest
        from tcache.teachercache.online import online_targets

        targets = online_targets(cfg.online_teacher, load_manifest(cfg.cache), resolve_device(cfg.device))
    from tcache import dist

    console = Console(stderr=True, quiet=not dist.is_main())  # under torchrun: rank 0 reports for all ranks
    # The bar row keeps to what fits 80 columns (bar, steps, elapsed, ETA); the loss figures go on their own
    # lines above it, at the first step and then every LOG_EVERY_S. The ETA averages over the whole run:
    # rich's default 30 s window never holds two CPU steps of a minute each, and showed no ETA at all.
    progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, speed_estimate_period=24 * 3600)
    task = None
    last_line = [float("-inf")]

    def on_start(info: dict) -> None:
        nonlocal task
        p = info["params"]
        if "window" in info:  # the hybrid: the teacher's layers, attention replaced
            full = info["full_attention_layers"]
            mixer = {"both": f"window {info['window']} + {info['sinks']} sinks + mLSTM", "mlstm": "mLSTM only",
                     "window": f"window {info['window']} + {info['sinks']} sinks only"}[info["branches"]]
            shape = (f"{info['blocks']} teacher layers, attention -> {mixer}"
                     f"{f' (full attention kept in {full})' if full else ''}")
        else:
            shape = f"{info['blocks']} blocks (sLSTM at {info['slstm_at'] or 'none'}), {info['heads']} heads"
        console.print(f"student: {shape}; params {p['total']:,} total, {p['trainable']:,} trainable, "
                      f"{p['frozen']:,} frozen")
        if "lora" in info:  # --train lora: what stage II trains
            lo = info["lora"]
            console.print(f"stage II LoRA: rank {lo['rank']}, alpha {lo['alpha']:g} on {','.join(lo['targets'])} "
                          f"({lo['modules']} projections); {lo['trainable']:,} trainable ({lo['params']:,} in adapters)")
        if len(info["stages"]) > 1 or info["stages"][0]["stage"] != "distill":
            console.print("stages: " + ", ".join(f"{s['stage']} ({s['loss']}, {s['steps']} steps, lr {s['lr']:g})"
                                                 for s in info["stages"]))
        console.print(
            f"kernels: mLSTM {info['mlstm_kernel']}, sLSTM {info['slstm_backend']}; {info['device']} "
            f"{info['precision']}; {info['total_steps']} steps x {info['tokens_per_step']:,} tokens"
            + (f"; resumed at step {info['resumed_from_step']}" if info["resumed_from_step"] is not None else "")
        )
        if info.get("compile", "off") != "off":  # else a bar stuck at step 0 for minutes looks like a hang
            console.print(f"compile: {info['compile']}, {info.get('compile_scope', 'layer')} scope; the first step of "
                          "each stage compiles (minutes on a machine's first run, far less once torch.compile's "
                          "cache holds it)")
        progress.start()
        task = progress.add_task("distill", total=info["total_steps"], completed=info["resumed_from_step"] or 0)

    def on_step(r: dict, plan) -> None:
        if "match" in r:  # the hybrid's stage I
            terms = f"stage {r['stage']} match {r['match']:.4f}"
        else:
            terms = (f"ce {r['ce']:.3f} kd {r['kd']:.3f} al {r['align']:.3f} a {r['alpha']:.2f} b {r['beta']:.2f} "
                     f"T {r['temperature']:.2f}")
        progress.update(task, completed=r["step"])
        now = time.monotonic()
        if now - last_line[0] >= LOG_EVERY_S or r["step"] == plan.total_steps:
            last_line[0] = now
            progress.console.print(f"step {r['step']}/{plan.total_steps} {terms} lr {r['lr']:.1e} "
                                   f"gn {r['grad_norm']:.2f} {human_count(r['tokens_per_s'])} tok/s")

    try:
        meta = run_distill(cfg, on_start, on_step, warn=lambda msg: console.print(f"[yellow]warning[/]: {msg}"),
                           targets=targets)
    finally:
        progress.stop()
    t = meta["trained"]
    console.print(f"[green]student saved[/]: {out}  {t['steps']} steps, {t['tokens']:,} tokens, {t['seconds']:.0f} s")
    if cfg.export and dist.is_main():
        from tcache.student.inference.hf import export_student

        export_student(out, cfg.export, overwrite=cfg.overwrite)
        console.print(f"[green]exported[/]: {cfg.export}  (AutoModelForCausalLM.from_pretrained(..., "
                      "trust_remote_code=True))")


def print_plan(cfg: DistillConfig) -> None:
    """--plan: student/training/shard.plan as a table (nothing is loaded but the cache's manifest and config), for
    GPUs of --max-gpu-memory, else this machine's, else 80 GB."""
    import torch
    from rich.table import Table

    from tcache.cli.format import human_bytes
    from tcache.student.training.shard import plan
    from tcache.teachercache.manifest import load_manifest
    from tcache.units import parse_bytes

    if cfg.max_gpu_memory is not None:
        capacity = parse_bytes(cfg.max_gpu_memory)
    else:
        capacity = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 10**9
    p = plan(cfg, load_manifest(cfg.cache), capacity)
    t = Table(title=f"distill --plan: {p['params']:,} parameters, {p['trainable']:,} trained; bytes per GPU rank at "
                    f"--batch-size {p['batch_size']} x {p['seq_len']} tokens")
    t.add_column("")
    for n in p["per_rank"]:
        t.add_column("1 GPU, unsharded" if n == 1 else f"{n} GPUs, --shard fsdp", justify="right")
    for row in ("weights", "gradients", "optimizer", "activations"):
        t.add_row(row + (" (estimate)" if row == "activations" else ""),
                  *(human_bytes(m[row]) for m in p["per_rank"].values()))
    t.add_row("[bold]total", *(f"[bold]{human_bytes(sum(m.values()))}" for m in p["per_rank"].values()))
    console = Console()
    console.print(t)
    n = p["smallest_world"]
    fits = (f"{n} GPU{'s' if n > 1 else ''}" + (" (--shard fsdp)" if n > 1 else " (no sharding)") if n
            else "none: one rank's activations alone do not fit; lower --batch-size or pass --checkpointing on")
    console.print(f"fewest GPUs of {human_bytes(capacity)} that fit it ({p['fit_fraction']:.0%} of each): {fits}")
