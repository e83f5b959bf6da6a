"""Cost model (ds_burst.plan): predictions, the command line, calibration files (and the calibrate command on
gloo ranks), projection and validation against recorded benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

from ds_burst.cli.bench_check import validate_bench
from ds_burst.cli.plan import main
from ds_burst.core.cost import backward_bytes_per_token
from ds_burst.core.cost_model import (
    CALIBRATION_FORMAT,
    HARDWARE_FIELDS,
    Hardware,
    Problem,
    choose,
    load_calibration,
    predict,
    rates_from_kernel_bench,
)


def _by(preds, schedule, backward):
    return next(x for x in preds if x.schedule == schedule and x.backward == backward)


def test_matches_the_measured_two_gpu_ring_within_10_percent():
    # docs/BENCHMARKS.md: 2 H200, S=128K causal, H=32, D=128: fwd 140.9 ms, fwd+bwd 607.4 ms
    pred = _by(predict(Problem(131072, 1, 2, 32, 32, 128)), "ring", "burst")
    assert abs(pred.fwd_ms - 140.9) / 140.9 < 0.1
    assert abs(pred.total_ms - 607.4) / 607.4 < 0.1


def test_topology_aware_schedules_beat_the_flat_ring_across_nodes():
    preds = predict(Problem(131072, 4, 8, 32, 8, 128))
    flat = _by(preds, "ring", "ring")
    assert _by(preds, "double_ring", "ring").total_ms < flat.total_ms
    assert _by(preds, "ulysses_ring", "ring").total_ms < flat.total_ms
    assert choose(Problem(131072, 4, 8, 32, 8, 128), implemented_only=False).schedule != "ring"


def test_backward_choice_follows_bytes_when_communication_bound():
    slow = Hardware(intra_gbps=2.0)  # a crude slow link: communication dominates
    mha = predict(Problem(16384, 1, 4, 32, 32, 128), slow)
    gqa = predict(Problem(16384, 1, 4, 32, 8, 128), slow)
    assert _by(mha, "ring", "burst").bwd_ms < _by(mha, "ring", "ring").bwd_ms
    assert _by(gqa, "ring", "ring").bwd_ms < _by(gqa, "ring", "burst").bwd_ms


def test_bad_problem_is_rejected():
    with pytest.raises(ValueError, match="divisible by kv_heads"):
        predict(Problem(4096, 1, 2, 32, 5, 128))
    with pytest.raises(ValueError, match="divisible by 2 \\* world"):
        predict(Problem(4098, 1, 2, 32, 8, 128))


def test_command_line_prints_table_and_choice():
    out = subprocess.run([sys.executable, "-m", "ds_burst.plan", "--seq", "1048576", "--nodes", "4",
                          "--gpus-per-node", "8", "--heads", "32", "--kv-heads", "8", "--head-dim", "128"],
                         capture_output=True, text=True, check=True).stdout
    assert "ulysses_ring" in out and "choice: schedule=double_ring" in out


def test_auto_schedule_choice():
    from ds_burst.core.cost_model import choose_schedule

    assert choose_schedule(131072, 1, 8, 32, 8, 128, 2, True) == "ring"  # one node
    assert choose_schedule(131072, 4, 8, 32, 8, 128, 2, True) in ("double_ring", "ulysses_ring")


def test_memory_command_line():
    out = subprocess.run([sys.executable, "-m", "ds_burst.plan", "--memory", "--seq", "131072", "--nodes", "1",
                          "--gpus-per-node", "2", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
                          "--checkpointing", "--lm-head-chunk", "4096"], capture_output=True, text=True, check=True)
    assert "ZeRO-3" in out.stdout and "total" in out.stdout and out.stderr == ""


# ---------------------------------------------------------------------------------------------
# calibration, figures from files, projection, validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
MEASURED = [f for f in HARDWARE_FIELDS if not f.startswith("peer_")]


def _ring_comm_ms(seq: int, world: int, heads: int, kv_heads: int, d: int, gbps: float) -> float:
    """Transfer ms of the flat ring's forward (K, V) and Burst backward over one link, latency excluded."""
    s = seq // world
    per_tok = 2 * kv_heads * d * 2 + backward_bytes_per_token("burst", heads, kv_heads, d, 2)
    return (world - 1) * s * per_tok / (gbps * 1e9) * 1e3


def _json_predictions(capsys, argv: list[str]) -> dict:
    main(argv + ["--json"])
    out = json.loads(capsys.readouterr().out)
    return {(x["schedule"], x["backward"]): x for x in out["predictions"]}


