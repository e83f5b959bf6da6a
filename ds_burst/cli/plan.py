"""Cost model: predicted forward/backward time of each schedule and backward pattern, and the choice.

    python -m ds_burst.plan --seq 1048576 --nodes 4 --gpus-per-node 8 --heads 32 --kv-heads 8 --head-dim 128
    torchrun --nproc_per_node N -m ds_burst.plan calibrate --out calib.json [--gpus-per-node L]
    python -m ds_burst.plan --seq 131072 --nodes 1 --gpus-per-node 2 --calibration calib.json
    python -m ds_burst.plan calibrate --tiles --out tiles.json
    python -m ds_burst.plan project --nodes 4 --gpus-per-node 8 --gpu h100 --out projection.json --plot projection.png
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
* ``ulysses``: DeepSpeed-Ulysses over all ``P`` ranks (ds-burst's ``schedule="ulysses"`` with the same kernel, or
  with the peer kernel's rates; needs heads divisible by P), no overlap of its all-to-alls.

Backward patterns: ``burst`` (Q, dO, lse, delta and the fp32 dQ travel) and ``ring`` (K, V and fp32
dK, dV travel); bytes from :mod:`ds_burst.core.cost`. Defaults are H200 figures measured in this project
(``docs/BENCHMARKS.md``) and 400 Gb/s InfiniBand per GPU; a calibration file (``calibrate``), the rates of
a kernel benchmark JSON (``--kernel-bench``) and every single flag override them, in that order; ``--tiles FILE``
(``calibrate --tiles``) or ``--gpu h100|h200`` (the shipped table) give the kernel term by tile length.
All four are ds-burst schedules; ``schedule="auto"`` picks among them with :func:`choose_schedule` (the defaults and
the GPU's shipped tile table; ``ulysses`` only with a table).

Subcommands: ``calibrate`` measures the figures on the machine it runs on (:mod:`ds_burst.cli.calibrate`);
``project`` tabulates the schedules against Ulysses over a range of sequence lengths (JSON, plot);
``validate`` compares predictions with a ``launch/bench_ring.py`` JSON, row by row.

The model itself is :mod:`ds_burst.core.cost_model`; this module is its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict, fields, replace

from ds_burst.cli.bench_check import validate_bench, validation_markdown
from ds_burst.cli.projection import plot_projection, project, projection_markdown
from ds_burst.core import tile_rates
from ds_burst.core.cost_model import (
    HARDWARE_FIELDS,
    Hardware,
    Prediction,
    Problem,
    choose,
    load_calibration,
    predict,
    rates_from_kernel_bench,
    read_json,
    split_bench_arg,
)


def readable(x: float, decimals: int = 1) -> str:
    """``x`` with ``decimals`` decimals, or three significant digits where that would print 0 (``0.0123``, ``4.5e-05``
    ms on the small problems of a CPU run) or drop the sign: a printed number is never a rounded-away 0."""
    if x == 0 or abs(x) >= 10.0**-decimals:
        return f"{x:.{decimals}f}"
    return f"{x:.3g}"


def format_predictions(preds: list[Prediction]) -> str:
    """Fixed-width table of predictions, fastest first (times in ms, see :func:`readable`)."""
    head = f"{'schedule':14s} {'backward':8s} {'fwd ms':>10s} {'bwd ms':>10s} {'total ms':>10s} {'exposed':>9s}  note"
    lines = [head]
    for x in sorted(preds, key=lambda x: x.total_ms):
        lines.append(f"{x.schedule:14s} {x.backward:8s} {readable(x.fwd_ms):>10s} {readable(x.bwd_ms):>10s} "
                     f"{readable(x.total_ms):>10s} {readable(x.exposed_comm_ms):>9s}  {x.note}".rstrip())
    return "\n".join(lines)


def _memory_report(args: argparse.Namespace) -> str:
    """``--memory``: :func:`ds_burst.training.estimate.estimate_memory` for the model and parallel layout given; with
    ``--gpu-memory`` the longest sequence that fits, and with ``--host-memory`` too the offload fraction per length
    (:func:`ds_burst.training.estimate.plan_offload`)."""
    from ds_burst.training.estimate import estimate_memory, host_bytes, longest_sequence, plan_offload
    from ds_burst.training.model import ModelConfig, offloaded_layer_count

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.heads * args.head_dim, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads or args.heads,
                      intermediate_size=args.intermediate)
    sp = args.nodes * args.gpus_per_node
    kwargs = dict(sp=sp, zero_stage=args.zero_stage, dp=args.dp, dtype_bytes=args.elem_bytes,
                  activation_checkpointing=args.checkpointing, micro_batch=args.batch,
                  lm_head_chunk_tokens=args.lm_head_chunk, mlp_tiles=args.mlp_tiles,
                  keep_attention_layers=args.keep_attention, offload_checkpoints=args.offload_checkpoints,
                  offload_optimizer=args.offload_optimizer, zero_reduce_bucket=args.reduce_bucket)
    est = estimate_memory(cfg, args.seq, **kwargs)
    lines = [f"memory per GPU (GiB): S={args.seq}, SP={sp}, DP={args.dp}, ZeRO-{args.zero_stage}, "
             f"{args.layers} layers, hidden {cfg.hidden_size}, vocab {args.vocab}"]
    lines += [f"  {k:20s} {readable(v, 2):>10s}" for k, v in est.items()]
    if args.gpu_memory and args.host_memory is None:
        longest = longest_sequence(cfg, args.gpu_memory, **kwargs)
        lines.append(f"longest sequence within {args.gpu_memory:g} GiB per GPU: S={longest}"
                     + (f" ({readable(estimate_memory(cfg, longest, **kwargs)['total'], 2)} GiB)" if longest else
                        " (not even the shortest step fits)"))
    elif args.gpu_memory:
        host = dict(host_budget_gib=args.host_memory, host_fixed_gib=args.host_fixed,
                    ranks_per_host=args.gpus_per_node)
        lines.append(f"host memory: {args.host_memory:g} GiB per node for {args.gpus_per_node} rank(s), "
                     f"{args.host_fixed:g} GiB of each process's own beside host_offload and host_optimizer")

        def planned(seq: int) -> str:
            frac = plan_offload(cfg, seq, args.gpu_memory, **host, **kwargs)
            if frac is None:
                return "nothing fits"
            e = estimate_memory(cfg, seq, **{**kwargs, "offload_checkpoints": frac})
            on_host = host_bytes(e, args.host_fixed, args.gpus_per_node)
            return (f"offload_checkpoints={frac:.4g} (the first {offloaded_layer_count(frac, cfg.num_layers)} of "
                    f"{cfg.num_layers} layers; GPU {readable(e['total'], 2)} GiB, host {readable(on_host, 2)} GiB)")

        lines.append(f"at S={args.seq}: {planned(args.seq)}")
        longest = longest_sequence(cfg, args.gpu_memory, **host, **kwargs)
        lines.append(f"longest sequence within {args.gpu_memory:g} GiB per GPU and {args.host_memory:g} GiB per "
                     f"node: S={longest}" + (f", {planned(longest)}" if longest else
                                              " (not even the shortest step fits)"))
        if not args.checkpointing:
            lines.append("(no --checkpointing: nothing to offload)")
    return "\n".join(lines)


def _offload_fraction(text: str) -> float:
    """``--offload-checkpoints F``: a fraction of the layers in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def _add_hardware_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("hardware figures (precedence: flag > --kernel-bench > --calibration > default)")
    g.add_argument("--calibration", metavar="FILE.json", help="figures measured by `python -m ds_burst.plan calibrate`")
    g.add_argument("--kernel-bench", metavar="FILE[:METHOD]",
                   help="kernel rates from a launch/bench_kernels.py JSON (method default ds-burst-triton)")
    g.add_argument("--tiles", metavar="FILE.json",
                   help="kernel rates by tile length (`python -m ds_burst.plan calibrate --tiles`)")
    g.add_argument("--gpu", choices=sorted(tile_rates.SHIPPED_GPUS),
                   help="kernel rates by tile length from the table shipped for this GPU (ds_burst/core/rates)")
    for f in fields(Hardware):
        if f.name in HARDWARE_FIELDS:
            g.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=None, help=f"default {f.default}")


