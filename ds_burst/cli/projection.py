"""Projection of the schedules against DeepSpeed-Ulysses over a range of sequence lengths (``python -m
ds_burst.plan project``): rows, a markdown table and a plot."""

from __future__ import annotations

import math

from ds_burst.core.cost_model import Hardware, Problem, choose, predict, predict_ulysses

SCHEDULE_ORDER = ("ring", "double_ring", "ulysses_ring")


def project(nodes: int, gpus_per_node: int, seqs: list[int], heads: int, kv_heads: list[int], head_dim: int,
            hw: Hardware, peer_hw: Hardware | None = None, elem_bytes: int = 2, causal: bool = True) -> list[dict]:
    """One row per (S, Hkv, schedule): each ds-burst schedule with its faster backward pattern (``ulysses``:
    ds-burst's own) and, with ``peer_hw`` (or a tile table in ``hw``: its cuDNN curve), DeepSpeed-Ulysses with the
    peer kernel rates (``ulysses_peer``). The row of the schedule ``choose`` picks has ``chosen=True``; every row
    has ``speedup_of_auto``: the peer's time over the chosen schedule's (``None`` without a peer)."""
    if peer_hw is None and hw.tiles is not None:
        peer_hw = hw  # the table's cuDNN curve
    rows = []
    for seq in seqs:
        for hkv in kv_heads:
            prob = Problem(seq, nodes, gpus_per_node, heads, hkv, head_dim, 1, elem_bytes, causal)
            preds = predict(prob, hw)
            best = choose(prob, hw)
            cands = [(x.schedule, x) for x in preds]
            speedup = None
            if peer_hw is not None:
                peer = predict_ulysses(prob, peer_hw, peer=True)
                cands.append(("ulysses_peer", peer))
                speedup = peer.total_ms / best.total_ms
            for name in (*SCHEDULE_ORDER, "ulysses", "ulysses_peer"):
                mine = [x for n, x in cands if n == name]
                if not mine:
                    continue
                # equal times (communication hidden): the pattern that sends fewer bytes, as backward="auto" does
                fastest = min(y.total_ms for y in mine)
                x = min((y for y in mine if y.total_ms <= fastest * (1 + 1e-9)), key=lambda y: y.comm_ms)
                rows.append({"S": seq, "Hq": heads, "Hkv": hkv, "schedule": name} | x.to_dict() | {
                    "schedule": name, "chosen": x.schedule == best.schedule and x.backward == best.backward
                    and name != "ulysses_peer", "speedup_of_auto": speedup})
    return rows


def projection_markdown(rows: list[dict], peer_label: str = "peer kernel") -> str:
    """Two markdown tables: fwd+bwd ms per schedule (backward pattern in brackets), exposed communication ms."""
    present = [n for n in (*SCHEDULE_ORDER, "ulysses", "ulysses_peer") if any(r["schedule"] == n for r in rows)]
    label = {"ulysses": "ds-burst ulysses", "ulysses_peer": f"DeepSpeed-Ulysses ({peer_label})"}
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
            cells = " | ".join(cell(got.get(n), field, with_bwd) for n in present)
            out.append(f"| {tokens_label(seq)} | {hkv} | {cells} |")
        out.append("")
    if any(r.get("speedup_of_auto") for r in rows):
        kvs = sorted({k[1] for k in keys}, reverse=True)
        out.append("speedup of `auto` over DeepSpeed-Ulysses (its time / auto's; > 1: auto faster)\n")
        out.append("| S | " + " | ".join(f"Hkv={h}" for h in kvs) + " |")
        out.append("| --- |" + " --- |" * len(kvs))
        for seq in sorted({k[0] for k in keys}):
            vals = [next((r["speedup_of_auto"] for r in rows if r["S"] == seq and r["Hkv"] == h), None) for h in kvs]
            out.append(f"| {tokens_label(seq)} | " + " | ".join("n/a" if v is None else f"{v:.2f}x" for v in vals)
                       + " |")
        out.append("")
    return "\n".join(out)


def tokens_label(n: int) -> str:
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
    label = {"ulysses": "ds-burst ulysses", "ulysses_peer": f"DeepSpeed-Ulysses ({peer_label})"}
    fig, axes = plt.subplots(2, len(kv), figsize=(5.5 * len(kv), 7), squeeze=False, sharex=True)
    for col, hkv in enumerate(kv):
        base = "ulysses_peer" if any(r["schedule"] == "ulysses_peer" for r in rows) else "ulysses"
        ref = {r["S"]: r["total_ms"] for r in rows if r["schedule"] == base and r["Hkv"] == hkv}
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
        axes[1][col].set_ylabel(f"time / {label[base]}")
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
