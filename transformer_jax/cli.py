"""The `transformer-jax` command line (also `python -m transformer_jax`).

    transformer-jax train [--config NAME|path/to/file.py] [--set key.path=value ...] [--workdir DIR]
    transformer-jax eval --workdir DIR [--set ...]
    transformer-jax info [--config ...] [--set ...]
    transformer-jax plan --config NAME [--mesh data=..,fsdp=..,tensor=..] [--chip v5e|v5p|h100|h200|cpu] [--set ...]
    transformer-jax generate --workdir DIR --prompt "def " [--max-new-tokens N] [--temperature T]
    transformer-jax export --workdir DIR --to HF_DIR

NAME is a shipped experiment (transformer_jax/experiments/NAME.py); with no --config, `train`
runs `default`. A bad setting is one line on stderr
and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transformer-jax", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, workdir_required=False):
        s.add_argument("--config", help="a shipped experiment's name (default: default) or your own experiment file")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.steps=100 (repeatable)")
        s.add_argument("--workdir", required=workdir_required,
                       help="the training run's directory (required)" if workdir_required
                       else "run directory (default: runs/<name>)")

    common(sub.add_parser("train", help="train (resumes from --workdir if it holds a checkpoint)"))
    common(sub.add_parser("eval", help="evaluate the newest intact checkpoint of --workdir"), workdir_required=True)
    common(sub.add_parser("info", help="devices, mesh, parameter count and per-device memory"))
    from transformer_jax.plan import add_arguments as plan_arguments
    common(pl := sub.add_parser("plan", help="compile ahead of time for a mesh: memory, FLOPs, collectives, "
                                "predicted step time and MFU on a chip (exit 1: does not fit)"))
    plan_arguments(pl)
    g = sub.add_parser("generate", help="sample from a trained decoder LM, streaming tokens")
    g.add_argument("--workdir", required=True, help="the training run's directory (its newest intact checkpoint "
                   "is used)")
    g.add_argument("--prompt", default=None, help="the text to continue (give this or --prompt-file)")
    g.add_argument("--prompt-file", default=None, help="a file whose text to continue")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="how many tokens to generate at most; with learned positions it is cut, with a note, "
                   "so that the prompt and these fit in model.max_len (default: 128)")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature, >= 0; 0 is greedy decoding (default: 0.8)")
    g.add_argument("--top-k", type=int, default=0,
                   help="sample only among the k most likely tokens; 0 is off (default: 0)")
    g.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling: only the most likely tokens whose probabilities add up to p, "
                   "in (0, 1]; 1 is off (default: 0.95)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default: 0)")
    e = sub.add_parser("export", help="write a run's newest checkpoint as a Hugging Face transformers directory")
    e.add_argument("--workdir", required=True, help="the training run's directory (its newest intact checkpoint "
                   "is exported)")
    e.add_argument("--to", required=True, help="output directory (config.json, model.safetensors, tokenizer)")
    return p


def run() -> int:
    """The program: `main` in a process whose malloc uses huge pages where that helps (hugepages.py)."""
    from transformer_jax import hugepages
    hugepages.relaunch(["-m", "transformer_jax", *sys.argv[1:]])
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    from transformer_jax import supervise
    if supervise.supervised():
        supervise.child_started()
    _quiet_libraries()
    from transformer_jax.checkpoint import CheckpointIntegrityError
    from transformer_jax.config import ConfigError

    try:
        _check_environment()
        if args.command == "generate":
            from transformer_jax.train.run import generate_cli
            return generate_cli(args)
        if args.command == "eval":
            _check_run_dir(Path(args.workdir))
        if args.command == "export":
            from transformer_jax.convert.runs import export_run
            out, note = export_run(args.workdir, args.to)
            print(f"transformer-jax: exported {args.workdir} to {out} ({note})")
            return 0
        from transformer_jax.experiment import load_experiment
        cfg = _load(args, load_experiment)
        if args.command == "plan":
            from transformer_jax.plan import plan_cli
            return plan_cli(cfg, args)
        workdir = Path(args.workdir) if args.workdir else Path("runs") / cfg.name
        if args.command == "train":
            _check_init_from(cfg.init_from, workdir)
            _make_workdir(workdir)
            from transformer_jax.parallel.mesh import distributed_requested
            if distributed_requested(cfg.mesh) and not supervise.supervised():  # see supervise.py
                return supervise.supervise([sys.executable, "-m", "transformer_jax", *argv],
                                           f"restart the job to resume from {workdir / 'checkpoints'}")
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
    except CheckpointIntegrityError as e:  # every checkpoint of the run is damaged
        print(f"transformer-jax: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # a device ran out of memory where the compile-time check (train/fits.py) could not tell
        first = str(e).strip().splitlines()[0][:200]
        print(f"transformer-jax: error: out of memory ({first}); lower train.global_batch_size or train.seq_len, set "
              "model.remat=full, or shard over more devices (mesh); a run resumes from its newest checkpoint",
              file=sys.stderr)
        return 2


def _load(args, load_experiment):
    """The experiment from --config, or the one saved in --workdir (eval, resume), plus --set."""
    if args.config is None and args.workdir and (Path(args.workdir) / "config.json").exists():
        from transformer_jax.experiment import load_run_config
        return load_run_config(args.workdir).apply_overrides(args.overrides)
    return load_experiment(args.config, args.overrides)


def _check_environment() -> None:
    """Settings read from the environment while tracing fail here, in one line, before compiling."""
    from transformer_jax.config import ConfigError
    from transformer_jax.layers.platform import environment_cpu_dots
    try:
        environment_cpu_dots()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_init_from(init_from: str | None, workdir: Path) -> None:
    """A fine-tune whose backbone is missing stops here, in one line, before compiling (a run
    that resumes from its own checkpoint never reads init_from)."""
    if init_from and not Path(init_from.removeprefix("hf:")).exists() and not (workdir / "checkpoints").is_dir():
        from transformer_jax.config import ConfigError
        raise ConfigError(f"init_from={init_from!r} does not exist (relative to {Path.cwd()}); train that run first "
                          "(the experiment's docstring has the command) or --set init_from=DIR (none: from scratch)")


def _check_run_dir(workdir: Path) -> None:
    """eval/generate read a training run: say so before anything is created or compiled."""
    from transformer_jax.config import ConfigError
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {str(workdir)!r} does not exist; point it at a training run's directory")
    if not (workdir / "checkpoints").is_dir():
        raise ConfigError(f"--workdir {str(workdir)!r} holds no checkpoints/; train first "
                          f"(transformer-jax train --workdir {workdir})")


def _make_workdir(workdir: Path) -> None:
    """Creates the run directory now, so that an unusable path is one line before any work."""
    from transformer_jax.config import ConfigError
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if not os.access(workdir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise ConfigError(f"--workdir {str(workdir)!r} cannot be used: {e.strerror or e}; "
                          "choose a directory you can write to") from None


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
