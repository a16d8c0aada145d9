"""`badger train` and `badger export` (both need the 'train' extra: torch)."""

from __future__ import annotations

import json

from .common import int_in


def register(sub):
    t = sub.add_parser("train", help="learn an expert policy (needs the 'train' extra: torch)")
    t.add_argument("config", nargs="?", default=None, help="TOML config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    t.add_argument("--out", required=True, help="run folder: checkpoint, metrics, summary")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (the same config; a larger train.batches trains longer). "
                        "Without it, an OUT that holds a run is refused, never overwritten")
    t.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--outer", choices=("bptt", "es"), default="bptt",
                   help="the outer loop: back-propagation through the inner loop (default), or evolution "
                        "strategies (settings in [train.es]; scored by the deploy engine)")
    t.add_argument("--workers", type=int_in(0, 4096, "--workers"), default=None,
                   help="--outer es: Ray workers scoring the population (default: train.es.workers; 0: this "
                        "process; without Ray installed: this process)")
    t.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="--outer es: join this Ray cluster (e.g. auto, HOST:6379) instead of starting a local one")
    t.set_defaults(fn=cmd_train)

    x = sub.add_parser("export", help="write the expert policy to ONNX with its card")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="policies/NAME.onnx")
    x.add_argument("--name", default=None)
    x.add_argument("--eval-episodes", type=int_in(0, 1_000_000, "--eval-episodes"), default=1000,
                   help="episodes for the card's evaluation (0: none)")
    x.add_argument("--command-line", default=None, help="the training command, recorded in the card")
    x.add_argument("--continual", default=None, metavar="EVIDENCE",
                   help="record the policy as continual (no horizon), citing the 10,000-step check that shows it "
                        "(default: episodic, with its training horizon)")
    x.add_argument("--horizon", type=int_in(1, 10**9, "--horizon"), default=None, metavar="STEPS",
                   help="record the policy as episodic with this horizon (default: its training horizon)")
    x.add_argument("--why", default=None, help="with --horizon: why this horizon (recorded in the card)")
    x.set_defaults(fn=cmd_export)


def cmd_train(args):
    from ..config import ConfigError, load_experiment
    from ..training.train import train

    cfg = load_experiment(args.config, args.set)
    if args.outer == "es":
        from ..cluster.es import train_es

        summary = train_es(cfg, args.out, resume=args.resume, progress=not args.quiet, final_eval=not args.no_eval,
                           workers=args.workers, ray_address=args.ray)
    elif args.workers is not None or args.ray is not None:
        raise ConfigError("--workers and --ray go with --outer es")
    else:
        summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet, final_eval=not args.no_eval)
    ev = summary.get("eval") or {}  # the final evaluation's headline numbers: final_mse, final_regret, final_error...
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"} |
                     {k: v for k, v in ev.items() if k.startswith("final_") and isinstance(v, (int, float))}))


def cmd_export(args):
    from ..config import ConfigError
    from ..training.export import export, write_card_evaluation

    extra = {"training_command": args.command_line} if args.command_line else {}
    if args.continual and args.horizon:
        raise ConfigError("--continual and --horizon exclude each other (a continual policy has no horizon)")
    if args.why and not args.horizon:
        raise ConfigError("--why goes with --horizon")
    if args.continual:
        extra["lifetime"] = {"kind": "continual", "horizon": None, "why": args.continual}
    elif args.horizon:
        extra["lifetime"] = {"kind": "episodic", "horizon": args.horizon,
                             "why": args.why or "set at export (badger export --horizon)"}
    card = export(args.checkpoint, args.out, name=args.name, extra=extra or None)
    if args.eval_episodes:
        card = write_card_evaluation(args.out, episodes=args.eval_episodes)
    print(json.dumps({"onnx": str(args.out), "sha256": card["sha256"], "export": card["export"]}))
