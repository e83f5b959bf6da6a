"""The cost model's kernel term by tile length (``ds_burst.core.tile_rates``) and its calibration.

* a table answers the measured rate at a measured length, interpolates in ``log2(tokens)`` between lengths and
  clamps outside them; malformed tables are refused by name;
* ``python -m ds_burst.plan calibrate --tiles`` on CPU writes a table whose every rate is the FLOPs over the time it
  recorded, with the heads shrunk above ``--full-heads-tokens``;
* with a table, ``compute_seconds`` charges each tile the rate at its own length, ``auto`` charges the faster
  kernel, and ``choose_schedule`` inside one node follows the table (ring or ulysses), the flat ring without one;
* the tables shipped in the package load, and ``DS_BURST_TILE_RATES`` replaces them.
"""

from __future__ import annotations

import json
import math

import pytest

from ds_burst.core import cost_model as cm
from ds_burst.core import tile_rates as tr


def _doc(**curves):
    return {"format": tr.TILE_RATES_FORMAT, "gpu": "test", "head_dim": 128, "dtype": "bfloat16", "curves": curves}


def _pts(*pts):
    return [{"tokens": t, "fwd_tflops": f, "bwd_tflops": b} for t, f, b in pts]


def test_rate_interpolates_in_log_tokens_and_clamps():
    t = tr.from_dict(_doc(diag={"triton": _pts((1024, 100, 50), (4096, 300, 150))}))
    assert t.rate("diag", "triton", 1024) == (100, 50)
    assert t.rate("diag", "triton", 2048) == pytest.approx((200, 100))  # half way in log2
    assert t.rate("diag", "triton", 512) == (100, 50) and t.rate("diag", "triton", 1 << 20) == (300, 150)
    with pytest.raises(KeyError, match="no 'step' curve"):
        t.rate("step", "triton", 1024)


@pytest.mark.parametrize("bad, msg", [
    ({"curves": {"diag": {"triton": _pts((2048, 1, 1), (1024, 1, 1))}}}, "strictly increasing"),
    ({"curves": {"diag": {"triton": _pts((1024, 0, 1))}}}, "positive rates"),
    ({"curves": {"tile": {"triton": _pts((1024, 1, 1))}}}, "unknown curve kind"),
    ({"curves": {"diag": {"triton": [{"tokens": 1}]}}}, "each point needs"),
    ({"format": "other"}, "expected format"),
])
def test_malformed_tables_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tr.from_dict(_doc(diag={"triton": _pts((1024, 1, 1))}) | bad)


def test_calibrate_tiles_on_cpu(tmp_path):
    from ds_burst.cli.calibrate import main

    out = tmp_path / "tiles.json"
    main(["calibrate", "--tiles", "--out", str(out), "--sizes", "32", "64", "--heads", "4", "--kv-heads", "2",
          "--head-dims", "8", "--iters", "1", "--full-heads-tokens", "32"][1:])
    doc = json.loads(out.read_text())
    table = tr.read(str(out), 8)
    assert (table.head_dim, table.dtype) == (8, "float32")
    rows = doc["tables"][0]["measurements"]
    assert {(r["kind"], r["kernel"]) for r in rows} == {("diag", "torch"), ("step", "torch"), ("whole", "torch"),
                                                      ("peer", "sdpa-cpu")}
    for r in rows:
        # the whole calls above --full-heads-tokens: heads in proportion; ring tiles keep them (--ring-heads-tokens)
        assert r["heads"] == (4 if r["tokens"] == 32 or r["kind"] in ("diag", "step") else 2), r
        tokens, h = r["tokens"], r["heads"]
        keys = tokens // 2 if r["kind"] == "step" else tokens
        flops = 4.0 * h * tokens * keys * 8 * (1.0 if r["kind"] == "step" else 0.5)
        assert r["flops"] == flops
        f, b = table.rate(r["kind"], r["kernel"], tokens)
        assert f == pytest.approx(flops / (r["fwd_ms"] * 1e-3) / 1e12, rel=1e-12)
        assert b == pytest.approx(2.5 * flops / (r["bwd_ms"] * 1e-3) / 1e12, rel=1e-12)


def _table(ring, whole, peer=1.0, sdpa=None):
    curves = {"diag": {"triton": _pts((1024, ring, ring / 2), (65536, 2 * ring, ring))},
              "step": {"triton": _pts((1024, ring, ring / 2), (65536, 2 * ring, ring))},
              "whole": {"auto": _pts((1024, whole, whole / 2))}, "peer": {"cudnn": _pts((1024, peer, peer / 2))}}
    if sdpa is not None:
        curves["diag"]["sdpa"] = curves["step"]["sdpa"] = _pts((1024, sdpa, sdpa / 2))
    return tr.from_dict(_doc(**curves))


