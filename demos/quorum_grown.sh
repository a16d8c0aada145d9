#!/usr/bin/env bash
# The learned quorum trained with experts joining from its first batch, on the log of the error (train.log_floor),
# then the average of two runs of one lineage (session 39, docs/results.md "The quorum on the log of the error").
# NOT SHIPPED: the best-balanced candidate of that session, 30x below guessing-quorum-v3's error, within the cards'
# rule for fresh experts and clones at seeds 0 and 12345, but over 12 clone-source draws clones cost it 2.1x
# (geometric mean) and fresh experts 1.2x (python demos/growth_paired.py --policy P --episodes 64 --seeds 1000-1011).
#
#   bash demos/quorum_grown.sh runs/qg4     # ~25 min on one core; reproduces the session's runs bit for bit
#   -> runs/qg4_f9 (Fig. 9 with experts joining), runs/qg4_q1 .. runs/qg4_q4, runs/qg4_soup/checkpoint.pt
#
# Every stage: fresh or cloned experts (even odds; train.grow_init = "mixed") join at a random inner step in a share
# of the batches, except q4 (fresh only); the vote's target at eps 0.05 as guessing-quorum-v2/v3. Each quorum stage
# weighs log(error + 1e-6) per step (train.log_floor): on the error itself the late steps of a converged agent
# (errors ~1e-4) weigh nothing next to the first steps' (~1), so what newcomers cost at the end goes unseen.
# q3 alone: clones harmless, fresh experts 1.35x; q4 (q3 trained further with fresh experts only): fresh experts
# harmless, clones 3x; their average lies between (12-draw numbers).
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
python demos/average_checkpoints.py --out "${out}_soup/checkpoint.pt" "${out}_q3/checkpoint.pt" "${out}_q4/checkpoint.pt"
