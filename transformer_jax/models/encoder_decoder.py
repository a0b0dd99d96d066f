"""EncoderDecoder: the original Transformer (Vaswani et al. 2017: sinusoidal positions,
post-norm, ReLU) or T5 (Raffel et al. 2020: relative bias, pre-RMSNorm), by config.

    logits_BLV = model.apply(v, inputs_BS, decoder_inputs_BL, input_segment_ids=..., ...)
    encoded = model.apply(v, inputs_BS, method="encode")
    logits = model.apply(v, encoded, decoder_inputs_BL, method="decode")

The token embedding is shared by encoder, decoder and (tied) output layer.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from transformer_jax.layers.blocks import DecoderLayer, EncoderLayer, LayerStack, dtypes
from transformer_jax.layers.embeddings import RelativePositionBias
from transformer_jax.models.config import ModelConfig
from transformer_jax.models.embedder import DecodePositions, Embedder, default_positions, final_norm


class EncoderDecoder(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        if cfg.family != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs model.family='encoder_decoder', got {cfg.family!r}")
        self.embedder = Embedder(cfg)
        self.encoder = LayerStack(cfg, EncoderLayer, cfg.num_layers, name="encoder")
        self.decoder = LayerStack(cfg, DecoderLayer, cfg.decoder_layers, (("cross_attention", True),), name="decoder")
        self.decoder_positions = DecodePositions()
        self.encoder_norm = final_norm(cfg, "encoder_norm")
        self.decoder_norm = final_norm(cfg, "decoder_norm")
        if cfg.position == "t5_bias":
            rel = dict(num_heads=cfg.num_heads, num_buckets=cfg.rel_num_buckets, max_distance=cfg.rel_max_distance,
                       **dtypes(cfg))
            self.encoder_bias = RelativePositionBias(bidirectional=True, **rel)
            self.decoder_bias = RelativePositionBias(bidirectional=False, **rel)

    def __call__(self, inputs_BS, decoder_inputs_BL, *, input_segment_ids=None, input_positions=None,
                 target_segment_ids=None, target_positions=None, deterministic: bool = True,
                 decode: bool = False) -> jax.Array:
        encoded = self.encode(inputs_BS, segment_ids=input_segment_ids, positions=input_positions,
                              deterministic=deterministic)
        return self.decode(encoded, decoder_inputs_BL, encoded_segment_ids=input_segment_ids,
                           segment_ids=target_segment_ids, positions=target_positions,
                           deterministic=deterministic, decode=decode)

    def encode(self, inputs_BS, *, segment_ids=None, positions=None, deterministic: bool = True) -> jax.Array:
        """Encoder output [B, S, D]."""
        cfg = self.config
        pos = default_positions(inputs_BS) if positions is None else positions
        x = self.embedder(inputs_BS, pos, deterministic=deterministic)
        bias = self.encoder_bias(pos, pos) if cfg.position == "t5_bias" else None
        x = self.encoder(x, segment_ids, pos, bias, deterministic=deterministic)
        return self.encoder_norm(x)

    def decode(self, encoded_BSD, decoder_inputs_BL, *, encoded_segment_ids=None, segment_ids=None,
               positions=None, deterministic: bool = True, decode: bool = False) -> jax.Array:
        """Vocabulary logits [B, L, V] given the encoder output."""
        cfg = self.config
        q_pos, k_pos = self.decoder_positions(decoder_inputs_BL, positions, decode)
        x = self.embedder(decoder_inputs_BL, q_pos, deterministic=deterministic, check_length=not decode)
        bias = self.decoder_bias(q_pos, k_pos) if cfg.position == "t5_bias" else None
        x = self.decoder(x, segment_ids, q_pos, bias, encoded_BSD, encoded_segment_ids,
                         deterministic=deterministic, decode=decode)
        return self.embedder.logits(self.decoder_norm(x))
