#!/usr/bin/env python
"""fewshot-v2's gate, chosen (docs/results.md, "fewshot-v2: the same cell, safe to grow"): the
handcrafted few-shot cell with seen-gated push keys of gain g written after one, two or three
examples of the class, built in memory (``training.inits.prototypes``), on 4-way held-out digits
(N = 256, 40 steps, 100 episodes, seed 0), unchanged and with as many fresh experts again at step
20. Prints a markdown table (accuracy over steps 31-40, and at step 21).

    python demos/fewshot_gate.py
"""
import dataclasses

import numpy as np
import torch

from badger_runtime.config import load_experiment
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import evaluate
from badger_runtime.tasks.fewshot import FewShotTask
from badger_runtime.training.inits import prototypes
from badger_runtime.training.model import ExpertPolicy, torch_ops

GATES = ((0.0, "seen"), (4.0, "seen"), (8.0, "seen"), (12.0, "seen"), (8.0, "n2"), (8.0, "n3"), (12.0, "n3"))


def main():
    torch.set_num_threads(1)
    cfg = load_experiment("configs/fewshot_joinable.toml")
    task = dataclasses.replace(FewShotTask.evaluation_config(cfg.task), steps=40, baselines="none")
    ops = torch_ops()
    print("| gain | written after | unchanged, steps 31-40 | +256 fresh at step 20: step 21 | steps 31-40 |")
    print("|---|---|---|---|---|")
    for g, after in GATES:
        pol = ExpertPolicy(cfg.agent.policy)
        prototypes(pol, seen_key_gain=g, seen_after=after)
        acc = []
        with torch.no_grad():
            for changes in ((), schedule(20, 256, "fresh")):
                r = evaluate(ops, pol, cfg.agent, task, dims=4, experts=256, episodes=100, seed=0, changes=changes,
                             baselines=False)
                acc.append(np.asarray(r["accuracy_by_step"]))
        label = {"seen": "one example", "n2": "two", "n3": "three"}[after] if g else "(no gate: fewshot-v1's cell)"
        print(f"| {g:g} | {label} | {acc[0][30:40].mean():.3f} | {acc[1][21]:.2f} | {acc[1][30:40].mean():.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
