"""The recall probe (student/inference/probe.py, `tcache probe`): a model that copies perfectly scores 1.0, one that
copies only within a window of W scores 1.0 at d <= W and chance beyond, a unigram model scores chance; the sequences
honour the distance, the span and the seed; the command runs on a real model and refuses bad options in one line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tcache.cli.main import main
from tcache.student.inference.probe import LEAD, ProbeConfig, recall, sequences, token_pool

V = 5000  # random tokens rarely recur outside the span, so the induction oracle below copies it


def copier(window: int | None = None):
    """Logits (B, T, V) of an induction oracle: at each position, the token that followed the most recent earlier
    occurrence of the current token (within `window` positions back, if given); uniform where there is none."""
    def fn(ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        out = torch.zeros(B, T, V)
        for b in range(B):
            for t in range(T):
                lo = 0 if window is None else max(0, t - window)
                prev = [j for j in range(lo, t) if ids[b, j] == ids[b, t] and j + 1 <= t]
                if prev:
                    out[b, t, ids[b, prev[-1] + 1]] = 1.0
        return out
    return fn


def test_sequences_repeat_the_span_at_the_distance_and_follow_the_seed():
    pool = token_pool(V, [0])
    ids, p = sequences(20, 5, 4, pool, seed=3)
    assert ids.shape == (5, LEAD + 20 + 4) and p == LEAD
    assert torch.equal(ids[:, p:p + 4], ids[:, p + 20:p + 24]) and not (ids == 0).any()
    assert torch.equal(ids, sequences(20, 5, 4, pool, seed=3)[0])
    assert not torch.equal(ids, sequences(20, 5, 4, pool, seed=4)[0])
    assert torch.equal(sequences(20, 5, 4, pool, seed=3)[0], sequences(20, 5, 4, pool, seed=3)[0])


def test_a_perfect_copier_scores_one_a_window_copies_within_it_and_a_unigram_model_scores_chance():
    pool = token_pool(V, [0, 1])
    cfg = ProbeConfig(model="x", distances="8,16,40", sequences=40, span=5, seed=1)
    cpu = torch.device("cpu")
    # a random filler token can equal a span token: the oracle then follows the later occurrence, rarely
    assert all(a >= 0.9 for a in recall(copier(), cfg, pool, cpu).values())
    windowed = recall(copier(window=16), cfg, pool, cpu)  # sees d - 1 back while d <= 16
    assert windowed[8] >= 0.9 and windowed[16] >= 0.9 and windowed[40] < 0.15
    unigram = recall(lambda ids: torch.zeros(*ids.shape, V).index_fill_(-1, torch.tensor([7]), 1.0), cfg, pool, cpu)
    assert all(a < 0.01 for a in unigram.values()), unigram  # chance: 1 / 4,998 (token 7 drawn as any other)


def test_probe_command_on_a_real_model_and_its_refusals(tiny_teacher):
    r = CliRunner().invoke(main, ["probe", str(tiny_teacher), "--distances", "8,24", "--sequences", "4",
                                  "--span", "4", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert set(out["accuracy"]) == {"8", "24"} and all(0 <= a <= 1 for a in out["accuracy"].values())
    assert out["chance"] == pytest.approx(1 / (16384 - 1), rel=0.01)
    for args, words in ((["--distances", "4", "--span", "8"], "at least --span"),
                        (["--distances", "a,b"], "not a list of integers"), (["--span", "1"], "at least 2")):
        r = CliRunner().invoke(main, ["probe", str(tiny_teacher), *args])
        assert r.exit_code != 0 and words in r.output and "Traceback" not in r.output, r.output