def test_calibrate_command_on_four_gloo_ranks_as_two_nodes(tmp_path):
    path = tmp_path / "calib.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "-m", "ds_burst.plan",
                    "calibrate", "--out", str(path), "--gpus-per-node", "2", "--kernel", "torch", "--tile-tokens",
                    "64", "--heads", "2", "--head-dim", "16", "--p2p-mib", "0.25", "--iters", "2"],
                   check=True, capture_output=True, text=True, env=env, timeout=240)
    doc = json.loads(path.read_text())
    assert doc["format"] == CALIBRATION_FORMAT
    meta, hw, meas = doc["meta"], doc["hardware"], doc["measurements"]
    assert (meta["world"], meta["nodes"], meta["gpus_per_node"], meta["kernel"]) == (4, 2, 2, "torch")
    assert sorted(hw) == sorted(MEASURED) and meta["not_measured"] == []
    assert all(v > 0 for v in hw.values())
    # the figures are what the raw timings say
    causal, full = meas["kernel"]["causal"], meas["kernel"]["full"]
    assert (causal["q_tokens"], causal["k_tokens"], full["q_tokens"], full["k_tokens"]) == (64, 64, 64, 32)
    flops = 4.0 * 2 * 64 * 64 * 16 * 0.5
    assert hw["fwd_tflops"] == pytest.approx(flops / (causal["fwd_ms"] * 1e-3) / 1e12, rel=1e-9)
    assert hw["bwd_tflops_full"] == pytest.approx(2.5 * flops / (full["bwd_ms"] * 1e-3) / 1e12, rel=1e-9)
    for link in ("intra", "inter"):
        m = meas[link]
        wire = (m["large_ms"] - m["small_ms"] if m["large_ms"] > m["small_ms"] else m["large_ms"]) * 1e-3
        assert hw[f"{link}_gbps"] == pytest.approx(2**18 / wire / 1e9, rel=1e-9)
        assert hw[f"{link}_latency_s"] == pytest.approx(m["small_ms"] * 1e-3, rel=1e-9)
    # the model uses the file: comm time of the flat ring over 2 nodes follows the measured inter-node link
    calib = load_calibration(str(path))
    assert asdict(calib) == asdict(Hardware()) | hw
    ring = _by(predict(Problem(8192, 2, 2, 32, 32, 128), calib), "ring", "burst")
    assert ring.comm_ms == pytest.approx(_ring_comm_ms(8192, 4, 32, 32, 128, hw["inter_gbps"]), rel=1e-9)


def test_calibration_file_drives_the_prediction(tmp_path, capsys):
    figures = {"fwd_tflops": 400.0, "bwd_tflops": 300.0, "intra_gbps": 20.0, "intra_latency_s": 1e-5}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": CALIBRATION_FORMAT, "meta": {}, "hardware": figures}))
    argv = ["--seq", "131072", "--nodes", "1", "--gpus-per-node", "4", "--calibration", str(path)]
    base = _json_predictions(capsys, argv)[("ring", "burst")]
    assert base["comm_ms"] == pytest.approx(_ring_comm_ms(131072, 4, 32, 32, 128, 20.0), rel=1e-12)
    # half the bandwidth in the file: twice the transfer time, and more exposed communication
    path.write_text(json.dumps({"format": CALIBRATION_FORMAT, "hardware": figures | {"intra_gbps": 10.0}}))
    slow = _json_predictions(capsys, argv)[("ring", "burst")]
    assert slow["comm_ms"] == pytest.approx(2 * base["comm_ms"], rel=1e-12)
    assert slow["total_ms"] > base["total_ms"] and slow["exposed_comm_ms"] > base["exposed_comm_ms"]
    # a flag overrides the file; compute-bound forward time scales with the kernel rate
    fast = _json_predictions(capsys, argv + ["--intra-gbps", "1000", "--fwd-tflops", "200"])[("ring", "burst")]
    s = 131072 // 4
    c = 4.0 * 32 * s * s * 128 * 0.5 / 200e12
    assert fast["fwd_ms"] == pytest.approx(4 * c * 1e3, rel=1e-12)  # 4 compute-bound steps, comm hidden


def test_unmasked_tile_rates_apply_to_the_later_ring_steps():
    p = Problem(131072, 1, 2, 32, 32, 128)
    c = 4.0 * 32 * 65536**2 * 128 * 0.5
    pred = _by(predict(p, Hardware(fwd_tflops=500, bwd_tflops=250, fwd_tflops_full=1000, bwd_tflops_full=500,
                                   intra_gbps=1e6)), "ring", "burst")
    assert pred.fwd_ms == pytest.approx((c / 500e12 + c / 1000e12) * 1e3, rel=1e-6)
    assert pred.bwd_ms == pytest.approx(2.5 * (c / 250e12 + c / 500e12) * 1e3, rel=1e-6)


