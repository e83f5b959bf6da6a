"""No hangs: a rank that fails in the middle of the ring makes its peers raise within a bounded time.

Real gloo ranks (3, so that one peer is not a direct neighbour of the failing rank). Rank 1's local kernel
raises inside the forward or the backward ring while the other ranks sit in P2P waits. Two endings:

- ``exit``: rank 1's exception propagates and its process leaves; gloo sees the closed connection and the
  peers raise at once (``RuntimeError`` naming the phase and the peer), long before the communication
  timeout (set to 120 s here, so a quick failure cannot come from it);
- ``stuck``: rank 1 catches its own error and stays alive without communicating; the peers raise
  ``CommTimeoutError`` after the ds-burst communication timeout (``DS_BURST_COMM_TIMEOUT=2`` here).

Each peer reports how long it took from the call to its error; docs/RELIABILITY.md quotes the numbers.
A slow but healthy rank (1 s stall per tile, timeout 5 s) must not trip the timeout and the output must
still match the float64 reference. On 2 GPUs (marked ``gpu``) the same failure on NCCL with an explicit
5 s timeout must raise ``CommTimeoutError`` on the peer.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from dist_utils import _free_port, run_ranks

WORLD = 3
FAIL_RANK = 1
STUCK_TIMEOUT = 2.0
EXIT_TIMEOUT = 120.0
# (kernel function, call that raises): fwd call 1 is the local tile (after the first hop was started), so a
# peer waits forever for the block rank 1 never forwards; bwd call 2 is the first remote tile (ring step 1)
INJECT = {"fwd": ("fwd_step", 1), "bwd": ("bwd_step", 2)}


def _inputs(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randn(1, 4 * world, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))


def _patch_kernel(name: str, on_call: int, action) -> None:
    from ds_burst.kernels import reference

    orig = getattr(reference, name)
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            action()
        return orig(*args, **kwargs)

    patched.orig = getattr(orig, "orig", orig)  # type: ignore[attr-defined]
    setattr(reference, name, patched)


def _slow_scenario(rank: int, group) -> list[torch.Tensor]:
    """A healthy but slow rank 1 (1 s stall in a forward and a backward tile, timeout 5 s)."""
    import ds_burst
    from ds_burst.dist.comm import set_comm_timeout

    set_comm_timeout(5.0)
    if rank == FAIL_RANK:
        _patch_kernel("fwd_step", 2, lambda: time.sleep(1.0))
        _patch_kernel("bwd_step", 2, lambda: time.sleep(1.0))
    q, k, v = (ds_burst.shard_sequence(x, 1, group=group, layout="zigzag").requires_grad_()
               for x in _inputs(WORLD))
    out = ds_burst.burst_attn_func(q, k, v, causal=True, kernel="torch", backward="burst", group=group)
    out.backward(torch.ones_like(out))
    _unpatch()
    return [ds_burst.gather_sequence(t.detach(), 1, group=group, layout="zigzag")
            for t in (out, q.grad, k.grad, v.grad)]


def _unpatch() -> None:
    from ds_burst.kernels import reference

    for name in ("fwd_step", "bwd_step"):
        setattr(reference, name, getattr(reference, name).__dict__.get("orig", getattr(reference, name)))


def _fail_scenario(rank: int, group, where: str, ending: str, marker_dir: str) -> dict:
    """Rank 1 raises in ``where``; returns how this rank ended (type, message, seconds to the error)."""
    import ds_burst
    from ds_burst.dist.comm import set_comm_timeout

    set_comm_timeout(STUCK_TIMEOUT if ending == "stuck" else EXIT_TIMEOUT)
    name, on_call = INJECT[where]
    if rank == FAIL_RANK:
        def boom() -> None:
            raise ValueError(f"injected failure in {name}")

        _patch_kernel(name, on_call, boom)
    q, k, v = (ds_burst.shard_sequence(x, 1, group=group, layout="zigzag").requires_grad_()
               for x in _inputs(WORLD))
    t0 = time.monotonic()
    try:
        out = ds_burst.burst_attn_func(q, k, v, causal=True, kernel="torch", backward="burst", group=group)
        out.sum().backward()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        elapsed = time.monotonic() - t0
        _unpatch()
        if rank == FAIL_RANK and ending == "exit":
            raise  # the process leaves with its error, as an uncaught exception would make it
        tag = f"{where}-{ending}"
        if rank == FAIL_RANK:  # alive but silent: wait (bounded) until every peer gave up
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and \
                    len([f for f in os.listdir(marker_dir) if f.startswith(tag)]) < WORLD - 1:
                time.sleep(0.05)
        else:
            open(os.path.join(marker_dir, f"{tag}-{rank}"), "w").close()
        return {"type": type(exc).__name__, "msg": str(exc), "elapsed": elapsed,
                "is_runtime_error": isinstance(exc, RuntimeError)}
    _unpatch()
    return {"type": None, "msg": "", "elapsed": time.monotonic() - t0, "is_runtime_error": False}


def worker_scenarios(rank: int, world: int, scenarios: list, out_dir: str) -> None:
    """Run each scenario on a fresh process group (a failed ring leaves its group unusable); results go to
    ``out_dir`` as they come, since an ``exit`` scenario ends the process with its error."""
    import torch.distributed as dist

    results: dict = {}
    for sc in scenarios:
        group = dist.new_group(list(range(world)))
        if sc == "slow":
            results[sc] = _slow_scenario(rank, group)
        else:
            results[sc] = _fail_scenario(rank, group, *sc, out_dir)
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))


SPAWNS = [["slow", ("fwd", "stuck"), ("bwd", "stuck"), ("fwd", "exit")], [("bwd", "exit")]]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict:
    out: dict = {}
    for i, spawn in enumerate(SPAWNS):
        d = tmp_path_factory.mktemp(f"spawn{i}")
        res = run_ranks(worker_scenarios, WORLD, spawn, str(d), timeout=150)
        per_rank = [torch.load(d / f"{r}.pt") if (d / f"{r}.pt").exists() else {} for r in range(WORLD)]
        for sc in spawn:
            out[sc] = {r: per_rank[r].get(sc) for r in range(WORLD)}
        last = spawn[-1]
        if last != "slow" and last[1] == "exit":
            out[last][FAIL_RANK] = res[FAIL_RANK]  # the failing rank's own error, as run_ranks saw it
            for r in range(WORLD):
                if r != FAIL_RANK:
                    assert res[r][0] == "ok", res[r]
    return out


@pytest.mark.parametrize("ending", ["exit", "stuck"])
@pytest.mark.parametrize("where", ["fwd", "bwd"])
def test_failing_rank_does_not_hang_its_peers(scenarios, where, ending):
    res = scenarios[(where, ending)]
    fail = res[FAIL_RANK]
    if ending == "exit":
        assert fail[0] == "error" and fail[1][0] == "ValueError" and "injected" in fail[1][1], fail
    else:
        assert fail["type"] == "ValueError" and "injected" in fail["msg"], fail
    peers = {r: v for r, v in res.items() if r != FAIL_RANK}
    phases = []
    for r, v in peers.items():
        assert v is not None and v["type"] is not None, f"rank {r} finished although rank {FAIL_RANK} failed: {v}"
        assert v["is_runtime_error"], v
        assert f"ds-burst rank {r} (phase '" in v["msg"], v["msg"]
        assert "rank " in v["msg"].split("):", 1)[1], v["msg"]  # names the peer
        phases.append(v["msg"].split("phase '", 1)[1].split("'", 1)[0])
        if ending == "exit":
            assert v["type"] == "RuntimeError" and "failed" in v["msg"], v
            assert v["elapsed"] < 30.0, f"rank {r}: {v['elapsed']:.1f}s to notice a peer that exited"
        else:
            assert v["type"] == "CommTimeoutError" and f"timeout of {STUCK_TIMEOUT:g}s" in v["msg"], v
            # each wait is bounded by the timeout; a peer may pass a few more steps before it blocks
            assert STUCK_TIMEOUT * 0.9 <= v["elapsed"] <= 3 * STUCK_TIMEOUT + 10.0, v["elapsed"]
    assert where in phases, phases  # some peer was blocked in the phase that failed
    print(f"\n[reliability] {where}/{ending}: seconds to error per peer "
          f"{ {r: round(v['elapsed'], 2) for r, v in peers.items()} }, phases {phases}")


def test_slow_rank_within_timeout_is_not_an_error(scenarios):
    from ds_burst.kernels.reference import naive_attention

    q, k, v = (x.clone().requires_grad_() for x in _inputs(WORLD))
    ref, _ = naive_attention(q, k, v, causal=True, window=(-1, -1))
    ref.backward(torch.ones_like(ref))
    for r in range(WORLD):
        got = scenarios["slow"][r]
        assert got is not None, f"rank {r} has no result"
        for a, b in zip(got, (ref.detach(), q.grad, k.grad, v.grad)):
            assert ((a - b).norm() / b.norm()).item() < 1e-12


def test_comm_timeout_settings(monkeypatch):
    from ds_burst.dist.comm import COMM_TIMEOUT_ENV, DEFAULT_CPU_COMM_TIMEOUT, GroupInfo, comm_timeout, set_comm_timeout

    single = GroupInfo(None, 0, 1)
    monkeypatch.delenv(COMM_TIMEOUT_ENV, raising=False)
    assert comm_timeout(single) == DEFAULT_CPU_COMM_TIMEOUT == 300.0
    monkeypatch.setenv(COMM_TIMEOUT_ENV, "2.5")
    assert comm_timeout(single) == 2.5
    for off in ("0", "none", "off"):
        monkeypatch.setenv(COMM_TIMEOUT_ENV, off)
        assert comm_timeout(single) is None
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(COMM_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=COMM_TIMEOUT_ENV):
            comm_timeout(single)
    try:
        set_comm_timeout(7)
        assert comm_timeout(single) == 7.0  # the explicit setting wins over the environment
        set_comm_timeout(None)
        assert comm_timeout(single) is None
        with pytest.raises(ValueError, match="set_comm_timeout"):
            set_comm_timeout("x")
    finally:
        set_comm_timeout()
    monkeypatch.setenv(COMM_TIMEOUT_ENV, "4")
    assert comm_timeout(single) == 4.0


# ---------------------------------------------------------------------------------------------
# NCCL (GPU machines): the ds-burst timeout is off by default there; set explicitly it must bound the wait too.


def _nccl_worker(rank: int, world: int, port: int, ending: str, out_dir: str) -> None:
    """Own spawn target: NCCL operations left posted by the failure can make process-group teardown hang,
    so every rank writes its result and leaves with ``os._exit``."""
    import torch.distributed as dist

    import ds_burst
    from ds_burst.dist.comm import set_comm_timeout

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    set_comm_timeout(NCCL_TIMEOUT)
    if rank == FAIL_RANK:
        def boom() -> None:
            raise ValueError("injected failure in fwd_step")

        _patch_kernel("fwd_step", 1, boom)
    q, k, v = (ds_burst.shard_sequence(x.cuda().float(), 1, layout="zigzag") for x in _inputs(world))
    t0 = time.monotonic()
    res = {"type": None, "msg": "", "elapsed": 0.0}
    try:
        out = ds_burst.burst_attn_func(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal=True,
                                       kernel="torch", backward="burst")
        out.sum().backward()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        res = {"type": type(exc).__name__, "msg": str(exc), "elapsed": time.monotonic() - t0}
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    if rank == FAIL_RANK and ending == "stuck":  # alive and silent until the peers gave up
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(os.listdir(out_dir)) < world:
            time.sleep(0.1)
    os._exit(0)


NCCL_TIMEOUT = 5.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("ending", ["exit", "stuck"])
def test_nccl_explicit_timeout_bounds_the_wait(ending, tmp_path):
    world = 2
    ctx = mp.start_processes(_nccl_worker, args=(world, _free_port(), ending, str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    for p in ctx.processes:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank did not finish within 240 s (hang)"
    res = [json.load(open(tmp_path / f"{r}.json")) for r in range(world)]
    assert res[FAIL_RANK]["type"] == "ValueError", res
    peer = res[0]
    assert peer["type"] == "CommTimeoutError" and "ds-burst rank 0 (phase '" in peer["msg"], peer
    assert NCCL_TIMEOUT * 0.9 <= peer["elapsed"] <= 3 * NCCL_TIMEOUT + 20.0, peer
    print(f"\n[reliability] nccl/{ending}: rank 0 raised after {peer['elapsed']:.2f}s: {peer['msg'][:160]}")
