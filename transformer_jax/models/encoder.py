"""Encoder: a bidirectional Transformer encoder, BERT style (Devlin et al. 2019), with a
masked-LM head and a sequence-classification head.

    hidden_BLD = model.apply(v, tokens, head="none")
    mlm_logits_BLV = model.apply(v, tokens, head="mlm")
    mlm_logits_BKV = model.apply(v, tokens, head="mlm", predict_BK=idx_BK)  # only at positions idx_BK
    class_logits_BC = model.apply(v, tokens, head="classify")  # pools the first token

Parameters of a head are created when that head is first used, so a model initialised
with head="classify" holds the backbone plus a fresh classifier (fine-tuning).
"""
from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers.blocks import EncoderLayer, LayerStack, dtypes
from transformer_jax.layers.dense import Dense
from transformer_jax.layers.embeddings import RelativePositionBias
from transformer_jax.layers.mlp import ACTIVATIONS
from transformer_jax.layers.norms import make_norm
from transformer_jax.models.config import ModelConfig
from transformer_jax.models.embedder import Embedder, default_positions, final_norm

Head = Literal["none", "mlm", "classify"]


class Encoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BL: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, token_types: jax.Array | None = None,
                 head: Head = "mlm", predict_BK: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        if cfg.family != "encoder":
            raise ValueError(f"Encoder needs model.family='encoder', got {cfg.family!r}")
        pos_BL = default_positions(tokens_BL) if positions is None else positions
        embedder = Embedder(cfg, name="embedder")
        x_BLD = embedder(tokens_BL, pos_BL, deterministic=deterministic, token_types_BL=token_types)
        bias = None
        if cfg.position == "t5_bias":
            bias = RelativePositionBias(cfg.num_heads, cfg.rel_num_buckets, cfg.rel_max_distance, bidirectional=True,
                                        name="relative_bias", **dtypes(cfg))(pos_BL, pos_BL)
        stack = LayerStack(cfg, EncoderLayer, cfg.num_layers, name="encoder")
        h_BLD = final_norm(cfg)(stack(x_BLD, segment_ids, pos_BL, bias, deterministic=deterministic))
        if head == "none":
            return h_BLD
        if head == "mlm":
            if predict_BK is not None:  # the vocabulary logits of the masked positions only
                # whole along length first: a gather from length split over tensor (sequence
                # parallelism) crashes XLA's SPMD partitioner (jax 0.10.2, 2x2x2 fsdp_tp)
                h_BLD = nn.with_logical_constraint(h_BLD, ("batch", "length", "embed"))
                h_BLD = jnp.take_along_axis(h_BLD, predict_BK[..., None], axis=1)  # [B, K, D]
            return MLMHead(cfg, name="mlm_head")(h_BLD, embedder)
        if head == "classify":
            return ClassifierHead(cfg, name="classifier")(h_BLD[:, 0], deterministic)
        raise ValueError(f"head={head!r} is unknown; choose 'none', 'mlm' or 'classify'")


class MLMHead(nn.Module):
    """BERT's transform (dense -> activation -> norm) then the tied output layer plus a bias."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BLD, embedder: Embedder):
        cfg = self.cfg
        act = ACTIVATIONS["gelu" if cfg.activation in ("swiglu", "geglu") else cfg.activation]
        h = act(Dense((cfg.d_model,), ("embed", "mlp"), use_bias=cfg.use_bias, name="transform", **dtypes(cfg))(h_BLD))
        h = make_norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name="norm", **dtypes(cfg))(h)
        # Pinned: left free, XLA (jax 0.10.2) miscompiles the backward of x @ W[fsdp, tensor] @
        # E[tensor, fsdp]^T on a 2x2x2 fsdp_tp mesh (gradients ~6% off; tests/test_step.py).
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        logits = embedder.logits(h)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                          jnp.dtype(cfg.param_dtype))
        return logits + bias.astype(jnp.float32)


class ClassifierHead(nn.Module):
    """BERT's pooler (dense + tanh on the first token) and a linear classifier: [B, num_classes]."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, first_BD, deterministic: bool):
        cfg = self.cfg
        pooled = jnp.tanh(Dense((cfg.d_model,), ("embed", "mlp"), use_bias=True, name="pooler", **dtypes(cfg))(first_BD))
        pooled = nn.Dropout(cfg.dropout_rate)(pooled, deterministic=deterministic)
        logits = Dense((cfg.num_classes,), ("mlp", None), use_bias=True, name="out", **dtypes(cfg))(pooled)
        return logits.astype(jnp.float32)
