"""The compact summary of launch/gpu_session.sh's ``e2e`` stage: the measured errors that tests/test_gpu_e2e.py
recorded (``DS_BURST_E2E_JSON``) and the launch/train.py runs' summary.json, as a few table lines; the train
summaries are added to the JSON file under ``"train"``.

    python3 launch/e2e_summary.py OUT/e2e.json --train tiny=/tmp/e2e_train_tiny packed=/tmp/e2e_train_packed
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from typing import Any

TRAIN_KEYS = ("steps_run", "first_loss", "final_loss", "eval_loss", "eval_retrieval_acc", "eval_doc_acc_mean",
              "chance_acc", "tflops_per_gpu", "mfu", "step_time_s", "first_step_time_s", "peak_mem_gib", "device")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _f(v: Any, spec: str = ".1e") -> str:
    return format(v, spec) if _num(v) else str(v)


def train_summary(name: str, run_dir: str) -> dict[str, Any]:
    """The main numbers of one launch/train.py run and ``sane``: finite losses that went down, TFLOP/s > 0."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        print(f"train {name}: no summary.json in {run_dir}")
        return {"sane": False}
    with open(path) as f:
        s = json.load(f)
    out = {k: s.get(k) for k in TRAIN_KEYS}
    out["sane"] = (_num(s.get("first_loss")) and _num(s.get("final_loss")) and s["final_loss"] < s["first_loss"]
                   and _num(s.get("tflops_per_gpu")) and s["tflops_per_gpu"] > 0)
    acc = s.get("eval_retrieval_acc")
    print(f"train {name}: {'OK ' if out['sane'] else 'BAD'} loss {_f(s.get('first_loss'), '.3f')} -> "
          f"{_f(s.get('final_loss'), '.3f')} (eval {_f(s.get('eval_loss'), '.3f')}), eval acc {_f(acc, '.3f')} "
          f"(chance {_f(s.get('chance_acc'), '.3f')}), {_f(s.get('tflops_per_gpu'), '.2f')} TFLOP/s, "
          f"{_f(s.get('step_time_s'), '.3f')} s/step (first {_f(s.get('first_step_time_s'), '.1f')} s)")
    return out


def _worst(rows: list[dict[str, Any]], key: str) -> float | None:
    return max((r[key] for r in rows if _num(r.get(key))), default=None)


def _ok(rows: list[dict[str, Any]]) -> str:
    return f"{sum(bool(r.get('ok')) for r in rows)}/{len(rows)} ok"


def print_tests(tests: dict[str, dict[str, Any]]) -> None:
    """One line per HF family, per trainer, per DistributedAttention case, and the compile results."""
    fams: dict[str, list[dict[str, Any]]] = {}
    for key, r in tests.items():
        if key.startswith("hf/"):
            fams.setdefault(key.split("/")[1], []).append(r)
    if fams:
        print("HF bf16 vs float64 per document (burst/transformers eager, worst of the ways; leak: no-documents "
              "control)")
    for fam, rows in fams.items():
        worst = functools.partial(_worst, rows)
        over = max(rows, key=lambda r: r.get("grad_over_err", 0.0))
        name = str(over.get("grad_over", "")).removeprefix("model.")[:34]
        print(f"  {fam:12s} logits {_f(worst('logits'))}/{_f(worst('base_logits'))} grad {_f(worst('grad'))}/"
              f"{_f(worst('base_grad'))} (vs eager: {name} {_f(over.get('grad_over_err'))}/"
              f"{_f(over.get('grad_over_base'))}) loss {_f(worst('loss'))}/{_f(worst('base_loss'))} leak "
              f"{_f(worst('leak'), '.2f')} {_ok(rows)}")
    for key, r in tests.items():
        if key.startswith("trainer/"):
            print(f"{key}: burst vs sdpa loss diff {_f(r.get('loss_diff'))} {_ok([r])}; burst "
                  f"{[round(x, 5) for x in r.get('burst', [])]}")
    layers = {k: r for k, r in tests.items() if k.startswith("layer/")}
    if layers:
        text = ", ".join(f"{k[6:]} {_f(max(r.get(n, 0.0) for n in ('out', 'dq', 'dk', 'dv')))}"
                         for k, r in layers.items())
        print(f"DistributedAttention (worst of out/dq/dk/dv) {_ok(list(layers.values()))}: {text}")
    for key, r in tests.items():
        if key == "compile/llama":
            modes = [m for m in ("default", "fullgraph", "reduce-overhead") if f"{m}_logits" in r]
            text = ", ".join(f"{m} {_f(r[f'{m}_logits'])}/{_f(r[f'{m}_grad'])} breaks {r.get(f'{m}_graph_breaks')}"
                             for m in modes)
            print(f"compile logits/grad vs float64 (eager {_f(r.get('eager_logits'))}/{_f(r.get('eager_grad'))}): "
                  f"{text} {_ok([r])}")
        elif key.startswith("compile/"):
            print(f"{key}: {_ok([r])} {str(r.get('message', ''))[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="the DS_BURST_E2E_JSON file (created if missing)")
    ap.add_argument("--train", nargs="*", default=[], metavar="NAME=DIR", help="launch/train.py output directories")
    args = ap.parse_args()
    data: dict[str, Any] = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            data = json.load(f)
    data["train"] = {}
    for item in args.train:
        name, run_dir = item.split("=", 1)
        data["train"][name] = train_summary(name, run_dir)
    print_tests(data.get("tests", {}))
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
