"""ModelConfig presets and validation."""
import pytest

from transformer_jax.config import ConfigError
from transformer_jax.models import PRESETS, ModelConfig, get_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = get_config(name)
    assert cfg.d_model > 0 and cfg.num_heads % cfg.kv_heads == 0


def test_known_sizes():
    assert get_config("gpt2-small").d_model == 768 and get_config("gpt2-medium").num_layers == 24
    llama = get_config("llama-1b")
    assert (llama.kv_heads, llama.dim_per_head, llama.activation) == (8, 64, "swiglu")
    t5 = get_config("t5-small")
    assert (t5.position, t5.norm, t5.attn_logit_scale, t5.decoder_layers) == ("t5_bias", "rmsnorm", False, 6)
    base = get_config("transformer-base")
    assert (base.position, base.norm_position, base.dropout_rate) == ("sinusoidal", "post", 0.1)


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=500, num_heads=8), "d_model=500 is not divisible by num_heads=8"),
    (dict(num_heads=8, num_kv_heads=3), "num_heads=8 is not a multiple of num_kv_heads=3"),
    (dict(position="rope", d_model=36, num_heads=4), "rope needs an even head_dim, got head_dim=9"),
    (dict(dropout_rate=1.0), "dropout_rate=1.0 must be in [0, 1)"),
    (dict(num_layers=0), "num_layers=0 must be positive"),
    (dict(norm="batchnorm"), "ModelConfig.norm='batchnorm' is not one of 'layernorm', 'rmsnorm'"),
    (dict(num_decoder_layers=2), "num_decoder_layers is only for family='encoder_decoder'"),
])
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown model preset 'gpt5'; known presets: .*gpt2-small"):
        get_config("gpt5")


def test_override_key_typo_is_named():
    with pytest.raises(ConfigError, match="unknown key 'd_modle'"):
        get_config("gpt2-tiny").override("d_modle", "3")
