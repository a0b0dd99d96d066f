"""The `info` and `generate` commands."""
from __future__ import annotations

import codecs
import sys
import tempfile
from pathlib import Path

import jax

from transformer_jax.config import ConfigError
from transformer_jax.experiment import ExperimentConfig
from transformer_jax.parallel import describe_mesh
from transformer_jax.train.synthetic import synthetic_batch


def info(cfg: ExperimentConfig) -> dict:
    """Devices, mesh, parameter count and per-device memory of the compiled train step."""
    from transformer_jax.train.loop import Run
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, tmp)
        cfg, setup = run.cfg, run.setup
        t = cfg.train
        batch = synthetic_batch(cfg.task.task, t.global_batch_size, t.seq_len, cfg.model.vocab_size,
                                target_len=t.target_seq_len, num_classes=cfg.model.num_classes)
        compiled = setup.compiled_train_step(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch))
        mem = compiled.memory_analysis()
        run.ckpt.close()
    gib = 2 ** 30
    out = {
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} process(es))",
        "mesh": describe_mesh(run.mesh),
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
    workdir = Path(args.workdir)
    if not (workdir / "config.json").exists():
        raise ConfigError(f"{workdir} has no config.json; point --workdir at a training run")
    cfg = ExperimentConfig.from_json((workdir / "config.json").read_text())
    if cfg.model.family != "decoder":
        raise ConfigError(f"generate needs a decoder LM; {workdir} holds a {cfg.model.family!r} model")
    if (args.prompt is None) == (args.prompt_file is None):
        raise ConfigError("give exactly one of --prompt or --prompt-file")
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    run = Run(cfg, workdir)
    restored = run.ckpt.restore(run.setup.abstract_state, restore_data_state=False)
    if restored is None:
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    tok = run.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    max_new = args.max_new_tokens
    if cfg.model.position == "learned":
        max_new = min(max_new, cfg.model.max_len - len(ids))
        if max_new < 1:
            raise ConfigError(f"the prompt has {len(ids)} tokens, leaving no room under max_len={cfg.model.max_len}")
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
