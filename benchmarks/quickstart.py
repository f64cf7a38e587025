"""The README quickstart, run literally: every command of its first bash block, in a fresh directory beside a
link to ../shared, timed, with the perplexities it prints. Writes results/quickstart-cpu.md.

    python benchmarks/quickstart.py [--shared ../shared] [--out benchmarks/results/quickstart-cpu.md]

Run it on the machine the README's numbers are for (the 2-core CPU one); nothing else should be running.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.env import ROOT, child_env, describe
from harness.results import table

MARK = "<!-- quickstart:"


def quickstart_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """The commands of the first ```bash block after the quickstart marker."""
    text = readme.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARK):], re.S)
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def perplexity(stdout: str) -> float | None:
    """The perplexity column of `tcache eval`'s table (its one data row)."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 4 and re.fullmatch(r"[\d.]+", cells[3]):
            return float(cells[3])
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart-cpu.md"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tcache-quickstart-"))
    (tmp / "shared").symlink_to(Path(a.shared).resolve())
    work = tmp / "work"
    work.mkdir()
    # the installed `tcache` script, as a user runs it; this checkout's package first if not installed
    env = child_env(COLUMNS="100")
    rows, t0 = [], time.time()
    for cmd in quickstart_commands():
        t = time.time()
        argv = shlex.split(cmd)
        argv = [sys.executable, "-m", "tcache", *argv[1:]] if argv[0] == "tcache" else argv
        p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over the children so far
        rows.append((cmd, time.time() - t, p.returncode, perplexity(p.stdout) if " eval " in cmd else None,
                     peak_kib))
        print(f"{time.time() - t:7.1f} s  rc {p.returncode}  {cmd}", flush=True)
        if p.returncode != 0:
            print(p.stdout[-2000:], p.stderr[-2000:])
            break
    total = time.time() - t0
    on = describe("cpu")
    ppl = [r[3] for r in rows if r[3] is not None]
    lines = ["# The README quickstart on this machine", "",
             f"Command: `python benchmarks/quickstart.py` ({on['device']}, "
             f"{os.cpu_count()} cores, torch {on['torch']}, {time.strftime('%Y-%m-%d')}); "
             "each command of the README's quickstart block, literally, in a fresh directory.", "",
             *table(["command", "wall s", "exit", "perplexity"],
                    [[f"`{c}`", f"{s:.0f}", rc, "" if p is None else f"{p:.2f}"] for c, s, rc, p, _ in rows])]
    lines += ["", f"Total: {total:.0f} s ({total / 60:.1f} min); peak RSS of any command: "
              f"{max(r[4] for r in rows) / 2**20:.2f} GiB."]
    if len(ppl) == 2:
        lines.append(f"Student {ppl[0]:.2f}, teacher {ppl[1]:.2f}: {ppl[0] / ppl[1]:.3f}x the teacher's perplexity.")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
