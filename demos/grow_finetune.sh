#!/usr/bin/env bash
# The recipe that made fresh hot-added experts stop hurting a shipped policy (guessing-one-expert-v2,
# guessing-nonstationary-v2; guessing-converge-v2 came from the same three runs written out in
# configs/fig9_converge_grow.toml's header): train it further with experts added mid-episode (1..N fresh or cloned at
# a random inner step) in 50 %, then 75 %, then 90 % of the batches, at a falling learning rate,
# 3 x 3,000 batches, each run from the last. The policy's own config gives the rest of the setting.
#
#   bash demos/grow_finetune.sh configs/fig6_one_expert.toml guessing-one-expert-v1 runs/oneexp
#   -> runs/oneexp_grow2, runs/oneexp_grow3, runs/oneexp_grow4 (export the last)
#
# Arguments after the third go to every stage (e.g. --set agent.agreement.eps=0.05); STAGES=2 stops
# after the second stage (guessing-quorum-v2 is runs/qeps_grow3:
#   STAGES=2 bash demos/grow_finetune.sh configs/fig9_quorum.toml guessing-quorum-v1 runs/qeps \
#       --set agent.agreement.eps=0.05).
set -euo pipefail
cfg=$1 policy=$2 out=$3
shift 3
stages=${STAGES:-3}
badger train "$cfg" --out "${out}_grow2" --quiet --set train.init_from="$policy" --set train.batches=3000 \
    --set train.grow_prob=0.5 --set train.lr=3e-4 --set 'train.lr_decay=[[2000, 1e-4]]' --set train.seed=1 \
    --set train.log_every=50 "$@"
[ "$stages" -ge 2 ] || exit 0
badger train "$cfg" --out "${out}_grow3" --quiet --set train.init_from="${out}_grow2/checkpoint.pt" \
    --set train.batches=3000 --set train.grow_prob=0.75 --set train.lr=2e-4 --set 'train.lr_decay=[[2000, 1e-4]]' \
    --set train.seed=2 --set train.log_every=50 "$@"
[ "$stages" -ge 3 ] || exit 0
badger train "$cfg" --out "${out}_grow4" --quiet --set train.init_from="${out}_grow3/checkpoint.pt" \
    --set train.batches=3000 --set train.grow_prob=0.9 --set train.lr=1e-4 --set 'train.lr_decay=[[2000, 5e-5]]' \
    --set train.seed=3 --set train.log_every=50 "$@"
