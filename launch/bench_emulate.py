"""One-GPU rank emulation: rank r of a P-rank sequence-parallel group, alone on one device (or the CPU).

    python launch/bench_emulate.py --world 2 4 8 --seqs 131072 262144 --heads 32 --kv-heads 32 8 \\
        --schedules ring --kernels triton --out results/emulate.json

No launcher: one process joins torch's fake process group (``torch.distributed.init_process_group("fake")``) as
rank ``--rank`` of ``P`` ranks, for each ``P`` of ``--world``, and runs ds-burst's real engine and kernels there:
rank r's whole ring, forward and backward. Every P2P and collective of a fake group returns at once without moving
data (received buffers hold garbage), so only time and host cost mean anything; ds-burst knows such a group as
*emulated* (:func:`ds_burst.dist.comm.emulated`: no per-call header round, its agreement helpers return this rank's
own values). What one rank computes (its tiles, its kernel launches, its host work) is what it computes in a real
P-rank run; what is missing is every wait on a link, so the time is the rank's compute-plus-host time, the term the
cost model calls compute.

For every point (P, S, Hkv) it prints and writes (JSON, ``launch/bench_common.py`` helpers):

* ``ds-burst-<kernel>[-<schedule>]``: rank r's ``burst_attn_func`` forward and forward+backward (causal, the
  caller's ``--layout``, backward "auto"), wall time (CUDA: events around the call, synchronised) and host time
  (the time until the Python call returns, from an idle device: the host's share when it is below the wall time),
  TFLOP/s of the rank's share (``2*S^2*Hq*D / P`` forward, 3.5x that forward+backward), peak memory, the tile calls
  the kernel ran (counted in one extra untimed call) next to the plan's tile count for that rank, and ``launches``:
  per Hopper kernel, its launches during the timed calls and how many went through the JIT instead of the light
  launch (:func:`ds_burst.kernels.fast_launch.launch_counts`; empty off Hopper);
* ``ulysses-rank``: the local attention a DeepSpeed-Ulysses rank runs after its all-to-all (whole sequence ``S``,
  ``Hq/P`` query heads, ``max(Hkv, P)/P`` KV heads, as Ulysses replicates them) with torch SDPA (cuDNN on CUDA, then
  flash; on CPU torch's default CPU op), forward and forward+backward, in the same process;
* the cost model's compute term for that rank and schedule (:func:`ds_burst.core.cost_model.compute_seconds`; rates:
  the defaults, ``--calibration`` or ``--kernel-bench``), ``ratio_to_predicted`` (measured / predicted) and
  ``ratio_to_ulysses`` (this row's forward+backward over the Ulysses rank's, same P, S, Hkv).

``--rank`` default: the rank whose queries see the most keys in the plan's compute layout (for causal zigzag all
ranks are equal: rank 0).

``--host-steps``: only the engine's host cost per ring step, on the CPU, nothing else run: for each ``P`` of
``--world``, causal and not, backward ``burst`` and ``ring``, rank 0's forward and forward+backward on tiny shards
(``--host-tokens`` tokens per rank, 1 head, D=16, fp32, kernel ``torch``) with the kernel's tile calls replaced by
no-ops (``--host-kernel`` keeps them: then the reference kernel's CPU time is in it), median host time of
``--host-iters`` calls over the tile calls made (``host_us_per_tile``), written to ``--out``::

    python launch/bench_emulate.py --host-steps --world 8 32 --out results/emulate_host_steps.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import attn_flops, device_meta, print_table, pyplot, write_json  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# The emulated group


def emulate_rank(world: int, rank: int) -> None:
    """Make this process rank ``rank`` of a ``world``-rank fake process group (replacing the one before)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from ds_burst.attention.call_plan import clear_plans
    from ds_burst.dist.topology import reset_topology

    if dist.is_initialized():
        if dist.get_world_size() == world and dist.get_rank() == rank:
            return
        reset_topology()
        clear_plans()
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def busiest_rank(world: int, seq: int, layout: str, causal: bool = True) -> int:
    """The rank whose queries see the most keys in the compute layout the plan picks for the caller's ``layout``
    (the lowest such rank; for causal zigzag every rank sees as many)."""
    from ds_burst.attention.call_plan import choose_compute_layout
    from ds_burst.core.documents import layout_assignment, rank_work

    s_local = seq // world
    window = (-1, 0) if causal else (-1, -1)
    compute, _ = choose_compute_layout(layout, causal, window, world, s_local)
    m = 2 if compute == "zigzag" else 1  # chunks per rank
    work = rank_work(layout_assignment(compute, world, m), s_local // m, None, causal, window, seq)
    return max(range(world), key=lambda r: (work[r], -r))


# ---------------------------------------------------------------------------------------------------------------
# Tile calls: counted, and what the plan says


@contextlib.contextmanager
def swapped_tiles(plan: object, fwd_step: Callable[..., object], bwd_step: Callable[..., object]) -> Iterator[None]:
    """Route the ``fwd_step`` / ``bwd_step`` calls the engine makes on ``plan``'s kernel to ``fwd_step`` /
    ``bwd_step`` (called with the kernel's own function first, then the call's arguments) while inside: the plan's
    kernel record is swapped for a stand-in and put back on exit; everything else reads through to the kernel."""
    setup = plan.setup  # type: ignore[attr-defined]
    spec = setup.kernel

    class Impl:
        def __getattr__(self, name: str) -> object:
            return getattr(spec.impl, name)

        def fwd_step(self, *a: object, **kw: object) -> object:
            return fwd_step(spec.impl.fwd_step, *a, **kw)

        def bwd_step(self, *a: object, **kw: object) -> object:
            return bwd_step(spec.impl.bwd_step, *a, **kw)

    class Spec:
        impl = Impl()

        def __getattr__(self, name: str) -> object:
            return getattr(spec, name)

    object.__setattr__(setup, "kernel", Spec())
    try:
        yield
    finally:
        object.__setattr__(setup, "kernel", spec)


@contextlib.contextmanager
def count_tiles(plan: object) -> Iterator[dict[str, int]]:
    """Count the ``fwd_step`` / ``bwd_step`` calls the engine makes on ``plan``'s kernel while inside (for an
    untimed call only)."""
    counts = {"fwd": 0, "bwd": 0}

    def counted(kind: str) -> Callable[..., object]:
        def call(real: Callable[..., object], *a: object, **kw: object) -> object:
            counts[kind] += 1
            return real(*a, **kw)
        return call

    with swapped_tiles(plan, counted("fwd"), counted("bwd")):
        yield counts


def _owners(passes: list, me: int, world: int) -> list[int]:
    return [me] + [(me - p.direction * t) % world for p in passes for t in range(1, p.steps + 1)]


def plan_tiles(plan: object) -> tuple[int, int]:
    """``(forward, backward)`` tile calls of this rank under ``plan`` from its step plan (``RingSetup.ops`` over the
    blocks the rank meets: every block on the double ring, the passes' owners on the flat ring)."""
    from ds_burst.core.step_plan import mirror

    setup = plan.setup  # type: ignore[attr-defined]
    me, world = setup.info.rank, setup.info.world
    if setup.nodes is not None:
        fwd_owners = bwd_owners = list(range(world))
    else:
        fwd_owners, bwd_owners = _owners(setup.passes, me, world), _owners(mirror(setup.passes), me, world)
    fwd = sum(len(setup.ops(me, o)) for o in fwd_owners)
    if plan.backward == "burst":  # type: ignore[attr-defined]
        bwd = sum(len(setup.ops(o, me)) for o in bwd_owners)
    else:
        bwd = fwd
    return fwd, bwd


def ran_schedule(plan: object) -> str:
    """The schedule ``plan`` runs (whatever was requested, ``auto`` included), read from the plan: a Ulysses
    all-to-all with a ring of one rank is ``ulysses``, with a longer ring ``ulysses_ring``; node groups without it the
    double ring; neither the flat ring. A schedule added to ``core.options.CONCRETE_SCHEDULES`` needs only its
    compute term in ``core.cost_model`` (``ulysses`` has one)."""
    if plan.ulysses is not None:  # type: ignore[attr-defined]
        return "ulysses" if plan.setup.info.world == 1 else "ulysses_ring"  # type: ignore[attr-defined]
    if plan.setup.nodes is not None:  # type: ignore[attr-defined]
        return "double_ring"
    return "ring"


# ---------------------------------------------------------------------------------------------------------------
# Timing


def time_rank(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> tuple[float, float]:
    """``(wall ms, host ms)`` medians of ``fn``: wall from CUDA events around the call with the device synchronised
    before and after (CPU: the host clock); host: the time until ``fn`` returns, from an idle device."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    walls, hosts = [], []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            start.record()
            fn()
            hosts.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize(device)
            walls.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            hosts.append((time.perf_counter() - t0) * 1e3)
            walls.append(hosts[-1])
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return med(walls), med(hosts)


def measure(fn: Callable[[], torch.Tensor], grads: list[torch.Tensor], dout: torch.Tensor, device: torch.device,
            iters: int, warmup: int = 2) -> dict:
    """Forward and forward+backward wall and host times of ``fn`` and the peak memory of forward+backward."""
    def fb() -> None:
        fn().backward(dout)
        for t in grads:
            t.grad = None

    from ds_burst.kernels.fast_launch import launch_counts

    before = launch_counts()
    with torch.no_grad():
        fwd, fwd_host = time_rank(fn, device, iters, warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwdbwd, fwdbwd_host = time_rank(fb, device, iters, warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    launches = {name: {k: c[k] - before.get(name, {}).get(k, 0) for k in c} for name, c in launch_counts().items()}
    return {"fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "fwd_host_ms": fwd_host, "fwdbwd_host_ms": fwdbwd_host,
            "peak_gib": peak, "launches": {n: c for n, c in launches.items() if c["launches"]}}


# ---------------------------------------------------------------------------------------------------------------
# The two methods


def burst_rank(topo: object, s: int, world: int, h: int, hkv: int, d: int, kernel: str, layout: str,
               dtype: torch.dtype, device: torch.device, iters: int, warmup: int = 2) -> tuple[dict, object]:
    """Rank r's ``burst_attn_func`` on its shard: times, counted tile calls and the plan's; returns (row, plan)."""
    import ds_burst
    from ds_burst.attention.call_plan import PLANS

    mk = lambda heads: torch.randn(1, s // world, heads, d, device=device, dtype=dtype, requires_grad=True)
    q, k, v = mk(h), mk(hkv), mk(hkv)
    dout = torch.randn_like(q)
    fn = lambda: ds_burst.burst_attn_func(q, k, v, causal=True, layout=layout, kernel=kernel, group=topo)
    fn()  # plan, kernel choice, compilation
    plan = PLANS.last()
    with count_tiles(plan) as counts:
        fn().backward(dout)
    q.grad = k.grad = v.grad = None
    row = measure(fn, [q, k, v], dout, device, iters, warmup)
    fwd_plan, bwd_plan = plan_tiles(plan)
    row.update(kernel=plan.setup.kernel.name, backward=plan.backward, tiles_fwd=counts["fwd"],  # type: ignore[union-attr]
               tiles_bwd=counts["bwd"], plan_tiles_fwd=fwd_plan, plan_tiles_bwd=bwd_plan)
    return row, plan


def ulysses_rank(s: int, world: int, h: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device,
                 iters: int, warmup: int = 2) -> dict:
    """The local attention of a DeepSpeed-Ulysses rank after its all-to-all: ``[1, S, Hq/P, D]`` queries against
    ``max(Hkv, P)/P`` KV heads, causal, torch SDPA (cuDNN, else flash, on CUDA; torch's CPU op on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if h % world or (hkv % world and world % hkv):
        raise ValueError(f"Ulysses cannot split Hq={h}, Hkv={hkv} over P={world}")
    hl, kvl = h // world, max(hkv, world) // world
    mk = lambda heads: torch.randn(1, heads, s, d, device=device, dtype=dtype, requires_grad=True)
    q, k, v = mk(hl), mk(kvl), mk(kvl)
    dout = torch.randn_like(q)
    tried = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [None]
    last: Exception | None = None
    for backend in tried:
        def fn(backend: SDPBackend | None = backend) -> torch.Tensor:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():  # a fresh one per call
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kvl != hl)

        try:
            fn().backward(dout)
        except RuntimeError as exc:  # this backend does not take the shape: the next one
            last = exc
            continue
        row = measure(fn, [q, k, v], dout, device, iters, warmup)
        row["kernel"] = "sdpa-" + (backend.name.lower().removesuffix("_attention") if backend is not None else "cpu")
        row["Hq_local"], row["Hkv_local"] = hl, kvl
        return row
    raise RuntimeError(f"no SDPA backend ran the Ulysses rank: {last}")


# ---------------------------------------------------------------------------------------------------------------
# The engine's host cost per ring step (--host-steps)


@contextlib.contextmanager
def null_tiles(plan: object) -> Iterator[None]:
    """Replace the ``fwd_step`` / ``bwd_step`` calls of ``plan``'s kernel by no-ops while inside
    (:func:`swapped_tiles`): what is left of a call is the engine's own host work."""
    def skip(real: Callable[..., object], *a: object, **kw: object) -> None:
        return None

    with swapped_tiles(plan, skip, skip):
        yield


def host_steps(world: int, causal: bool, backward: str, tokens: int, iters: int, keep_kernel: bool = False
               ) -> list[dict]:
    """Rank 0 of an emulated ``world``-rank group on the CPU, tiny shards: host us per tile call of the forward and
    of forward+backward (median of ``iters`` calls after a warm-up, divided by the tile calls they make)."""
    import ds_burst
    from ds_burst.attention.call_plan import PLANS

    emulate_rank(world, 0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, 1, 16, generator=g, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    fn = lambda: ds_burst.burst_attn_func(q, k, v, causal=causal, layout="zigzag", kernel="torch",
                                          backward=backward)
    fn().backward(dout)
    plan = PLANS.last()
    with count_tiles(plan) as counts:
        fn().backward(dout)

    def fb() -> None:
        fn().backward(dout)
        q.grad = k.grad = v.grad = None

    rows = []
    with contextlib.nullcontext() if keep_kernel else null_tiles(plan):
        for phase, call, tiles in (("fwd", fn, counts["fwd"]), ("fwdbwd", fb, counts["fwd"] + counts["bwd"])):
            with torch.no_grad() if phase == "fwd" else contextlib.nullcontext():
                _, host_ms = time_rank(call, torch.device("cpu"), iters, warmup=10)
            rows.append({"method": "host-steps", "P": world, "rank": 0, "causal": causal, "backward": plan.backward,
                         "phase": phase, "tokens_per_rank": tokens, "kernel": "torch" if keep_kernel else "none",
                         "tiles": tiles, "host_us": host_ms * 1e3, "host_us_per_tile": host_ms * 1e3 / tiles})
    return rows


def main_host_steps(args: argparse.Namespace) -> list[dict]:
    """``--host-steps``: :func:`host_steps` for every ``--world``, causal and not, both backward patterns."""
    torch.set_flush_denormal(True)
    rows = []
    for world in args.world:
        for backward in ("burst", "ring"):
            for causal in (True, False):
                for row in host_steps(world, causal, backward, args.host_tokens, args.host_iters, args.host_kernel):
                    rows.append(row)
                    print(f"P={world:3d} {'causal' if causal else 'full':6s} backward={backward:5s} "
                          f"{row['phase']:6s}: {row['host_us']:8.0f} us host, {row['tiles']:3d} tiles, "
                          f"{row['host_us_per_tile']:6.1f} us per tile", flush=True)
    meta = device_meta() | {"command": " ".join(sys.argv), "device": device_name(torch.device("cpu")),
                            "device_type": "cpu", "emulated": True}
    write_json(args.out, meta, rows)
    if dist.is_initialized():
        from ds_burst.dist.topology import reset_topology

        reset_topology()
        dist.destroy_process_group()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The cost model


def hardware(args: argparse.Namespace, device: torch.device) -> object:
    """The cost model's rates: the defaults, then ``--calibration``, then ``--kernel-bench``; the kernel term by tile
    length from ``--tiles``, else the table shipped for this GPU at ``--head-dim`` (none on CPU)."""
    from dataclasses import replace

    from ds_burst.core import settings, tile_rates
    from ds_burst.core.cost_model import Hardware, load_calibration, rates_from_kernel_bench, split_bench_arg

    hw = Hardware()
    if args.calibration:
        hw = load_calibration(args.calibration, hw)
    if args.kernel_bench:
        path, method = split_bench_arg(args.kernel_bench)
        hw = replace(hw, **rates_from_kernel_bench(path, method, args.head_dim))
    if args.tiles:
        hw = replace(hw, tiles=tile_rates.read(args.tiles, args.head_dim))
        os.environ[settings.TILE_RATES] = os.path.abspath(args.tiles)  # schedule="auto" picks with it too
    elif device.type == "cuda" and not args.kernel_bench:
        hw = replace(hw, tiles=tile_rates.shipped(tile_rates.gpu_kind(torch.cuda.get_device_name(device)),
                                                  args.head_dim))
    hw.check()
    return hw


def predicted_ms(schedule: str, s: int, world: int, per_node: int, h: int, hkv: int, d: int, elem: int,
                 hw: object, peer: bool = False, kernel: str = "auto") -> tuple[float, float]:
    """The cost model's ``(forward, backward)`` compute ms of one rank under ``schedule`` with tile ``kernel``."""
    from ds_burst.core.cost_model import Problem, compute_seconds

    nodes = world // per_node if world % per_node == 0 else 1
    per_node = world // nodes
    prob = Problem(s, nodes, per_node, h, hkv, d, 1, elem, True)
    f, b = compute_seconds(prob, schedule, hw, peer=peer, kernel=kernel)  # type: ignore[arg-type]
    return f * 1e3, b * 1e3


# ---------------------------------------------------------------------------------------------------------------


def plot_rows(rows: list[dict], path: str, title: str) -> bool:
    """Emulated forward+backward ms against the cost model's compute term, one marker per schedule, the 10% band
    shaded; returns False without matplotlib or timed rows."""
    plt = pyplot()
    pts = [r for r in rows if "fwdbwd_ms" in r and "predicted_ms" in r]
    if plt is None or not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for i, sched in enumerate(sorted({r["schedule"] for r in pts})):
        for peer in (False, True):
            mine = [r for r in pts if r["schedule"] == sched and (r["method"] == "ulysses-rank") == peer]
            if mine:
                ax.scatter([r["predicted_ms"] for r in mine], [r["fwdbwd_ms"] for r in mine], color=f"C{i}",
                           marker="x" if peer else "o", label=("DeepSpeed-Ulysses rank (cuDNN)" if peer else sched))
    lo = min(min(r["predicted_ms"], r["fwdbwd_ms"]) for r in pts) / 1.5
    hi = max(max(r["predicted_ms"], r["fwdbwd_ms"]) for r in pts) * 1.5
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="k", alpha=0.08, label="+-10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cost model: compute ms of the rank (fwd+bwd)")
    ax.set_ylabel("emulated ms (fwd+bwd)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def summary_markdown(rows: list[dict]) -> str:
    """One markdown row per (P, S, Hkv): each schedule's emulated fwd+bwd ms with its ratio to the cost model's
    compute term, the DeepSpeed-Ulysses rank's, the schedule ``auto`` ran and its time over the Ulysses rank's."""
    scheds = [s for s in ("ring", "double_ring", "ulysses_ring", "ulysses")
              if any(r.get("requested") == s for r in rows)]
    head = ("| P | S | Hkv | " + " | ".join(f"{s} ms (/model)" for s in scheds)
            + " | DS-Ulysses rank (cuDNN) ms (/model) | auto ran | auto / DS-Ulysses |")
    out = [head, "|" + " --- |" * (head.count("|") - 1)]

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if "fwdbwd_ms" not in r:
            return "error"
        return f"{r['fwdbwd_ms']:.1f} ({r['ratio_to_predicted']:.2f})"

    for key in sorted({(r["P"], r["S"], r["Hkv"]) for r in rows}):
        mine = [r for r in rows if (r["P"], r["S"], r["Hkv"]) == key]
        def get(req: str, mine: list[dict] = mine) -> dict | None:
            return next((r for r in mine if r.get("requested") == req), None)

        peer = next((r for r in mine if r["method"] == "ulysses-rank"), None)
        auto = get("auto")
        ratio = (f"{auto['fwdbwd_ms'] / peer['fwdbwd_ms']:.2f}" if auto and peer and "fwdbwd_ms" in auto
                 and "fwdbwd_ms" in peer else "-")
        seq = f"{key[1] // 1024}K" if key[1] % 1024 == 0 else str(key[1])
        out.append(f"| {key[0]} | {seq} | {key[2]} | " + " | ".join(cell(get(s)) for s in scheds)
                   + f" | {cell(peer)} | {auto['schedule'] if auto else '-'} | {ratio} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ds_burst.core.options import CONCRETE_SCHEDULES, LAYOUTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/emulate.json")
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4, 8], help="group sizes P to emulate")
    ap.add_argument("--rank", type=int, default=None,
                    help="the rank to run (default: the one with the most work in the compute layout)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--schedules", nargs="+", default=["ring"], choices=["auto", *CONCRETE_SCHEDULES],
                    help="ds-burst schedules (double_ring and ulysses_ring over --gpus-per-node ranks per node; "
                    "auto: the one the cost model picks, reported as run)")
    ap.add_argument("--gpus-per-node", type=int, default=8,
                    help="ranks per (emulated) node; a group of P <= this is one node")
    ap.add_argument("--kernels", nargs="+", default=None,
                    help="ds-burst kernels (default: triton on CUDA, torch on CPU)")
    ap.add_argument("--layout", default="zigzag", choices=list(LAYOUTS), help="the caller's layout")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    ap.add_argument("--summary", metavar="FILE.json",
                    help="print the markdown summary of a results file of this script and exit (nothing is run)")
    ap.add_argument("--max-seq-kv", type=int, default=None,
                    help="above this S, only the first --kv-heads value (keeps long points short)")
    ap.add_argument("--tiles", metavar="FILE.json",
                    help="cost-model kernel term by tile length (`python -m ds_burst.plan calibrate --tiles`), also "
                    "what schedule auto picks with (DS_BURST_TILE_RATES); default on CUDA: the table shipped for "
                    "this GPU")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--calibration", metavar="FILE.json",
                    help="cost-model rates from `python -m ds_burst.plan calibrate`")
    ap.add_argument("--kernel-bench", metavar="FILE[:METHOD]",
                    help="cost-model kernel rates from a launch/bench_kernels.py JSON")
    ap.add_argument("--host-steps", action="store_true",
                    help="only the engine's host us per tile step on the CPU (tiny shards, no-op tiles; see above)")
    ap.add_argument("--host-tokens", type=int, default=64, help="--host-steps: tokens per rank")
    ap.add_argument("--host-iters", type=int, default=200, help="--host-steps: timed calls per point")
    ap.add_argument("--host-kernel", action="store_true",
                    help="--host-steps: keep the reference kernel's tile calls (their CPU time counts too)")
    args = ap.parse_args(argv)
    if args.rank is not None and not 0 <= args.rank < min(args.world):
        ap.error(f"--rank {args.rank} is not a rank of every --world {args.world}")
    if min(args.world) < 2:
        ap.error("--world: emulate groups of 2 ranks or more")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.summary:  # the markdown summary of a results file, nothing run
        import json

        with open(args.summary) as f:
            rows = json.load(f)["rows"]
        print(summary_markdown(rows))
        return rows
    if args.host_steps:
        return main_host_steps(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    else:
        torch.set_flush_denormal(True)  # received buffers hold garbage: no denormal slow path in the CPU math
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    kernels = args.kernels or (["triton"] if device.type == "cuda" else ["torch"])
    hw = hardware(args, device)
    name = device_name(device)
    elem = torch.empty((), dtype=dtype).element_size()
    h, d = args.heads, args.head_dim
    print(f"emulating one rank on {name} ({device.type}), torch {torch.__version__}, {dtype}", flush=True)
    import ds_burst

    rows: list[dict] = []
    for world in args.world:
        per_node = min(args.gpus_per_node, world)
        for s in args.seqs:
            rank = args.rank if args.rank is not None else busiest_rank(world, s, args.layout)
            emulate_rank(world, rank)
            share = attn_flops(1, h, s, d, True) / world  # this rank's FLOPs (every rank's on zigzag)
            base = {"S": s, "P": world, "rank": rank, "Hq": h, "D": d, "dtype": str(dtype).removeprefix("torch."),
                    "device": name, "emulated": True, "gpus_per_node": per_node}
            kvs = args.kv_heads[:1] if args.max_seq_kv is not None and s > args.max_seq_kv else args.kv_heads
            for hkv in kvs:
                todo: list[tuple[str, str | None, str | None]] = [("ulysses-rank", None, None)]
                # inside one node double_ring is the flat ring and ulysses_ring is ulysses: not run twice
                todo += [(f"ds-burst-{kern}" + ("" if sched == "ring" else f"-{sched}"), sched, kern)
                         for sched in args.schedules for kern in kernels
                         if not (world <= per_node and sched in ("double_ring", "ulysses_ring")
                                 and {"double_ring": "ring", "ulysses_ring": "ulysses"}[sched] in args.schedules)]
                for method, sched, kern in todo:
                    row = dict(base, method=method, Hkv=hkv, schedule=sched or "ulysses")
                    try:
                        if sched is None:
                            row.update(ulysses_rank(s, world, h, hkv, d, dtype, device, args.iters, args.warmup))
                            pf, pb = predicted_ms("ulysses", s, world, per_node, h, hkv, d, elem, hw, peer=True)
                        else:
                            topo = ds_burst.init_sequence_parallel(world, gpus_per_node=per_node, schedule=sched)
                            got, plan = burst_rank(topo, s, world, h, hkv, d, kern, args.layout, dtype, device,
                                                   args.iters, args.warmup)
                            row.update(got, schedule=ran_schedule(plan), requested=sched)
                            # the whole call of "ulysses" is charged as the kernel requested; ring tiles as the
                            # kernel the plan ran
                            model_kernel = kern if row["schedule"] == "ulysses" else row["kernel"]
                            pf, pb = predicted_ms(row["schedule"], s, world, per_node, h, hkv, d, elem, hw,
                                                  kernel=model_kernel)
                        row.update(predicted_fwd_ms=pf, predicted_bwd_ms=pb, predicted_ms=pf + pb,
                                   fwd_tflops=share / row["fwd_ms"] / 1e9,
                                   fwdbwd_tflops=3.5 * share / row["fwdbwd_ms"] / 1e9,
                                   ratio_to_predicted=row["fwdbwd_ms"] / (pf + pb),
                                   fwd_ratio_to_predicted=row["fwd_ms"] / pf)
                    except Exception as exc:  # noqa: BLE001 - a point that cannot run is reported, not fatal
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(row)
                    print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
    for r in rows:
        peer = next((x for x in rows if x["method"] == "ulysses-rank" and x["P"] == r["P"] and x["S"] == r["S"]
                     and x["Hkv"] == r["Hkv"] and "fwdbwd_ms" in x), None)
        if peer is not None and "fwdbwd_ms" in r:
            r["ratio_to_ulysses"] = r["fwdbwd_ms"] / peer["fwdbwd_ms"]
    cols = ["method", "schedule", "P", "rank", "S", "Hkv", "fwd_ms", "fwdbwd_ms", "fwdbwd_host_ms", "fwdbwd_tflops",
            "peak_gib", "predicted_ms", "ratio_to_predicted", "ratio_to_ulysses", "tiles_fwd", "plan_tiles_fwd",
            "tiles_bwd", "plan_tiles_bwd", "error"]
    print_table(rows, cols)
    print(summary_markdown(rows))
    meta = device_meta() | {"command": " ".join(sys.argv), "device": name, "device_type": device.type,
                            "emulated": True, "rates": hw.to_dict()}  # type: ignore[attr-defined]
    write_json(args.out, meta, rows)
    plot_rows(rows, os.path.splitext(args.out)[0] + ".png", f"one emulated rank on {name}")
    if dist.is_initialized():
        from ds_burst.dist.topology import reset_topology

        reset_topology()
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
