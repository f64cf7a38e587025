"""`--config FILE`: options from YAML, the command line over the file over the defaults, and the config.yaml
saved beside a cache and a distill run repeating it exactly."""

from __future__ import annotations

import json

import pytest
import yaml
from click.core import ParameterSource
from click.testing import CliRunner

from conftest import text_head
from tcache import ownership
from tcache.cli.build import build
from tcache.cli.distill import distill
from tcache.cli.main import main
from tcache.cli.options import config_from
from tcache.cli.plan import plan
from tcache.student.training.config import DistillConfig
from tcache.student.training.schedules import Anneal
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.manifest import load_manifest
from tcache.text import DataSpec
from test_cli_build import assert_clean_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write(path, text: str):
    path.write_text(text)
    return path


def parse(command, *args):
    """The options click resolves for `command args`, without running it."""
    return command.make_context(command.name, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_teacher, valid_jsonl):
    """A cache built from a config file, with --top-k overriding the file's top_k."""
    d = tmp_path_factory.mktemp("configfile")
    data = text_head(valid_jsonl, d / "data.jsonl", chars=2000)
    conf = write(d / "build.yaml", f"teacher: {tiny_teacher}\ndata: {{path: {data}}}\ntokens: 0.5k\n"
                                   "seq-len: 64\ntop_k: 8\nshard-rows: 3\ndevice: cpu\n")
    r = run("build", "--config", conf, "--top-k", 4, "--out", d / "cache")
    assert r.exit_code == 0, r.output
    return d


def test_build_from_a_file_then_again_from_its_saved_config_is_byte_identical(built):
    cache = built / "cache"
    m = load_manifest(cache)
    # the command line's --top-k won over the file's; the file's seq-len, shard-rows and tokens were used
    assert (m.top_k, m.seq_len, m.rows_per_shard, m.tokens, len(m.shards)) == (4, 64, 3, 448, 3)
    saved = yaml.safe_load((cache / "config.yaml").read_text())
    assert saved["top_k"] == 4 and saved["tokens"] == 500 and saved["batch_size"] == 0
    assert saved["data"] == {"path": str(built / "data.jsonl"), "config": None, "split": "train", "text_field": "text"}
    assert saved["overwrite"] is False and saved["resume"] is False and saved["out"] == str(cache)
    # the saved file is one tcache wrote: --overwrite may replace it, verify accepts the cache
    assert ownership.foreign(cache) == []
    r = run("verify", cache)
    assert r.exit_code == 0, r.output
    # the same --out again is refused (the saved config names it), leaving the cache as it was
    assert_clean_error(run("build", "--config", cache / "config.yaml"), "is a tcache cache", "--overwrite")
    r = run("build", "--config", cache / "config.yaml", "--out", built / "again")
    assert r.exit_code == 0, r.output
    again = load_manifest(built / "again")
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in m.shards]
    resaved = yaml.safe_load((built / "again" / "config.yaml").read_text())
    assert resaved == {**saved, "out": str(built / "again")}


def test_distill_again_from_its_saved_config_gives_the_same_losses(tmp_path, built):
    first = tmp_path / "first"
    r = run("distill", built / "cache", "--out", first, "--steps", 2, "--batch-size", 2, "--grad-accum", 1,
            "--device", "cpu", "--seed", 3, "--lr", "1e-3", "--slstm-at", "1", "--alpha", "0.7:0.4", "--delta", 0.2)
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["alpha"] == {"start": 0.7, "final": 0.4, "delta": 0.2} and saved["slstm_at"] == [1]
    assert saved["cache"] == str(built / "cache") and saved["resume"] is False
    r = run("distill", "--config", first / "config.yaml", "--out", tmp_path / "second")
    assert r.exit_code == 0, r.output

    def lines(run_dir):
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    a, b = lines(first), lines(tmp_path / "second")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert [ra[k] for k in ("ce", "kd", "align", "loss", "lr", "alpha")] == \
               [rb[k] for k in ("ce", "kd", "align", "loss", "lr", "alpha")]
    ja = json.loads((first / "distill_config.json").read_text())
    jb = json.loads((tmp_path / "second" / "distill_config.json").read_text())
    assert jb == {**ja, "out": str(tmp_path / "second")}