def test_compute_term_charges_each_tile_its_own_rate():
    hw = cm.Hardware(tiles=_table(100.0, 400.0, peer=500.0))
    p = cm.Problem(131072, 1, 8, 32, 8, 128)
    s = 131072 // 8
    rate_f, rate_b = hw.tiles.rate("diag", "triton", s)
    flops = 4.0 * 32 * s * s * 128 * 0.5
    f, b = cm.compute_seconds(p, "ring", hw)
    assert f == pytest.approx(8 * flops / (rate_f * 1e12)) and b == pytest.approx(8 * 2.5 * flops / (rate_b * 1e12))
    whole = 4.0 * 4 * 131072**2 * 128 * 0.5
    assert cm.compute_seconds(p, "ulysses", hw)[0] == pytest.approx(whole / 400e12)
    assert cm.compute_seconds(p, "ulysses", hw, peer=True)[0] == pytest.approx(whole / 500e12)
    # auto charges the kernel with the faster ring pass; a concrete kernel its own curve
    fast = cm.Hardware(tiles=_table(100.0, 400.0, sdpa=1000.0))
    assert cm.ring_kernel(p, fast, s, 8) == "sdpa"
    assert cm.compute_seconds(p, "ring", fast)[0] == pytest.approx(8 * flops / 1000e12)
    assert cm.compute_seconds(p, "ring", fast, kernel="triton")[0] == pytest.approx(f)


def test_kernels_are_ranked_by_one_pass_the_same_way_for_ring_and_whole_call():
    """Forward plus backward at 2.5x the forward's FLOPs, for the ring's tiles and the whole call alike: a kernel
    with the fast forward but the slow backward loses to the even one (``1/f + 1/b`` would rank them the other way)."""
    def pts(f, b):
        return _pts((1024, f, b), (1 << 20, f, b))

    t = tr.from_dict(_doc(diag={"fwd_fast": pts(1000, 300), "even": pts(250, 500)},
                          step={"fwd_fast": pts(1000, 300), "even": pts(250, 500)},
                          whole={"fwd_fast": pts(1000, 300), "even": pts(250, 500)}, peer={"cudnn": pts(1, 1)}))
    hw = cm.Hardware(tiles=t)
    p = cm.Problem(131072, 1, 8, 32, 8, 128)
    assert cm.ring_kernel(p, hw, 16384, 8) == "even"
    assert cm.whole_rates(p, hw, peer=False) == (250, 500)


def test_auto_inside_one_node_follows_the_table(monkeypatch):
    # without a table (CPU, an unknown GPU): the flat ring, as before
    monkeypatch.setattr(cm, "shipped", lambda gpu, d: None)
    cm.hardware_for.cache_clear(), cm.choose_schedule.cache_clear()
    assert cm.choose_schedule(131072, 1, 8, 32, 8, 128, 2, True, "h100") == "ring"
    for ring, whole, want in ((50.0, 600.0, "ulysses"), (600.0, 50.0, "ring")):
        monkeypatch.setattr(cm, "shipped", lambda gpu, d, r=ring, w=whole: _table(r, w))
        cm.hardware_for.cache_clear(), cm.choose_schedule.cache_clear()
        assert cm.choose_schedule(131072, 1, 8, 32, 8, 128, 2, True, "h100") == want
        assert cm.choose_schedule(131072, 1, 8, 32, 8, 128, 4, True, "h100") == "ring"  # fp32: not this table
        # heads the all-to-all cannot split over 8 ranks: never ulysses
        assert cm.choose_schedule(131072, 1, 8, 12, 4, 128, 2, True, "h100") == "ring"
    cm.hardware_for.cache_clear(), cm.choose_schedule.cache_clear()


def test_environment_table_replaces_the_shipped_one(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_table(50.0, 600.0).to_dict() | {"format": tr.TILE_RATES_FORMAT}))
    monkeypatch.setenv("DS_BURST_TILE_RATES", str(path))
    cm.hardware_for.cache_clear(), cm.choose_schedule.cache_clear()
    try:
        assert cm.hardware_for(None, 128, 2).tiles == _table(50.0, 600.0)
        assert cm.choose_schedule(131072, 1, 8, 32, 8, 128, 2, True, None) == "ulysses"
        assert cm.hardware_for(None, 64, 2).tiles is None  # no table at this head dim
    finally:
        cm.hardware_for.cache_clear(), cm.choose_schedule.cache_clear()


@pytest.mark.parametrize("gpu", sorted(tr.SHIPPED_GPUS))
def test_shipped_tables_load(gpu):
    table = tr.shipped(gpu, 128)
    if table is None:
        pytest.skip(f"no table shipped for {gpu}")
    for kind in ("diag", "step", "whole", "peer"):
        assert table.kernels(kind), kind
    assert all(math.isfinite(x) for _, _, c in table.curves for p in c for x in p)
