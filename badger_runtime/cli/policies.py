"""`badger policies`: which policies are shipped and what their cards say (task, trained ranges, lifetime,
what newcomers do to them, what to use instead, the headline number and its command).

Reads the cards only (JSON): no onnxruntime session is opened, so it answers at once and works on a base
install. A card that cannot be read is listed with its reason, never a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import ConfigError


def register(sub):
    p = sub.add_parser("policies", help="list the shipped policies and what their cards say; NAME: one card")
    p.add_argument("names", nargs="*", metavar="NAME", help="show these policies' cards (a shipped name or a path)")
    p.add_argument("--task", default=None, metavar="NAME", help="only the policies of this task")
    p.add_argument("--retired", action="store_true",
                   help="list the retired policies instead (superseded ones that fresh experts hurt, kept in "
                        "policies/retired/ for the results they made; still loadable by name)")
    p.add_argument("--json", action="store_true", help="print JSON (the list's rows; with NAME and no --verify, "
                                                       "the cards themselves)")
    p.add_argument("--verify", action="store_true",
                   help="also load each policy as every runtime does (its file's sha256 against the card, the config, "
                        "the graph's inputs and outputs in onnxruntime) and step it once; exit 2 if any fails")
    p.set_defaults(fn=cmd_policies)


def _headline(card: dict) -> dict | None:
    """The first evaluation's headline number: its first ``final_*`` entry (and standard error), setting and
    command."""
    evals = card.get("evaluation")
    first = evals[0] if isinstance(evals, list) and evals and isinstance(evals[0], dict) else None
    if first is None:
        return None
    for key, value in first.items():
        if key.startswith("final_") and not key.endswith("_sem") and isinstance(value, (int, float)):
            sem = first.get(f"{key}_sem")
            return {"metric": key[len("final_"):], "value": value,
                    "sem": sem if isinstance(sem, (int, float)) else None,
                    "dims": first.get("dims"), "experts": first.get("experts"), "command": first.get("command")}
    return None


def _successor(text, names: set[str], own: str) -> str | None:
    """The first shipped policy other than ``own`` that a card's advice names."""
    if not isinstance(text, str):
        return None
    for word in re.findall(r"[a-z][a-z0-9-]*-v\d+", text):
        if word in names and word != own:
            return word
    return None


def _map(x) -> dict:
    return x if isinstance(x, dict) else {}


def summary(card: dict, names: set[str]) -> dict:
    """One row of the list: what a user picks a policy by."""
    task = _map(_map(card.get("config")).get("task"))
    life, growth = _map(card.get("lifetime")), _map(card.get("growth"))
    name = str(card.get("name", "?"))
    fresh, clone = growth.get("fresh"), growth.get("clone")
    advice = []  # where a kind of newcomer hurts: the kind that does not, and the successor the card names
    if fresh == "hurts" and clone == "ok":
        advice.append("clones")
    if clone == "hurts" and fresh == "ok":
        advice.append("fresh")
    if fresh == "hurts":
        advice += [s for s in [_successor(growth.get("instead"), names, name)] if s]
    elif clone == "hurts" and fresh != "ok":
        advice += [s for s in [_successor(growth.get("clone_instead"), names, name)] if s]
    return {"name": name, "task": task.get("name"), "dims": task.get("dims"), "experts": task.get("experts"),
            "lifetime": life.get("kind"), "horizon": life.get("horizon"), "fresh": fresh, "clone": clone,
            "instead": ", or ".join(advice) or None, "headline": _headline(card)}


def _cards(names: list[str], retired: bool = False) -> list[tuple[str, Path, dict | None, str | None]]:
    """(name, card path, card or None, why not) for the given names, or for every shipped (``retired``: retired)
    policy."""
    from ..policy_card import PolicyError, card_paths, resolve_policy, retired_dir, shipped_dir, shipped_policies

    if not names:
        d = retired_dir() if retired else shipped_dir()
        paths = [(n, d / f"{n}.json") for n in shipped_policies(retired)] if d else []
    else:
        paths = []
        for n in names:
            try:
                paths.append((n, card_paths(resolve_policy(n))[1]))
            except PolicyError as e:
                raise ConfigError(str(e)) from None
    out = []
    for n, path in paths:
        try:
            card = json.loads(Path(path).read_text())
            if not isinstance(card, dict):
                raise ValueError("not a JSON object")
            out.append((n, path, card, None))
        except (OSError, ValueError) as e:
            if names:  # asked for by name: an error, as every command that loads a policy
                raise ConfigError(f"cannot read the card {path}: {e}"[:300]) from None
            out.append((n, path, None, f"card unreadable: {e}"[:200]))
    return out


def _range(r) -> str:
    if isinstance(r, list) and len(r) == 2:
        return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"
    return "?"


