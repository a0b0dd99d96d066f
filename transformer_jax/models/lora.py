"""LoRA (Hu et al. 2021): low-rank adapters for fine-tuning, and merging them for export.

    cfg = base_cfg.replace(lora_rank=8, lora_alpha=16.0)   # adapters on cfg.lora_targets
    params, report = init_from(pretrain_dir, fresh_params)  # base kernels restored, adapters fresh
    ... train: only adapters (and optim.lora_train, e.g. a new head) update ...
    merged = merge_lora(params, cfg)                        # W <- W + (alpha / r) A B
    build_model(cfg.replace(lora_rank=0)).apply({"params": merged}, ...)   # same logits

Each adapted Dense holds `lora_a` [*in, r] and `lora_b` [r, *out] next to its kernel
(layers/dense.py); B starts at zero, so the adapted model starts equal to its base.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from transformer_jax.layers.dense import LORA_PARAMS, lora_delta
from transformer_jax.models.config import ModelConfig


def merge_lora(params: Any, cfg: ModelConfig) -> dict:
    """`params` of the model `cfg` (lora_rank > 0) with every adapter folded into its kernel
    and removed: the params of `cfg.replace(lora_rank=0)`, same outputs up to float rounding.
    Works on stacked (scanned) layers and sharded arrays; other leaves are passed through."""
    if not cfg.lora_rank:
        raise ValueError("merge_lora: model.lora_rank is 0, there are no adapters to merge")
    scale = cfg.lora_alpha / cfg.lora_rank

    def merge(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: merge(v) for k, v in node.items() if k not in LORA_PARAMS}
        if "lora_a" in node:
            kernel = node["kernel"]
            delta = lora_delta(node["lora_a"], node["lora_b"], kernel.ndim, scale)
            out["kernel"] = (kernel.astype(delta.dtype) + delta).astype(kernel.dtype)
        return out

    return merge(nn.unbox(params))
