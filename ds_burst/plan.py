"""Cost model: predicted forward/backward time of each schedule and backward pattern, and the choice.

    python -m ds_burst.plan --seq 1048576 --nodes 4 --gpus-per-node 8 --heads 32 --kv-heads 8 --head-dim 128
    torchrun --nproc_per_node N -m ds_burst.plan calibrate --out calib.json [--gpus-per-node L]
    python -m ds_burst.plan --seq 131072 --nodes 1 --gpus-per-node 2 --calibration calib.json
    python -m ds_burst.plan project --nodes 4 --gpus-per-node 8 --out projection.json --plot projection.png
    python -m ds_burst.plan validate docs/results/ring_tuned.json [--kernel-bench docs/results/kernels_tuned.json]

Per ring step a rank computes one tile pair and moves one block; the step takes the longer of the two
(communication overlaps compute) plus a fixed per-message latency. The first (local, diagonal) step runs
causal tiles, every later zigzag step unmasked tiles of the same FLOPs. Schedules:

* ``ring``: flat ring over all ``P = nodes * L`` ranks; with several nodes every step waits for the
  inter-node link.
* ``double_ring``: intra-node ring; each block crosses nodes once per node-cycle of ``L`` steps, overlapped
  with the intra-node steps (one NIC per GPU, all rails in parallel).
* ``ulysses_ring``: all-to-all over heads inside the node, then a ring of ``nodes`` steps across nodes
  (KV heads replicated up to ``L`` when fewer); the all-to-alls do not overlap compute.
* ``ulysses``: DeepSpeed-Ulysses over all ``P`` ranks (for comparison; needs heads divisible by P), no
  overlap of its all-to-alls.

Backward patterns: ``burst`` (Q, dO, lse, delta and the fp32 dQ travel) and ``ring`` (K, V and fp32
dK, dV travel); bytes from :mod:`ds_burst.cost`. Defaults are H200 figures measured in this project
(``docs/BENCHMARKS.md``) and 400 Gb/s InfiniBand per GPU; a calibration file (``calibrate``), the rates of
a kernel benchmark JSON (``--kernel-bench``) and every single flag override them, in that order.
``ulysses`` is only a comparison; the other three are ds-burst schedules (``schedule="auto"`` picks among
them with :func:`choose_schedule`, always with the defaults).

Subcommands: ``calibrate`` measures the figures on the machine it runs on (:mod:`ds_burst.calibrate`);
``project`` tabulates the schedules against Ulysses over a range of sequence lengths (JSON, plot);
``validate`` compares predictions with a ``launch/bench_ring.py`` JSON, row by row.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, fields, replace

from .cost import backward_bytes_per_token


@dataclass(frozen=True)
class Hardware:
    """Rates of one GPU and its links (TFLOP/s, GB/s per GPU and direction, seconds).

    ``fwd_tflops``/``bwd_tflops`` are the local kernel's rates on causal (diagonal) tiles; the ``*_full``
    rates are for unmasked tiles (every zigzag ring step after the local one, and all of non-causal
    attention), ``None`` = the causal rate. ``peer_*`` are the local-attention rates of the DeepSpeed-Ulysses
    comparison (``None`` = the same kernel as ds-burst). ``python -m ds_burst.plan calibrate`` measures them.
    """

    fwd_tflops: float = 520.0  # ds-burst Triton forward, H200, 32K causal, D=128 (docs/BENCHMARKS.md)
    bwd_tflops: float = 373.0  # ds-burst Triton backward alone at the same shape (2.5x fwd FLOPs)
    intra_gbps: float = 260.0  # NVLink ring step (send next, recv prev), H200 measured
    inter_gbps: float = 50.0  # 400 Gb/s InfiniBand, one NIC per GPU
    a2a_intra_gbps: float = 277.0  # all-to-all bus bandwidth inside a node, H200 measured
    a2a_inter_gbps: float = 45.0  # all-to-all bus bandwidth across nodes (estimate)
    intra_latency_s: float = 20e-6
    inter_latency_s: float = 30e-6
    fwd_tflops_full: float | None = None
    bwd_tflops_full: float | None = None
    peer_fwd_tflops: float | None = None
    peer_bwd_tflops: float | None = None

    def rates(self, causal_tile: bool) -> tuple[float, float]:
        """(forward, backward) TFLOP/s of ds-burst's kernel on a causal or an unmasked tile."""
        if causal_tile:
            return self.fwd_tflops, self.bwd_tflops
        return (self.fwd_tflops if self.fwd_tflops_full is None else self.fwd_tflops_full,
                self.bwd_tflops if self.bwd_tflops_full is None else self.bwd_tflops_full)

    def peer_rates(self) -> tuple[float, float]:
        """(forward, backward) TFLOP/s of the Ulysses comparison's causal full-sequence attention."""
        return (self.fwd_tflops if self.peer_fwd_tflops is None else self.peer_fwd_tflops,
                self.bwd_tflops if self.peer_bwd_tflops is None else self.peer_bwd_tflops)

    def check(self) -> None:
        """Raise ``ValueError`` unless every rate is a finite positive number (latencies: non-negative)."""
        for name, value in asdict(self).items():
            if value is None and name.endswith(("_full", "tflops")) and name not in ("fwd_tflops", "bwd_tflops"):
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not name.endswith("latency_s")):
                raise ValueError(f"hardware figure {name} must be a finite positive number, got {value!r}")


