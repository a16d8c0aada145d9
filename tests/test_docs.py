"""The documentation's commands and code still match the code.

Every number in README.md, docs/ and the policy cards names the command that made it; a flag renamed or a
setting removed would leave those commands wrong without any test noticing. These tests read the
commands out of the text and hold them to the command line (every `--flag` of a `badger SUBCOMMAND`
exists), the code blocks of the guides to the parser (each complete line parses), every documented
`badger train CONFIG --set ...` to the config loader (the config exists and its overrides are valid), every
quoted demo script to the checkout (it exists, its quoted flags are its own, it loads); they run the
tutorial's Python and its walkthrough as written, and hold README's counts of the policies that meet the
product rule to the cards.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import io
import json
import os
import re
import shlex

import pytest

from badger_runtime.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
CARDS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "policies", "**", "*.json"),
                                                            recursive=True))  # the retired cards' commands too
# a word that ends the command in a sentence ("... --json, then badger export ...", "(8,000 batches)")
_PROSE = {"then", "and", "or", "with", "python", "bash", "badger", "&&", "|", ";"}


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _fenced(text: str) -> list[str]:
    """The lines of the shell code blocks (```bash / ```sh), continuations joined, comments cut."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip() or "text", []
            else:
                if lang in ("bash", "sh"):
                    blocks.append("\n".join(body))
                lang = None
        elif lang is not None:
            body.append(line)
    return [line.split(" #")[0].strip()
            for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()
            if not line.lstrip().startswith("#")]


