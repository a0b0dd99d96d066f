"""Parallelism presets: each is data, a tuple of (logical axis, mesh axes) rules.

Model code names its axes (LOGICAL_AXES); a preset says which mesh axes (data, fsdp, tensor)
shard them, and maps every other name to None (replicated). Linen treats a name without a
rule as replicated, but Flax NNX passes it through to the mesh, so every preset names every
axis. Flax applies rules in order and never uses a mesh axis twice in one array, so
activations [batch, length, embed] keep embed unsharded when fsdp holds the batch.

"seq" is the length of the residual stream between sublayers ([batch, seq, embed]: embeddings,
block outputs); "length" is every other length (q/k/v, a sublayer's gathered input, logits, the
KV cache). Tensor-parallel presets split "seq" over tensor, after heads/mlp/vocab so that an
array with those keeps its length whole.
"""
from __future__ import annotations

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

LOGICAL_AXES = ("batch", "length", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")

_BATCH: Rules = (("batch", ("data", "fsdp")),)
_FSDP: Rules = (("embed", "fsdp"),)
_TENSOR: Rules = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
                  ("seq", "tensor"))


def _replicate_the_rest(rules: Rules) -> Rules:
    named = {name for name, _ in rules}
    return rules + tuple((name, None) for name in LOGICAL_AXES if name not in named)


PRESETS: dict[str, Rules] = {name: _replicate_the_rest(rules) for name, rules in {
    "dp": _BATCH,  # params replicated; gradients reduce-scattered, the update split over data (split_update)
    "fsdp": _BATCH + _FSDP,  # params, grads, optimizer state sharded over fsdp; all-gathered per layer
    "tp": _BATCH + _TENSOR,  # Megatron: heads and mlp split over tensor; the residual stream
    # ("seq") split along length too (sequence parallelism): gathered per sublayer, reduce-scattered back
    "dp_tp": _BATCH + _TENSOR,
    "fsdp_tp": _BATCH + _FSDP + _TENSOR,
}.items()}

# Which config setting a logical axis comes from, for error messages.
AXIS_SETTINGS = {"heads": "num_heads", "kv_heads": "num_kv_heads", "mlp": "d_ff", "vocab": "vocab_size",
                 "embed": "d_model", "head_dim": "head_dim", "layers": "num_layers", "batch": "global batch"}


def get_rules(preset: str) -> Rules:
    if preset not in PRESETS:
        raise ValueError(f"unknown parallelism preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[preset]