@dataclass(frozen=True)
class Problem:
    """One attention layer's shape and the cluster it runs on."""

    seq: int
    nodes: int
    gpus_per_node: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 1
    elem_bytes: int = 2
    causal: bool = True

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        for name in ("seq", "nodes", "gpus_per_node", "heads", "kv_heads", "head_dim", "batch", "elem_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.seq % (2 * self.world):
            raise ValueError(f"seq ({self.seq}) must be divisible by 2 * world ({2 * self.world})")


@dataclass(frozen=True)
class Prediction:
    """Predicted times (ms) of one schedule with one backward pattern.

    ``exposed_comm_ms``: forward + backward time not covered by local compute (latency, waiting for links,
    all-to-alls). ``comm_ms``: time the rank's transfers take on their links, latency excluded, summed as if
    they ran one after another (the communication volume in time units; most of it overlaps compute).
    """

    schedule: str
    backward: str
    fwd_ms: float
    bwd_ms: float
    exposed_comm_ms: float
    note: str = ""
    comm_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms

    def to_dict(self) -> dict:
        """The fields and ``total_ms`` (JSON output)."""
        return asdict(self) | {"total_ms": self.total_ms}


def _pair_flops(p: Problem, q_tokens: int, k_tokens: int, heads: int) -> float:
    """Forward FLOPs of one ring step (zigzag causal steps are exactly half a block)."""
    return 4.0 * p.batch * heads * q_tokens * k_tokens * p.head_dim * (0.5 if p.causal else 1.0)


def _step_seconds(p: Problem, hw: Hardware, flops: float) -> tuple[float, float, float, float]:
    """Forward and backward seconds of the local (diagonal) step and of every later ring step.

    Causal: the local step runs masked diagonal tiles, the later zigzag steps unmasked tiles of the same FLOPs.
    The backward does 2.5x the forward FLOPs.
    """
    f_loc, b_loc = hw.rates(p.causal)
    f_st, b_st = hw.rates(False)
    return (flops / (f_loc * 1e12), 2.5 * flops / (b_loc * 1e12), flops / (f_st * 1e12), 2.5 * flops / (b_st * 1e12))


def _chain(steps: int, c_local: float, c_step: float, hop: float) -> float:
    """Seconds of a local step and ``steps`` received blocks when each hop overlaps the previous compute."""
    if steps <= 0:
        return c_local
    return max(c_local, hop) + (steps - 1) * max(c_step, hop) + c_step


def predict(p: Problem, hw: Hardware = Hardware()) -> list[Prediction]:
    """Predictions for every schedule and backward pattern that can run this problem."""
    p.validate()
    hw.check()
    s = p.seq // p.world
    e = p.elem_bytes
    out: list[Prediction] = []
    fwd_bytes_tok = 2 * p.kv_heads * p.head_dim * e * p.batch
    multi = p.nodes > 1
    cf_loc, cb_loc, cf, cb = _step_seconds(p, hw, _pair_flops(p, s, s, p.heads))
    steps = p.world - 1
    for backward in ("burst", "ring"):
        bwd_bytes_tok = backward_bytes_per_token(backward, p.heads, p.kv_heads, p.head_dim, e) * p.batch
        # flat ring: every hop waits for the slowest link in the ring
        bw, lat = (hw.inter_gbps, hw.inter_latency_s) if multi else (hw.intra_gbps, hw.intra_latency_s)
        wire_f, wire_b = s * fwd_bytes_tok / (bw * 1e9), s * bwd_bytes_tok / (bw * 1e9)
        f = _chain(steps, cf_loc, cf, lat + wire_f)
        b = _chain(steps, cb_loc, cb, lat + wire_b)
        compute = cf_loc + cb_loc + steps * (cf + cb)
        out.append(Prediction("ring", backward, f * 1e3, b * 1e3, max(0.0, f + b - compute) * 1e3,
                              comm_ms=steps * (wire_f + wire_b) * 1e3))
        if multi:
            out.append(_double_ring(p, hw, backward, s, (cf_loc, cb_loc, cf, cb), fwd_bytes_tok, bwd_bytes_tok))
            out.append(_ulysses_ring(p, hw, backward))
    out.append(_ulysses(p, hw))
    return out


def _double_ring(p: Problem, hw: Hardware, backward: str, s: int, c: tuple[float, float, float, float],
                 fwd_tok: float, bwd_tok: float) -> Prediction:
    L, n = p.gpus_per_node, p.nodes
    times, compute, wire = [], 0.0, 0.0
    for c_loc, c_st, tok in ((c[0], c[2], fwd_tok), (c[1], c[3], bwd_tok)):
        w_intra, w_inter = s * tok / (hw.intra_gbps * 1e9), s * tok / (hw.inter_gbps * 1e9)
        intra, inter = hw.intra_latency_s + w_intra, hw.inter_latency_s + w_inter
        cycle_intra = (L - 1) * max(c_st, intra)
        # the inter-node transfer of a cycle overlaps the cycle's L-1 intra steps (and their compute)
        times.append(_chain(L - 1, c_loc, c_st, intra) + (n - 1) * (max(cycle_intra, inter) + c_st))
        compute += c_loc + (p.world - 1) * c_st
        wire += n * (L - 1) * w_intra + (n - 1) * w_inter
    return Prediction("double_ring", backward, times[0] * 1e3, times[1] * 1e3, max(0.0, sum(times) - compute) * 1e3,
                      comm_ms=wire * 1e3)


def _ulysses_ring(p: Problem, hw: Hardware, backward: str) -> Prediction:
    L, n = p.gpus_per_node, p.nodes
    s = p.seq // p.world
    if p.heads % L:
        return Prediction("ulysses_ring", backward, float("inf"), float("inf"), 0.0, "heads not divisible by L")
    hq, hkv = p.heads // L, max(p.kv_heads, L) // L
    e, d = p.elem_bytes, p.head_dim
    a2a = lambda heads_total: s * heads_total * d * e * p.batch * (L - 1) / L / (hw.a2a_intra_gbps * 1e9)
    a2a_f = a2a(p.heads + 2 * max(p.kv_heads, L)) + a2a(p.heads)  # q, k, v in; out back
    a2a_b = a2a(p.heads) + a2a(p.heads + 2 * max(p.kv_heads, L))  # dO in; dq, dk, dv back
    tokens = s * L
    cf_loc, cb_loc, cf, cb = _step_seconds(p, hw, _pair_flops(p, tokens, tokens, hq))
    wire_f = tokens * 2 * hkv * d * e * p.batch / (hw.inter_gbps * 1e9)
    wire_b = tokens * backward_bytes_per_token(backward, hq, hkv, d, e) * p.batch / (hw.inter_gbps * 1e9)
    f = _chain(n - 1, cf_loc, cf, hw.inter_latency_s + wire_f) + a2a_f
    b = _chain(n - 1, cb_loc, cb, hw.inter_latency_s + wire_b) + a2a_b
    compute = cf_loc + cb_loc + (n - 1) * (cf + cb)
    return Prediction("ulysses_ring", backward, f * 1e3, b * 1e3, max(0.0, f + b - compute) * 1e3,
                      comm_ms=(a2a_f + a2a_b + (n - 1) * (wire_f + wire_b)) * 1e3)


def _ulysses(p: Problem, hw: Hardware) -> Prediction:
    P = p.world
    if p.heads % P:
        return Prediction("ulysses", "-", float("inf"), float("inf"), 0.0, "heads not divisible by P")
    s = p.seq // P
    bw = (hw.a2a_inter_gbps if p.nodes > 1 else hw.a2a_intra_gbps) * 1e9
    kv = max(p.kv_heads, P)
    a2a = lambda heads_total: s * heads_total * p.head_dim * p.elem_bytes * p.batch * (P - 1) / P / bw
    flops = _pair_flops(p, p.seq, p.seq, p.heads // P)
    peer = hw.peer_fwd_tflops is not None or hw.peer_bwd_tflops is not None
    rf, rb = hw.peer_rates() if peer else hw.rates(p.causal)
    comm = 2 * (a2a(p.heads + 2 * kv) + a2a(p.heads))
    f = a2a(p.heads + 2 * kv) + a2a(p.heads) + flops / (rf * 1e12)
    b = a2a(p.heads) + a2a(p.heads + 2 * kv) + 2.5 * flops / (rb * 1e12)
    note = "DeepSpeed-Ulysses with the peer kernel rates" if peer else "DeepSpeed-Ulysses with the same local kernel"
    return Prediction("ulysses", "-", f * 1e3, b * 1e3, comm * 1e3, note, comm_ms=comm * 1e3)


IMPLEMENTED = ("ring", "double_ring", "ulysses_ring")
# On equal predictions prefer the topology-aware schedules (robust to a misestimated inter-node link).
_PREFERENCE = {"double_ring": 0, "ulysses_ring": 1, "ring": 2}


def choose(p: Problem, hw: Hardware = Hardware(), implemented_only: bool = True) -> Prediction:
    """The fastest predicted ds-burst schedule/backward pair (only implemented schedules by default)."""
    cands = [x for x in predict(p, hw) if x.schedule != "ulysses"]
    if implemented_only:
        cands = [x for x in cands if x.schedule in IMPLEMENTED]
    best = min(x.total_ms for x in cands)
    # predictions equal up to rounding count as ties
    ties = [x for x in cands if x.total_ms <= best * (1 + 1e-9)]
    return min(ties, key=lambda x: (_PREFERENCE.get(x.schedule, 3), x.total_ms, x.comm_ms))


@functools.lru_cache(maxsize=256)
def choose_schedule(seq: int, nodes: int, gpus_per_node: int, heads: int, kv_heads: int, head_dim: int,
                    elem_bytes: int, causal: bool) -> str:
    """The schedule ``schedule="auto"`` runs for one attention call (same answer on every rank)."""
    if nodes <= 1 or seq % (2 * nodes * gpus_per_node) or heads % kv_heads:
        return "ring"
    prob = Problem(seq, nodes, gpus_per_node, heads, kv_heads, head_dim, 1, elem_bytes, causal)
    return choose(prob).schedule


def schedule_report(schedule: str, seq: int, sequence_parallel_size: int, gpus_per_node: int, heads: int,
                    kv_heads: int, head_dim: int, elem_bytes: int = 2, causal: bool = True) -> str:
    """What a training run logs at start: the predictions for its attention shape and the schedule used."""
    p = sequence_parallel_size
    nodes = p // gpus_per_node if p > gpus_per_node and p % gpus_per_node == 0 else 1
    per_node = p // nodes
    if p == 1:
        return "schedule: none (sequence_parallel_size=1)"
    prob = Problem(seq, nodes, per_node, heads, kv_heads, head_dim, 1, elem_bytes, causal)
    try:
        table = format_table(predict(prob))
    except ValueError as exc:
        return f"schedule: {schedule} (no cost-model prediction: {exc})"
    used = schedule
    if schedule == "auto":
        used = f"auto -> {choose_schedule(seq, nodes, per_node, heads, kv_heads, head_dim, elem_bytes, causal)}"
    return (f"cost model for S={seq}, {nodes} node(s) x {per_node} rank(s), Hq={heads}, Hkv={kv_heads}, D={head_dim}:"
            f"\n{table}\nschedule: {used}")


def format_table(preds: list[Prediction]) -> str:
    """Fixed-width table of predictions, fastest first."""
    head = f"{'schedule':14s} {'backward':8s} {'fwd ms':>10s} {'bwd ms':>10s} {'total ms':>10s} {'exposed':>9s}  note"
    lines = [head]
    for x in sorted(preds, key=lambda x: x.total_ms):
        lines.append(f"{x.schedule:14s} {x.backward:8s} {x.fwd_ms:10.1f} {x.bwd_ms:10.1f} {x.total_ms:10.1f} "
                     f"{x.exposed_comm_ms:9.1f}  {x.note}")
    return "\n".join(lines)


def _memory_report(args: argparse.Namespace) -> str:
    """``--memory``: :func:`ds_burst.memory.estimate_memory` for the model and parallel layout given."""
    from .memory import estimate_memory
    from .model import ModelConfig

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.heads * args.head_dim, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads or args.heads,
                      intermediate_size=args.intermediate)
    sp = args.nodes * args.gpus_per_node
    est = estimate_memory(cfg, args.seq, sp=sp, zero_stage=args.zero_stage, dp=args.dp, dtype_bytes=args.elem_bytes,
                          activation_checkpointing=args.checkpointing, micro_batch=args.batch,
                          lm_head_chunk_tokens=args.lm_head_chunk, mlp_tiles=args.mlp_tiles,
                          keep_attention_layers=args.keep_attention, offload_checkpoints=args.offload_checkpoints,
                          offload_optimizer=args.offload_optimizer)
    lines = [f"memory per GPU (GiB): S={args.seq}, SP={sp}, DP={args.dp}, ZeRO-{args.zero_stage}, "
             f"{args.layers} layers, hidden {cfg.hidden_size}, vocab {args.vocab}"]
    lines += [f"  {k:20s} {v:10.2f}" for k, v in est.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures from files: calibration JSON, kernel benchmark JSON

CALIBRATION_FORMAT = "ds-burst-calibration/1"
HARDWARE_FIELDS = tuple(f.name for f in fields(Hardware))


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object at the top level")
    return data


def load_calibration(path: str, base: Hardware = Hardware()) -> Hardware:
    """``base`` with the figures a calibration file (``python -m ds_burst.plan calibrate``) measured.

    Figures the file does not hold (e.g. the inter-node link when every rank was on one node) keep
    ``base``'s values. Raises ``ValueError`` for an unreadable file, unknown figures or bad values.
    """
    data = _read_json(path, "calibration file")
    if data.get("format") != CALIBRATION_FORMAT or not isinstance(data.get("hardware"), dict):
        raise ValueError(f"calibration file {path}: expected format {CALIBRATION_FORMAT!r} with a 'hardware' object")
    figures = data["hardware"]
    unknown = sorted(set(figures) - set(HARDWARE_FIELDS))
    if unknown:
        raise ValueError(f"calibration file {path}: unknown figures {unknown}; known: {list(HARDWARE_FIELDS)}")
    hw = replace(base, **figures)
    try:
        hw.check()
    except ValueError as exc:
        raise ValueError(f"calibration file {path}: {exc}") from None
    return hw


def rates_from_kernel_bench(path: str, method: str = "ds-burst-triton", head_dim: int = 128,
                            seq: int | None = None) -> dict[str, float]:
    """Kernel rates derived from a ``launch/bench_kernels.py`` JSON (one GPU, whole-sequence attention).

    For ``method`` at ``head_dim`` and ``seq`` (default: the largest S measured for it) returns
    ``fwd_tflops``/``bwd_tflops`` from the causal row and ``fwd_tflops_full``/``bwd_tflops_full`` from the
    non-causal row, where present: forward FLOPs ``4*B*H*S^2*D`` (halved when causal) over the forward time,
    backward 2.5x those FLOPs over ``fwdbwd_ms - fwd_ms``.
    """
    data = _read_json(path, "kernel benchmark")
    rows = [r for r in data.get("rows", []) if r.get("method") == method and r.get("D") == head_dim
            and "fwd_ms" in r and "fwdbwd_ms" in r]
    if seq is None and rows:
        seq = max(r["S"] for r in rows)
    rows = [r for r in rows if r["S"] == seq]
    if not rows:
        raise ValueError(f"kernel benchmark {path}: no timed row for method {method!r}, D={head_dim}, S={seq}")
    out: dict[str, float] = {}
    for r in rows:
        flops = 4.0 * r.get("B", 1) * r["H"] * r["S"] ** 2 * r["D"] * (0.5 if r["causal"] else 1.0)
        suffix = "" if r["causal"] else "_full"
        out["fwd_tflops" + suffix] = flops / (r["fwd_ms"] * 1e-3) / 1e12
        out["bwd_tflops" + suffix] = 2.5 * flops / ((r["fwdbwd_ms"] - r["fwd_ms"]) * 1e-3) / 1e12
    if "fwd_tflops" not in out:  # only non-causal rows: use them for causal tiles too
        out["fwd_tflops"], out["bwd_tflops"] = out["fwd_tflops_full"], out["bwd_tflops_full"]
    return out


def _split_bench_arg(value: str) -> tuple[str, str]:
    """``FILE[:METHOD]`` (method default ``ds-burst-triton``)."""
    path, sep, method = value.rpartition(":")
    if not sep or not method or os.path.exists(value):
        return value, "ds-burst-triton"
    return path, method


# ---------------------------------------------------------------------------------------------
# Projection over sequence lengths

SCHEDULE_ORDER = ("ring", "double_ring", "ulysses_ring")


def project(nodes: int, gpus_per_node: int, seqs: list[int], heads: int, kv_heads: list[int], head_dim: int,
            hw: Hardware, peer_hw: Hardware | None = None, elem_bytes: int = 2, causal: bool = True) -> list[dict]:
    """One row per (S, Hkv, schedule): each ds-burst schedule with its faster backward pattern, Ulysses with
    the same kernel (``ulysses``) and, with ``peer_hw``, Ulysses with the peer kernel rates (``ulysses_peer``).
    The row of the schedule ``choose`` picks has ``chosen=True``."""
    rows = []
    for seq in seqs:
        for hkv in kv_heads:
            prob = Problem(seq, nodes, gpus_per_node, heads, hkv, head_dim, 1, elem_bytes, causal)
            preds = predict(prob, hw)
            best = choose(prob, hw)
            cands = [(x.schedule, x) for x in preds]
            if peer_hw is not None:
                cands.append(("ulysses_peer", _ulysses(prob, peer_hw)))
            for name in (*SCHEDULE_ORDER, "ulysses", "ulysses_peer"):
                mine = [x for n, x in cands if n == name]
                if not mine:
                    continue
                # equal times (communication hidden): the pattern that sends fewer bytes, as backward="auto" does
                fastest = min(y.total_ms for y in mine)
                x = min((y for y in mine if y.total_ms <= fastest * (1 + 1e-9)), key=lambda y: y.comm_ms)
                rows.append({"S": seq, "Hq": heads, "Hkv": hkv, "schedule": name} | x.to_dict() | {
                    "schedule": name, "chosen": x.schedule == best.schedule and x.backward == best.backward
                    and name != "ulysses_peer"})
    return rows


def projection_markdown(rows: list[dict], peer_label: str = "peer kernel") -> str:
    """Two markdown tables: fwd+bwd ms per schedule (backward pattern in brackets), exposed communication ms."""
    present = [n for n in (*SCHEDULE_ORDER, "ulysses", "ulysses_peer") if any(r["schedule"] == n for r in rows)]
    label = {"ulysses": "Ulysses (same kernel)", "ulysses_peer": f"Ulysses ({peer_label})"}
    keys = sorted({(r["S"], r["Hkv"]) for r in rows}, key=lambda k: (-k[1], k[0]))

    def cell(r: dict | None, field: str, with_bwd: bool) -> str:
        if r is None or not math.isfinite(r[field]):
            return "n/a"
        txt = f"{r[field]:.1f}"
        if with_bwd and r["backward"] != "-":
            txt += f" ({r['backward']})"
        return f"**{txt}**" if r["chosen"] else txt

    out = []
    for title, field, with_bwd in (("fwd+bwd ms (backward pattern); bold: the schedule `auto` picks", "total_ms", True),
                                   ("exposed communication ms (fwd+bwd)", "exposed_comm_ms", False)):
        out.append(f"{title}\n")
        out.append("| S | Hkv | " + " | ".join(label.get(n, n) for n in present) + " |")
        out.append("| --- | --- |" + " --- |" * len(present))
        for seq, hkv in keys:
            got = {r["schedule"]: r for r in rows if r["S"] == seq and r["Hkv"] == hkv}
            out.append(f"| {_tokens(seq)} | {hkv} | " + " | ".join(cell(got.get(n), field, with_bwd) for n in present)
                       + " |")
        out.append("")
    return "\n".join(out)


def _tokens(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def plot_projection(rows: list[dict], path: str, title: str, peer_label: str = "peer kernel") -> bool:
    """fwd+bwd ms against S, one panel per KV-head count; returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kv = sorted({r["Hkv"] for r in rows}, reverse=True)
    names = [n for n in (*SCHEDULE_ORDER, "ulysses", "ulysses_peer") if any(r["schedule"] == n for r in rows)]
    label = {"ulysses": "Ulysses (same kernel)", "ulysses_peer": f"Ulysses ({peer_label})"}
    fig, axes = plt.subplots(2, len(kv), figsize=(5.5 * len(kv), 7), squeeze=False, sharex=True)
    for col, hkv in enumerate(kv):
        ref = {r["S"]: r["total_ms"] for r in rows if r["schedule"] == "ulysses" and r["Hkv"] == hkv}
        for i, n in enumerate(names):
            pts = sorted((r["S"], r["total_ms"]) for r in rows if r["schedule"] == n and r["Hkv"] == hkv
                         and math.isfinite(r["total_ms"]))
            style = dict(marker="o", label=label.get(n, n), color=f"C{i}",
                         linestyle="--" if n in ("ulysses", "ulysses_peer") else "-")
            if pts:
                axes[0][col].plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], **style)
            rel = [(x, t / ref[x]) for x, t in pts if math.isfinite(ref.get(x, math.inf))]
            if rel:
                axes[1][col].plot([p[0] for p in rel], [p[1] for p in rel], **style)
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"{title}, Hkv={hkv}", fontsize=9)
        axes[0][col].set_ylabel("predicted fwd+bwd s per layer")
        axes[1][col].set_ylabel("time / Ulysses (same kernel)")
        axes[1][col].set_xlabel("sequence length (tokens)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Validation against a ring benchmark JSON

PEER_KERNELS = {"ulysses-cudnn": "sdpa-cudnn", "ulysses-flash": "sdpa-flash"}


def _bench_gpus_per_node(meta: dict) -> int | None:
    try:
        argv = shlex.split(str(meta.get("command", "")))
    except ValueError:
        return None
    for i, a in enumerate(argv):
        if a == "--gpus-per-node" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if a.startswith("--gpus-per-node="):
            return int(a.split("=", 1)[1])
    return None


def validate_bench(path: str, hw: Hardware = Hardware(), kernel_bench: str | None = None,
                   gpus_per_node: int | None = None, hw_kernel: str = "triton") -> list[dict]:
    """Predicted against measured forward and forward+backward ms for each row of a ``launch/bench_ring.py``
    JSON (causal, bf16, B=1 as that script runs).

    ds-burst rows (``ds-burst-<kernel>[-<schedule>]``) are predicted with ``hw``, or with the rates of the
    same kernel in ``kernel_bench`` (a ``launch/bench_kernels.py`` JSON) when given; Ulysses rows only with
    ``kernel_bench`` (its ``sdpa-cudnn``/``sdpa-flash`` rates). Nodes: ``gpus_per_node``, else the
    benchmark command's ``--gpus-per-node``, else one node. Rows that cannot be modelled come back with
    ``skipped`` saying why. ``err_*`` are ``(predicted - measured) / measured``.
    """
    from .cost import choose_backward

    data = _read_json(path, "ring benchmark")
    if not isinstance(data.get("rows"), list):
        raise ValueError(f"ring benchmark {path}: expected a 'rows' list (launch/bench_ring.py output)")
    per_node_meta = gpus_per_node or _bench_gpus_per_node(data.get("meta", {}))
    out = []
    for r in data["rows"]:
        method = str(r.get("method", ""))
        res = {"method": method, "S": r.get("S"), "P": r.get("P"), "Hkv": r.get("Hkv")}
        if "fwdbwd_ms" not in r or "fwd_ms" not in r:
            out.append(res | {"skipped": "no timing (" + str(r.get("error", "missing")) + ")"})
            continue
        P = int(r["P"])
        L = per_node_meta if per_node_meta and per_node_meta < P and P % per_node_meta == 0 else P
        prob = Problem(int(r["S"]), P // L, L, int(r["Hq"]), int(r["Hkv"]), int(r["D"]))
        res["nodes"] = prob.nodes
        try:
            if method.startswith("ds-burst-"):
                kernel, _, sched = method[len("ds-burst-"):].partition("-")
                if kernel_bench:
                    # the sdpa tiles are the cuDNN fused ops: their rates are the cuDNN rows of the benchmark
                    bench_method = "sdpa-cudnn" if kernel == "sdpa" else f"ds-burst-{kernel}"
                    rhw = replace(hw, **rates_from_kernel_bench(kernel_bench, bench_method, prob.head_dim))
                elif kernel == hw_kernel:
                    rhw = hw
                else:
                    out.append(res | {"skipped": f"rates are for kernel {hw_kernel!r} (give --kernel-bench)"})
                    continue
                sched = sched or "ring"
                if prob.nodes == 1:
                    sched = "ring"
                elif sched == "auto":
                    sched = choose(prob, rhw).schedule
                backward = "ring" if kernel == "sdpa" else choose_backward(prob.heads, prob.kv_heads,
                                                                           prob.head_dim, prob.elem_bytes)
                pred = next(x for x in predict(prob, rhw) if x.schedule == sched and x.backward == backward)
                res |= {"schedule": sched, "backward": backward}
            elif method in PEER_KERNELS and kernel_bench:
                rates = rates_from_kernel_bench(kernel_bench, PEER_KERNELS[method], prob.head_dim)
                pred = _ulysses(prob, replace(hw, peer_fwd_tflops=rates["fwd_tflops"],
                                              peer_bwd_tflops=rates["bwd_tflops"]))
                res |= {"schedule": "ulysses", "backward": "-"}
            else:
                why = "needs --kernel-bench" if method in PEER_KERNELS else "not modelled"
                out.append(res | {"skipped": why})
                continue
        except ValueError as exc:
            out.append(res | {"skipped": str(exc)})
            continue
        res |= {"pred_fwd_ms": pred.fwd_ms, "fwd_ms": r["fwd_ms"], "err_fwd": pred.fwd_ms / r["fwd_ms"] - 1,
                "pred_fwdbwd_ms": pred.total_ms, "fwdbwd_ms": r["fwdbwd_ms"],
                "err_fwdbwd": pred.total_ms / r["fwdbwd_ms"] - 1}
        out.append(res)
    return out


def validation_markdown(rows: list[dict]) -> str:
    """Markdown table of :func:`validate_bench` rows (skipped rows listed below it)."""
    lines = ["| method | S | P | nodes | Hkv | schedule / backward | fwd ms pred / meas | err | "
             "fwd+bwd ms pred / meas | err |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    skipped = []
    for r in rows:
        if "skipped" in r:
            skipped.append(f"- {r['method']} S={r['S']} Hkv={r['Hkv']}: {r['skipped']}")
            continue
        lines.append(f"| {r['method']} | {_tokens(r['S'])} | {r['P']} | {r['nodes']} | {r['Hkv']} | "
                     f"{r['schedule']} / {r['backward']} | {r['pred_fwd_ms']:.1f} / {r['fwd_ms']:.1f} | "
                     f"{100 * r['err_fwd']:+.1f}% | {r['pred_fwdbwd_ms']:.1f} / {r['fwdbwd_ms']:.1f} | "
                     f"{100 * r['err_fwdbwd']:+.1f}% |")
    if skipped:
        lines += ["", "not compared:", *skipped]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _add_hardware_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("hardware figures (precedence: flag > --kernel-bench > --calibration > default)")
    g.add_argument("--calibration", metavar="FILE.json", help="figures measured by `python -m ds_burst.plan calibrate`")
    g.add_argument("--kernel-bench", metavar="FILE[:METHOD]",
                   help="kernel rates from a launch/bench_kernels.py JSON (method default ds-burst-triton)")
    for f in fields(Hardware):
        g.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=None, help=f"default {f.default}")


def _hardware_from_args(args: argparse.Namespace, head_dim: int = 128) -> Hardware:
    hw = Hardware()
    if args.calibration:
        hw = load_calibration(args.calibration, hw)
    if getattr(args, "kernel_bench", None):
        path, method = _split_bench_arg(args.kernel_bench)
        hw = replace(hw, **rates_from_kernel_bench(path, method, head_dim))
    given = {k: getattr(args, k) for k in HARDWARE_FIELDS if getattr(args, k) is not None}
    hw = replace(hw, **given)
    hw.check()
    return hw


def _describe(hw: Hardware) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in asdict(hw).items() if v is not None)


def _project_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m ds_burst.plan project",
                                 description="Predicted fwd+bwd time of every schedule and of DeepSpeed-Ulysses over "
                                 "a range of sequence lengths; prints markdown tables, writes JSON and a plot.")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--seqs", type=int, nargs="+", default=[2**17, 2**18, 2**19, 2**20, 2**21, 2**22])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--elem-bytes", type=int, default=2)
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--peer-kernel-bench", metavar="FILE:METHOD",
                    help="also Ulysses with this kernel's rates, e.g. docs/results/kernels_tuned.json:sdpa-cudnn")
    ap.add_argument("--out", help="JSON output")
    ap.add_argument("--plot", help="PNG output (needs matplotlib)")
    _add_hardware_args(ap)
    args = ap.parse_args(argv)
    try:
        hw = _hardware_from_args(args, args.head_dim)
        peer_hw, peer_label = None, "peer kernel"
        if args.peer_kernel_bench:
            path, method = _split_bench_arg(args.peer_kernel_bench)
            rates = rates_from_kernel_bench(path, method, args.head_dim)
            peer_hw = replace(hw, peer_fwd_tflops=rates["fwd_tflops"], peer_bwd_tflops=rates["bwd_tflops"])
            peer_label = f"{method} rates"
        rows = project(args.nodes, args.gpus_per_node, args.seqs, args.heads, args.kv_heads, args.head_dim, hw,
                       peer_hw, args.elem_bytes, not args.non_causal)
    except ValueError as exc:
        ap.error(str(exc))
    mask = "full" if args.non_causal else "causal"
    title = f"{args.nodes} nodes x {args.gpus_per_node} GPUs, Hq={args.heads}, D={args.head_dim}, {mask}"
    print(f"# {title}; hardware: {_describe(hw)}")
    if peer_hw is not None:
        print(f"# Ulysses ({peer_label}): peer_fwd_tflops={peer_hw.peer_fwd_tflops:g}, "
              f"peer_bwd_tflops={peer_hw.peer_bwd_tflops:g}")
    print(projection_markdown(rows, peer_label))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": {"command": "python -m ds_burst.plan project " + shlex.join(argv), "title": title},
                       "hardware": asdict(hw), "peer_hardware": None if peer_hw is None else asdict(peer_hw),
                       "rows": rows}, f, indent=1)
    if args.plot and not plot_projection(rows, args.plot, title, peer_label):
        print("matplotlib is not installed: no plot written", file=sys.stderr)


def _validate_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m ds_burst.plan validate",
                                 description="Predicted vs measured times for each row of a launch/bench_ring.py JSON.")
    ap.add_argument("bench", help="ring benchmark JSON, e.g. docs/results/ring_tuned.json")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="ranks per node (default: the benchmark command's --gpus-per-node, else one node)")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    _add_hardware_args(ap)
    args = ap.parse_args(argv)
    kernel_bench = args.kernel_bench
    args.kernel_bench = None  # per-method rates: applied row by row
    try:
        hw = _hardware_from_args(args)
        hw_kernel = "triton"
        if args.calibration:
            hw_kernel = _read_json(args.calibration, "calibration file").get("meta", {}).get("kernel", "triton")
        rows = validate_bench(args.bench, hw, kernel_bench, args.gpus_per_node, hw_kernel)
    except ValueError as exc:
        ap.error(str(exc))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"# {args.bench}; rates: {'per method from ' + kernel_bench if kernel_bench else _describe(hw)}")
    print(validation_markdown(rows))


def main(argv: list[str] | None = None) -> None:
    """Command line: print the prediction table and the choice (or run a subcommand, see the module doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "calibrate":
        from .calibrate import main as calibrate_main

        calibrate_main(argv[1:])
        return
    if argv and argv[0] == "project":
        _project_main(argv[1:])
        return
    if argv and argv[0] == "validate":
        _validate_main(argv[1:])
        return
    ap = argparse.ArgumentParser(prog="python -m ds_burst.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, required=True, help="total sequence length S")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32, help="query heads Hq")
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads Hkv (default: Hq)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--elem-bytes", type=int, default=2, help="bytes per input element (bf16: 2)")
    ap.add_argument("--non-causal", action="store_true")
    _add_hardware_args(ap)
    ap.add_argument("--all", action="store_true", help="choose among predicted schedules too, not only implemented")
    mem = ap.add_argument_group("memory estimate (--memory): per-GPU GiB of training the built-in Llama-style model")
    mem.add_argument("--memory", action="store_true", help="print the memory estimate instead of the time table")
    mem.add_argument("--layers", type=int, default=32)
    mem.add_argument("--vocab", type=int, default=128256)
    mem.add_argument("--intermediate", type=int, default=None, help="MLP width (default ~8/3 hidden)")
    mem.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    mem.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    mem.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    mem.add_argument("--lm-head-chunk", type=int, default=None, help="chunked LM head + loss, tokens per chunk")
    mem.add_argument("--mlp-tiles", type=int, default=1, help="sequence tiles of the MLP (1: off)")
    mem.add_argument("--keep-attention", type=float, default=0.0,
                     help="fraction of layers keeping attention output + lse under checkpointing")
    mem.add_argument("--offload-checkpoints", action="store_true", help="checkpointed layer inputs in host memory")
    mem.add_argument("--offload-optimizer", action="store_true",
                     help="ZeRO optimizer states and fp32 gradients in host memory")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if args.memory:
        print(_memory_report(args))
        return
    prob = Problem(args.seq, args.nodes, args.gpus_per_node, args.heads, args.kv_heads or args.heads,
                   args.head_dim, args.batch, args.elem_bytes, not args.non_causal)
    try:
        hw = _hardware_from_args(args, args.head_dim)
        preds = predict(prob, hw)
    except ValueError as exc:
        ap.error(str(exc))
    best = choose(prob, hw, implemented_only=not args.all)
    if args.json:
        print(json.dumps({"problem": asdict(prob), "hardware": asdict(hw),
                          "predictions": [x.to_dict() for x in preds], "choice": asdict(best)}, indent=1))
        return
    print(format_table(preds))
    print(f"choice: schedule={best.schedule} backward={best.backward} ({best.total_ms:.1f} ms predicted"
          f"{'' if args.all else ', implemented schedules only'})")
    if args.calibration or args.kernel_bench:
        print(f"hardware: {_describe(hw)}")


if __name__ == "__main__":
    main()
