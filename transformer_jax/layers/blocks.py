"""Transformer layers and the layer stack.

EncoderLayer: x -> self-attention -> FFN.  DecoderLayer: x -> causal self-attention ->
(cross-attention to the encoder) -> FFN.  Each sublayer is wrapped in a residual with
dropout, normalised before (pre-norm, GPT-2/T5/Llama) or after (post-norm, Vaswani/BERT).

`LayerStack` runs N layers unrolled or with `nn.scan` (params stacked on a leading
"layers" axis, compile time flat in depth), each optionally under `nn.remat` with a
named checkpoint policy. Layers take (x, *broadcast_args) and return (x, None), the
shape `nn.scan` wants.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers.attention import MultiHeadAttention
from transformer_jax.layers.dense import LoRA
from transformer_jax.layers.mlp import MLP
from transformer_jax.layers.norms import make_norm

if TYPE_CHECKING:  # layers know the config's fields, not the models package
    from transformer_jax.models.config import ModelConfig

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dtypes(cfg: ModelConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def lora(cfg: ModelConfig) -> LoRA | None:
    """The LoRA adapters of the attention and MLP projections, or None (cfg.lora_rank=0)."""
    return LoRA(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets)) if cfg.lora_rank else None


def _residual(layer: nn.Module, x_BLD, f, name: str):
    """Pre-norm: x + drop(f(norm(x))).  Post-norm: norm(x + drop(f(x))).  Call inside compact."""
    cfg = layer.cfg
    norm = make_norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name=name, **dtypes(cfg))
    drop = nn.Dropout(cfg.dropout_rate, deterministic=layer.deterministic)
    # Sequence parallelism (Korthikanti et al. 2022), where a preset splits "seq": the residual
    # stream and the norms hold 1/t of the positions; the sublayer's input is gathered whole
    # along length and its output reduce-scattered back, in place of Megatron's all-reduce.
    if cfg.norm_position == "pre":
        y = x_BLD + drop(f(gather_positions(norm(x_BLD))))
    else:
        y = norm(x_BLD + drop(f(gather_positions(x_BLD))))
    return nn.with_logical_constraint(y, ("batch", "seq", "embed"))


@jax.custom_vjp
def gather_positions(x_BLD: jax.Array) -> jax.Array:
    """x whole along length; its gradient comes back split like the residual stream ("seq"): a
    reduce-scatter, where autodiff of the constraint alone left the norm's backward on whole
    rows behind an all-reduce. The identity off a mesh or without a "seq" rule."""
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))


def _gather_fwd(x_BLD):
    return gather_positions(x_BLD), None


def _gather_bwd(_, g_BLD):
    return (nn.with_logical_constraint(g_BLD, ("batch", "seq", "embed")),)


gather_positions.defvjp(_gather_fwd, _gather_bwd)


def _attention(cfg: ModelConfig, name: str, decode: bool = False, rope: bool = False) -> MultiHeadAttention:
    return MultiHeadAttention(
        num_heads=cfg.num_heads, head_dim=cfg.dim_per_head, num_kv_heads=cfg.kv_heads, use_bias=cfg.use_bias,
        rope=rope, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, qkv_bias=cfg.qkv_bias,
        sliding_window=cfg.sliding_window, logit_scale=cfg.attn_logit_scale, implementation=cfg.attention,
        decode=decode, lora=lora(cfg), name=name, **dtypes(cfg))


def _mlp(cfg: ModelConfig, deterministic: bool) -> MLP:
    return MLP(cfg.d_ff, cfg.activation, cfg.use_bias, cfg.dropout_rate, deterministic, lora=lora(cfg), name="mlp",
               **dtypes(cfg))


class EncoderLayer(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL=None, positions_BL=None, bias_BHLL=None):
        cfg, det = self.cfg, self.deterministic
        attn = _attention(cfg, "self_attention", rope=cfg.position == "rope")
        x_BLD = _residual(self, x_BLD, lambda h: attn(
            h, q_segment_ids=segment_ids_BL, kv_segment_ids=segment_ids_BL, q_positions=positions_BL,
            bias=bias_BHLL), "attention_norm")
        x_BLD = _residual(self, x_BLD, _mlp(cfg, det), "mlp_norm")
        return x_BLD, None


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    cross_attention: bool = False
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL=None, positions_BL=None, bias_BHLL=None,
                 encoded_BSD=None, encoded_segment_ids_BS=None):
        cfg, det = self.cfg, self.deterministic
        attn = _attention(cfg, "self_attention", decode=self.decode, rope=cfg.position == "rope")
        x_BLD = _residual(self, x_BLD, lambda h: attn(
            h, causal=True, q_segment_ids=segment_ids_BL, kv_segment_ids=segment_ids_BL,
            q_positions=positions_BL, bias=bias_BHLL), "attention_norm")
        if self.cross_attention:
            if encoded_BSD is None:
                raise ValueError("a DecoderLayer with cross_attention=True needs encoded_BSD")
            cross = _attention(cfg, "cross_attention")
            q_seg = segment_ids_BL
            if (q_seg is None) != (encoded_segment_ids_BS is None):  # pad the missing side with ones
                b = x_BLD.shape[0]
                q_seg = jnp.ones((b, x_BLD.shape[1]), jnp.int32) if q_seg is None else q_seg
                encoded_segment_ids_BS = (jnp.ones((b, encoded_BSD.shape[1]), jnp.int32)
                                          if encoded_segment_ids_BS is None else encoded_segment_ids_BS)
            x_BLD = _residual(self, x_BLD, lambda h: cross(
                h, encoded_BSD, q_segment_ids=q_seg, kv_segment_ids=encoded_segment_ids_BS), "cross_attention_norm")
        x_BLD = _residual(self, x_BLD, _mlp(cfg, det), "mlp_norm")
        return x_BLD, None


class LayerStack(nn.Module):
    """`num_layers` copies of `layer`, scanned or unrolled, optionally rematerialised."""
    cfg: ModelConfig
    layer: type[nn.Module]
    num_layers: int
    layer_kwargs: tuple[tuple[str, Any], ...] = ()

    @nn.compact
    def __call__(self, x_BLD, *args, **layer_attrs):
        """`layer_attrs` (e.g. deterministic=, decode=) are set on every layer for this call."""
        cfg = self.cfg
        block = self.layer
        if cfg.remat != "none":
            if cfg.remat not in REMAT_POLICIES:
                raise ValueError(f"remat={cfg.remat!r} is unknown; choose 'none' or one of {sorted(REMAT_POLICIES)}")
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        kwargs = dict(self.layer_kwargs, **layer_attrs)
        if cfg.scan_layers:
            block = nn.scan(
                block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x_BLD, _ = block(cfg, name="layers", **kwargs)(x_BLD, *args)
            return x_BLD
        for i in range(self.num_layers):
            x_BLD, _ = block(cfg, name=f"layer_{i}", **kwargs)(x_BLD, *args)
        return x_BLD
