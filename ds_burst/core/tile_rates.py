"""Measured kernel rates against tile length: the cost model's kernel term on one GPU kind.

A rate table holds, for one GPU kind, head dimension and dtype, TFLOP/s curves against the tile's length in
tokens (the project's FLOP counts: forward ``4*B*H*Sq*Sk*D``, halved on causal tiles; backward 2.5x that). Each
curve is one ``(kind, kernel)``:

* ``diag``: the first step of a zigzag causal ring, ``s`` queries against their own ``s`` keys (causal), with the
  tile contract's ``fwd_step`` / ``bwd_step`` of ``kernel`` (``triton``, ``sdpa``, ``torch``);
* ``step``: every later zigzag step, ``s`` queries against ``s/2`` earlier keys (nothing masked), same calls;
* ``whole``: ds-burst's whole one-rank causal call over ``s`` tokens (``burst_attn_func`` with ``kernel``;
  ``auto`` is what schedule ``ulysses`` runs after its all-to-all);
* ``peer``: torch SDPA over ``s`` tokens, causal (``cudnn`` on CUDA; the DeepSpeed-Ulysses rank's local attention).

Between measured lengths a rate is interpolated linearly in ``log2(tokens)``; outside them it is the nearest
measured rate. ``python -m ds_burst.plan calibrate --tiles`` measures a table (:mod:`ds_burst.cli.calibrate`);
the tables shipped in ``ds_burst/core/rates/tiles_<gpu>.json`` name the results file they were copied from.
Pure Python.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources

TILE_RATES_FORMAT = "ds-burst-tile-rates/1"
KINDS = ("diag", "step", "whole", "peer")
#: GPU kinds with a shipped table, and the substring of ``torch.cuda.get_device_name`` that names each
SHIPPED_GPUS = {"h100": "H100", "h200": "H200"}

Curve = tuple[tuple[int, float, float], ...]  # (tokens, fwd TFLOP/s, bwd TFLOP/s), tokens ascending


@dataclass(frozen=True)
class TileRates:
    """Kernel rates against tile length for one GPU kind (hashable: the cost model caches on it)."""

    gpu: str
    head_dim: int
    dtype: str
    curves: tuple[tuple[str, str, Curve], ...]  # (kind, kernel, curve)

    def kernels(self, kind: str) -> tuple[str, ...]:
        """The kernels with a ``kind`` curve."""
        return tuple(kern for k, kern, _ in self.curves if k == kind)

    def rate(self, kind: str, kernel: str, tokens: int) -> tuple[float, float]:
        """``(forward, backward)`` TFLOP/s of ``kernel`` on a ``kind`` tile of ``tokens`` tokens. Raises
        ``KeyError`` when the table has no such curve."""
        for k, kern, curve in self.curves:
            if k == kind and kern == kernel:
                return _interpolate(curve, tokens)
        raise KeyError(f"tile rates for {self.gpu}: no {kind!r} curve for kernel {kernel!r} "
                       f"(have {[(k, n) for k, n, _ in self.curves]})")

    def to_dict(self) -> dict:
        """The JSON form (the ``curves`` object of a tile-rates file)."""
        out: dict = {}
        for kind, kern, curve in self.curves:
            out.setdefault(kind, {})[kern] = [{"tokens": t, "fwd_tflops": f, "bwd_tflops": b} for t, f, b in curve]
        return {"gpu": self.gpu, "head_dim": self.head_dim, "dtype": self.dtype, "curves": out}


def _interpolate(curve: Curve, tokens: int) -> tuple[float, float]:
    if tokens <= curve[0][0]:
        return curve[0][1], curve[0][2]
    if tokens >= curve[-1][0]:
        return curve[-1][1], curve[-1][2]
    x = math.log2(tokens)
    for (t0, f0, b0), (t1, f1, b1) in zip(curve, curve[1:]):
        if t0 <= tokens <= t1:
            w = (x - math.log2(t0)) / (math.log2(t1) - math.log2(t0))
            return f0 + w * (f1 - f0), b0 + w * (b1 - b0)
    raise AssertionError("unreachable: tokens inside the curve")


def from_dict(doc: dict, where: str = "tile rates") -> TileRates:
    """A :class:`TileRates` from a tile-rates document (``{"format", "gpu", "head_dim", "dtype", "curves"}``);
    ``ValueError`` naming ``where`` for anything malformed (unknown kind, non-positive rate, unsorted or repeated
    lengths, an empty curve)."""
    if not isinstance(doc, dict) or doc.get("format") != TILE_RATES_FORMAT:
        raise ValueError(f"{where}: expected format {TILE_RATES_FORMAT!r}")
    curves_in = doc.get("curves")
    if not isinstance(curves_in, dict) or not curves_in:
        raise ValueError(f"{where}: 'curves' must be a non-empty object of kind -> kernel -> points")
    curves = []
    for kind, by_kernel in sorted(curves_in.items()):
        if kind not in KINDS or not isinstance(by_kernel, dict):
            raise ValueError(f"{where}: unknown curve kind {kind!r} (known: {KINDS})")
        for kern, points in sorted(by_kernel.items()):
            try:
                curve = tuple((int(p["tokens"]), float(p["fwd_tflops"]), float(p["bwd_tflops"])) for p in points)
            except (TypeError, KeyError, ValueError):
                raise ValueError(f"{where}: {kind}/{kern}: each point needs tokens, fwd_tflops, bwd_tflops") from None
            ok = curve and all(t > 0 and f > 0 and b > 0 and math.isfinite(f) and math.isfinite(b)
                               for t, f, b in curve)
            if not ok or any(a[0] >= b[0] for a, b in zip(curve, curve[1:])):
                raise ValueError(f"{where}: {kind}/{kern}: positive rates at strictly increasing token counts needed")
            curves.append((kind, kern, curve))
    head_dim, dtype = doc.get("head_dim"), doc.get("dtype")
    if not isinstance(head_dim, int) or not isinstance(dtype, str):
        raise ValueError(f"{where}: 'head_dim' (int) and 'dtype' (str) are required")
    return TileRates(str(doc.get("gpu", "?")), head_dim, dtype, tuple(curves))


def read_file(path: str) -> list[TileRates]:
    """Every table of a tile-rates JSON file (``python -m ds_burst.plan calibrate --tiles --out FILE``);
    ``ValueError`` when unreadable or malformed."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read tile rates {path}: {exc}") from None
    return read_tables(doc, f"tile rates {path}")


