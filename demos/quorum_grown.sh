#!/usr/bin/env bash
# guessing-quorum-v4 (session 39, docs/results.md "The quorum on the log of the error"): the learned quorum trained
# with experts joining from its first batch, four stages on the log of the error (train.log_floor), then one on the
# error with the experts' disagreement added (train.spread_weight): fresh experts and clones both harmless.
#
#   bash demos/quorum_grown.sh runs/qg4     # ~50 min on one core; reproduces the sessions' runs bit for bit
#   -> runs/qg4_f9 (Fig. 9 with experts joining), runs/qg4_q1 .. runs/qg4_q14 (guessing-quorum-v4 is q5, v5 is q6,
#      v6 is q11, v7 is q14)
#
# Every stage: fresh or cloned experts (even odds; train.grow_init = "mixed") join at a random inner step in a share
# of the batches, except q4 (fresh only); the vote's target at eps 0.05 as guessing-quorum-v2/v3. q1-q4 weigh
# log(error + 1e-6) per step: on the error itself the late steps of a converged agent (~1e-4) weigh nothing next to
# the first steps' (~1), so what newcomers cost at the end goes unseen. They reach a 30x lower final error than
# guessing-quorum-v3, but each trades one kind of newcomer's harm for the other's (q3: fresh 1.35x; q4: clones 3x
# over 12 clone draws). q5 scores each step's error plus the push-weighted variance of the experts' own answers
# (membrane.push_spread): experts that agree make the output indifferent to which of them is copied or joins.
# q6 (guessing-quorum-v5): q5 a little further on the log of the error with the same term: 9x lower final error.
# q7-q11 (session 40; q11 is guessing-quorum-v6): q6 with agents of 3 to 6 experts from the start (task.experts;
# v5 had only ever started with 3, and an agent of 6 was 15x worse than one of 3), 18,500 batches at falling rates.
# q12-q14 (session 40; q14 is guessing-quorum-v7): the log's floor raised 1e-6 -> 1e-4 -> 1e-3 -> 1e-2, so that the
# late steps' tiny errors weigh less against the first steps': v4's first steps with a 15x lower final error.
set -euo pipefail
out=$1
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
q="--quiet --set agent.agreement.eps=0.05 --set train.log_floor=1e-6 --set train.log_every=100"
badger train configs/fig9_converge.toml --out "${out}_f9" --quiet --set train.grow_prob=0.5 --set train.grow_init=mixed \
    --set train.log_every=100
stage() {  # stage NAME FROM SETTINGS...: a quorum stage from the last one's checkpoint
    local name=$1 from=$2
    shift 2
    badger train configs/fig9_quorum.toml --out "${out}_$name" $q --set train.init_from="${out}_$from/checkpoint.pt" "$@"
}
stage q1 f9 --set train.batches=6000 --set train.lr=3e-4 --set 'train.lr_decay=[[3000, 1e-4], [5000, 5e-5]]' \
    --set train.grow_prob=0.5 --set train.grow_init=mixed --set train.seed=10
stage q2 q1 --set train.batches=4000 --set train.lr=1e-4 --set 'train.lr_decay=[[2500, 5e-5]]' \
    --set train.grow_prob=0.75 --set train.grow_init=mixed --set train.seed=12
stage q3 q2 --set train.batches=4000 --set train.lr=5e-5 --set 'train.lr_decay=[[2500, 2.5e-5]]' \
    --set train.grow_prob=0.9 --set train.grow_init=mixed --set train.seed=14
stage q4 q3 --set train.batches=3000 --set train.lr=5e-5 --set 'train.lr_decay=[[2000, 2.5e-5]]' \
    --set train.grow_prob=0.75 --set train.grow_init=fresh --set train.seed=15
stage q5 q4 --set train.log_floor=0 --set train.spread_weight=1 --set train.batches=3000 --set train.lr=5e-5 \
    --set 'train.lr_decay=[[2000, 2.5e-5]]' --set train.grow_prob=0.75 --set train.grow_init=mixed --set train.seed=43
stage q6 q5 --set train.spread_weight=1 --set train.batches=1500 --set train.lr=2.5e-5 --set train.grow_prob=0.75 \
    --set train.grow_init=mixed --set train.seed=60
grown() {  # the session-40 stages: agents of 3 to 6 experts, the log of the error with the disagreement term
    local name=$1 from=$2
    shift 2
    stage "$name" "$from" --set 'task.experts=[3,6]' --set train.spread_weight=1 --set train.grow_prob=0.75 \
        --set train.grow_init=mixed "$@"
}
grown q7 q6 --set train.batches=1500 --set train.lr=2.5e-5 --set train.seed=70
grown q8 q7 --set train.batches=3000 --set train.lr=2.5e-5 --set 'train.lr_decay=[[2000, 1.25e-5]]' --set train.seed=71
grown q9 q8 --set train.batches=4000 --set train.lr=1.5e-5 --set 'train.lr_decay=[[3000, 7.5e-6]]' --set train.seed=72
grown q10 q9 --set train.batches=4000 --set train.lr=1e-5 --set 'train.lr_decay=[[3000, 5e-6]]' --set train.seed=73
grown q11 q10 --set train.batches=6000 --set train.lr=1e-5 --set 'train.lr_decay=[[4000, 5e-6]]' --set train.seed=74
grown q12 q11 --set train.log_floor=1e-4 --set train.batches=3000 --set train.lr=5e-6 --set train.seed=75
grown q13 q12 --set train.log_floor=1e-3 --set train.batches=3000 --set train.lr=5e-6 --set train.seed=76
grown q14 q13 --set train.log_floor=1e-2 --set train.batches=3000 --set train.lr=5e-6 --set train.seed=77
