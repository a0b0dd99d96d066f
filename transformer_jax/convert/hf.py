"""Hugging Face `transformers` checkpoints <-> this library's configs and params.

    imported = load_hf("path/to/gpt2")             # a directory from save_pretrained
    model = build_model(imported.config)
    logits = model.apply({"params": imported.params}, tokens)
    save_hf("out/", imported.config, params, hf_config=imported.hf_config)  # reloads in transformers

Supported: GPT-2, Llama, Mistral, Qwen2 -> `DecoderLM`, BERT -> `Encoder` (MLM head, pooler +
classifier), T5 / mT5 -> `EncoderDecoder` (see convert/gpt2.py, llama.py, bert.py, t5.py).
Reading needs only `safetensors` and numpy for `model.safetensors` (float32, float16 or bfloat16,
one file or shards listed in `model.safetensors.index.json`, read tensor by tensor);
`pytorch_model.bin` needs torch. Nothing here imports `transformers`.

Params are plain nested dicts of **unboxed numpy arrays** (dtype = `config.param_dtype`) in
the layout of `build_model(config).init(...)["params"]` (scanned `layers` when
`config.scan_layers`, else `layer_0, layer_1, ...`). To place them on a mesh, take shardings
from the boxed abstract init: `jax.device_put(params, logical_shardings(jax.eval_shape(
model.init, key, tokens)["params"], mesh, rules))` (transformer_jax.parallel.partition).

Vocabulary: the import keeps the checkpoint's vocabulary (e.g. 30522 for bert-base-uncased);
`pad_vocab_to=128` appends zero rows (and zero MLM-bias entries) up to a multiple of 128, as
this library's presets do for tensor parallelism (padded tokens get logit 0 (+ bias 0): mask
them when sampling). The export cuts the vocabulary back to `vocab_size`, by default the
`vocab_size` of `hf_config`.

Attention masks: where transformers takes `attention_mask` (1 = token, 0 = padding), pass it
as `segment_ids` (`input_segment_ids` for T5's encoder); outputs at padded positions differ
and are meant to be ignored. For left-padded GPT-2 rows also pass `positions`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.convert import bert, gpt2, llama, t5
from transformer_jax.convert._common import Weights, stack_layers, to_numpy, unstack_layers
from transformer_jax.models.config import ModelConfig

CONVERTERS = {t: mod for mod in (gpt2, llama, bert, t5) for t in mod.MODEL_TYPES}
FAMILIES = {"decoder": gpt2, "encoder": bert, "encoder_decoder": t5}  # the export of each family (rope: llama)
# Where the vocabulary lies in a param tree: path -> axis.
VOCAB_AXES = {("embedder", "token", "embedding"): 0, ("embedder", "unembed", "kernel"): 1, ("mlm_head", "bias"): 0}
SAFETENSORS, TORCH_BIN = "model.safetensors", "pytorch_model.bin"


@dataclasses.dataclass(frozen=True)
class HFImport:
    config: ModelConfig
    params: dict[str, Any]  # unboxed numpy arrays, `model.apply({"params": params}, ...)`
    hf_config: dict[str, Any]  # config.json as read (pass it to save_hf to keep its other fields)
    vocab_size: int  # the checkpoint's vocabulary; config.vocab_size is larger when padded
    unused: tuple[str, ...]  # checkpoint tensors not imported (e.g. BERT's next-sentence head)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; pass a directory written by transformers' save_pretrained")
    return json.loads(file.read_text())


def read_state_dict(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """All tensors of a model directory (safetensors preferred, then pytorch_model.bin; sharded
    checkpoints through their *.index.json), name -> float32 numpy array. Safetensors are read
    lazily, one tensor per lookup."""
    d = Path(path)
    for name, reader in ((SAFETENSORS, _SafetensorsFiles), (TORCH_BIN, _read_torch)):
        if (d / name).is_file():
            return reader([d / name])
        index = d / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise ConfigError(f"{index} lists {len(missing)} shard(s) that are not in {d}: "
                                  f"{', '.join(missing[:3])}; download every shard")
            return reader([d / s for s in shards])
    raise FileNotFoundError(f"{d} holds neither {SAFETENSORS} nor {TORCH_BIN} (nor a sharded *.index.json); "
                            "pass a directory written by transformers' save_pretrained")


class _SafetensorsFiles(Mapping):
    """name -> float32 numpy array over one or more .safetensors files, read on lookup."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open
        self.file_of = {}
        for file in files:
            with safe_open(file, framework="numpy") as f:
                self.file_of.update({k: file for k in f.keys()})

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open
        try:
            with safe_open(self.file_of[key], framework="numpy") as f:
                x = f.get_tensor(key)
        except TypeError:  # bfloat16: numpy has no such dtype; read through jax instead
            with safe_open(self.file_of[key], framework="flax") as f:
                x = f.get_tensor(key)
        return np.asarray(x, np.float32) if jnp.dtype(x.dtype).kind in "fV" else np.asarray(x)

    def __iter__(self):
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


def _read_torch(files: list[Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {files[0].name} needs torch: pip install 'transformer-jax[hf]' "
                          "(or save the checkpoint as safetensors)") from e
    out = {}
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)
        out.update({k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()})
    return out