def at_head_dim(tables: list[TileRates], head_dim: int) -> TileRates | None:
    """The first of ``tables`` measured at ``head_dim`` (``None`` when none is)."""
    return next((t for t in tables if t.head_dim == head_dim), None)


def read(path: str, head_dim: int | None = None) -> TileRates:
    """The table in a tile-rates file at ``head_dim`` (``None``: the file's first table). ``ValueError`` when
    unreadable or without that head dim."""
    tables = read_file(path)
    table = tables[0] if head_dim is None else at_head_dim(tables, head_dim)
    if table is None:
        raise ValueError(f"tile rates {path}: no table at head_dim={head_dim} (have {[t.head_dim for t in tables]})")
    return table


def element_size(dtype: str) -> int:
    """Bytes per element of a table's ``dtype`` name (``bfloat16``, ``float16``: 2; ``float32``: 4; ``float64``: 8)."""
    sizes = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
    if dtype not in sizes:
        raise ValueError(f"tile rates: unknown dtype {dtype!r} (known: {sorted(sizes)})")
    return sizes[dtype]


def gpu_kind(device_name: str) -> str | None:
    """The shipped table's key for a ``torch.cuda.get_device_name`` string (``None``: no table for this GPU)."""
    for key, mark in SHIPPED_GPUS.items():
        if mark in device_name:
            return key
    return None


@functools.cache
def shipped(gpu: str | None, head_dim: int = 128) -> TileRates | None:
    """The table shipped for GPU kind ``gpu`` at ``head_dim`` (``ds_burst/core/rates/tiles_<gpu>.json``, which may
    hold one table per head dimension), ``None`` without one."""
    if gpu is None:
        return None
    res = resources.files("ds_burst.core").joinpath("rates", f"tiles_{gpu}.json")
    if not res.is_file():
        return None
    return at_head_dim(read_tables(json.loads(res.read_text()), f"shipped tile rates tiles_{gpu}.json"), head_dim)


def read_tables(doc: dict, where: str) -> list[TileRates]:
    """The tables of a tile-rates document: one (``curves`` at the top level) or several (``tables``: a list of
    ``{head_dim, dtype, curves}``, sharing the top level's ``format`` and ``gpu``)."""
    if isinstance(doc, dict) and isinstance(doc.get("tables"), list):
        return [from_dict({"format": doc.get("format"), "gpu": doc.get("gpu")} | t, f"{where} table {i}")
                for i, t in enumerate(doc["tables"])]
    return [from_dict(doc, where)]