def _hardware_from_args(args: argparse.Namespace, head_dim: int = 128) -> Hardware:
    hw = Hardware()
    if args.calibration:
        hw = load_calibration(args.calibration, hw)
    if getattr(args, "kernel_bench", None):
        path, method = split_bench_arg(args.kernel_bench)
        hw = replace(hw, **rates_from_kernel_bench(path, method, head_dim))
    given = {k: getattr(args, k) for k in HARDWARE_FIELDS if getattr(args, k) is not None}
    hw = replace(hw, **given)
    if getattr(args, "tiles", None):
        hw = replace(hw, tiles=tile_rates.read(args.tiles, head_dim))
    elif getattr(args, "gpu", None):
        tiles = tile_rates.shipped(args.gpu, head_dim)
        if tiles is None:
            raise ValueError(f"no tile table shipped for {args.gpu} at head_dim={head_dim}")
        hw = replace(hw, tiles=tiles)
    hw.check()
    return hw


def _describe(hw: Hardware) -> str:
    text = ", ".join(f"{k}={v:g}" for k, v in hw.figures().items() if v is not None)
    return text + (f"; kernel rates by tile length: {hw.tiles.gpu} table (D={hw.tiles.head_dim})" if hw.tiles else "")


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
            path, method = split_bench_arg(args.peer_kernel_bench)
            rates = rates_from_kernel_bench(path, method, args.head_dim)
            peer_hw = replace(hw, peer_fwd_tflops=rates["fwd_tflops"], peer_bwd_tflops=rates["bwd_tflops"])
            peer_label = f"{method} rates"
        if peer_hw is None and hw.tiles is not None:
            peer_label = "cuDNN, tile table"
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
                       "hardware": hw.to_dict(), "peer_hardware": None if peer_hw is None else peer_hw.to_dict(),
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
            hw_kernel = read_json(args.calibration, "calibration file").get("meta", {}).get("kernel", "triton")
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
        from ds_burst.cli.calibrate import main as calibrate_main

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
    mem.add_argument("--offload-checkpoints", nargs="?", const=True, default=False, type=_offload_fraction,
                     metavar="FRACTION", help="checkpointed layer inputs in host memory: of every layer, or of this "
                     "fraction of the layers (the first ones; ModelConfig.offload_checkpoints)")
    mem.add_argument("--offload-optimizer", action="store_true",
                     help="ZeRO optimizer states and fp32 gradients in host memory")
    mem.add_argument("--reduce-bucket", type=int, default=500_000_000, metavar="ELEMENTS",
                     help="DeepSpeed's zero_optimization.reduce_bucket_size (ZeRO 2 and 3: a gradient bucket of this "
                     "many elements on the GPU; default DeepSpeed's 5e8)")
    mem.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                     help="also print the longest sequence whose estimate fits in this many GiB per GPU")
    mem.add_argument("--host-memory", type=float, default=None, metavar="GIB",
                     help="with --gpu-memory: host memory per node (shared by --gpus-per-node ranks); the host must "
                     "hold the offloaded layer inputs and optimizer too, and the offload fraction is chosen per "
                     "length (the smallest that fits both; replaces --offload-checkpoints there) and printed")
    mem.add_argument("--host-fixed", type=float, default=0.0, metavar="GIB",
                     help="with --host-memory: host memory each process holds beside the offloaded layer inputs and "
                     "optimizer states (runtime, data path; default 0)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if args.host_memory is not None and not args.gpu_memory:
        ap.error("--host-memory needs --gpu-memory (the longest sequence is searched within both)")
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
        print(json.dumps({"problem": asdict(prob), "hardware": hw.to_dict(),
                          "predictions": [x.to_dict() for x in preds], "choice": asdict(best)}, indent=1))
        return
    print(format_predictions(preds))
    print(f"choice: schedule={best.schedule} backward={best.backward} ({readable(best.total_ms)} ms predicted"
          f"{'' if args.all else ', implemented schedules only'})")
    if args.calibration or args.kernel_bench:
        print(f"hardware: {_describe(hw)}")


if __name__ == "__main__":
    main()
