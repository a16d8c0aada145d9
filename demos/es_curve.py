"""The training curve of an ES run (``badger train CONFIG --out RUN --outer es``), from its metrics.jsonl.

    python demos/es_curve.py --run runs/es_finetune --out docs/figures/es_finetune.png
    python demos/es_curve.py --run runs/es_finetune --run runs/es_finetune_try1 --label final --label "try 1"

Each metrics row is the mean over the last ``train.log_every`` generations of: the centre's loss
(``loss``: the objective over the episode's inner steps, on that generation's seeded episodes),
the population's mean loss (``population_loss``) and the best candidate's (``best_loss``). A
generation's episodes depend only on (seed, generation), so two runs with the same seed are scored
on the same episodes at the same generation. The right panel is the seconds per generation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(run: str) -> list[dict]:
    with open(Path(run) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="an ES run folder (repeatable)")
    p.add_argument("--label", action="append", default=[], help="a label per --run (default: the folder's name)")
    p.add_argument("--out", default="docs/figures/es_finetune.png")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)

    from badger_runtime.demo.figures import save_png, subplots

    labels = args.label + [Path(r).name for r in args.run[len(args.label):]]
    fig, (ax, ax_t) = subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [2, 1]})
    for i, (run, label) in enumerate(zip(args.run, labels)):
        rows = read(run)
        g = [r["generation"] for r in rows]
        color = f"C{i}"
        ax.plot(g, [r["loss"] for r in rows], "o-", ms=3, color=color, label=f"{label}: centre")
        ax.plot(g, [r["population_loss"] for r in rows], ":", color=color, label=f"{label}: population mean")
        ax.plot(g, [r["best_loss"] for r in rows], "--", lw=0.8, color=color, label=f"{label}: best candidate")
        ax_t.plot(g, [r["sec_per_batch"] for r in rows], "o-", ms=3, color=color, label=label)
    steps = read(args.run[0])[-1].get("steps")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"mean error over the {steps:,}-step life (3 x MSE)" if steps else "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax_t.set_xlabel("generation")
    ax_t.set_ylabel("seconds per generation (wall, shared cores)")
    ax_t.set_ylim(bottom=0)
    ax_t.grid(alpha=0.3)
    fig.suptitle(args.title or f"ES training: {', '.join(labels)} (each point: mean of the last logged generations)",
                 fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, args.out, dpi=120)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