def load_hf(path: str | os.PathLike, *, pad_vocab_to: int | None = None, **config_overrides) -> HFImport:
    """Imports a transformers GPT-2, Llama, Mistral, Qwen2, BERT or T5 directory.

    `pad_vocab_to`: pad the vocabulary with zero rows to a multiple of this. `config_overrides`
    are ModelConfig fields that do not change the weights (scan_layers, dtype, param_dtype,
    attention, remat, dropout_rate, lora_rank, ...).
    """
    cfg, hf, hf_vocab, conv, w = _open(path, pad_vocab_to, config_overrides)
    params = conv.params_from_hf(cfg, w, hf)
    rows = params["embedder"]["token"]["embedding"].shape[0]
    if rows != hf_vocab:
        raise ConfigError(f"config.json says vocab_size={hf_vocab} but the checkpoint's embedding has {rows} rows")
    params = _resize_vocab(params, cfg.vocab_size)
    if cfg.scan_layers:
        params = stack_layers(params)
    dtype = jnp.dtype(cfg.param_dtype)
    params = _map_leaves(lambda x: np.asarray(x, dtype), params)
    return HFImport(cfg, params, hf, hf_vocab, w.unused())


def hf_model_config(path: str | os.PathLike, *, pad_vocab_to: int | None = None, **config_overrides) -> ModelConfig:
    """The ModelConfig `load_hf` would build, reading config.json and no weights (at most one tensor)."""
    return _open(path, pad_vocab_to, config_overrides)[0]


def _open(path, pad_vocab_to, config_overrides):
    hf = read_hf_config(path)
    kind = hf.get("model_type")
    if kind not in CONVERTERS:
        raise ConfigError(f"model_type={kind!r} in {Path(path) / 'config.json'} is not supported; "
                          f"supported: {', '.join(sorted(CONVERTERS))}")
    conv = CONVERTERS[kind]
    w = Weights(read_state_dict(path), conv.PREFIX)
    kwargs = conv.config_from_hf(hf, w)
    hf_vocab = kwargs["vocab_size"]
    if pad_vocab_to is not None:
        if pad_vocab_to < 1:
            raise ConfigError(f"pad_vocab_to={pad_vocab_to} must be a positive multiple, e.g. 128")
        kwargs["vocab_size"] = math.ceil(hf_vocab / pad_vocab_to) * pad_vocab_to
    cfg = ModelConfig.from_dict(dict(kwargs, **config_overrides), where="model")
    return cfg, hf, hf_vocab, conv, w


def save_hf(path: str | os.PathLike, config: ModelConfig, params: Any, *, vocab_size: int | None = None,
            hf_config: dict[str, Any] | None = None) -> Path:
    """Writes a transformers-loadable directory (config.json + model.safetensors, float32).

    The architecture follows `hf_config`'s model_type if given, else `config.family` (decoder ->
    GPT-2, or Llama / Mistral / Qwen2 with rope, encoder -> BERT, encoder_decoder -> T5); a
    config that architecture cannot express raises ConfigError naming the settings. LoRA
    adapters (`config.lora_rank` > 0) are merged into their kernels first.
    `params` may be boxed or unboxed, scanned or unrolled, jax or numpy. `hf_config` (e.g.
    `HFImport.hf_config`) supplies fields this library does not model (token ids, labels); the
    vocabulary is cut to `vocab_size`, else hf_config's vocab_size, else config.vocab_size.
    Tokenizer files are not written: copy them next to the weights.
    """
    from safetensors.numpy import save_file

    if config.lora_rank:
        from transformer_jax.models.lora import merge_lora
        params, config = merge_lora(params, config), config.replace(lora_rank=0)
    base = dict(hf_config or {})
    rope = config.family == "decoder" and config.position == "rope"
    conv = llama if rope else FAMILIES[config.family]
    if base.get("model_type", conv.MODEL_TYPES[0]) not in conv.MODEL_TYPES:
        raise ConfigError(f"hf_config has model_type={base['model_type']!r}, but this {config.family} model exports "
                          f"as {conv.MODEL_TYPES[0]!r}; pass the matching hf_config or none")
    kind = {"model_type": base["model_type"]} if conv is llama and "model_type" in base else {}
    conv.check_exportable(config, **kind)
    vocab = vocab_size or base.get("vocab_size") or config.vocab_size
    if vocab > config.vocab_size:
        raise ConfigError(f"vocab_size={vocab} is larger than the model's vocab_size={config.vocab_size}")
    tree = _resize_vocab(unstack_layers(to_numpy(params)), vocab)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in conv.params_to_hf(config, tree).items()}
    base.pop("torch_dtype", None)
    out_cfg = dict(base, **conv.config_to_hf(config, vocab, tree, **kind), dtype="float32")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / SAFETENSORS, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True) + "\n")
    return out


def _resize_vocab(params: dict, vocab: int) -> dict:
    """A copy with every vocabulary-sized axis padded with zeros or cut to `vocab` entries."""
    for path, axis in VOCAB_AXES.items():
        x = _get(params, path)
        if x is None:
            continue
        if x.shape[axis] < vocab:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, vocab - x.shape[axis])
            x = np.pad(x, pad)
        params = _replace(params, path, np.take(x, np.arange(vocab), axis=axis))
    return params


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _replace(tree: dict, path: tuple[str, ...], value) -> dict:
    if not path:
        return value
    return dict(tree, **{path[0]: _replace(tree[path[0]], path[1:], value)})


def _map_leaves(f, tree):
    if isinstance(tree, dict):
        return {k: _map_leaves(f, v) for k, v in tree.items()}
    return f(tree)
