"""DecoderLM: a decoder-only language model, GPT-2 style (learned positions, LayerNorm, GELU)
or Llama style (RoPE, RMSNorm, SwiGLU, GQA), by config.

    logits_BLV = DecoderLM(cfg).apply(variables, tokens_BL, segment_ids=..., positions=...)

`segment_ids` (0 = padding) keep packed documents from attending to each other; `positions`
restart per document. Decoding: see `MultiHeadAttention`; here the model also keeps the
cache index, so positions default to the next ones.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from transformer_jax.layers.blocks import DecoderLayer, LayerStack, dtypes
from transformer_jax.layers.embeddings import RelativePositionBias
from transformer_jax.models.config import ModelConfig
from transformer_jax.models.embedder import DecodePositions, Embedder, final_norm


class DecoderLM(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BL: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True, decode: bool = False) -> jax.Array:
        cfg = self.config
        if cfg.family != "decoder":
            raise ValueError(f"DecoderLM needs model.family='decoder', got {cfg.family!r}")
        q_pos_BL, k_pos_BS = DecodePositions(name="positions")(tokens_BL, positions, decode)
        embedder = Embedder(cfg, name="embedder")
        x_BLD = embedder(tokens_BL, q_pos_BL, deterministic=deterministic, check_length=not decode)
        bias = None
        if cfg.position == "t5_bias":
            bias = RelativePositionBias(cfg.num_heads, cfg.rel_num_buckets, cfg.rel_max_distance, bidirectional=False,
                                        name="relative_bias", **dtypes(cfg))(q_pos_BL, k_pos_BS)
        stack = LayerStack(cfg, DecoderLayer, cfg.num_layers, name="decoder")
        x_BLD = stack(x_BLD, segment_ids, q_pos_BL, bias, deterministic=deterministic, decode=decode)
        return embedder.logits(final_norm(cfg)(x_BLD))