def _texts(rel: str) -> list[str]:
    """Where a file mentions commands: a markdown file's code lines and inline code spans, every string
    of a card."""
    if rel.endswith(".json"):
        out = []

        def walk(v):
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)

        walk(json.loads(_read(rel)))
        return out
    text = _read(rel)
    spans = re.findall(r"`([^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))  # may wrap lines
    return _fenced(text) + [" ".join(s.split()) for s in spans if re.search(r"\b(badger|python3?) ", s)]


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    return build_parser()


def _subparsers(p: argparse.ArgumentParser) -> dict:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


def _mentions(text: str):
    """Each `badger SUB [SUB2] ...` in a text: (the subcommand's parser, its name, its tokens up to where the
    sentence goes on)."""
    root = _parser()
    for m in re.finditer(r"\bbadger ([a-z].*)", text):
        p, path, toks = root, [], m.group(1).replace("`", " ").split()
        while toks and toks[0] in _subparsers(p):
            p = _subparsers(p)[toks[0]]
            path.append(toks.pop(0))
        if not path:
            continue
        kept = []
        for t in toks:
            if t.startswith("(") or t in _PROSE:
                break
            kept.append(t)
            if t.endswith((":", ",", ")", ";", ".")):
                break
        yield p, " ".join(path), kept


def test_every_documented_flag_exists():
    """`--flag` in any documented `badger` command is an option of that subcommand (4,000+ uses)."""
    uses, missing = 0, []
    for rel in DOCS + CARDS:
        for text in _texts(rel):
            for p, name, toks in _mentions(text):
                options = {s for a in p._actions for s in a.option_strings}
                for t in toks:
                    flag = re.match(r"--[a-z0-9][a-z0-9-]*", t)
                    if flag:
                        uses += 1
                        if flag.group(0) not in options:
                            missing.append(f"{rel}: badger {name} {flag.group(0)}  ({text[:120]})")
    assert uses > 1000, uses  # the extraction still finds the commands
    assert not missing, "\n".join(missing)


def test_documented_scripts_exist_with_their_flags():
    """Every `python demos/X.py --flag ...` or `bash demos/X.sh` the pages and cards quote is a script of the
    checkout, and each quoted flag appears in its source (the scripts parse their own flags)."""
    scripts, uses, failures = set(), 0, []
    for rel in DOCS + CARDS:
        for text in _texts(rel):
            for m in re.finditer(r"(?:python3?|bash) ((?:demos|configs)/[\w/.-]+\.(?:py|sh))((?: [^\s`]+)*)", text):
                path = m.group(1)
                scripts.add(path)
                if not os.path.exists(os.path.join(ROOT, path)):
                    failures.append(f"{rel}: {path} does not exist")
                    continue
                source = _read(path)
                for tok in m.group(2).split():
                    if tok.startswith("(") or tok in _PROSE:
                        break
                    flag = re.match(r"--[a-z0-9][a-z0-9-]*", tok)
                    if flag:
                        uses += 1
                        if flag.group(0) not in source:
                            failures.append(f"{rel}: {path} {flag.group(0)}")
                    if tok.endswith((":", ",", ")", ";", ".")):
                        break
    assert len(scripts) > 15 and uses > 100, (len(scripts), uses)
    assert not failures, "\n".join(failures)


_PLACEHOLDER = re.compile(r"\[|\.\.\.|\|| [A-Z]{1,6}\b| [A-Z][A-Z_]+\.onnx|\bNAME\b|\bPOLICY\b")


def test_code_block_commands_parse():
    """Each complete `badger` line of the guides' shell blocks (no placeholders) parses as written."""
    parser, parsed, failures = build_parser(), 0, []
    for rel in DOCS:
        for line in _fenced(_read(rel)):
            for part in re.split(r"&&|;", line):
                toks = shlex.split(part)
                while toks and re.fullmatch(r"[A-Z_]+=\S*", toks[0]):  # VAR=value badger ...
                    toks.pop(0)
                if len(toks) < 2 or toks[0] != "badger" or _PLACEHOLDER.search(part):
                    continue
                parsed += 1
                err = io.StringIO()
                try:
                    with contextlib.redirect_stderr(err):
                        parser.parse_args(toks[1:])
                except SystemExit as e:
                    if e.code:
                        failures.append(f"{rel}: {part.strip()}: {err.getvalue().strip().splitlines()[-1]}")
    assert parsed > 20, parsed
    assert not failures, "\n".join(failures)


def test_documented_training_commands_load():
    """Every documented `badger train CONFIG ... --set KEY=VALUE ...` names a config that exists, and its
    overrides are settings the loader accepts (a renamed setting fails here, not in a user's run)."""
    from badger_runtime.config import load_experiment

    cmd = re.compile(r"badger train (\S+)((?: --\S+(?: (?:'[^']*'|\"[^\"]*\"|[^-\s(]\S*))?)*)")
    seen, failures = set(), []
    for rel in DOCS + CARDS:
        for text in _texts(rel):
            for m in cmd.finditer(text):
                path = m.group(1).strip("`")
                if not path.startswith("configs/") or re.search(r"\||\.\.\.|=[A-Z]{1,6}\b|_[A-Z]{2,}\b", m.group(0)):
                    continue  # a placeholder (CONFIG, OBJ, a|b) or the tutorial's own my_task.toml
                toks = shlex.split(m.group(2))
                sets = [toks[i + 1] for i, t in enumerate(toks[:-1]) if t == "--set"]
                sets = [s.rstrip(",;:)`") if s.count("[") == s.count("]") else s for s in sets]
                if (path, tuple(sets)) in seen:
                    continue
                seen.add((path, tuple(sets)))
                if not os.path.exists(os.path.join(ROOT, path)):
                    failures.append(f"{rel}: {path} does not exist")
                    continue
                try:
                    load_experiment(os.path.join(ROOT, path), sets)
                except Exception as e:  # noqa: BLE001 (report every one)
                    failures.append(f"{rel}: {m.group(0)[:160]}: {type(e).__name__}: {e}")
    assert len(seen) > 30, len(seen)
    assert not failures, "\n".join(failures)


def test_tutorial_python_runs_as_written(capsys):
    """docs/tutorial.md's Python, run as written: the error it quotes (0.8 at step 0, about 1e-4 within 5
    steps), then its growing snippet on the same agent (3 -> 5 -> 6 -> 5 experts)."""
    blocks = re.findall(r"```python\n(.*?)```", _read("docs/tutorial.md"), re.S)
    assert len(blocks) == 2, "the tutorial's Python blocks changed: update this test"
    namespace: dict = {}
    exec(compile(blocks[0], "tutorial-block-1", "exec"), namespace)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    errors = [float(r[2]) for r in rows]
    assert len(errors) == 20 and all(int(r[1]) == 3 for r in rows)
    assert 0.7 < errors[0] < 0.9
    assert min(errors[:6]) < 1e-4 and max(errors[5:]) < 3e-4
    exec(compile(blocks[1], "tutorial-block-2", "exec"), namespace)
    assert namespace["agent"].n_experts == 5  # 3 + 2 fresh + 1 clone - 1
    # section 7: "adding two fresh experts right after step 10 ... costs nothing: the error is 5e-5 at step 11
    # and 1.2e-4 at step 19, as without them (1.5e-4)"
    anchor = "    out, info = agent.step(slots)\n"
    assert anchor in blocks[0]
    grown = blocks[0].replace(anchor, anchor + '    if t == 10: agent.add_experts(2, init="fresh")\n')
    capsys.readouterr()
    exec(compile(grown, "tutorial-block-1-grown", "exec"), {})
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [int(r[1]) for r in rows] == [3] * 10 + [5] * 10  # printed after the add
    grown_errors = [float(r[2]) for r in rows]
    assert grown_errors[:11] == errors[:11]
    assert grown_errors[11] < errors[11] and grown_errors[19] < 1.2 * errors[19]


@pytest.mark.parametrize("rel", ["README.md", "docs/tutorial.md"])
def test_relative_links_resolve(rel):
    """Every relative link of the guides points at a file of the checkout."""
    base = os.path.dirname(os.path.join(ROOT, rel))
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(rel)):
        if not re.match(r"[a-z]+://", target) and not os.path.exists(os.path.join(base, target)):
            broken.append(target)
    assert not broken, broken


