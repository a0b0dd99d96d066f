"""`ModelConfig`: one typed config for all three model families, plus named presets."""
from __future__ import annotations

import dataclasses
from typing import Literal

from transformer_jax.config import Config, ConfigError

Family = Literal["decoder", "encoder", "encoder_decoder"]
LORA_TARGETS = ("query", "key", "value", "out", "wi", "wi_0", "wi_1", "wo")


@dataclasses.dataclass(frozen=True)
class RopeScaling(Config):
    """RoPE frequencies stretched for long contexts: "linear" (position interpolation: all
    frequencies / factor) or "llama3" (Llama 3.1: low frequencies / factor, high ones kept,
    a smooth blend between; wavelengths compared with original_max_len / the two factors)."""
    kind: Literal["linear", "llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def validate(self) -> None:
        if self.factor <= 0 or self.original_max_len < 1 or not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"rope_scaling={self} needs factor > 0, original_max_len >= 1 and "
                              "0 < low_freq_factor < high_freq_factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    family: Family = "decoder"
    vocab_size: int = 32768
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: = num_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // num_heads
    d_ff: int = 2048
    num_layers: int = 6  # decoder-only / encoder-only depth; encoder depth of an encoder-decoder
    num_decoder_layers: int | None = None  # encoder-decoder only; None: = num_layers
    max_len: int = 1024  # learned-position table size and the longest KV cache
    position: Literal["learned", "sinusoidal", "rope", "t5_bias", "none"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # Llama 3.1 / linear scaling of the RoPE frequencies
    sliding_window: int | None = None  # Mistral: a query sees only the last `sliding_window` keys (itself included)
    rel_num_buckets: int = 32  # T5 relative bias
    rel_max_distance: int = 128
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-6
    embed_norm: bool = False  # BERT: LayerNorm right after the embeddings
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"] = "gelu_tanh"
    use_bias: bool = True
    qkv_bias: bool = False  # Qwen2: biases on query/key/value only (use_bias puts them everywhere)
    tie_embeddings: bool = True  # output projection = embedding^T
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (Vaswani et al.)
    attn_logit_scale: bool = True  # False for T5: no 1/sqrt(head_dim) (folded into init)
    scale_tied_logits: bool = False  # T5: logits = (h / sqrt(d_model)) @ E^T, with E ~ N(0, 1)
    type_vocab_size: int = 0  # BERT token-type embeddings (0 = none)
    num_classes: int = 2  # Encoder classification head
    dropout_rate: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention: str = "auto"  # dot_product_attention implementation
    scan_layers: bool = True
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"  # nn.remat policy per layer
    lora_rank: int = 0  # > 0: LoRA adapters on lora_targets (models/lora.py); training then freezes the rest
    lora_alpha: float = 16.0  # adapter output scale alpha / rank
    lora_targets: tuple[str, ...] = LORA_TARGETS  # Dense module names: attention and MLP projections

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "num_layers", "max_len", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "change one of them or set head_dim explicitly")
        if self.num_kv_heads is not None and self.num_kv_heads < 1:
            raise ConfigError(f"model.num_kv_heads={self.num_kv_heads} must be >= 1 (1: MQA) or none (= num_heads)")
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"model.head_dim={self.head_dim} must be >= 1 or none (= d_model // num_heads)")
        from transformer_jax.layers.dot_product import KERNELS
        if self.attention not in KERNELS:
            raise ConfigError(f"model.attention={self.attention!r} is not a kernel; choose one of {', '.join(KERNELS)}")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ConfigError(f"rope needs an even head_dim, got head_dim={self.dim_per_head}")
        if self.sliding_window is not None and (self.sliding_window < 1 or self.family != "decoder"):
            raise ConfigError(f"sliding_window={self.sliding_window} must be >= 1 (none: off), decoder family only")
        if self.rope_scaling is not None and self.position != "rope":
            raise ConfigError(f"rope_scaling is set but position={self.position!r}; set position='rope' or "
                              "rope_scaling=none")
        if self.position == "t5_bias" and self.rel_num_buckets < 2:
            raise ConfigError(f"rel_num_buckets={self.rel_num_buckets} must be at least 2")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        if self.num_decoder_layers is not None and self.family != "encoder_decoder":
            raise ConfigError(f"num_decoder_layers is only for family='encoder_decoder', not {self.family!r}")
        if self.type_vocab_size and self.family != "encoder":
            raise ConfigError(f"type_vocab_size is only for family='encoder', not {self.family!r}")
        if self.lora_rank < 0 or not self.lora_alpha > 0:
            raise ConfigError(f"lora_rank={self.lora_rank} must be >= 0 (0: off) and lora_alpha={self.lora_alpha} > 0")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or (self.lora_rank and not self.lora_targets):
            raise ConfigError(f"lora_targets={list(self.lora_targets)} must be a non-empty subset of "
                              f"{list(LORA_TARGETS)}")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers


