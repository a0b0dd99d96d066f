"""Llama 1/2/3 (`LlamaForCausalLM`), Mistral (`MistralForCausalLM`) and Qwen2 (`Qwen2ForCausalLM`)
<-> `DecoderLM`: RoPE (`rope_theta`, Llama-3 or linear `rope_scaling`), grouped-query attention,
pre-RMSNorm, SwiGLU (`gate_proj` -> wi_0, `up_proj` -> wi_1, `down_proj` -> wo), no biases except
Qwen2's on q/k/v (`qkv_bias`), Mistral's sliding window (`sliding_window`), tied or untied head.

Configs of transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) are read;
exports write both spellings, so either version loads them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from transformer_jax.convert._common import (
    Weights, flat_in, flat_out, heads_in, heads_out, linear_kernel, require, torch_linear)
from transformer_jax.models.config import ModelConfig, RopeScaling

MODEL_TYPES = ("llama", "mistral", "qwen2")
PREFIX = "model."
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_MLP = {"gate_proj": "wi_0", "up_proj": "wi_1", "down_proj": "wo"}


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope = {**legacy, **params}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return float(theta), None
    require(kind in ("linear", "llama3"), f"rope_type={kind!r} is not supported; supported: default, linear, llama3")
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=float(rope["factor"]))
    return float(theta), RopeScaling(
        kind="llama3", factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_len=int(rope["original_max_position_embeddings"]))


def _sliding_window(hf: dict) -> int | None:
    kind, n = hf["model_type"], hf.get("num_hidden_layers", 32)
    if kind == "llama":
        return None
    window = hf.get("sliding_window")
    if kind == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        default = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n)]
        types = hf.get("layer_types") or default
    else:
        types = hf.get("layer_types") or ["sliding_attention"] * n
    if window is None or set(types) == {"full_attention"}:
        return None
    require(set(types) == {"sliding_attention"}, f"{kind} layer_types mixes sliding and full attention "
            f"({types}); only one kind for all layers is supported")
    return int(window)


def config_from_hf(hf: dict, w: Weights) -> dict:
    kind = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    require(act == "silu", f"{kind} hidden_act={act!r} is not supported; only 'silu' (SwiGLU)")
    require(not hf.get("attention_bias", False) and not hf.get("mlp_bias", False),
            f"{kind} attention_bias/mlp_bias=true is not supported; only Qwen2-style q/k/v biases")
    d, h = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    theta, scaling = _rope(hf)
    return dict(
        family="decoder", vocab_size=hf.get("vocab_size", 32000), d_model=d, num_heads=h,
        num_kv_heads=hf.get("num_key_value_heads") or h, head_dim=hf.get("head_dim") or d // h,
        d_ff=hf.get("intermediate_size", 11008), num_layers=hf.get("num_hidden_layers", 32),
        max_len=hf.get("max_position_embeddings", 2048), position="rope", rope_theta=theta, rope_scaling=scaling,
        sliding_window=_sliding_window(hf), norm="rmsnorm", norm_position="pre", norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu", use_bias=False, qkv_bias=kind == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout_rate=0.0)


def params_from_hf(cfg: ModelConfig, w: Weights, hf: dict) -> dict[str, Any]:
    h, k = cfg.num_heads, cfg.kv_heads
    layers = {}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn = {}
        for name, proj, heads in (("query", "q_proj", h), ("key", "k_proj", k), ("value", "v_proj", k)):
            attn[name] = {"kernel": heads_in(linear_kernel(w.take(f"{p}self_attn.{proj}.weight")), heads)}
            if cfg.qkv_bias:
                attn[name]["bias"] = w.take(f"{p}self_attn.{proj}.bias").reshape(heads, -1)
        attn["out"] = {"kernel": heads_out(linear_kernel(w.take(p + "self_attn.o_proj.weight")), h)}
        w.drop(p + "self_attn.rotary_emb.inv_freq")  # a buffer in old checkpoints
        layers[f"layer_{i}"] = {
            "attention_norm": {"scale": w.take(p + "input_layernorm.weight")}, "self_attention": attn,
            "mlp_norm": {"scale": w.take(p + "post_attention_layernorm.weight")},
            "mlp": {ours: {"kernel": linear_kernel(w.take(f"{p}mlp.{theirs}.weight"))}
                    for theirs, ours in _MLP.items()}}
    embedder = {"token": {"embedding": w.take("embed_tokens.weight")}}
    if cfg.tie_embeddings:
        w.drop("lm_head.weight")  # a tied copy
    else:
        require(w.has("lm_head.weight"), f"{hf['model_type']} checkpoint has tie_word_embeddings=false but no "
                "lm_head.weight; is a shard missing?")
        embedder["unembed"] = {"kernel": linear_kernel(w.take("lm_head.weight"))}
    return {"embedder": embedder, "decoder": layers, "final_norm": {"scale": w.take("norm.weight")}}


def check_exportable(cfg: ModelConfig, model_type: str | None = None) -> None:
    why = [f"{k}={getattr(cfg, k)!r} (Llama needs {v!r})" for k, v in dict(
        family="decoder", position="rope", norm="rmsnorm", norm_position="pre", activation="swiglu", use_bias=False,
        embed_norm=False, embed_scale=False, attn_logit_scale=True, scale_tied_logits=False).items()
        if getattr(cfg, k) != v]
    kind = model_type or export_type(cfg)
    if cfg.qkv_bias and kind != "qwen2":
        why.append(f"qkv_bias=True (model_type {kind!r} has no q/k/v-only biases; export as qwen2)")
    if cfg.sliding_window is not None and kind == "llama":
        why.append(f"sliding_window={cfg.sliding_window} (model_type 'llama' has none; export as mistral)")
    require(not why, "cannot export as Llama/Mistral/Qwen2: " + "; ".join(why))


def export_type(cfg: ModelConfig) -> str:
    return "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window is not None else "llama"


def config_to_hf(cfg: ModelConfig, vocab_size: int, params: dict, model_type: str | None = None) -> dict:
    kind = model_type or export_type(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is not None and s.kind == "linear":
        rope.update(rope_type="linear", factor=s.factor)
    elif s is not None:
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_len)
    out = dict(
        model_type=kind, architectures=[_ARCH[kind]], vocab_size=vocab_size, hidden_size=cfg.d_model,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
        intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers, max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps, hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope, rope_theta=cfg.rope_theta, rope_scaling=None if s is None else rope)
    if kind == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif kind == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:
        window = cfg.sliding_window is not None
        out.update(use_sliding_window=window, sliding_window=cfg.sliding_window, max_window_layers=0 if window else
                   cfg.num_layers, layer_types=["sliding_attention" if window else "full_attention"] * cfg.num_layers)
    return out


def params_to_hf(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    out = {"model.embed_tokens.weight": p["embedder"]["token"]["embedding"],
           "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(cfg.num_layers):
        lp, pre = p["decoder"][f"layer_{i}"], f"model.layers.{i}."
        a = lp["self_attention"]
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{pre}self_attn.{proj}.weight"] = torch_linear(flat_in(a[name]["kernel"]))
            if cfg.qkv_bias:
                out[f"{pre}self_attn.{proj}.bias"] = a[name]["bias"].reshape(-1)
        out[pre + "self_attn.o_proj.weight"] = torch_linear(flat_out(a["out"]["kernel"]))
        out[pre + "input_layernorm.weight"] = lp["attention_norm"]["scale"]
        out[pre + "post_attention_layernorm.weight"] = lp["mlp_norm"]["scale"]
        for theirs, ours in _MLP.items():
            out[f"{pre}mlp.{theirs}.weight"] = torch_linear(lp["mlp"][ours]["kernel"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = torch_linear(p["embedder"]["unembed"]["kernel"])
    return out
