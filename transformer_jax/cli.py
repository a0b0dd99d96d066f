"""The `transformer-jax` command line (also `python -m transformer_jax`).

    transformer-jax train [--config NAME|path/to/file.py] [--set key.path=value ...] [--workdir DIR]
    transformer-jax eval --workdir DIR [--set ...]
    transformer-jax info [--config ...] [--set ...]
    transformer-jax plan --config NAME [--mesh data=..,fsdp=..,tensor=..] [--chip v5e|v5p|h100|h200|cpu] [--set ...]
    transformer-jax generate --workdir DIR --prompt "def " [--max-new-tokens N] [--temperature T]

NAME is a shipped experiment (transformer_jax/experiments/NAME.py); with no --config, `train`
runs `default`. A bad setting is one line on stderr
and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transformer-jax", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, workdir_required=False):
        s.add_argument("--config", help="a shipped experiment's name (default: default) or your own experiment file")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.steps=100 (repeatable)")
        s.add_argument("--workdir", required=workdir_required, help="run directory (default: runs/<name>)")

    common(sub.add_parser("train", help="train (resumes from --workdir if it holds a checkpoint)"))
    common(sub.add_parser("eval", help="evaluate the newest intact checkpoint of --workdir"), workdir_required=True)
    common(sub.add_parser("info", help="devices, mesh, parameter count and per-device memory"))
    from transformer_jax.plan import add_arguments as plan_arguments
    common(pl := sub.add_parser("plan", help="compile ahead of time for a mesh: memory, FLOPs, collectives, "
                                "predicted step time and MFU on a chip (exit 1: does not fit)"))
    plan_arguments(pl)
    g = sub.add_parser("generate", help="sample from a trained decoder LM, streaming tokens")
    g.add_argument("--workdir", required=True)
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    from transformer_jax.config import ConfigError

    try:
        if args.command == "generate":
            from transformer_jax.train.run import generate_cli
            return generate_cli(args)
        from transformer_jax.experiment import load_experiment
        cfg = _load(args, load_experiment)
        if args.command == "plan":
            from transformer_jax.plan import plan_cli
            return plan_cli(cfg, args)
        workdir = Path(args.workdir) if args.workdir else Path("runs") / cfg.name
        if args.command == "train":
            _check_init_from(cfg.init_from, workdir)
            from transformer_jax.train.loop import train
            train(cfg, workdir)
        elif args.command == "eval":
            from transformer_jax.train.loop import evaluate
            evaluate(cfg, workdir)
        elif args.command == "info":
            from transformer_jax.train.run import info
            info(cfg)
        return 0
    except ConfigError as e:
        print(f"transformer-jax: error: {e}", file=sys.stderr)
        return 2


def _load(args, load_experiment):
    """The experiment from --config, or the one saved in --workdir (eval, resume), plus --set."""
    if args.config is None and args.workdir and (Path(args.workdir) / "config.json").exists():
        from transformer_jax.experiment import ExperimentConfig
        cfg = ExperimentConfig.from_json((Path(args.workdir) / "config.json").read_text())
        return cfg.apply_overrides(args.overrides)
    return load_experiment(args.config, args.overrides)


def _check_init_from(init_from: str | None, workdir: Path) -> None:
    """A fine-tune whose backbone is missing stops here, in one line, before compiling (a run
    that resumes from its own checkpoint never reads init_from)."""
    if init_from and not Path(init_from).exists() and not (workdir / "checkpoints").is_dir():
        from transformer_jax.config import ConfigError
        raise ConfigError(f"init_from={init_from!r} does not exist (relative to {Path.cwd()}); train that run first "
                          "(the experiment's docstring has the command) or --set init_from=DIR (none: from scratch)")


def _quiet_libraries() -> None:
    """TFDS/absl chatter (progress bars of dataset preparation, info logs) off; our own output stays."""
    import logging

    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    try:
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
    except ImportError:
        pass