_GPT2 = dict(family="decoder", vocab_size=50304, max_len=1024, position="learned", norm="layernorm",
             norm_position="pre", norm_eps=1e-5, activation="gelu_tanh", use_bias=True, tie_embeddings=True)
_LLAMA = dict(family="decoder", position="rope", norm="rmsnorm", norm_position="pre", norm_eps=1e-5,
              activation="swiglu", use_bias=False)
_BERT = dict(family="encoder", vocab_size=30592,  # 30522 padded to a multiple of 128
             max_len=512, position="learned", norm="layernorm",
             norm_position="post", norm_eps=1e-12, embed_norm=True, activation="gelu", use_bias=True,
             type_vocab_size=2, tie_embeddings=True)
_T5 = dict(family="encoder_decoder", vocab_size=32128, position="t5_bias", norm="rmsnorm", norm_position="pre",
           norm_eps=1e-6, activation="relu", use_bias=False, tie_embeddings=True, attn_logit_scale=False,
           scale_tied_logits=True, max_len=512)
_VASWANI = dict(family="encoder_decoder", vocab_size=32768, position="sinusoidal", norm="layernorm",
                norm_position="post", norm_eps=1e-6, activation="relu", use_bias=True, tie_embeddings=True,
                embed_scale=True, max_len=512)

PRESETS: dict[str, dict] = {
    "gpt2-small": dict(_GPT2, d_model=768, num_heads=12, num_layers=12, d_ff=3072),
    "gpt2-medium": dict(_GPT2, d_model=1024, num_heads=16, num_layers=24, d_ff=4096),
    "gpt2-large": dict(_GPT2, d_model=1280, num_heads=20, num_layers=36, d_ff=5120),
    "gpt2-xl": dict(_GPT2, d_model=1600, num_heads=25, num_layers=48, d_ff=6400),
    "llama-1b": dict(_LLAMA, vocab_size=128256, d_model=2048, num_heads=32, num_kv_heads=8, num_layers=16,
                     d_ff=8192, rope_theta=500000.0, max_len=8192, tie_embeddings=True),
    "llama-8b": dict(_LLAMA, vocab_size=128256, d_model=4096, num_heads=32, num_kv_heads=8, num_layers=32,
                     d_ff=14336, rope_theta=500000.0, max_len=8192, tie_embeddings=False),
    "bert-base": dict(_BERT, d_model=768, num_heads=12, num_layers=12, d_ff=3072),
    "bert-large": dict(_BERT, d_model=1024, num_heads=16, num_layers=24, d_ff=4096),
    "t5-small": dict(_T5, d_model=512, num_heads=8, head_dim=64, num_layers=6, d_ff=2048),
    "t5-base": dict(_T5, d_model=768, num_heads=12, head_dim=64, num_layers=12, d_ff=3072),
    "transformer-base": dict(_VASWANI, d_model=512, num_heads=8, num_layers=6, d_ff=2048, dropout_rate=0.1),
    "transformer-big": dict(_VASWANI, d_model=1024, num_heads=16, num_layers=6, d_ff=4096, dropout_rate=0.3),
    # The bench model of docs/architecture.md: 6 x 512, 8 heads, mlp 2048, vocab 32768.
    "bench": dict(_GPT2, vocab_size=32768, d_model=512, num_heads=8, num_layers=6, d_ff=2048, max_len=512),
}
_TINY = dict(vocab_size=256, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=64)
PRESETS.update({
    "gpt2-tiny": dict(_GPT2, **_TINY),
    "llama-tiny": dict(_LLAMA, **dict(_TINY, num_kv_heads=2)),
    "bert-tiny": dict(_BERT, **_TINY),
    "t5-tiny": dict(_T5, **dict(_TINY, head_dim=8)),
    "transformer-tiny": dict(_VASWANI, **_TINY),
})


def get_config(name: str, **overrides) -> ModelConfig:
    """The preset `name` with `overrides` applied, e.g. `get_config("gpt2-small", scan_layers=False)`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict(dict(PRESETS[name], **overrides), where="model")
