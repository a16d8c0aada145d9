#!/usr/bin/env python
"""Average the policy weights of training checkpoints (a "model soup": Wortsman et al., 2022).

Checkpoints fine-tuned from one parent sit in one basin of the loss; their average can be better than
each. demos/quorum_grown.sh averages two runs of one quorum lineage, one trained with fresh or cloned experts
joining, one with fresh experts only: the average keeps the better run's error and lands between the two in
what each kind of newcomer costs (docs/results.md, session 39).

    python demos/average_checkpoints.py --out runs/soup/checkpoint.pt runs/a/checkpoint.pt runs/b/checkpoint.pt

The output is the first checkpoint with its policy weights replaced by the (weighted) mean: its config,
batch count and optimizer state are the first one's, so ``badger export`` reads it as it reads any
checkpoint (resuming training from it restarts Adam's moments from the first run's). Needs the 'train' extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def average(paths: list[str], weights: list[float] | None = None) -> dict:
    """The first checkpoint with its ``model`` the weighted mean of every checkpoint's (weights: equal by
    default, normalised to sum to 1). Refuses checkpoints of different policy shapes or agent settings."""
    import torch

    from badger_runtime.config import ConfigError
    from badger_runtime.training.train import load_checkpoint

    cks = [load_checkpoint(p) for p in paths]
    w = [1.0] * len(cks) if weights is None else [float(x) for x in weights]
    if len(w) != len(cks) or min(w) < 0 or sum(w) <= 0:
        raise ConfigError("--weights: one non-negative weight per checkpoint, not all zero")
    first = cks[0]
    for p, ck in zip(paths[1:], cks[1:]):
        if ck["config"]["agent"] != first["config"]["agent"] or ck["model"].keys() != first["model"].keys() or any(
                ck["model"][k].shape != v.shape for k, v in first["model"].items()):
            raise ConfigError(f"{p}: not the same policy as {paths[0]} (agent settings or weight shapes differ)")
    total = sum(w)
    first["model"] = {k: sum(wi / total * ck["model"][k].to(torch.float64) for wi, ck in zip(w, cks)).to(v.dtype)
                      for k, v in first["model"].items()}
    first["averaged_from"] = [str(p) for p in paths]
    return first


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--out", required=True, help="where the averaged checkpoint goes (a .pt path)")
    ap.add_argument("--weights", default=None, help="comma-separated, one per checkpoint (default: equal)")
    args = ap.parse_args(argv)
    weights = None if args.weights is None else args.weights.split(",")
    ck = average(args.checkpoints, weights)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, out)
    print(f"{out}: the mean of {len(args.checkpoints)} checkpoints' policy weights")


if __name__ == "__main__":
    main()
