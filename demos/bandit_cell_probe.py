"""Probe a variant of the handcrafted bandit cell (``training/inits.py``, ``arm_index``) on both of
issue 15's settings: the K = 2 stationary game against Thompson sampling and the 10,000-step check
with changing means (docs/results.md, "bandit-v5"). Builds the cell with the given keyword
arguments on bandit-v4's architecture (``configs/bandit_index_sharp.toml``), exports it to ONNX in a
scratch folder and runs, torch-free:

    badger eval --policy P --task bandit --dims 2 --experts 20 --steps 1000 --episodes E2 --seed S
    badger longrun --policy P --task bandit --steps 10000 --episodes EL --seed S --change-every 500 1500

    python demos/bandit_cell_probe.py --seed 12345 \\
        --cell '{"beta": 48, "kappa": 0.8, "n_cap": 400, "join_after": 2, "join_more": [[20, 8], [100, 8]],
                 "detect": [20, 0.16], "share_alarm": true}'

Prints one line (and ``--json``: the numbers). Use tuning seeds, never the evaluation seed 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", required=True, help="arm_index keyword arguments, as JSON")
    ap.add_argument("--config", default=str(ROOT / "configs" / "bandit_index_sharp.toml"))
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--k2-episodes", type=int, default=1000)
    ap.add_argument("--long-episodes", type=int, default=150)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kwargs = json.loads(args.cell)
    if "join_more" in kwargs:
        kwargs["join_more"] = tuple(tuple(x) for x in kwargs["join_more"])
    import badger_runtime.training.inits as inits
    from badger_runtime.cli import main as badger

    inits.INITS["_probe"] = lambda policy: inits.arm_index(policy, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        run, onnx = Path(tmp) / "run", Path(tmp) / "probe.onnx"
        for argv in (["train", args.config, "--out", str(run), "--set", "train.init=_probe",
                      "--set", "train.eval_episodes=1"],
                     ["export", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(onnx),
                      "--eval-episodes", "0"]):
            with open(Path(tmp) / "log", "a") as log:
                old, sys.stdout = sys.stdout, log
                try:
                    if badger(argv) != 0:
                        raise SystemExit(f"badger {' '.join(argv)} failed")
                finally:
                    sys.stdout = old

        def cli(*a) -> dict:
            out = subprocess.run([sys.executable, "-m", "badger_runtime.cli", *a, "--json"], check=True,
                                 capture_output=True, text=True).stdout
            return json.loads(out)

        s = str(args.seed)
        k2 = cli("eval", "--policy", str(onnx), "--task", "bandit", "--dims", "2", "--experts", "20", "--steps", "1000",
                 "--episodes", str(args.k2_episodes), "--seed", s)
        lr = cli("longrun", "--policy", str(onnx), "--task", "bandit", "--steps", "10000", "--episodes",
                 str(args.long_episodes), "--seed", s, "--change-every", "500", "1500")
    ts = k2["baselines"]["thompson"][-1]
    kf = lr["keeps_finding"]
    res = {"cell": kwargs, "seed": args.seed, "k2_regret": k2["final_regret"], "k2_thompson": ts,
           "k2_ratio": k2["final_regret"] / ts, "keeps_ratio": kf["ratio"], "keeps_first_half": kf["first_half"],
           "keeps_second_half": kf["second_half"], "regret_per_step": lr["agent"]["mean_regret_per_step"]}
    print(f"K = 2: {res['k2_regret']:.2f} / Thompson {ts:.2f} = {res['k2_ratio']:.3f}x | 10,000-step check: "
          f"{kf['first_half']:.3f} -> {kf['second_half']:.3f} (ratio {kf['ratio']:.3f}), "
          f"regret per step {res['regret_per_step']:.4f}")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
