"""Measure every error-measured card's growth again and write the numbers it quotes (torch-free).

tests/test_growth_guard.py holds each shipped card of an error-measured task to what ``growth.measure_growth``
gives today, to the digits the card writes. When a change moves those numbers on purpose (session 40: each
episode came to draw whom its clones copy), this measures each card in its own setting (the episodes and seed
of its ``why`` command) and rewrites the numbers it quotes (``growth.requote``: each verdict's "final error U
unchanged -> F (Rx, SEM S)" and the other arm's mean an ``instead`` offers). It prints every change; with
``--write`` it writes the cards (the ONNX files and their hashes are untouched). A verdict the measurement no
longer gives is reported, never rewritten: its reasons, successors and the README need a person. So does
anything else a card says (paired differences, other seeds): the script names the cards that say more.

    python demos/refresh_growth.py                       # every error-measured shipped policy, a dry run
    python demos/refresh_growth.py --policy guessing-quorum-v6 --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from badger_runtime.growth import card_setting, growth_metric, measure_growth, requote  # noqa: E402
from badger_runtime.policy_card import card_paths, every_policy, load_policy, write_card  # noqa: E402


def refresh(policy: str, write: bool = False, log=print) -> list[str]:
    """Measure one policy's card again; returns (and logs) its changes, written with ``write``."""
    pol = load_policy(policy)
    card = pol.card  # the card load_policy read (and checked)
    growth = card.get("growth") or {}
    if growth_metric(pol.task.name) is None or "why" not in growth:
        log(f"{policy}: not measured by an error (its growth entry is written by hand)")
        return []
    episodes, seed = card_setting(growth)
    new, changes = requote(growth, measure_growth(pol, episodes=episodes, seed=seed))
    for c in changes:
        log(f"{policy}: {c}")
    if any(k in growth.get(w, "") for w in ("why", "clone_why") for k in ("paired", "seeds", "seed 12345")):
        log(f"{policy}: its card says more than the measurement (paired differences or other seeds): check by hand")
    if write and changes and not any("VERDICT" in c for c in changes):
        write_card({**card, "growth": new}, card_paths(pol.path)[1])
    return changes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", action="append", default=None, help="a shipped policy or a path (default: all)")
    ap.add_argument("--write", action="store_true", help="write the new numbers into the cards")
    args = ap.parse_args(argv)
    verdicts = 0
    for name in args.policy or every_policy():  # the retired cards' verdicts too
        verdicts += sum("VERDICT" in c for c in refresh(name, args.write))
    return 1 if verdicts else 0


if __name__ == "__main__":
    raise SystemExit(main())
