"""``kernel="auto"`` on GPUs: a measured, cached, rank-agreed choice of the local tile kernel per shape.

The first call with a new shape key (device, dtype, batch, ``S_local``, heads, head dim, causal) times one
forward+backward of a causal and of a full tile with each candidate kernel at the call's local shape, scores
them by the ring's mix of tiles (one diagonal tile and ``P - 1`` half tiles for zigzag causal, ``P`` full tiles
otherwise) and keeps the faster. The ranks of the group then take group rank 0's pick (one small all-gather,
issued by every rank on the same call because every process starts with an empty cache and sees the same
sequence of shapes), so all ranks run the same kernel and the same backward pattern.

Picks are kept in memory and, unless ``DS_BURST_KERNEL_CACHE`` is ``0``, in a JSON file (default
``~/.cache/ds_burst/kernel_choice.json``, or the path in ``DS_BURST_KERNEL_CACHE``) so that later runs skip the
measurement. Delete the file to measure again.

Candidates: ``triton`` always; ``sdpa`` (cuDNN/flash per tile) for 16-bit inputs without a sliding window, when
the backward may be the K/V ring (``backward`` is not ``"burst"``) and the run is not ``deterministic``.
On CPU ``auto`` is the PyTorch reference kernel and nothing is measured.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ds_burst.core import settings
from ds_burst.kernels import registry

_MEMORY: dict[tuple[str, object], str] = {}
Timer = Callable[[str, tuple[int, int, int, int, int], torch.dtype, torch.device, bool], float]


def shape_key(q: torch.Tensor, k: torch.Tensor, causal: bool, world: int) -> str:
    """Cache key of a call: device name, dtype, ``B, S_local, Hq, Hkv, D``, causal, the ring size, and which
    Triton tiles run (``tiles:hopper-fwd`` / ``hopper-fwd+bwd`` where the Gluon Hopper kernels take the call), so
    that a pick measured with other tiles is measured again."""
    dev = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else q.device.type
    b, s, hq, d = q.shape
    dtype = str(q.dtype).removeprefix("torch.")
    return (f"{dev}|{dtype}|B{b}|S{s}|Hq{hq}|Hkv{k.shape[2]}|D{d}|causal{int(causal)}|P{world}"
            f"|tiles:{_triton_tiles(q, k)}")


def _triton_tiles(q: torch.Tensor, k: torch.Tensor) -> str:
    """Which Triton tiles ``kernel="triton"`` runs for this call (its record's ``path``: ``tl``, ``hopper-fwd`` or
    ``hopper-fwd+bwd``)."""
    try:
        return registry.get("triton").path(q, k)  # type: ignore[misc]
    except ValueError:  # triton not installed
        return "tl"


def candidates(q: torch.Tensor, window_finite: bool, backward: str, deterministic: bool) -> list[str]:
    """Kernels ``auto`` may pick for this call (see the module docstring)."""
    if q.device.type != "cuda":
        return ["torch"]
    names = ["triton"]
    sdpa = registry.get("sdpa")
    if (q.dtype in (torch.float16, torch.bfloat16) and not window_finite and not deterministic
            and not (sdpa.bwd_needs_out and backward == "burst")):
        names.append("sdpa")
    return names


def cache_path() -> Path | None:
    """The JSON file of persisted picks, or ``None`` when ``DS_BURST_KERNEL_CACHE=0``."""
    env = settings.raw(settings.KERNEL_CACHE, "\0unset")
    if env in ("0", ""):
        return None
    return Path.home() / ".cache" / "ds_burst" / "kernel_choice.json" if env == "\0unset" else Path(env)


def _load() -> dict[str, dict]:
    path = cache_path()
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is measured again, never trusted


def _store(key: str, entry: dict) -> None:
    path = cache_path()
    if path is None:
        return
    try:
        data = _load()
        data[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: concurrent ranks never see half a file
    except OSError:
        pass  # a read-only home: keep the in-memory pick only


def time_tile(name: str, shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device,
              causal: bool, iters: int = 3) -> float:
    """Median ms of one forward+backward tile of kernel ``name`` at ``shape = (B, S, Hq, Hkv, D)``."""
    kern = registry.get(name).impl
    b, s, hq, hkv, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, s, hq, d, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(b, s, hkv, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
    dout = torch.randn_like(q)
    scale = d**-0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def run() -> None:
        out = torch.zeros(b, s, hq, d, device=device, dtype=acc)
        lse = torch.full((b, hq, s), float("-inf"), device=device, dtype=acc)
        kern.fwd_step(q, k, v, out, lse, scale=scale, causal=causal)
        o = out.to(dtype)
        delta = kern.bwd_preprocess(o, dout)
        dq = torch.zeros(b, s, hq, d, device=device, dtype=acc)
        dk, dv = (torch.zeros(b, s, hkv, d, device=device, dtype=acc) for _ in range(2))
        kern.bwd_step(q, k, v, dout, lse, delta, dq, dk, dv, scale=scale, causal=causal, out=o)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # compile / autotune / self-check outside the timing
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(names: Sequence[str], shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device,
            causal: bool, world: int, timer: Timer = time_tile) -> dict[str, float]:
    """Predicted ms per ring pass of each kernel: the tile mix of a ``world``-rank ring, from timed tiles.

    A kernel that fails on this shape scores ``inf`` (it is then never picked).
    """
    scores = {}
    for name in names:
        try:
            full = timer(name, shape, dtype, device, False)
            scores[name] = timer(name, shape, dtype, device, True) + (world - 1) / 2 * full if causal \
                else world * full
        except Exception:  # noqa: BLE001 - a kernel that cannot run this shape is simply not a candidate
            scores[name] = float("inf")
    return scores


def choose(q: torch.Tensor, k: torch.Tensor, causal: bool, window_finite: bool, backward: str,
           deterministic: bool, world: int, group_key: object, agree: Callable[[int], int] | None = None,
           timer: Timer = time_tile, names: Sequence[str] | None = None) -> str:
    """The concrete kernel of ``kernel="auto"`` for this call, identical on every rank of the group.

    ``world`` is the group's size and ``group_key`` identifies it in the in-memory cache; ``agree(index)``
    returns group rank 0's kernel index (a collective every member calls on the same call: the attention layer
    passes one over :mod:`ds_burst.dist`; this module uses no ``torch.distributed``). ``timer`` and ``names``
    (the candidates) are for tests; by default :func:`candidates` decides.
    """
    names = list(names) if names is not None else candidates(q, window_finite, backward, deterministic)
    if len(names) == 1:
        return names[0]
    key = f"{shape_key(q, k, causal, world)}|{'+'.join(names)}"
    # in memory per group as well: a miss (and its all-gather) happens on the same call on every member
    mem_key = (key, group_key)
    if mem_key not in _MEMORY:
        entry = _load().get(key)
        if not (isinstance(entry, dict) and entry.get("kernel") in names):
            shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3])
            scores = measure(names, shape, q.dtype, q.device, causal, world, timer)
            entry = {"kernel": min(names, key=lambda n: scores[n]), "ms": scores,
                     "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            _store(key, entry)
        pick = registry.names().index(entry["kernel"])
        if world > 1 and agree is not None:  # every rank runs what group rank 0 picked
            pick = agree(pick)
        _MEMORY[mem_key] = registry.names()[pick]
    return _MEMORY[mem_key]


def clear_memory() -> None:
    """Forget the in-memory picks of this process (tests; the JSON file is kept)."""
    _MEMORY.clear()
