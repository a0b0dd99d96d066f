"""The `info` and `generate` commands."""
from __future__ import annotations

import codecs
import sys
from pathlib import Path

import jax

from transformer_jax.config import ConfigError
from transformer_jax.experiment import ExperimentConfig
from transformer_jax.parallel import check_batch, describe_mesh, get_rules, make_mesh, maybe_initialize_distributed
from transformer_jax.train.step import make_train_setup


def info(cfg: ExperimentConfig) -> dict:
    """Devices, mesh, parameter count and per-device memory of the compiled train step, from
    abstract shapes like `plan`: no data is prepared, no tokenizer trained, nothing downloaded
    (the vocabulary size is the one the config's tokenizer will have)."""
    from transformer_jax.data.tokenizer import ByteTokenizer
    from transformer_jax.plan import abstract_batch
    maybe_initialize_distributed(cfg.mesh)
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg.train.global_batch_size, mesh, cfg.optimizer.grad_accum_steps)
    vocab = ByteTokenizer.vocab_size if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
    cfg = cfg.replace(model=cfg.model.replace(vocab_size=vocab))
    setup = make_train_setup(cfg.model, cfg.optimizer, cfg.task, mesh, get_rules(cfg.mesh.preset),
                             total_steps=cfg.train.steps, seed=cfg.train.seed)
    batch = abstract_batch(cfg)
    print(f"compiling the train step of {cfg.name} for {describe_mesh(mesh)}...", file=sys.stderr, flush=True)
    mem = setup.compiled_train_step(batch).memory_analysis()
    gib = 2 ** 30
    out = {
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} process(es))",
        "mesh": describe_mesh(mesh),
        "params": setup.param_count,
        "flops_per_step": setup.flops_per_step(batch),
        "per_device_arguments_gib": mem.argument_size_in_bytes / gib,
        "per_device_temp_gib": mem.temp_size_in_bytes / gib,
        "per_device_output_gib": mem.output_size_in_bytes / gib,
    }
    if jax.process_index() == 0:
        width = max(map(len, out))
        for k, v in out.items():
            v = f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else v)
            print(f"{k:<{width}}  {v}")
    return out


def generate_cli(args) -> int:
    """Streams a decoder LM's continuation of --prompt (or --prompt-file) from a run's newest checkpoint."""
    from transformer_jax import decode
    from transformer_jax.train.loop import Run
    from transformer_jax.experiment import load_run_config
    workdir = Path(args.workdir)
    if not (workdir / "config.json").exists():
        raise ConfigError(f"{workdir} has no config.json; point --workdir at a training run")
    _check_sampling_args(args)
    cfg = load_run_config(workdir)
    if cfg.model.family != "decoder":
        raise ConfigError(f"generate needs a decoder LM; {workdir} holds a {cfg.model.family!r} model")
    if (args.prompt is None) == (args.prompt_file is None):
        raise ConfigError("give exactly one of --prompt or --prompt-file")
    prompt = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file)
    if not (workdir / "checkpoints").is_dir():
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    run = Run(cfg, workdir)
    restored = run.ckpt.restore(run.setup.abstract_state, restore_data_state=False)
    if restored is None:
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    tok = run.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    max_new = args.max_new_tokens
    if cfg.model.position == "learned":
        room = cfg.model.max_len - len(ids)
        if room < 1:
            raise ConfigError(f"the prompt has {len(ids)} tokens, leaving no room under model.max_len="
                              f"{cfg.model.max_len}; shorten the prompt")
        if max_new > room:
            print(f"transformer-jax: note: --max-new-tokens {max_new} cut to {room}: the prompt's {len(ids)} "
                  f"tokens and the new ones must fit in model.max_len={cfg.model.max_len}", file=sys.stderr)
            max_new = room
    sys.stdout.write(prompt)
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    with run.setup.context():
        for t in decode.stream(run.setup.model, restored.state.params, ids, max_new_tokens=max_new,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               eos_id=tok.eos_id, seed=args.seed):
            if t == tok.eos_id:
                break
            sys.stdout.write(utf8.decode(tok.decode_bytes([t])))
            sys.stdout.flush()
    sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    run.ckpt.close()
    return 0


def _check_sampling_args(args) -> None:
    """The sampling options, checked before anything is loaded or compiled."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature {args.temperature} must be >= 0 (0: greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k} must be >= 0 (0: off)")
    if not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p {args.top_p} must be in (0, 1] (1: off)")


def _read_prompt(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompt-file {path!r} cannot be read: {getattr(e, 'strerror', None) or e}") from None
