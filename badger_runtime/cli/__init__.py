"""`badger ...`: a thin command line over the library (parses, calls, prints).

One module per group of commands (``train``: train and export; ``evaluate``: eval and run;
``longrun``), the shared flags in ``common``; ``serve``, ``demo`` and ``bench`` register their
commands from their own packages. torch is imported only by the commands that need it
(train, export, eval of a checkpoint); everything else runs on a base install.
"""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from ..bench.cli import register as register_bench
    from ..demo.cli import register as register_demo
    from ..serve.cli import register as register_serve
    from . import evaluate, longrun, policies, train

    p = argparse.ArgumentParser(prog="badger", description="Badger agents: many experts, one shared policy.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for register in (train.register, evaluate.register, longrun.register, policies.register, register_serve,
                     register_demo, register_bench):
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error (or --help)
        return e.code if isinstance(e.code, int) else 2
    except ConfigError as e:  # e.g. a task module BADGER_TASKS names that does not import (the parser lists tasks)
        print(f"badger: error: {e}", file=sys.stderr)
        return 2
    from ..engine import InputError
    from ..policy_card import PolicyError

    try:
        try:
            args.fn(args)
        except BaseExceptionGroup as group:  # an actor runtime's nursery: report its one cause
            while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
                group = group.exceptions[0]
            raise group from None
    except (ConfigError, PolicyError, InputError) as e:
        print(f"badger: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional extra that is not installed
        extra = EXTRAS.get((getattr(e, "name", None) or "").split(".")[0])
        if "pip install" not in str(e) and extra is None:
            raise
        hint = "" if extra is None else (f": `badger {args.cmd}` needs the '{extra}' extra "
                                         f"(pip install \"badger-runtime[{extra}]\", or pip install -e \".[{extra}]\" "
                                         "in a checkout)")
        print(f"badger: error: {e}{hint}", file=sys.stderr)
        return 2
    return 0


# an optional dependency's top-level module -> the extra (pyproject.toml) that installs it
EXTRAS = {"torch": "train", "onnx": "train", "sklearn": "data", "gymnasium": "gym", "prometheus_client": "serve",
          "ray": "cluster"}


if __name__ == "__main__":
    sys.exit(main())