def test_tutorial_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/tutorial.md, sections 1-5 and 7, as a user runs them: its `my_task.toml` written from the page,
    then every shell line of the page on that task (train's smoke run, export, eval, run) exactly as
    written, in a fresh folder; each exits 0 and the evaluations print their JSON."""
    from badger_runtime.cli import main

    text = _read("docs/tutorial.md")
    (toml,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    (tmp_path / "my_task.toml").write_text(toml)
    (tmp_path / "policies").mkdir()
    monkeypatch.chdir(tmp_path)
    lines = [line for line in _fenced(text) if re.search(r"my_task|my-task-v1", line)
             and line.split()[:2][-1] in ("train", "export", "eval", "run")]
    assert [line.split()[1] for line in lines] == ["train", "export", "eval", "eval", "run", "eval"], lines
    for line in lines:
        capsys.readouterr()
        assert main(shlex.split(line)[1:]) == 0, line
        out = capsys.readouterr().out
        if " --json" in line:
            report = json.loads(out.strip().splitlines()[-1])
            assert 0 <= report["final_mse"] < 10, (line, report["final_mse"])
    assert (tmp_path / "policies" / "my-task-v1.json").exists()


def test_readme_counts_the_retired_policies_and_each_names_a_shipped_successor():
    """README's "**Ten retired policies**" counts policies/retired/; each retired card says fresh experts hurt it (why
    it was retired) and its advice names a shipped policy to use instead (what the load note prints)."""
    from badger_runtime.policy_card import card_paths, resolve_policy, shipped_policies

    words = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()
    m = re.search(r"\*\*(\S+) retired policies\*\*", _read("README.md"))
    assert m, "README's retired-policies sentence changed: update this test"
    retired, shipped = shipped_policies(retired=True), set(shipped_policies())
    assert words.index(m.group(1).lower()) == len(retired) and retired and not shipped & set(retired)
    named = re.compile(r"[a-z][a-z0-9-]*-v\d+")
    for name in retired:
        growth = json.loads(card_paths(resolve_policy(name))[1].read_text())["growth"]
        assert growth["fresh"] == "hurts", name
        assert shipped & set(named.findall(growth["instead"])), (name, growth["instead"])
    for name in sorted(shipped):  # and no shipped card's advice sends its users to a retired policy
        growth = json.loads(card_paths(resolve_policy(name))[1].read_text())["growth"]
        for key in ("instead", "clone_instead"):
            assert not set(named.findall(growth.get(key, ""))) & set(retired), (name, key, growth[key])


def test_every_demo_script_loads_without_running(monkeypatch):
    """The scripts under demos/ (quoted by the pages for the numbers they made) still import what they use:
    each is loaded as a module (its top level only; each keeps its work under ``if __name__ == "__main__"``),
    so an API they call that moved or was renamed fails here, not in a reader's run."""
    import runpy

    scripts = sorted(glob.glob(os.path.join(ROOT, "demos", "*.py")))
    assert len(scripts) > 20
    monkeypatch.syspath_prepend(os.path.join(ROOT, "demos"))  # scripts that import their neighbours
    unguarded = [os.path.basename(p) for p in scripts if 'if __name__ == "__main__":' not in _read(p)]
    assert not unguarded, f"demo scripts that run on import: {unguarded}"
    for path in scripts:
        runpy.run_path(path, run_name="loaded_by_test_docs")
