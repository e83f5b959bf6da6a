"""launch/bench_train_memory.py: run specs, the per-method overrides, the estimate, ratios (no jobs started)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import bench_train_memory as btm  # noqa: E402


def test_parse_run():
    assert btm.parse_run("ds-burst:128K") == ("ds-burst", 131072)
    assert btm.parse_run("ulysses-plain:1M") == ("ulysses-plain", 1048576)
    assert btm.parse_run("ulysses:4096") == ("ulysses", 4096)
    for bad in ("ring:128K", "ds-burst", "ds-burst:12x", "ds-burst:"):
        with pytest.raises(argparse.ArgumentTypeError):
            btm.parse_run(bad)


def test_overrides_per_method():
    burst = btm.overrides("ds-burst", 524288, 2, 8192, 1, "/tmp/x")
    assert "train.attention=burst" in burst and "train.model.mlp_tiles=32" in burst
    assert not any("lm_head_chunk_tokens" in o for o in burst)  # the config's chunking stays
    uly = btm.overrides("ulysses", 131072, 2, 8192, 2, "/tmp/x")
    assert "train.attention=ulysses" in uly and "train.model.mlp_tiles=8" in uly
    assert "train.model.keep_attention_layers=0.0" in uly
    plain = btm.overrides("ulysses-plain", 131072, 2, 8192, 2, "/tmp/x")
    assert "train.model.lm_head_chunk_tokens=null" in plain and "train.model.mlp_tiles=1" in plain
    assert "train.eval_batches=0" in plain and "train.steps=2" in plain and "train.seq_len=131072" in plain


def test_estimate_follows_config_and_overrides():
    with open(os.path.join(ROOT, "configs", "h200x2_llama8b.json")) as f:
        config = json.load(f)
    e128 = btm.estimate(config, btm.overrides("ds-burst", 131072, 2, 8192, 1, "/tmp/x"), 2)
    e512 = btm.estimate(config, btm.overrides("ds-burst", 524288, 2, 8192, 1, "/tmp/x"), 2)
    assert e128 is not None and e512 is not None
    assert e128["optimizer"] == 0.0 and e128["host_optimizer"] > 50  # the config offloads the optimizer
    assert e512["total"] > 2.5 * e128["total"]
    plain = btm.estimate(config, btm.overrides("ulysses-plain", 131072, 2, 8192, 1, "/tmp/x"), 2)
    assert plain is not None and plain["logits_peak"] > 5 * e128["logits_peak"]  # logits of all 64K tokens


def test_ratios_and_dry_run(capsys):
    rows = [{"method": "ds-burst", "S": 8, "peak_gib": 1.0}, {"method": "ulysses", "S": 8, "peak_gib": 2.0},
            {"method": "ulysses-plain", "S": 8, "status": "OOM"}]
    btm.add_ratios(rows)
    assert rows[0]["vs_ulysses"] == 0.5 and "vs_ulysses-plain" not in rows[0]
    out = btm.main(["--runs", "ds-burst:128K", "ulysses-plain:256K", "--dry-run"])
    text = capsys.readouterr().out
    assert len(out) == 2 and "deepspeed.launcher.runner" in text and "train.attention=ulysses" in text