def test_the_command_line_wins_then_the_file_then_the_defaults(tmp_path):
    conf = write(tmp_path / "c.yaml", "teacher: t\ndata: corpus.jsonl\ndata-config: sample\ntext_field: body\n"
                                      "tokens: 2M\nout: o\nseq_len: 256\ntop-k: 16\n")
    ctx = parse(build, "--config", conf, "--top-k", 64)
    assert ctx.params["top_k"] == 64 and ctx.get_parameter_source("top_k") is ParameterSource.COMMANDLINE
    assert ctx.params["seq_len"] == 256 and ctx.get_parameter_source("seq_len") is ParameterSource.DEFAULT_MAP
    assert ctx.get_parameter_source("hidden_groups") is ParameterSource.DEFAULT
    cfg = config_from(BuildConfig, dict(ctx.params))
    assert cfg.data == DataSpec("corpus.jsonl", "sample", "train", "body") and cfg.tokens == 2_000_000
    assert (cfg.teacher, cfg.out, cfg.hidden_groups) == ("t", "o", 1)
    # plan shares the file: its --out from the file too; build's per-run fields are not plan options
    ctx = parse(plan, "--config", write(tmp_path / "p.yaml", "teacher: t\ndata: x.jsonl\ntokens: 1k\nout: o\n"
                                                             "overwrite: true\n"))
    assert ctx.params["out"] == "o" and "overwrite" not in ctx.params
    # YAML's own types: `off` and `1` are booleans / numbers to YAML, choices to distill; lists and schedules
    conf = write(tmp_path / "d.yaml", "cache: c\nout: o\nrecipe: hybrid\nstage: 1\ncompile: off\nlr: 1e-5\n"
                                      "full-attention-layers: [0, 2]\nalpha: {start: 0.3, final: 0.1}\n"
                                      "beta: 0.05\n")
    ctx = parse(distill, "--config", conf)
    cfg = config_from(DistillConfig, dict(ctx.params))
    assert (cfg.cache, cfg.stage, cfg.compile, cfg.lr, cfg.full_attention_layers) == ("c", "1", "off", 1e-5, [0, 2])
    assert cfg.alpha == Anneal(0.3, 0.1, 0.0) and cfg.beta == Anneal(0.05, 0.05, 0.0)
    ctx = parse(distill, "--config", conf, "other-cache", "--compile", "on")
    assert (ctx.params["cache"], ctx.params["compile"]) == ("other-cache", "on")


def test_bad_files_are_one_line(tmp_path):
    def err(text, *fragments, command="build"):
        assert_clean_error(run(command, "--config", write(tmp_path / "c.yaml", text)), *fragments)

    err("topk: 4\n", "c.yaml: unknown key 'topk'; did you mean 'top_k'?", "build --help")
    err("data: {path: x, splt: train}\n", "unknown key 'data.splt'; did you mean 'split'?")
    err("teacher: [oops\nout: x\n", "c.yaml is not valid YAML (line 2", "fix the file")
    err("- teacher\n- out\n", "not a mapping")
    err("top_k: [1, 2]\n", "'top_k' takes one value, not a list")
    err("seq_len: 64\nseq-len: 128\n", "'seq-len' and 'seq_len' set the same option")
    err("alpha: {start: 1, end: 0}\n", "'alpha' takes the fields start, final, delta", command="distill")
    assert_clean_error(run("build", "--config", tmp_path / "missing.yaml"), "missing.yaml", "No such file")
    # a required option neither in the file nor on the command line is still click's usual refusal
    r = run("build", "--config", write(tmp_path / "c.yaml", "teacher: t\ntokens: 1k\nout: o\n"))
    assert r.exit_code == 2 and "Missing option '--data'" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("err, says", [(28, "the disk is full; free space, then rerun"),
                                       (122, "the disk quota is exceeded; free space, then rerun"),
                                       (5, "(Input/output error); make its directory writable, then rerun")])
def test_a_config_yaml_that_cannot_be_written_is_one_line_and_leaves_no_partial(tmp_path, monkeypatch, err, says):
    """A full disk (ENOSPC), a quota (EDQUOT) or any other OSError while config.yaml is written: a TcacheError
    naming the path, and the temporary file removed."""
    import os
    from pathlib import Path

    from tcache import configfile
    from tcache.errors import TcacheError

    real = Path.write_text

    def full(self, text, *a, **k):
        real(self, text[:10])  # the temporary is created, then the disk fills
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(Path, "write_text", full)
    cfg = BuildConfig(teacher="t", data=DataSpec("x.jsonl"), tokens="1k", out=str(tmp_path))
    with pytest.raises(TcacheError) as e:
        configfile.write(cfg, tmp_path / "config.yaml", "build")
    msg = str(e.value)
    assert str(tmp_path / "config.yaml") in msg and msg.endswith(says) and "\n" not in msg, msg
    assert list(tmp_path.iterdir()) == []
