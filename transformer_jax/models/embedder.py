"""Input embedding (tokens + positions [+ token types], scaled, normed, dropped out) and the
output projection to vocabulary logits, shared by all three model families."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers.blocks import dtypes
from transformer_jax.layers.dense import Dense
from transformer_jax.layers.embeddings import Embed, LearnedPositions, sinusoidal_positions
from transformer_jax.layers.norms import make_norm
from transformer_jax.models.config import ModelConfig


def default_positions(tokens_BL: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
    return jnp.broadcast_to(offset + jnp.arange(tokens_BL.shape[1], dtype=jnp.int32)[None], tokens_BL.shape)


class Embedder(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.token = Embed(cfg.vocab_size, cfg.d_model, init_std=1.0 if cfg.scale_tied_logits else None,
                           name="token", **dtypes(cfg))
        if cfg.position == "learned":
            self.position = LearnedPositions(cfg.max_len, cfg.d_model, name="position", **dtypes(cfg))
        if cfg.type_vocab_size:
            self.token_type = self.param(
                "token_type", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (cfg.type_vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
        if cfg.embed_norm:
            self.norm = make_norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name="norm", **dtypes(cfg))
        if not cfg.tie_embeddings:
            self.unembed = Dense((cfg.vocab_size,), ("embed", "vocab"), name="unembed", **dtypes(cfg))
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, tokens_BL, positions_BL, *, deterministic=True, token_types_BL=None, check_length=True):
        cfg = self.cfg
        if check_length and cfg.position == "learned" and tokens_BL.shape[1] > cfg.max_len:
            raise ValueError(f"sequence length {tokens_BL.shape[1]} exceeds max_len={cfg.max_len} of the learned "
                             "position table; raise model.max_len or shorten the sequences")
        x_BLD = self.token(tokens_BL)
        if cfg.embed_scale:
            x_BLD = x_BLD * jnp.asarray(cfg.d_model ** 0.5, x_BLD.dtype)
        if cfg.position == "learned":
            x_BLD = x_BLD + self.position(positions_BL)
        elif cfg.position == "sinusoidal":
            x_BLD = x_BLD + sinusoidal_positions(positions_BL, cfg.d_model).astype(x_BLD.dtype)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(tokens_BL) if token_types_BL is None else token_types_BL
            table = nn.with_logical_constraint(self.token_type, (None, None))  # whole along embed, as Embed's
            x_BLD = x_BLD + jnp.take(table, types, axis=0).astype(x_BLD.dtype)
        if cfg.embed_norm:
            x_BLD = self.norm(x_BLD)
        x_BLD = self.dropout(x_BLD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BLD, ("batch", "seq", "embed"))

    def logits(self, x_BLD):
        """Vocabulary logits [..., vocab] in float32."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            if cfg.scale_tied_logits:
                x_BLD = x_BLD * jnp.asarray(cfg.d_model ** -0.5, x_BLD.dtype)
            y = self.token.attend(x_BLD)
        else:
            y = self.unembed(x_BLD)
        return nn.with_logical_constraint(y.astype(jnp.float32), ("batch", "length", "vocab"))


def final_norm(cfg: ModelConfig, name: str = "final_norm"):
    """Pre-norm stacks end with a norm; post-norm stacks are already normalised (identity)."""
    if cfg.norm_position == "pre":
        return make_norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name=name, **dtypes(cfg))
    return lambda x: x


class DecodePositions(nn.Module):
    """(query positions [B, L], key positions [B, S]) for this call.

    Outside decoding both are the given positions (default 0..L-1). While decoding, the
    module keeps a cache index and the positions of every cached slot, so queries default
    to index..index+L-1 and keys are all slots written so far (the T5 bias needs them).
    """

    @nn.compact
    def __call__(self, tokens_BL, positions_BL, decode: bool):
        if not decode:
            pos = default_positions(tokens_BL) if positions_BL is None else positions_BL
            return pos, pos
        initialised = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        q_pos = default_positions(tokens_BL, index.value) if positions_BL is None else positions_BL
        slots = self.variable("cache", "positions", lambda: q_pos.astype(jnp.int32))
        if initialised:
            slots.value = jax.lax.dynamic_update_slice(slots.value, q_pos.astype(jnp.int32), (0, index.value))
            index.value = index.value + tokens_BL.shape[1]
        return q_pos, slots.value
