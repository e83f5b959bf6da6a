"""launch/train.py end to end on 2 CPU ranks (shortened cpu_tiny config), exact resume, and the pieces it uses
(model, data, config handling) in a single process."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from launch_utils import REPO, deepspeed_launch

from ds_burst.attention.config import BurstConfig
from ds_burst.core.layout import global_index
from ds_burst.training.data import (
    RetrievalTask,
    TokenFile,
    far_labels,
    make_batch,
    sample_indices,
    shard_batch_local,
    write_token_file,
)
from ds_burst.training.losses import sequence_parallel_accuracy, sequence_parallel_loss
from ds_burst.training.model import BurstLlama, ModelConfig

SHORT = ["train_micro_batch_size_per_gpu=4", "train.seq_len=256", "train.steps=16", "train.save_interval=8",
         "train.log_interval=4", "train.progress_bar=false", "train.eval_batches=1",
         "scheduler.params.warmup_num_steps=2"]
# no wandb credentials: the script must choose offline mode by itself
NO_WANDB_ENV: dict[str, str | None] = {"WANDB_MODE": None, "WANDB_API_KEY": None, "NETRC": "/nonexistent/netrc"}


def _metrics(d) -> list[dict]:
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    a, b = str(base / "a"), str(base / "b")
    env_clean = dict(NO_WANDB_ENV)
    log_a = deepspeed_launch(2, "launch/train.py", ["--config", "configs/cpu_tiny.json", "--override", *SHORT,
                                                    f"train.output_dir={a}"], timeout=300, env=env_clean)
    log_b = deepspeed_launch(2, "launch/train.py", ["--config", "configs/cpu_tiny.json", "--override", *SHORT,
                                                    f"train.output_dir={b}", f"train.resume={a}/checkpoints",
                                                    "train.resume_tag=step_8"], timeout=300, env=env_clean)
    return {"a": a, "b": b, "log_a": log_a, "log_b": log_b}


def test_loss_falls_and_summary(runs):
    m = _metrics(runs["a"])
    assert [r["step"] for r in m] == list(range(1, 17))
    first, last = (sum(r["loss"] for r in part) / 4 for part in (m[:4], m[-4:]))
    assert last < first - 0.25, [r["loss"] for r in m]
    for r in m:
        assert r["tokens_per_s"] > 0 and r["attn_comm_bytes"] > 0 and r["peak_mem_gib"] > 0
    with open(os.path.join(runs["a"], "summary.json")) as f:
        s = json.load(f)
    assert s["steps_run"] == 16 and s["world_size"] == 2 and s["sequence_parallel_size"] == 2
    # accuracies are ratios of counts over the eval answers (a float that is not k/n would be a bookkeeping bug)
    far_hits = s["eval_retrieval_acc_far"] * s["eval_far_answers"]
    assert abs(far_hits - round(far_hits)) < 1e-6 and 0 <= round(far_hits) <= s["eval_far_answers"], s
    assert s["eval_retrieval_acc"] >= 0 and s["eval_retrieval_acc"] == s["eval_retrieval_acc"]  # not NaN
    assert s["eval_far_answers"] > 0 and s["chance_acc"] == 0.125 and s["attention"] == "burst"
    assert s["timed_steps"] == 15 and s["step_time_s"] > 0 and s["peak_mem_gib"] > 0
    assert "[train] summary:" in runs["log_a"] and "(chance 0.125)" in runs["log_a"]


def test_ulysses_attention_same_first_loss(runs, tmp_path):
    """train.attention=ulysses (DeepSpeed-Ulysses, contiguous shards) starts from the loss of the burst run."""
    out = str(tmp_path / "u")
    log = deepspeed_launch(2, "launch/train.py", ["--config", "configs/cpu_tiny.json", "--override", *SHORT,
                                                  "train.steps=1", "train.save_interval=0", "train.attention=ulysses",
                                                  "train.wandb.enabled=false", f"train.output_dir={out}"],
                           timeout=300)
    assert "attention ulysses, layout contiguous" in log
    u, a = _metrics(out)[0]["loss"], _metrics(runs["a"])[0]["loss"]
    assert abs(u - a) <= 1e-5 * abs(a), (u, a)


def test_wandb_offline_run_written(runs):
    assert "wandb mode offline" in runs["log_a"]
    offline = glob.glob(os.path.join(runs["a"], "wandb", "offline-run-*"))
    assert offline, os.listdir(runs["a"])
    assert glob.glob(os.path.join(offline[0], "*.wandb"))


def test_resume_gives_identical_losses(runs):
    a, b = _metrics(runs["a"]), _metrics(runs["b"])
    assert "resumed from" in runs["log_b"]
    assert [r["step"] for r in b] == list(range(9, 17))
    assert [r["loss"] for r in b] == [r["loss"] for r in a[8:]]
    assert [r["lr"] for r in b] == [r["lr"] for r in a[8:]]


def test_help_is_accurate():
    out = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in ("--config", "--override", "--print-config", "KEY=VALUE"):
        assert flag in out.stdout


def _train_module():
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import train as train_script
    finally:
        sys.path.pop(0)
    return train_script


def test_print_config_without_distributed(monkeypatch, capsys):
    """--print-config resolves the config without the runtime (no torch.distributed, no DeepSpeed engine): by hand
    the world is the SP size, under a launcher WORLD_SIZE, and only rank 0 prints."""
    train_script = _train_module()

    def no_runtime(*args, **kwargs):
        raise AssertionError("--print-config started the distributed runtime")

    monkeypatch.setattr(train_script, "init_runtime", no_runtime)
    with open(REPO / "configs/cpu_tiny.json") as f:
        raw = json.load(f)
    batch = raw["train_micro_batch_size_per_gpu"] * raw.get("gradient_accumulation_steps", 1)
    argv = ["--config", str(REPO / "configs/cpu_tiny.json"), "--print-config", "--override", "train.steps=3"]
    for env, dp, prints in (({}, 1, True), ({"WORLD_SIZE": "4", "RANK": "0"}, 2, True),
                            ({"WORLD_SIZE": "4", "RANK": "3"}, 2, False)):
        for key in ("WORLD_SIZE", "RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert train_script.main(argv) == {}
        out = capsys.readouterr()
        if not prints:
            assert out.out == "" and out.err == ""
            continue
        cfg = json.loads(out.out)  # stdout is the JSON alone
        assert cfg["deepspeed"]["train_batch_size"] == batch * dp and cfg["train"]["steps"] == 3, cfg
        assert "burst_attention" not in cfg["deepspeed"] and cfg["burst_attention"]["sequence_parallel_size"] == 2
        assert cfg["deepspeed"]["bf16"]["enabled"] is torch.cuda.is_available()
        assert f"dp {dp} x sp 2" in out.err
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        train_script.main(argv)
    assert not torch.distributed.is_initialized()


def test_print_config_under_the_launcher():
    log = deepspeed_launch(2, "launch/train.py", ["--config", "configs/cpu_tiny.json", "--print-config"], timeout=300)
    assert log.count('"deepspeed": {') == 1 and "dp 1 x sp 2 (WORLD_SIZE)" in log, log[-3000:]


def test_step_log_prints_only_measured_numbers(tmp_path, capsys):
    """A step without accuracy (chunked LM head, token files) prints none (no "acc nan"), null in metrics.jsonl;
    a CPU-sized FLOP rate prints in a unit that shows it (not "0.000 TFLOP/s")."""
    train_script = _train_module()
    job = types.SimpleNamespace(is_main=True, tc=types.SimpleNamespace(steps=2, log_interval=1),
                                say=lambda msg: print(f"[train] {msg}"))
    logs = train_script.Logs(str(tmp_path / "metrics.jsonl"), "disabled")
    rec = {"step": 1, "loss": 2.0, "lr": 1e-3, "retrieval_acc": None, "retrieval_acc_far": None,
           "tokens_per_s": 1000.0, "tflops_per_gpu": 2.5e-5, "mfu": None, "step_time_s": 0.5, "data_time_s": 0.01,
           "attn_comm_bytes": 2**20, "peak_mem_gib": 0.1, "rss_mib": 100.0}
    train_script.log_step(job, logs, rec)
    line = capsys.readouterr().out
    assert " acc " not in line and " far " not in line and "nan" not in line and "25 MFLOP/s/GPU" in line, line
    train_script.log_step(job, logs, dict(rec, step=2, retrieval_acc=0.5, retrieval_acc_far=0.25, tflops_per_gpu=294.4,
                                          mfu=0.297))
    line = capsys.readouterr().out
    assert "loss 2.0000 acc 0.500 far 0.250 lr" in line and "294 TFLOP/s/GPU MFU 29.7%" in line, line
    m = _metrics(tmp_path)
    assert m[0]["retrieval_acc"] is None and m[1]["retrieval_acc_far"] == 0.25
    assert [train_script.format_flops(x) for x in (989.0, 0.0417, 1.23e-5, 0.0)] == [
        "989 TFLOP/s", "41.7 GFLOP/s", "12.3 MFLOP/s", "0 FLOP/s"]


def test_config_loading_and_overrides(tmp_path):
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import train as train_script
    finally:
        sys.path.pop(0)
    ds, tc = train_script.load_config(str(REPO / "configs/cpu_tiny.json"),
                                      ["train.steps=3", "burst_attention.backward=ring", "train.wandb.enabled=false"])
    assert tc.steps == 3 and not tc.wandb.enabled and ds["burst_attention"]["backward"] == "ring"
    assert BurstConfig.from_ds_config(ds).sequence_parallel_size == 2
    with pytest.raises(ValueError, match="unknown key"):
        train_script.load_config(str(REPO / "configs/cpu_tiny.json"), ["train.stepz=3"])
    with pytest.raises(ValueError, match="train.attention"):
        train_script.load_config(str(REPO / "configs/cpu_tiny.json"), ["train.attention=ring"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        train_script.load_config(str(REPO / "configs/cpu_tiny.json"), ["train.steps"])
    for name in ("h200x2_llama_128k.json", "h200_llama8b_128k.json", "multinode_template.json"):
        ds, tc = train_script.load_config(str(REPO / "configs" / name), [])
        BurstConfig.from_ds_config(ds)
        mcfg = ModelConfig.from_dict(tc.model)
        data = dict(tc.data)
        if data.pop("type") == "retrieval":
            RetrievalTask(tc.seq_len, mcfg.vocab_size, **data)


# ---------------------------------------------------------------------------------------------
# single-process pieces


def test_model_burst_world1_equals_local():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, sliding_window=20)
    torch.manual_seed(0)
    m_local = BurstLlama(cfg, attention="local")
    m_burst = BurstLlama(cfg, attention="burst")
    m_burst.load_state_dict(m_local.state_dict())
    ids = torch.randint(0, 64, (2, 48))
    pos = torch.arange(48)
    a, b = m_local(ids, pos), m_burst(ids, pos)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    labels = torch.randint(0, 64, (2, 48))
    loss = sequence_parallel_loss(a, labels)
    ref = torch.nn.functional.cross_entropy(a.reshape(-1, 64), labels.reshape(-1))
    assert torch.allclose(loss, ref)
    correct, total = sequence_parallel_accuracy(a, labels)
    assert total == 96 and 0 <= correct <= 96


def test_model_config_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"hidden": 3})
    assert ModelConfig().num_params() == sum(p.numel() for p in BurstLlama(ModelConfig(), attention="local")
                                             .parameters())


def test_retrieval_task_and_sharding():
    task = RetrievalTask(seq_len=256, vocab_size=128, num_pairs=8, num_queries=16, num_keys=8, num_values=8, copies=4)
    ids, labels = task.sample(3)
    ids2, _ = task.sample(3)
    assert torch.equal(ids, ids2) and not torch.equal(ids, task.sample(4)[0])
    answers = (labels != -100).nonzero().flatten()
    assert len(answers) == 16 and int(answers.min()) >= 128
    src = task.sources(3)
    p0 = 1 + 8 + 8  # first pair token: (key k, value v) is p0 + k * 8 + v
    for p in answers:  # the question is a key; its fact (one pair token, repeated) is stored in the first half
        a, b = src[p].tolist()
        k, v = int(ids[p]) - 1, int(labels[p]) - 9
        assert b - a == 4 and b <= 128 and ids[a:b].tolist() == [p0 + k * 8 + v] * 4
    far = far_labels(labels, src, "contiguous", 2)
    assert torch.equal(far, labels)  # contiguous over 2 ranks: every fact is on the other rank
    far = far_labels(labels, src, "zigzag", 2)  # zigzag: rank 0 holds [0, 64) + [192, 256)
    for p in answers:
        a = int(src[p, 0])
        assert (far[p] != -100) == ((int(p) < 192) == (a < 64))
    with pytest.raises(ValueError, match="vocab_size"):
        RetrievalTask(seq_len=256, vocab_size=40, num_keys=8, num_values=8)
    with pytest.raises(ValueError, match="first half"):
        RetrievalTask(seq_len=64, vocab_size=128, num_pairs=8, copies=8)
    full = torch.stack([ids, ids])
    for layout in ("contiguous", "zigzag"):
        parts = [shard_batch_local(full, full, r, 4, layout) for r in range(4)]
        for r, p in enumerate(parts):
            assert p["position_ids"][0].tolist() == global_index(layout, r, 4, 256)
            assert torch.equal(p["input_ids"], full[:, p["position_ids"][0]])
    b = make_batch(task, sample_indices(1, 0, 1, 1, 2, 2), 1, 2, "zigzag")
    assert b["input_ids"].shape == (2, 128) and b["position_ids"][0, 0] == 64 and b["far_labels"].shape == (2, 128)
    assert sample_indices(1, 0, 1, 1, 2, 2) == [6, 7]


def test_token_file(tmp_path):
    path = tmp_path / "t.bin"
    write_token_file(path, np.arange(1000) % 50000, dtype="uint16")
    tf = TokenFile(path, seq_len=16)
    x, y = tf.sample(2)
    assert x.tolist() == list(range(32, 48)) and y.tolist() == list(range(33, 49))
    path32 = tmp_path / "t.u32.bin"
    write_token_file(path32, np.arange(100) + 70000, dtype="uint32")
    assert TokenFile(path32, seq_len=8).sample(0)[0][0] == 70000
    with pytest.raises(ValueError, match="fewer than"):
        TokenFile(path32, seq_len=200)
