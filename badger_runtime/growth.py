"""What fresh experts do to a policy: the measurement behind a card's ``growth``.

The product rule: hot-adding fresh experts to a running agent never makes a shipped policy worse
than the unchanged agent. ``measure_growth`` measures it on the policy's own task (the setting of
docs/results.md's table "Hot-adding fresh experts to every shipped policy"): an agent of the
trained minimum N (at least 2 unless N is fixed) at the trained maximum d gets as many fresh experts
again at mid-episode; its final error is compared with the unchanged agent's on the same seeded
episodes, and so are clones (the same number of experts copying living ones). ``badger export
--eval-episodes`` writes both verdicts into the card, and ``engine.check_growth`` refuses fresh
experts (clones) where the card says they hurt.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .engine import growth_hurts, numpy_ops
from .episodes import schedule
from .evaluation import run_episodes
from .tasks import task_class

def growth_metric(task_name: str) -> str | None:
    """The metric (lower is better) a task's policies' growth is measured by (``Task.growth_metric``: the guessing
    game's and scale's error, a plugin task's own); None for a task measured by its own report (a bandit's regret,
    a classifier's accuracy), whose cards say it by hand."""
    return task_class(task_name).growth_metric

#: "hurts": the grown agent's final error is above the unchanged agent's by more than this many
#: standard errors of the unchanged agent's (the rule tests/test_horizon.py holds policies to). Not a paired
#: test on purpose: harm is heavy-tailed (a few episodes blow up), which inflates the SEM of the paired
#: differences; on the shipped policies (256 episodes, seed 0) both rules give every card's verdict but
#: guessing-one-expert-v1's, 4.2e-5 -> 0.068, which a paired 3-SEM test would pass (z = 2.87)
NOISE_SEMS = 3.0


def evaluation_setting(pol):
    """The task setting a policy is measured on, and the ``badger eval`` flags that name it (a
    policy trained with target jumps is measured on the stationary game: ``--task NAME``)."""
    own = pol.task
    task = task_class(own.name).evaluation_config(own)
    if task == own:
        return own, {}
    steps = min(own.steps, 20)  # the stationary game over the steps of the card's evaluation
    return dataclasses.replace(task, steps=steps), {"task": own.name, "steps": steps}


@dataclasses.dataclass(frozen=True)
class GrowthSetting:
    task: object  # TaskConfig
    flags: dict  # the eval flags that name the task setting
    dims: int  # the trained maximum d
    experts: int  # the trained minimum N (>= 2 unless fixed)
    steps: int  # within the policy's horizon
    at: int  # the experts join before this step (mid-episode)


def growth_setting(pol) -> GrowthSetting | None:
    """The setting ``measure_growth`` uses for ``pol``; None for a task not measured by an error."""
    own = pol.task
    if growth_metric(own.name) is None:
        return None
    task, flags = evaluation_setting(pol)
    n = own.experts[0] if own.experts[0] == own.experts[1] else max(2, own.experts[0])
    steps = min(own.steps, pol.horizon or own.steps)
    return GrowthSetting(task, flags, own.dims[1], n, steps, steps // 2)


def command(name: str, s: GrowthSetting, *, episodes: int, seed: int, init: str | None = None,
            allow_harmful: bool = False) -> str:
    """The ``badger eval`` command that gives one arm of the measurement on its own."""
    parts = [f"badger eval --policy {name}"]
    for k, v in {**s.flags, "dims": s.dims, "experts": s.experts, "steps": s.steps}.items():
        parts.append(f"--{k} {v}")
    if init:
        parts.append(f"--add-at {s.at} --add {s.experts} --init {init}")
        if allow_harmful:
            parts.append("--allow-harmful-growth")
    return " ".join(parts) + f" --episodes {episodes} --seed {seed} --json"


def final_errors(pol, s: GrowthSetting, *, episodes: int, seed: int, init: str | None = None,
                 add: int | None = None) -> np.ndarray:
    """Each episode's final error [episodes] in the setting ``s``: the unchanged agent (``init`` None) or
    one that gets ``add`` (default ``s.experts``: as many again) more experts (``init`` 'fresh' or 'clone')
    before step ``s.at``. A measurement, so a card that says they hurt does not refuse them here; the same
    episodes for every ``init`` (paired)."""
    changes = schedule(s.at, s.experts if add is None else add, init, allow_harmful=True) if init else ()
    run = run_episodes(numpy_ops(), pol, pol.agent, s.task, dims=s.dims, experts=s.experts, episodes=episodes,
                       seed=seed, steps=s.steps, changes=changes)
    return run.metrics[growth_metric(s.task.name)][-1]


def worse(base: np.ndarray, grown: float) -> bool:
    """The cards' rule: a grown agent's mean final error ``grown`` is worse than the unchanged agent's
    (final errors ``base``) by more than ``NOISE_SEMS`` of their standard errors."""
    return grown > float(base.mean()) + NOISE_SEMS * float(base.std() / np.sqrt(base.size))


def measure_growth(pol, *, name: str | None = None, episodes: int = 256, seed: int = 0) -> dict | None:
    """Fresh experts and clones joining at mid-episode against the unchanged agent (module doc), on the
    same episodes. Returns {"fresh": "ok" | "hurts", "why": str, "instead": str (where fresh experts hurt),
    "clone", "clone_why", "clone_instead" alike for clones, and the numbers: "command", "unchanged",
    "fresh_final", "clone_final", "sem", "ratio", "clone_ratio", "setting"}; None for a task not measured by
    an error."""
    s = growth_setting(pol)
    if s is None:
        return None
    name = name or pol.name
    kw = dict(episodes=episodes, seed=seed)
    base = final_errors(pol, s, **kw)
    mean, sem = float(base.mean()), float(base.std() / np.sqrt(base.size))
    final = {init: float(final_errors(pol, s, init=init, **kw).mean()) for init in ("fresh", "clone")}
    ratio = {init: v / max(mean, 1e-12) for init, v in final.items()}
    hurts = {init: worse(base, final[init]) for init in final}
    out, cmd = {}, {}
    who = {"fresh": "fresh experts", "clone": "clones"}
    for init, other in (("fresh", "clone"), ("clone", "fresh")):
        key = "" if init == "fresh" else "clone_"
        # the flag where either this measurement or the card says they hurt (the card refuses them otherwise)
        cmd[init] = command(name, s, init=init, allow_harmful=hurts[init] or growth_hurts(pol, init), **kw)
        out[init] = "hurts" if hurts[init] else "ok"
        out[key + "why"] = (f"{cmd[init]}: final error {mean:.4g} unchanged -> {final[init]:.4g} ({ratio[init]:.2f}x, "
                            f"SEM {sem:.2g}) when {s.experts} {who[init]} join {s.experts} at step {s.at} of "
                            f"{s.steps}, d = {s.dims}")
        if hurts[init]:
            fine = "better than" if final[other] < mean else "within the noise of"
            out[key + "instead"] = (
                f"add {who[other]} (init '{other}': {final[other]:.4g}, {fine} the unchanged agent)" if not hurts[other]
                else f"none measured: {who[other]} hurt too ({final[other]:.4g})")
    return out | {"command": cmd["fresh"], "clone_command": cmd["clone"], "unchanged": mean,
                  "fresh_final": final["fresh"], "clone_final": final["clone"], "sem": sem,
                  "ratio": ratio["fresh"], "clone_ratio": ratio["clone"],
                  "setting": dataclasses.asdict(s) | {"task": s.task.name}}


#: the keys of a card's ``growth`` (policy_card.PolicyCard.growth)
CARD_KEYS = ("fresh", "why", "instead", "clone", "clone_why", "clone_instead")


def card_growth(measured: dict) -> dict:
    """The card's ``growth`` entry from ``measure_growth``'s result."""
    return {k: measured[k] for k in CARD_KEYS if k in measured}


#: measure_growth's wording of a verdict's numbers (``why`` / ``clone_why``), SEM optional (some cards drop it)
_QUOTED = re.compile(r"final error (\S+) unchanged -> (\S+) \((\S+?)x(?:, SEM (\S+?))?\)")
#: the other arm's mean where an ``instead`` text offers it ("add clones (init 'clone': 0.1688, ...")
_OFFERED = re.compile(r"\(init '(fresh|clone)': (\S+?),")


def card_setting(growth: dict) -> tuple[int, int]:
    """The (episodes, seed) of a card's growth measurement, read off its ``why`` command."""
    return tuple(int(re.search(rf"--{k} (\d+)", growth["why"]).group(1)) for k in ("episodes", "seed"))


def agrees_as_written(text: str, value: float) -> bool:
    """Whether a number written in a card (``text``, "0.1675", "1.2e-05", "66.2", "1,000") is ``value`` to its
    last written digit (scientific notation: to its mantissa's)."""
    text = text.replace(",", "")
    mant, _, exp = text.lower().partition("e")
    places = len(mant.split(".")[1]) if "." in mant else 0
    return abs(float(text) - value) <= 0.5 * 10.0 ** (-places + (int(exp) if exp else 0)) * (1 + 1e-9) + 1e-15


def requote(growth: dict, measured: dict) -> tuple[dict, list[str]]:
    """A card's ``growth`` with ``measure_growth``'s numbers (``measured``) in place of those it quotes: each
    verdict's "final error U unchanged -> F (Rx, SEM S)" and the other arm's mean an ``instead`` text offers.
    What the card says besides (paired differences, other seeds, what to use instead) is left as written.
    Returns (the new entry, the changes as "key: old -> new"); a verdict the measurement no longer gives is not
    rewritten but listed as "key: VERDICT old -> new" (its reasons and successors need a person)."""
    out, changes = dict(growth), []
    for init, key in (("fresh", ""), ("clone", "clone_")):
        if key + "why" not in growth:
            continue
        if growth[init] != measured[init]:
            changes.append(f"{init}: VERDICT {growth[init]} -> {measured[init]}")
            continue
        text = growth[key + "why"]
        m = _QUOTED.search(text)
        if m is None:
            continue
        ratio = measured["ratio" if init == "fresh" else "clone_ratio"]
        values = (measured["unchanged"], measured[init + "_final"], ratio, measured["sem"])
        if all(t is None or agrees_as_written(t, v) for t, v in zip(m.groups(), values)):
            continue  # the card's numbers, as written
        new = (f"final error {measured['unchanged']:.4g} unchanged -> {measured[init + '_final']:.4g} ({ratio:.2f}x"
               + (f", SEM {measured['sem']:.2g})" if m.group(4) is not None else ")"))
        changes.append(f"{key}why: {m.group(0)} -> {new}")
        out[key + "why"] = text[:m.start()] + new + text[m.end():]
    for key in ("instead", "clone_instead"):
        text = out.get(key)
        if not text:
            continue
        new_text = _OFFERED.sub(lambda m: m.group(0) if agrees_as_written(m.group(2), measured[m.group(1) + "_final"])
                                else f"(init '{m.group(1)}': {measured[m.group(1) + '_final']:.4g},", text)
        if new_text != text:
            changes.append(f"{key}: {text} -> {new_text}")
            out[key] = new_text
    return out, changes

