#!/usr/bin/env bash
# Issue 14: what the outer loop does to the handcrafted few-shot policy (docs/results.md, "What the
# outer loop did"). Fine-tunes the handcrafted init (configs/fewshot.toml, train.init = "prototypes")
# for 100 batches of 24, heads only (lr 3e-4) and all weights (lr 1e-4), then validates the init and
# both fine-tunes on one protocol: training digit classes 0-5, test-split examples, 4-way, N = 256,
# balanced streams of 11 shots per class (44 steps), 100 episodes, seed 0, nearest class mean on the
# same episodes; prints a markdown table of the accuracy on an example whose class was seen k times.
#
#   bash demos/fewshot_finetune.sh runs/fsft      # -> runs/fsft_{init,heads,all}/ (checkpoint, val.json)
set -euo pipefail
out=${1:-runs/fsft}
common=(--quiet --no-eval --set task.loss_unseen=false --set 'task.experts=[8,48]' --set train.batch_size=24
        --set task.steps=30 --set train.ckpt_every=50 --set train.batches=100)
badger train configs/fewshot.toml --out "${out}_init" --quiet --no-eval   # batches = 0: the handcrafted init
badger train configs/fewshot.toml --out "${out}_heads" "${common[@]}" --set train.lr=3e-4 --set 'train.trainable=["heads."]'
badger train configs/fewshot.toml --out "${out}_all" "${common[@]}" --set train.lr=1e-4
val=(--task fewshot --classes 4 --experts 256 --option classes_pool=train --option split=test --option shots=11
     --steps 44 --episodes 100 --seed 0 --json)
for run in init heads all; do
    badger eval --checkpoint "${out}_${run}/checkpoint.pt" "${val[@]}" > "${out}_${run}/val.json"
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = [("init", "handcrafted init (as shipped)"), ("heads", "fine-tuned from it, heads only, lr 3e-4, 100 batches x 24"),
        ("all", "fine-tuned from it, all weights, lr 1e-4, 100 batches x 24")]
print("| policy | k = 1 | k = 2 | k = 3 |")
print("|---|---|---|---|")
r = json.load(open(f"{out}_init/val.json"))
ncm = r["baselines_by_shot"]["nearest_class_mean"]
print(f"| NCM (same episodes) | {ncm[1]:.3f} | {ncm[2]:.3f} | {ncm[3]:.3f} |")
for run, label in rows:
    a = json.load(open(f"{out}_{run}/val.json"))["accuracy_by_shot"]
    print(f"| {label} | {a[1]:.3f} | {a[2]:.3f} | {a[3]:.3f} |")
PY
