"""Training curves (loss against batch) of one or more `badger train` runs, as one PNG.

Each run is its folder (its ``metrics.jsonl``), optionally with a label (``DIR=LABEL``); the logged
window means are smoothed over ``--smooth`` log points. The curve behind docs/results.md's "fewshot-v5"
section (the learning rule found from random weights, and two recipes that stayed at chance):

    python demos/training_curves.py runs/fewshot_rule="wiring init, projections and pixels (stage 1, shipped)" \
        runs/fewshot_rule_continual="stage 2: changing classes, joining experts (shipped)" \
        runs/rule_b="wiring init, projections only" runs/rule_a="wiring init, raw pixels only" \
        runs/rule_full="every weight random, projections only" \
        --out docs/figures/fewshot_rule_curve.png --title "fewshot-v5: the outer loop finds the learning rule (seed 0)"

(runs/rule_a, rule_b and rule_full are the scratch runs whose commands docs/results.md gives.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from badger_runtime.demo.figures import label_axes, save_png, subplots
from es_curve import read  # demos/es_curve.py: a run's metrics.jsonl rows (this script's folder is on sys.path)


def read_curve(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(batch, loss) of the logged windows of ``run/metrics.jsonl`` (es_curve.read; rows without a loss skipped)."""
    rows = [r for r in read(str(run)) if "loss" in r and "batch" in r]
    if not rows:
        raise SystemExit(f"{run}/metrics.jsonl has no logged losses")
    return np.array([r["batch"] for r in rows]), np.array([r["loss"] for r in rows])


def smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:k] / np.arange(1, k)  # the first points: the mean of what there is so far
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="DIR or DIR=LABEL")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smooth", type=int, default=5)
    ap.add_argument("--title", default="training loss")
    args = ap.parse_args(argv)
    fig, ax = subplots(figsize=(8, 4.5), dpi=110)
    ends = {}  # a run's folder -> its last logged batch
    for spec in args.runs:
        d, _, label = spec.partition("=")
        x, y = read_curve(Path(d))
        init_from = json.loads((Path(d) / "config.json").read_text())["train"].get("init_from", "")
        parent = str(Path(init_from).parent) if init_from.endswith("checkpoint.pt") else ""
        start = ends.get(parent, 0)  # a stage that goes on from an earlier run is drawn after it
        ax.plot(x + start, smooth(y, args.smooth), label=label or d, lw=1.4)
        ends[str(Path(d))] = start + int(x.max())
    label_axes(ax, xlabel="batch (32 episodes each)", ylabel="training loss (cross-entropy, mean over steps)",
               title=args.title, legend="upper right")
    print(save_png(fig, args.out))


if __name__ == "__main__":
    main()
