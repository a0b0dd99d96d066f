"""The three model families and their configs."""
from transformer_jax.models.config import PRESETS, ModelConfig, get_config
from transformer_jax.models.decoder_lm import DecoderLM
from transformer_jax.models.encoder import Encoder
from transformer_jax.models.encoder_decoder import EncoderDecoder
from transformer_jax.models.lora import merge_lora

__all__ = ["PRESETS", "ModelConfig", "get_config", "DecoderLM", "Encoder", "EncoderDecoder", "build_model",
           "merge_lora"]


def build_model(cfg: ModelConfig):
    """The model class for `cfg.family`."""
    return {"decoder": DecoderLM, "encoder": Encoder, "encoder_decoder": EncoderDecoder}[cfg.family](cfg)
