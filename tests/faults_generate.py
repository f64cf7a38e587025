"""Issue 21, case 10: `tcache generate` streams its tokens, stops at the first SIGINT / SIGTERM with the text so far
(one `Stopped by` line, exit 130 / 143), stops cleanly during the prompt's prefill too, and refuses a
--max-new-tokens outside 1 to 1,000,000 with one `Error:` line. The faults of those rows in
tests/test_reliability.py; the signal rows are `Interrupt` rows (tests/promises.py)."""

from __future__ import annotations

import json

from promises import Case


def _text(case: Case) -> str:
    """The held-out text of the fixture's small corpus: three books' first 8,000 characters (~5,500 tokens)."""
    with open(case.fixtures["text"]) as f:
        return "\n".join(json.loads(line)["text"] for line in f)


def generate(case: Case, model: str, *extra: str, prompt: str = "Hi") -> list[str]:
    return ["generate", str(case.fixtures[model]), "--prompt", prompt, "--device", "cpu", *extra]


def long_prompt(case: Case) -> str:
    return _text(case)[:20_000]