def _number(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "?"


def cmd_policies(args):
    from ..policy_card import is_retired, shipped_policies

    if args.names and args.retired:
        raise ConfigError("give policy names or --retired, not both (a retired policy's card shows by its name)")
    cards = _cards(args.names, args.retired)
    known = set(shipped_policies())
    rows = []
    for n, path, card, why in cards:
        row = summary(card, known) if card is not None else {"name": n, "error": why}
        row["retired"] = is_retired(path)
        if args.task is None or row.get("task") == args.task:
            if args.verify:
                row["verified"] = verify(n)
            rows.append((row, card))
    if args.task is not None and not rows:
        tasks = sorted({str(summary(c, known)["task"]) for _, _, c, _ in cards if c is not None})
        raise ConfigError(f"no {'retired' if args.retired else 'shipped'} policy of task {args.task!r} "
                          f"(tasks: {', '.join(tasks)})")
    if args.json:
        print(json.dumps([card if args.names and card is not None and not args.verify else row
                          for row, card in rows], indent=1))
    elif args.names:
        for row, card in rows:
            _show(row, card)
    else:
        _table([row for row, _ in rows], args.retired)
        old = len(shipped_policies(retired=True))
        if old and not args.retired and args.task is None:
            print(f"and {old} retired policies (superseded; fresh experts hurt them), still loadable by name: "
                  "badger policies --retired")
    failed = [row["name"] for row, _ in rows if row.get("verified", "ok") != "ok"]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(rows)} policies failed to load: {', '.join(failed)}")


def verify(name: str) -> str:
    """"ok" if the policy loads as every runtime loads it and one step of its graph on the initial state gives
    finite numbers; else the reason."""
    import numpy as np

    from ..policy_card import PolicyError, load_policy

    try:
        pol = load_policy(name)
        spec = pol.spec
        h = np.tile(np.tanh(np.asarray(pol.h0, np.float32)), (2, 1))  # the state with zero noise
        state, heads = pol.step(h, np.zeros((2, spec.msg_dim), np.float32), np.zeros((2, spec.sensed_dim), np.float32))
        if not (np.isfinite(state).all() and np.isfinite(heads).all()):
            return "its step on the initial state is not finite"
    except PolicyError as e:
        return str(e)[:300]
    return "ok"


def _table(rows: list[dict], retired: bool = False):
    from rich.console import Console
    from rich.table import Table

    t = Table(title=("retired policies: superseded, fresh experts hurt them (use the one in 'newcomers: instead')"
                     if retired else "shipped policies") + " (badger policies NAME: one card; --json for scripts)")
    verified = any("verified" in r for r in rows)
    for col in ("name", "task", "d", "N", "lifetime", "fresh", "clone", "newcomers: instead",
                "headline (first evaluation)") + (("verified",) if verified else ()):
        t.add_column(col)
    for r in rows:
        check = (r.get("verified", ""),) if verified else ()
        if "error" in r:
            t.add_row(r["name"], "", "", "", "", "", "", "", r["error"], *check)
            continue
        life = "continual" if r["lifetime"] == "continual" else f"episodic {r['horizon']}"
        h = r["headline"]
        head = "" if h is None else (f"{h['metric']} {_number(h['value'])}" + (f" ± {_number(h['sem'])}" if h["sem"]
                                                                                else "")
                                     + f" (d {h['dims']}, N {h['experts']})")
        t.add_row(r["name"], str(r["task"]), _range(r["dims"]), _range(r["experts"]), life, str(r["fresh"] or "-"),
                  str(r["clone"] or "-"), r["instead"] or "", head, *check)
    Console(width=200).print(t)


def _show(row: dict, card: dict | None):
    if card is None:
        print(f"{row['name']}: {row['error']}")
        return
    life, growth, training = (_map(card.get(k)) for k in ("lifetime", "growth", "training"))
    lines = [f"{row['name']}  (task {row['task']}; trained d {_range(row['dims'])}, N {_range(row['experts'])})"
             + ("  [retired: superseded, kept in policies/retired/ for the results it made]" if row.get("retired")
                else "") + (f"  [verified: {row['verified']}]" if "verified" in row else ""),
             f"  lifetime: {life.get('kind')}" + (f", horizon {life.get('horizon')}" if life.get("horizon") else "")
             + (f"  [{life.get('why')}]" if life.get("why") else "")]
    for kind, why, instead in (("fresh", "why", "instead"), ("clone", "clone_why", "clone_instead")):
        if growth.get(kind):
            lines.append(f"  {kind} experts: {growth[kind]}  [{growth.get(why, '')}]")
            if growth.get(instead):
                lines.append(f"    instead: {growth[instead]}")
    if card.get("training_command"):
        lines.append(f"  trained by: {card['training_command']}")
    if isinstance(training.get("wall_seconds"), (int, float)):
        lines.append(f"  training: {training.get('batches')} batches, {training['wall_seconds']:.0f} s")
    for ev in card.get("evaluation") if isinstance(card.get("evaluation"), list) else []:
        if isinstance(ev, dict):
            nums = ", ".join(f"{k} {_number(v)}" for k, v in ev.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool) and k not in ("dims", "experts"))
            lines.append(f"  evaluation (d {ev.get('dims')}, N {ev.get('experts')}): {nums}")
            if ev.get("command"):
                lines.append(f"    {ev['command']}")
    print("\n".join(lines))
