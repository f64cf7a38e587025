"""`tcache distill`: options -> DistillConfig -> student.train.distill, with a rich progress bar."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tcache.cli.format import human_count
from tcache.cli.interrupts import stops_cleanly
from tcache.cli.errors import friendly_errors
from tcache.errors import TcacheError


def parse_anneal(text: str | None, flag: str, delta: float):
    """'0.8:0.5' -> Anneal(0.8, 0.5, delta); '0.3' -> fixed 0.3; None -> the recipe's default."""
    from tcache.student.schedules import Anneal

    if text is None:
        return None
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError:
        raise TcacheError(f"{flag} {text!r} is not a number or START:FINAL pair, e.g. 0.8:0.5") from None
    if len(parts) == 1:
        return Anneal(parts[0], parts[0], 0.0)
    if len(parts) == 2:
        return Anneal(parts[0], parts[1], delta)
    raise TcacheError(f"{flag} {text!r} has too many parts; use VALUE or START:FINAL")


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    if text.strip() in ("", "none"):
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise TcacheError(f"{flag} {text!r} is not a comma-separated list of block indices, e.g. 0,2") from None


@click.command()
@click.argument("cache", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Run directory (student, checkpoints, metrics).")
@click.option("--recipe", default="v1", show_default=True, type=click.Choice(["v1", "v2"]),
              help="v1: floor(L/2) alternating sLSTM/mLSTM, CE+KD+align. v2: L mLSTM blocks, CE+align.")
@click.option("--blocks", type=int, default=None, help="Override the recipe's number of blocks.")
@click.option("--heads", type=int, default=None, help="Override the recipe's heads, roundup(H_t, 4).")
@click.option("--slstm-at", default=None, help="Comma-separated sLSTM block indices ('none' for all mLSTM).")
@click.option("--tokens", default=None, help="Token budget (e.g. 50M); exclusive with --steps/--epochs.")
@click.option("--steps", type=int, default=None, help="Optimizer-step budget.")
@click.option("--epochs", type=float, default=None, help="Passes over the cache (default budget: 1).")
@click.option("--batch-size", default=8, show_default=True, help="Rows per micro-batch.")
@click.option("--grad-accum", default=4, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", default=2e-4, show_default=True, help="Peak learning rate (cosine, warmup).")
@click.option("--warmup", default=0.1, show_default=True, help="Warmup fraction of the steps.")
@click.option("--alpha", default=None, help="KD weight, VALUE or START:FINAL (v1: 0.8:0.5, v2: 0).")
@click.option("--beta", default=None, help="Alignment weight, VALUE or START:FINAL (v1: 0.1, v2: 0.8:0.5).")
@click.option("--temperature", default=None, help="KD temperature, VALUE or START:FINAL (v1: 2:1).")
@click.option("--delta", default=0.05, show_default=True, help="Per-epoch Delta for START:FINAL schedules.")
@click.option("--kd-tail", default="bucket", show_default=True, type=click.Choice(["bucket", "renorm"]),
              help="Teacher mass outside the top-k: a tail bucket, or renormalise over the top-k.")
@click.option("--precision", default="auto", show_default=True, help="auto, fp32, fp16 (T4), bf16.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=-1, show_default=True,
              help="DataLoader worker processes reading the cache; -1: min(4, cores/2) on GPU, 0 on CPU.")
@click.option("--loss-chunk", default=-1, show_default=True,
              help="Positions per chunk of the fused CE+KD (no full logits); 0: full logits; -1: 1024 on GPU, 0 on CPU.")
@click.option("--compile", "compile_", default="auto", show_default=True,
              type=click.Choice(["auto", "off", "on", "cudagraphs"]),
              help="torch.compile each xLSTM block; cudagraphs also replays them as CUDA graphs; auto: cudagraphs on "
                   "GPUs of compute capability >= 8.0, off on a T4 or CPU.")
@click.option("--max-gpu-memory", default=None, help="Cap GPU memory, e.g. 16GB, to test a T4's budget on a larger GPU.")
@click.option("--ckpt-every", default=0, show_default=True, help="Checkpoint every N steps (0: final only).")
@click.option("--resume", is_flag=True,
              help="Continue from the newest checkpoint in --out that loads (same options and cache).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run at --out: the new student is trained beside it and swapped in when complete.")
@click.option("--mlstm-kernel", default="auto", show_default=True,
              help="auto, parallel, chunkwise--native_autograd, chunkwise--triton_xl_chunk.")
@click.option("--slstm-backend", default="auto", show_default=True, help="auto, vanilla, cuda.")
@click.option("--online-teacher", default=None,
              help="Comparison runs only: compute targets with this teacher on the device instead of the cache.")
@friendly_errors
@stops_cleanly
def distill(cache, out, recipe, blocks, heads, slstm_at, tokens, steps, epochs, batch_size, grad_accum, lr,
            warmup, alpha, beta, temperature, delta, kd_tail, precision, device, seed, workers, loss_chunk, compile_,
            max_gpu_memory, ckpt_every, resume, overwrite, mlstm_kernel, slstm_backend, online_teacher) -> None:
    """Train an xLSTM student from a cache alone (the teacher is never loaded)."""
    from tcache.units import parse_count
    from tcache.student.train import DistillConfig, distill as run_distill

    cfg = DistillConfig(
        cache=cache, out=out, recipe=recipe, blocks=blocks, heads=heads,
        slstm_at=parse_int_list(slstm_at, "--slstm-at"),
        tokens=parse_count(tokens) if tokens is not None else None, steps=steps, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
        alpha=parse_anneal(alpha, "--alpha", delta), beta=parse_anneal(beta, "--beta", delta),
        temperature=parse_anneal(temperature, "--temperature", delta), kd_tail=kd_tail,
        precision=precision, device=device, seed=seed, workers=workers, loss_chunk=loss_chunk, compile=compile_,
        max_gpu_memory=max_gpu_memory, ckpt_every=ckpt_every,
        resume=resume, overwrite=overwrite, mlstm_kernel=mlstm_kernel, slstm_backend=slstm_backend,
        online_teacher=online_teacher,
    )
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[m]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = None

    def on_start(info: dict) -> None:
        nonlocal task
        p = info["params"]
        console.print(
            f"student: {info['blocks']} blocks (sLSTM at {info['slstm_at'] or 'none'}), {info['heads']} heads; "
            f"params {p['total']:,} total, {p['trainable']:,} trainable, {p['frozen']:,} frozen"
        )
        console.print(
            f"kernels: mLSTM {info['mlstm_kernel']}, sLSTM {info['slstm_backend']}; {info['device']} "
            f"{info['precision']}; {info['total_steps']} steps x {info['tokens_per_step']:,} tokens"
            + (f"; resumed at step {info['resumed_from_step']}" if info["resumed_from_step"] is not None else "")
        )
        progress.start()
        task = progress.add_task("distill", total=info["total_steps"], completed=info["resumed_from_step"] or 0,
                                 m="")

    def on_step(r: dict, plan) -> None:
        progress.update(task, completed=r["step"], m=(
            f"ce {r['ce']:.3f} kd {r['kd']:.3f} al {r['align']:.3f} a {r['alpha']:.2f} b {r['beta']:.2f} "
            f"T {r['temperature']:.2f} lr {r['lr']:.1e} gn {r['grad_norm']:.2f} {human_count(r['tokens_per_s'])} tok/s"))

    try:
        meta = run_distill(cfg, on_start, on_step, warn=lambda msg: console.print(f"[yellow]warning[/]: {msg}"))
    finally:
        progress.stop()
    t = meta["trained"]
    console.print(f"[green]student saved[/]: {out}  {t['steps']} steps, {t['tokens']:,} tokens, {t['seconds']:.0f} s")
