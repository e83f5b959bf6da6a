"""Cost model: predicted forward/backward time of each schedule and backward pattern, and the choice.

    python -m ds_burst.plan --seq 1048576 --nodes 4 --gpus-per-node 8 --heads 32 --kv-heads 8 --head-dim 128

Per ring step a rank computes one tile pair and moves one block; the step takes the longer of the two
(communication overlaps compute) plus a fixed per-message latency. Schedules:

* ``ring``: flat ring over all ``P = nodes * L`` ranks; with several nodes every step waits for the
  inter-node link.
* ``double_ring``: intra-node ring; each block crosses nodes once per node-cycle of ``L`` steps, overlapped
  with the intra-node steps (one NIC per GPU, all rails in parallel).
* ``ulysses_ring``: all-to-all over heads inside the node, then a ring of ``nodes`` steps across nodes
  (KV heads replicated up to ``L`` when fewer).
* ``ulysses``: DeepSpeed-Ulysses over all ``P`` ranks (for comparison; needs heads divisible by P).

Backward patterns: ``burst`` (Q, dO, lse, delta and the fp32 dQ travel) and ``ring`` (K, V and fp32
dK, dV travel); bytes from :mod:`ds_burst.cost`. Defaults are H200 figures measured in this project
(``docs/BENCHMARKS.md``) and 400 Gb/s InfiniBand per GPU; every figure can be overridden.
``ulysses`` is only a comparison; the other three are ds-burst schedules (``schedule="auto"`` picks among
them with :func:`choose_schedule`).
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import asdict, dataclass

from .cost import backward_bytes_per_token


@dataclass(frozen=True)
class Hardware:
    """Rates of one GPU and its links (TFLOP/s, GB/s per GPU and direction, seconds)."""

    fwd_tflops: float = 520.0  # ds-burst Triton forward, H200, 32K causal, D=128 (docs/BENCHMARKS.md)
    bwd_tflops: float = 373.0  # ds-burst Triton backward alone at the same shape (2.5x fwd FLOPs)
    intra_gbps: float = 260.0  # NVLink ring step (send next, recv prev), H200 measured
    inter_gbps: float = 50.0  # 400 Gb/s InfiniBand, one NIC per GPU
    a2a_intra_gbps: float = 277.0  # all-to-all bus bandwidth inside a node, H200 measured
    a2a_inter_gbps: float = 45.0  # all-to-all bus bandwidth across nodes (estimate)
    intra_latency_s: float = 20e-6
    inter_latency_s: float = 30e-6


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
    """Predicted times (ms) of one schedule with one backward pattern."""

    schedule: str
    backward: str
    fwd_ms: float
    bwd_ms: float
    exposed_comm_ms: float
    note: str = ""

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms


def _pair_flops(p: Problem, q_tokens: int, k_tokens: int, heads: int) -> float:
    """Forward FLOPs of one ring step (zigzag causal steps are exactly half a block)."""
    return 4.0 * p.batch * heads * q_tokens * k_tokens * p.head_dim * (0.5 if p.causal else 1.0)


def _ring_time(steps: int, compute_s: float, comm_s: float, latency_s: float) -> tuple[float, float]:
    """Total and exposed-communication seconds of ``steps`` overlapped hops after a local step."""
    hop = latency_s + comm_s
    total = compute_s + steps * max(compute_s, hop)
    return total, steps * max(0.0, hop - compute_s)


def predict(p: Problem, hw: Hardware = Hardware()) -> list[Prediction]:
    """Predictions for every schedule and backward pattern that can run this problem."""
    p.validate()
    s = p.seq // p.world
    e = p.elem_bytes
    out: list[Prediction] = []
    fwd_bytes_tok = 2 * p.kv_heads * p.head_dim * e * p.batch
    multi = p.nodes > 1
    for backward in ("burst", "ring"):
        bwd_bytes_tok = backward_bytes_per_token(backward, p.heads, p.kv_heads, p.head_dim, e) * p.batch
        c_f = _pair_flops(p, s, s, p.heads) / (hw.fwd_tflops * 1e12)
        c_b = 2.5 * _pair_flops(p, s, s, p.heads) / (hw.bwd_tflops * 1e12)
        # flat ring: every hop waits for the slowest link in the ring
        bw, lat = (hw.inter_gbps, hw.inter_latency_s) if multi else (hw.intra_gbps, hw.intra_latency_s)
        f, fe = _ring_time(p.world - 1, c_f, s * fwd_bytes_tok / (bw * 1e9), lat)
        b, be = _ring_time(p.world - 1, c_b, s * bwd_bytes_tok / (bw * 1e9), lat)
        out.append(Prediction("ring", backward, f * 1e3, b * 1e3, (fe + be) * 1e3))
        if multi:
            out.append(_double_ring(p, hw, backward, s, c_f, c_b, fwd_bytes_tok, bwd_bytes_tok))
            out.append(_ulysses_ring(p, hw, backward))
    out.append(_ulysses(p, hw))
    return [x for x in out if x is not None]


def _double_ring(p: Problem, hw: Hardware, backward: str, s: int, c_f: float, c_b: float,
                 fwd_tok: float, bwd_tok: float) -> Prediction:
    L, n = p.gpus_per_node, p.nodes
    times, exposed = [], 0.0
    for c, tok in ((c_f, fwd_tok), (c_b, bwd_tok)):
        intra = hw.intra_latency_s + s * tok / (hw.intra_gbps * 1e9)
        inter = hw.inter_latency_s + s * tok / (hw.inter_gbps * 1e9)
        cycle_intra = (L - 1) * max(c, intra)
        # the inter-node transfer of a cycle overlaps the cycle's L-1 intra steps (and their compute)
        cycle = max(cycle_intra, inter) + c
        t = c + (L - 1) * max(c, intra) + (n - 1) * cycle
        times.append(t)
        exposed += (L - 1) * n * max(0.0, intra - c) + (n - 1) * max(0.0, inter - cycle_intra)
    return Prediction("double_ring", backward, times[0] * 1e3, times[1] * 1e3, exposed * 1e3)


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
    c_f = _pair_flops(p, tokens, tokens, hq) / (hw.fwd_tflops * 1e12)
    c_b = 2.5 * _pair_flops(p, tokens, tokens, hq) / (hw.bwd_tflops * 1e12)
    fwd_tok = 2 * hkv * d * e * p.batch
    bwd_tok = backward_bytes_per_token(backward, hq, hkv, d, e) * p.batch
    f, fe = _ring_time(n - 1, c_f, tokens * fwd_tok / (hw.inter_gbps * 1e9), hw.inter_latency_s)
    b, be = _ring_time(n - 1, c_b, tokens * bwd_tok / (hw.inter_gbps * 1e9), hw.inter_latency_s)
    return Prediction("ulysses_ring", backward, (f + a2a_f) * 1e3, (b + a2a_b) * 1e3, (fe + be + a2a_f + a2a_b) * 1e3)


def _ulysses(p: Problem, hw: Hardware) -> Prediction | None:
    P = p.world
    if p.heads % P:
        return Prediction("ulysses", "-", float("inf"), float("inf"), 0.0, "heads not divisible by P")
    s = p.seq // P
    bw = (hw.a2a_inter_gbps if p.nodes > 1 else hw.a2a_intra_gbps) * 1e9
    kv = max(p.kv_heads, P)
    a2a = lambda heads_total: s * heads_total * p.head_dim * p.elem_bytes * p.batch * (P - 1) / P / bw
    flops = _pair_flops(p, p.seq, p.seq, p.heads // P)
    f = a2a(p.heads + 2 * kv) + a2a(p.heads) + flops / (hw.fwd_tflops * 1e12)
    b = a2a(p.heads) + a2a(p.heads + 2 * kv) + 2.5 * flops / (hw.bwd_tflops * 1e12)
    comm = 2 * (a2a(p.heads + 2 * kv) + a2a(p.heads))
    return Prediction("ulysses", "-", f * 1e3, b * 1e3, comm * 1e3, "DeepSpeed-Ulysses with the same local kernel")


IMPLEMENTED = ("ring", "double_ring", "ulysses_ring")
# On equal predictions prefer the topology-aware schedules (robust to a misestimated inter-node link).
_PREFERENCE = {"double_ring": 0, "ulysses_ring": 1, "ring": 2}


def choose(p: Problem, hw: Hardware = Hardware(), implemented_only: bool = True) -> Prediction:
    """The fastest predicted ds-burst schedule/backward pair (only implemented schedules by default)."""
    cands = [x for x in predict(p, hw) if x.schedule != "ulysses"]
    if implemented_only:
        cands = [x for x in cands if x.schedule in IMPLEMENTED]
    return min(cands, key=lambda x: (x.total_ms, _PREFERENCE.get(x.schedule, 3)))


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
                          lm_head_chunk_tokens=args.lm_head_chunk, mlp_tiles=args.mlp_tiles)
    lines = [f"memory per GPU (GiB): S={args.seq}, SP={sp}, DP={args.dp}, ZeRO-{args.zero_stage}, "
             f"{args.layers} layers, hidden {cfg.hidden_size}, vocab {args.vocab}"]
    lines += [f"  {k:20s} {v:10.2f}" for k, v in est.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: print the prediction table and the choice."""
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
    for f in Hardware.__dataclass_fields__.values():
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default, help=f"default {f.default}")
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
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if args.memory:
        print(_memory_report(args))
        return
    prob = Problem(args.seq, args.nodes, args.gpus_per_node, args.heads, args.kv_heads or args.heads,
                   args.head_dim, args.batch, args.elem_bytes, not args.non_causal)
    hw = Hardware(**{k: getattr(args, k) for k in Hardware.__dataclass_fields__})
    try:
        preds = predict(prob, hw)
    except ValueError as exc:
        ap.error(str(exc))
    best = choose(prob, hw, implemented_only=not args.all)
    if args.json:
        print(json.dumps({"problem": asdict(prob), "hardware": asdict(hw),
                          "predictions": [asdict(x) | {"total_ms": x.total_ms} for x in preds],
                          "choice": asdict(best)}, indent=1))
        return
    print(format_table(preds))
    print(f"choice: schedule={best.schedule} backward={best.backward} ({best.total_ms:.1f} ms predicted"
          f"{'' if args.all else ', implemented schedules only'})")


if __name__ == "__main__":
    main()
