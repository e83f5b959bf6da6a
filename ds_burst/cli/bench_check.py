"""Cost-model validation against a ``launch/bench_ring.py`` JSON (``python -m ds_burst.plan validate``)."""

from __future__ import annotations

import shlex
from dataclasses import replace

from ds_burst.cli.projection import tokens_label
from ds_burst.core.cost_model import (
    Hardware,
    Problem,
    choose,
    predict,
    predict_ulysses,
    rates_from_kernel_bench,
    read_json,
)

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


def validate_bench(path: str, hw: Hardware | None = None, kernel_bench: str | None = None,
                   gpus_per_node: int | None = None, hw_kernel: str = "triton") -> list[dict]:
    """Predicted against measured forward and forward+backward ms for each row of a ``launch/bench_ring.py``
    JSON (causal, bf16, B=1 as that script runs).

    ds-burst rows (``ds-burst-<kernel>[-<schedule>]``) are predicted with ``hw``, or with the rates of the
    same kernel in ``kernel_bench`` (a ``launch/bench_kernels.py`` JSON) when given; Ulysses rows only with
    ``kernel_bench`` (its ``sdpa-cudnn``/``sdpa-flash`` rates). Nodes: ``gpus_per_node``, else the
    benchmark command's ``--gpus-per-node``, else one node. Rows that cannot be modelled come back with
    ``skipped`` saying why. ``err_*`` are ``(predicted - measured) / measured``.
    """
    hw = Hardware() if hw is None else hw
    from ds_burst.core.cost import choose_backward

    data = read_json(path, "ring benchmark")
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
                pred = predict_ulysses(prob, replace(hw, peer_fwd_tflops=rates["fwd_tflops"],
                                              peer_bwd_tflops=rates["bwd_tflops"]), peer=True)
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
        lines.append(f"| {r['method']} | {tokens_label(r['S'])} | {r['P']} | {r['nodes']} | {r['Hkv']} | "
                     f"{r['schedule']} / {r['backward']} | {r['pred_fwd_ms']:.1f} / {r['fwd_ms']:.1f} | "
                     f"{100 * r['err_fwd']:+.1f}% | {r['pred_fwdbwd_ms']:.1f} / {r['fwdbwd_ms']:.1f} | "
                     f"{100 * r['err_fwdbwd']:+.1f}% |")
    if skipped:
        lines += ["", "not compared:", *skipped]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

