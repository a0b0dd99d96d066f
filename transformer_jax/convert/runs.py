"""Hugging Face checkpoints in training runs: `init_from=hf:PATH` and `transformer-jax export`.

    transformer-jax train --config finetune_hf --set init_from=hf:path/to/llama --workdir runs/ft
    transformer-jax export --workdir runs/ft --to runs/ft/hf
    # then: transformers.AutoModelForCausalLM.from_pretrained("runs/ft/hf"), AutoTokenizer likewise

With `init_from=hf:PATH` (or a directory holding config.json and safetensors) the run's model
is the checkpoint's architecture (`run_model_config`: only the fields that do not change the
weights, RUN_FIELDS, come from the experiment: dtype, attention kernel, scan, remat, LoRA), its
tokenizer is the checkpoint's own (data/hf_tokenizer.py), and every checkpoint tensor is
placed on its parameter's sharding (`init_params`). The checkpoint's config.json is kept in the
run as `hf_config.json`, so `export_run` writes the same architecture back, LoRA merged, with
the tokenizer files beside the weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.convert.hf import SAFETENSORS, TORCH_BIN, hf_model_config, load_hf, save_hf
from transformer_jax.models.config import ModelConfig

RUN_FIELDS = ("dtype", "param_dtype", "attention", "scan_layers", "remat", "lora_rank", "lora_alpha", "lora_targets")
HF_CONFIG = "hf_config.json"  # the checkpoint's config.json, kept in the run directory
_WEIGHTS = (SAFETENSORS, SAFETENSORS + ".index.json", TORCH_BIN, TORCH_BIN + ".index.json")


def hf_dir(init_from: str | None, *, required: bool = True) -> Path | None:
    """The transformers directory `init_from` names ("hf:PATH", or a directory with config.json and
    weights), else None. With required=False a missing "hf:" directory is None, not an error
    (a run that already holds its own checkpoint no longer needs it)."""
    if not init_from:
        return None
    explicit = init_from.startswith("hf:")
    d = Path(init_from[3:] if explicit else init_from).expanduser()
    if (d / "config.json").is_file() and any((d / name).is_file() for name in _WEIGHTS):
        return d
    if explicit and required:
        raise ConfigError(f"init_from={init_from!r}: {d} holds no config.json with {SAFETENSORS} (or shards); "
                          "point it at a directory written by transformers' save_pretrained")
    return None


def _run_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in RUN_FIELDS}


def run_model_config(experiment_model: ModelConfig, path: Path) -> ModelConfig:
    """The checkpoint's architecture with the experiment's RUN_FIELDS."""
    return hf_model_config(path, **_run_fields(experiment_model))


def init_params(path: Path, model_cfg: ModelConfig, params: Any) -> tuple[Any, str]:
    """`params` (the new model's unboxed, sharded tree) with every checkpoint tensor in place;
    only LoRA adapters may stay fresh. Returns (params, a one-line summary)."""
    imp = load_hf(path, **_run_fields(model_cfg))
    if imp.unused:
        raise ConfigError(f"{path}: {len(imp.unused)} checkpoint tensor(s) have no place in the model "
                          f"({', '.join(imp.unused[:3])}); this architecture variant is not supported")
    ours, theirs = _flat(params), _flat(imp.params)
    for key, arr in theirs.items():
        if key not in ours or tuple(ours[key].shape) != arr.shape:
            got = tuple(ours[key].shape) if key in ours else "missing"
            raise ConfigError(f"{path}: tensor for {key} has shape {arr.shape}, the model's is {got}; "
                              "the run's model config does not match the checkpoint")
    fresh = [k for k in ours if k not in theirs]
    odd = [k for k in fresh if k.rsplit("/", 1)[-1] not in ("lora_a", "lora_b")]
    if odd:
        raise ConfigError(f"{path} has no tensor for {', '.join(odd[:3])}; the run's model config does not "
                          "match the checkpoint")

    def place(key_path, leaf):
        arr = theirs.get(_key(key_path))
        if arr is None:
            return leaf
        arr = arr.astype(leaf.dtype)
        return jax.make_array_from_callback(arr.shape, leaf.sharding, lambda index: arr[index])

    merged = jax.tree_util.tree_map_with_path(place, params)
    return merged, f"restored all {len(theirs)} parameter arrays of {path}; fresh: {len(fresh)} LoRA adapter arrays"


def export_run(workdir: str | Path, to: str | Path) -> tuple[Path, str]:
    """Writes the newest intact checkpoint of run `workdir` as a transformers directory `to`
    (LoRA merged; the checkpoint's tokenizer files copied when the run used one). Returns the
    directory and a note on the tokenizer."""
    from transformer_jax.experiment import ExperimentConfig
    from transformer_jax.train.loop import Run
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise ConfigError(f"{workdir} has no config.json; point --workdir at a training run")
    cfg = ExperimentConfig.from_json((workdir / "config.json").read_text())
    run = Run(cfg, workdir)
    restored = run.ckpt.restore(run.setup.abstract_state, restore_data_state=False)
    if restored is None:
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    params = restored.state.params
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    run.ckpt.close()
    hf_config = json.loads((workdir / HF_CONFIG).read_text()) if (workdir / HF_CONFIG).is_file() else None
    out = Path(to)
    if jax.process_index() != 0:
        return out, ""
    save_hf(out, run.cfg.model, params, hf_config=hf_config)
    tok_dir = workdir / "tokenizer"
    if run.tokenizer.kind != "hf":
        return out, (f"tokenizer not written: the run's {run.tokenizer.kind} tokenizer ({tok_dir}) is this "
                     "library's own, not a transformers one")
    from transformer_jax.data.hf_tokenizer import FILES
    for name in FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    return out, "tokenizer files copied"


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flat(tree: Any) -> dict[str, Any]:
    return {_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
