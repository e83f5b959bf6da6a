"""Cost model: predicted forward/backward time of each schedule and backward pattern, and the choice.

Per ring step a rank computes one tile pair and moves one block; the step takes the longer of the two
(communication overlaps compute) plus a fixed per-message latency. The first (local, diagonal) step runs
causal tiles, every later zigzag step unmasked tiles of the same FLOPs. Schedules:

* ``ring``: flat ring over all ``P = nodes * L`` ranks; with several nodes every step waits for the
  inter-node link.
* ``double_ring``: intra-node ring; each block crosses nodes once per node-cycle of ``L`` steps, overlapped
  with the intra-node steps (one NIC per GPU, all rails in parallel).
* ``ulysses_ring``: all-to-all over heads inside the node, then a ring of ``nodes`` steps across nodes
  (KV heads replicated up to ``L`` when fewer); the all-to-alls do not overlap compute.
* ``ulysses``: the all-to-all over heads across all ``P`` ranks, then ds-burst's whole one-rank call on ``Hq/P``
  heads (``schedule="ulysses"``; needs heads divisible by P), no overlap of its all-to-alls. It is an ``auto``
  candidate only where the hardware has a measured tile table (:attr:`Hardware.tiles`): whether it beats the ring
  inside a node turns on the kernel rates at the ring's tile length, which only a measurement gives.

Kernel term: with a tile table (:mod:`ds_burst.core.tile_rates`, shipped per GPU kind, measured by
``python -m ds_burst.plan calibrate --tiles``) every tile is charged the rate measured at its own length (the
ring's ``diag``/``step`` curves at ``S/P`` tokens, the Ulysses call's ``whole`` curve at ``S``, DeepSpeed-Ulysses'
cuDNN ``peer`` curve at ``S``), for ``kernel="auto"`` the kernel whose ring pass is fastest; without one, the
scalar rates of :class:`Hardware` for every tile.


Pure Python: ``python -m ds_burst.plan`` (:mod:`ds_burst.cli.plan`) is its command line.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources

from ds_burst.core import settings, tile_rates
from ds_burst.core.cost import backward_bytes_per_token
from ds_burst.core.tile_rates import TileRates, shipped

RATES_FORMAT = "ds-burst-rates/1"
#: the figures every rates file holds (the defaults of :class:`Hardware` that are numbers)
RATE_FIGURES = ("fwd_tflops", "bwd_tflops", "intra_gbps", "inter_gbps", "a2a_intra_gbps", "a2a_inter_gbps",
                "intra_latency_s", "inter_latency_s")
#: the rates file ``Hardware()`` starts from, in ``ds_burst/core/rates/``
DEFAULT_RATES = "h200.json"


def read_rates(name: str = DEFAULT_RATES) -> dict[str, float]:
    """The figures of a rates file shipped in ``ds_burst/core/rates/`` (each with the source it was taken from:
    a results file of ``docs/results`` and its date, or ``assumed``). Raises ``ValueError`` for a file that
    lacks a figure or its source, or holds one it should not."""
    text = resources.files("ds_burst.core").joinpath("rates", name).read_text()
    data = json.loads(text)
    figures = data.get("figures") if isinstance(data, dict) and data.get("format") == RATES_FORMAT else None
    if not isinstance(figures, dict):
        raise ValueError(f"rates file {name}: expected format {RATES_FORMAT!r} with a 'figures' object")
    if sorted(figures) != sorted(RATE_FIGURES):
        raise ValueError(f"rates file {name}: figures {sorted(figures)}, expected {sorted(RATE_FIGURES)}")
    out = {}
    for key, entry in figures.items():
        value = entry.get("value") if isinstance(entry, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not entry.get("source"):
            raise ValueError(f"rates file {name}: {key} needs a numeric 'value' and a 'source'")
        out[key] = float(value)
    return out


_DEFAULTS = read_rates()  # read once, at import


@dataclass(frozen=True)
class Hardware:
    """Rates of one GPU and its links (TFLOP/s, GB/s per GPU and direction, seconds).

    ``fwd_tflops``/``bwd_tflops`` are the local kernel's rates on causal (diagonal) tiles; the ``*_full``
    rates are for unmasked tiles (every zigzag ring step after the local one, and all of non-causal
    attention), ``None`` = the causal rate. ``peer_*`` are the local-attention rates of the DeepSpeed-Ulysses
    comparison (``None`` = the same kernel as ds-burst). ``python -m ds_burst.plan calibrate`` measures them.
    The defaults of the numeric figures come from ``ds_burst/core/rates/h200.json`` (:func:`read_rates`), which
    names the measurement (or the assumption) behind each.
    """

    fwd_tflops: float = _DEFAULTS["fwd_tflops"]
    bwd_tflops: float = _DEFAULTS["bwd_tflops"]
    intra_gbps: float = _DEFAULTS["intra_gbps"]
    inter_gbps: float = _DEFAULTS["inter_gbps"]
    a2a_intra_gbps: float = _DEFAULTS["a2a_intra_gbps"]
    a2a_inter_gbps: float = _DEFAULTS["a2a_inter_gbps"]
    intra_latency_s: float = _DEFAULTS["intra_latency_s"]
    inter_latency_s: float = _DEFAULTS["inter_latency_s"]
    fwd_tflops_full: float | None = None
    bwd_tflops_full: float | None = None
    peer_fwd_tflops: float | None = None
    peer_bwd_tflops: float | None = None
    tiles: TileRates | None = None

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

    def figures(self) -> dict[str, float | None]:
        """The numeric figures (every field but :attr:`tiles`), for printing and JSON."""
        return {name: getattr(self, name) for name in HARDWARE_FIELDS}

    def to_dict(self) -> dict:
        """The figures and, where present, the tile table (JSON output)."""
        return self.figures() | {"tiles": None if self.tiles is None else self.tiles.to_dict()}

    def check(self) -> None:
        """Raise ``ValueError`` unless every rate is a finite positive number (latencies: non-negative)."""
        for name, value in self.figures().items():
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


def _tile_seconds(p: Problem, hw: Hardware, flops: float, tokens: int,
                  kernel: str) -> tuple[float, float, float, float]:
    """Forward and backward seconds of the local (diagonal) step and of every later ring step of ``kernel``.

    Causal: the local step runs masked diagonal tiles, the later zigzag steps unmasked tiles of the same FLOPs.
    The backward does 2.5x the forward FLOPs. With a tile table the rates are ``kernel``'s at ``tokens``
    (the ``diag`` and ``step`` curves), else the scalar rates.
    """
    if hw.tiles is None:
        f_loc, b_loc = hw.rates(p.causal)
        f_st, b_st = hw.rates(False)
    else:
        f_loc, b_loc = hw.tiles.rate("diag" if p.causal else "step", kernel, tokens)
        f_st, b_st = hw.tiles.rate("step", kernel, tokens)
    return (flops / (f_loc * 1e12), 2.5 * flops / (b_loc * 1e12), flops / (f_st * 1e12), 2.5 * flops / (b_st * 1e12))


def ring_kernel(p: Problem, hw: Hardware, tokens: int, blocks: int, kernel: str = "auto") -> str:
    """The tile kernel the model charges a ring of ``blocks`` steps over ``tokens``-token tiles: ``kernel`` when
    concrete, for ``"auto"`` the table's kernel with the fastest pass (one local step and ``blocks - 1`` later
    steps, forward and backward, by :func:`_tile_seconds`), as ``kernel="auto"`` measures it per shape; ``kernel``
    itself without a table."""
    tiles = hw.tiles
    if tiles is None or kernel != "auto":
        return kernel
    cands = [k for k in tiles.kernels("step") if not p.causal or k in tiles.kernels("diag")]
    if not cands:
        raise ValueError(f"tile rates for {tiles.gpu}: no kernel with ring curves")

    def cost(k: str) -> float:
        f_loc, b_loc, f_st, b_st = _tile_seconds(p, hw, 1.0, tokens, k)
        return f_loc + b_loc + (blocks - 1) * (f_st + b_st)

    return min(cands, key=cost)


def _step_seconds(p: Problem, hw: Hardware, flops: float, tokens: int, blocks: int,
                  kernel: str = "auto") -> tuple[float, float, float, float]:
    """:func:`_tile_seconds` of the kernel :func:`ring_kernel` charges this ring."""
    return _tile_seconds(p, hw, flops, tokens, ring_kernel(p, hw, tokens, blocks, kernel))


def _chain(steps: int, c_local: float, c_step: float, hop: float) -> float:
    """Seconds of a local step and ``steps`` received blocks when each hop overlaps the previous compute."""
    if steps <= 0:
        return c_local
    return max(c_local, hop) + (steps - 1) * max(c_step, hop) + c_step


def compute_seconds(p: Problem, schedule: str, hw: Hardware = Hardware(), peer: bool = False,
                    kernel: str = "auto") -> tuple[float, float]:
    """``(forward, backward)`` seconds of local attention compute that the model charges one rank under
    ``schedule``, communication excluded (:func:`predict` adds links, latency and all-to-alls on top; with
    unbounded links and no latency its times are these).

    ``ring``/``double_ring``: the local (diagonal) tile pair and ``P - 1`` received blocks of ``S/P`` tokens, all
    ``Hq`` heads; ``ulysses_ring``: the same over ``nodes`` node-level blocks of ``S/nodes`` tokens on ``Hq/L`` heads;
    ``ulysses``: the whole sequence on ``Hq/P`` heads in one causal call (``peer``: DeepSpeed-Ulysses' cuDNN call,
    the table's ``peer`` curve or :meth:`Hardware.peer_rates`). ``kernel``: the tile kernel (``"auto"``: the one
    :func:`ring_kernel` picks). Raises ``ValueError`` for an unknown schedule or heads it cannot split.
    """
    p.validate()
    if schedule not in _COMPUTE:
        raise ValueError(f"no compute term for schedule {schedule!r}: known {tuple(_COMPUTE)}")
    return _COMPUTE[schedule](p, hw, peer, kernel)


def _ring_compute(p: Problem, hw: Hardware, heads: int, tokens: int, blocks: int,
                  kernel: str) -> tuple[float, float]:
    """Local step and ``blocks - 1`` received blocks of ``tokens`` tokens on ``heads`` heads."""
    cf_loc, cb_loc, cf, cb = _step_seconds(p, hw, _pair_flops(p, tokens, tokens, heads), tokens, blocks, kernel)
    return cf_loc + (blocks - 1) * cf, cb_loc + (blocks - 1) * cb


def _split(heads: int, ways: int, what: str) -> int:
    if heads % ways:
        raise ValueError(f"heads ({heads}) not divisible by {what} ({ways})")
    return heads // ways


def whole_rates(p: Problem, hw: Hardware, peer: bool, kernel: str = "auto") -> tuple[float, float]:
    """``(forward, backward)`` TFLOP/s of one causal call over the whole sequence: ds-burst's one-rank call with
    ``kernel`` (table curve ``whole``) or, with ``peer``, DeepSpeed-Ulysses' cuDNN call (curve ``peer``); without a
    table the scalar rates (:meth:`Hardware.peer_rates` for the peer when set)."""
    if hw.tiles is None:
        if peer:
            return hw.peer_rates()
        return hw.rates(p.causal)
    if peer:
        return hw.tiles.rate("peer", hw.tiles.kernels("peer")[0], p.seq)
    have = hw.tiles.kernels("whole")
    if kernel not in have:  # e.g. "auto" in a table measured per kernel: the fastest of them
        if not have:
            raise ValueError(f"tile rates for {hw.tiles.gpu}: no 'whole' curve")
        kernel = min(have, key=lambda k: _pass_seconds(*hw.tiles.rate("whole", k, p.seq)))
    return hw.tiles.rate("whole", kernel, p.seq)


def _pass_seconds(fwd_tflops: float, bwd_tflops: float) -> float:
    """Seconds per FLOP of the forward of a call and its backward (2.5x the forward's FLOPs) at these rates: how
    the kernels are ranked, for the ring (:func:`ring_kernel`) and the whole call alike."""
    return 1.0 / fwd_tflops + 2.5 / bwd_tflops


def _ulysses_compute(p: Problem, hw: Hardware, peer: bool, kernel: str) -> tuple[float, float]:
    flops = _pair_flops(p, p.seq, p.seq, _split(p.heads, p.world, "P"))
    rf, rb = whole_rates(p, hw, peer, kernel)
    return flops / (rf * 1e12), 2.5 * flops / (rb * 1e12)


#: the compute term of each schedule (``Problem``, ``Hardware``, peer rates, kernel) -> (fwd s, bwd s)
_COMPUTE = {
    "ring": lambda p, hw, peer, kern: _ring_compute(p, hw, p.heads, p.seq // p.world, p.world, kern),
    "double_ring": lambda p, hw, peer, kern: _ring_compute(p, hw, p.heads, p.seq // p.world, p.world, kern),
    "ulysses_ring": lambda p, hw, peer, kern: _ring_compute(
        p, hw, _split(p.heads, p.gpus_per_node, "gpus_per_node"), p.seq // p.nodes, p.nodes, kern),
    "ulysses": _ulysses_compute,
}


def predict(p: Problem, hw: Hardware = Hardware()) -> list[Prediction]:
    """Predictions for every schedule and backward pattern that can run this problem."""
    p.validate()
    hw.check()
    s = p.seq // p.world
    e = p.elem_bytes
    out: list[Prediction] = []
    fwd_bytes_tok = 2 * p.kv_heads * p.head_dim * e * p.batch
    multi = p.nodes > 1
    cf_loc, cb_loc, cf, cb = _step_seconds(p, hw, _pair_flops(p, s, s, p.heads), s, p.world)
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
    out.append(predict_ulysses(p, hw))
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
    cf_loc, cb_loc, cf, cb = _step_seconds(p, hw, _pair_flops(p, tokens, tokens, hq), tokens, n)
    wire_f = tokens * 2 * hkv * d * e * p.batch / (hw.inter_gbps * 1e9)
    wire_b = tokens * backward_bytes_per_token(backward, hq, hkv, d, e) * p.batch / (hw.inter_gbps * 1e9)
    f = _chain(n - 1, cf_loc, cf, hw.inter_latency_s + wire_f) + a2a_f
    b = _chain(n - 1, cb_loc, cb, hw.inter_latency_s + wire_b) + a2a_b
    compute = cf_loc + cb_loc + (n - 1) * (cf + cb)
    return Prediction("ulysses_ring", backward, f * 1e3, b * 1e3, max(0.0, f + b - compute) * 1e3,
                      comm_ms=(a2a_f + a2a_b + (n - 1) * (wire_f + wire_b)) * 1e3)


def predict_ulysses(p: Problem, hw: Hardware, peer: bool = False) -> Prediction:
    """Ulysses over all ``P`` ranks: the all-to-alls of q, k, v (KV heads replicated up to ``P``) and of the output
    (forward), of dO and of dq, dk, dv (backward), none overlapped, each with one link latency; the local call is
    the whole sequence on ``Hq/P`` heads. ``peer=False``: ds-burst's ``schedule="ulysses"`` (its own one-rank call,
    :func:`whole_rates`); ``peer=True``: DeepSpeed-Ulysses with cuDNN (the ``peer`` rates)."""
    P = p.world
    name = "ulysses_peer" if peer else "ulysses"
    if p.heads % P:
        return Prediction(name, "-", float("inf"), float("inf"), 0.0, "heads not divisible by P")
    s = p.seq // P
    multi = p.nodes > 1
    bw = (hw.a2a_inter_gbps if multi else hw.a2a_intra_gbps) * 1e9
    lat = hw.inter_latency_s if multi else hw.intra_latency_s
    kv = max(p.kv_heads, P)
    a2a = lambda heads_total: lat + s * heads_total * p.head_dim * p.elem_bytes * p.batch * (P - 1) / P / bw
    flops = _pair_flops(p, p.seq, p.seq, p.heads // P)
    rf, rb = whole_rates(p, hw, peer)
    comm = 2 * (a2a(p.heads + 2 * kv) + a2a(p.heads))
    f = a2a(p.heads + 2 * kv) + a2a(p.heads) + flops / (rf * 1e12)
    b = a2a(p.heads) + a2a(p.heads + 2 * kv) + 2.5 * flops / (rb * 1e12)
    note = "DeepSpeed-Ulysses, cuDNN (peer rates)" if peer else "ds-burst schedule='ulysses'"
    return Prediction(name, "-", f * 1e3, b * 1e3, comm * 1e3, note, comm_ms=comm * 1e3)


#: the candidates of schedule="auto" ("ulysses" only where the hardware has a measured tile table)
IMPLEMENTED = ("ring", "double_ring", "ulysses_ring", "ulysses")
# On equal predictions prefer the topology-aware schedules (robust to a misestimated inter-node link), then the
# ring (its communication overlaps compute).
_PREFERENCE = {"double_ring": 0, "ulysses_ring": 1, "ring": 2, "ulysses": 3}


def choose(p: Problem, hw: Hardware = Hardware(), implemented_only: bool = True) -> Prediction:
    """The fastest predicted ds-burst schedule/backward pair (only ``auto``'s candidates by default: every
    schedule of :data:`IMPLEMENTED`, ``ulysses`` only with a tile table)."""
    cands = predict(p, hw)
    if implemented_only:
        cands = [x for x in cands if x.schedule in IMPLEMENTED and (x.schedule != "ulysses" or hw.tiles is not None)]
    cands = [x for x in cands if math.isfinite(x.total_ms)] or cands
    best = min(x.total_ms for x in cands)
    # predictions equal up to rounding count as ties
    ties = [x for x in cands if x.total_ms <= best * (1 + 1e-9)]
    return min(ties, key=lambda x: (_PREFERENCE.get(x.schedule, 4), x.total_ms, x.comm_ms))


@functools.lru_cache(maxsize=32)
def hardware_for(gpu: str | None, head_dim: int, elem_bytes: int) -> Hardware:
    """The figures ``schedule="auto"`` uses on GPU kind ``gpu`` (:func:`ds_burst.core.tile_rates.gpu_kind`): the
    defaults, with a tile table measured at this head dimension and element size: the file named by
    ``DS_BURST_TILE_RATES`` (any device), else the table shipped for ``gpu``; the defaults alone without one."""
    path = settings.raw(settings.TILE_RATES)
    tiles = tile_rates.at_head_dim(tile_rates.read_file(path), head_dim) if path else shipped(gpu, head_dim)
    if tiles is not None and tile_rates.element_size(tiles.dtype) != elem_bytes:
        tiles = None
    return Hardware(tiles=tiles)


@functools.lru_cache(maxsize=256)
def choose_schedule(seq: int, nodes: int, gpus_per_node: int, heads: int, kv_heads: int, head_dim: int,
                    elem_bytes: int, causal: bool, gpu: str | None = None) -> str:
    """The schedule ``schedule="auto"`` runs for one attention call (same answer on every rank of one GPU kind;
    ranks that differ are told by the per-call header, which carries the schedule). Inside one node: the flat
    ring, or ``ulysses`` where the tile table of ``gpu`` predicts it faster; across nodes :func:`choose`."""
    hw = hardware_for(gpu, head_dim, elem_bytes)
    if seq % (2 * nodes * gpus_per_node) or heads % kv_heads or (nodes <= 1 and hw.tiles is None):
        return "ring"
    prob = Problem(seq, nodes, gpus_per_node, heads, kv_heads, head_dim, 1, elem_bytes, causal)
    return choose(prob, hw).schedule


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


# ---------------------------------------------------------------------------------------------
# Figures from files: calibration JSON, kernel benchmark JSON

CALIBRATION_FORMAT = "ds-burst-calibration/1"
HARDWARE_FIELDS = tuple(f.name for f in fields(Hardware) if f.name != "tiles")  # the numeric figures


def read_json(path: str, what: str) -> dict:
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
    data = read_json(path, "calibration file")
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
    data = read_json(path, "kernel benchmark")
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


def split_bench_arg(value: str) -> tuple[str, str]:
    """``FILE[:METHOD]`` (method default ``ds-burst-triton``)."""
    path, sep, method = value.rpartition(":")
    if not sep or not method or os.path.exists(value):
        return value, "ds-burst-triton"
    return path, method


# ---------------------------------------------------------------------------------------------
# Projection over sequence lengths