def test_bad_calibration_file_is_rejected(tmp_path):
    def write(doc) -> str:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        return str(path)

    with pytest.raises(ValueError, match="unknown figures \\['nvlink'\\]"):
        load_calibration(write({"format": CALIBRATION_FORMAT, "hardware": {"nvlink": 1.0}}))
    with pytest.raises(ValueError, match="intra_gbps must be a finite positive number"):
        load_calibration(write({"format": CALIBRATION_FORMAT, "hardware": {"intra_gbps": -3}}))
    with pytest.raises(ValueError, match="expected format"):
        load_calibration(write({"hardware": {}}))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(write("{"))
    with pytest.raises(ValueError, match="cannot read calibration file"):
        load_calibration(str(tmp_path / "missing.json"))
    with pytest.raises(SystemExit):  # the command line turns it into a usage error
        main(["--seq", "4096", "--calibration", str(tmp_path / "missing.json")])


def test_default_kernel_rates_are_the_tuned_benchmark_file():
    rates = rates_from_kernel_bench(os.path.join(RESULTS, "kernels_tuned.json"))
    assert rates["fwd_tflops"] == pytest.approx(Hardware().fwd_tflops, abs=0.5)
    assert rates["bwd_tflops"] == pytest.approx(Hardware().bwd_tflops, abs=0.5)
    assert rates["fwd_tflops_full"] < rates["fwd_tflops"] < rates_from_kernel_bench(
        os.path.join(RESULTS, "kernels_tuned.json"), "sdpa-cudnn")["fwd_tflops"]


def test_validate_against_the_recorded_ring_benchmark():
    rows = validate_bench(os.path.join(RESULTS, "ring_tuned.json"))
    done = [r for r in rows if "skipped" not in r]
    assert [r["method"] for r in done] == ["ds-burst-triton"]
    (r,) = done
    assert (r["schedule"], r["backward"], r["nodes"]) == ("ring", "burst", 1)
    assert r["pred_fwdbwd_ms"] == pytest.approx(_by(predict(Problem(131072, 1, 2, 32, 32, 128)), "ring",
                                                    "burst").total_ms)
    assert r["err_fwdbwd"] == pytest.approx(r["pred_fwdbwd_ms"] / 607.38330078125 - 1)
    with_peers = validate_bench(os.path.join(RESULTS, "ring_tuned.json"),
                                kernel_bench=os.path.join(RESULTS, "kernels_tuned.json"))
    assert {r["method"] for r in with_peers if "skipped" not in r} == {"ds-burst-triton", "ulysses-cudnn",
                                                                       "ulysses-flash"}


def test_validate_reads_simulated_nodes_from_the_benchmark_command(tmp_path):
    row = {"method": "ds-burst-triton-double_ring", "S": 65536, "P": 4, "Hq": 32, "Hkv": 8, "D": 128,
           "fwd_ms": 10.0, "fwdbwd_ms": 40.0}
    path = tmp_path / "ring.json"
    path.write_text(json.dumps({"meta": {"command": "launch/bench_ring.py --gpus-per-node 2 --schedules double_ring"},
                                "rows": [row, {"method": "ds-burst-triton", "S": 65536, "P": 4, "error": "OOM"}]}))
    got, skipped = validate_bench(str(path))
    pred = _by(predict(Problem(65536, 2, 2, 32, 8, 128)), "double_ring", "ring")
    assert (got["nodes"], got["schedule"], got["backward"]) == (2, "double_ring", "ring")
    assert got["err_fwd"] == pytest.approx(pred.fwd_ms / 10.0 - 1)
    assert "OOM" in skipped["skipped"]


def test_projection_command(tmp_path, capsys):
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    main(["project", "--seqs", "131072", "1048576", "--out", str(out), "--plot", str(png),
          "--peer-kernel-bench", os.path.join(RESULTS, "kernels_tuned.json") + ":sdpa-cudnn"])
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert "| 1M | 8 |" in table and "DeepSpeed-Ulysses (sdpa-cudnn rates)" in table
    for seq in (131072, 1048576):
        for hkv in (32, 8):
            mine = {r["schedule"]: r for r in rows if r["S"] == seq and r["Hkv"] == hkv}
            assert set(mine) == {"ring", "double_ring", "ulysses_ring", "ulysses", "ulysses_peer"}
            preds = predict(Problem(seq, 4, 8, 32, hkv, 128))
            for name in ("ring", "double_ring", "ulysses_ring", "ulysses"):
                assert mine[name]["total_ms"] == min(x.total_ms for x in preds if x.schedule == name)
            chosen = [r for r in mine.values() if r["chosen"]]
            assert len(chosen) == 1 and chosen[0]["schedule"] == choose(Problem(seq, 4, 8, 32, hkv, 128)).schedule
            assert mine["ulysses_peer"]["total_ms"] < mine["ulysses"]["total_ms"]  # cuDNN is the faster kernel
    assert png.stat().st_size > 0
