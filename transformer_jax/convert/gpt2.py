"""GPT-2 (`GPT2LMHeadModel` / `GPT2Model`) <-> `DecoderLM`: learned positions, pre-LayerNorm,
GELU (tanh), fused qkv `Conv1D` weights stored [in, out], output layer tied to `wte`."""
from __future__ import annotations

from typing import Any

import numpy as np

from transformer_jax.convert._common import Weights, heads_in, heads_out, require, same
from transformer_jax.models.config import ModelConfig

MODEL_TYPES = ("gpt2",)
PREFIX = "transformer."
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict, w: Weights) -> dict:
    require(not hf.get("scale_attn_by_inverse_layer_idx", False),
            "GPT-2 config scale_attn_by_inverse_layer_idx=true has no equivalent here; import a model without it")
    require(not hf.get("add_cross_attention", False),
            "GPT-2 config add_cross_attention=true (a decoder with cross-attention) is not supported here")
    act = hf.get("activation_function", "gelu_new")
    require(act in ACTIVATIONS, f"GPT-2 activation_function={act!r} is not supported; "
            f"supported: {', '.join(sorted(ACTIVATIONS))}")
    d = hf.get("n_embd", 768)
    return dict(
        family="decoder", vocab_size=hf.get("vocab_size", 50257), d_model=d, num_heads=hf.get("n_head", 12),
        d_ff=hf.get("n_inner") or 4 * d, num_layers=hf.get("n_layer", 12), max_len=hf.get("n_positions", 1024),
        position="learned", norm="layernorm", norm_position="pre", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=ACTIVATIONS[act], use_bias=True, tie_embeddings=not _untied(w),
        attn_logit_scale=hf.get("scale_attn_weights", True), dropout_rate=hf.get("resid_pdrop", 0.1))


def _untied(w: Weights) -> bool:
    return w.has("lm_head.weight") and not same(w.peek("lm_head.weight"), w.peek("wte.weight"))


def params_from_hf(cfg: ModelConfig, w: Weights, hf: dict) -> dict[str, Any]:
    d, h = cfg.d_model, cfg.num_heads
    norm = lambda name: {"scale": w.take(f"{name}.weight"), "bias": w.take(f"{name}.bias")}  # noqa: E731
    layers = {}
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        qkv_w, qkv_b = w.take(p + "attn.c_attn.weight"), w.take(p + "attn.c_attn.bias")  # [d, 3d], [3d]
        attn = {name: {"kernel": heads_in(qkv_w[:, j * d:(j + 1) * d], h), "bias": qkv_b[j * d:(j + 1) * d].reshape(h, -1)}
                for j, name in enumerate(("query", "key", "value"))}
        attn["out"] = {"kernel": heads_out(w.take(p + "attn.c_proj.weight"), h), "bias": w.take(p + "attn.c_proj.bias")}
        w.drop(p + "attn.bias")  # causal-mask buffers of old checkpoints
        w.drop(p + "attn.masked_bias")
        layers[f"layer_{i}"] = {
            "attention_norm": norm(p + "ln_1"), "self_attention": attn, "mlp_norm": norm(p + "ln_2"),
            "mlp": {"wi": {"kernel": w.take(p + "mlp.c_fc.weight"), "bias": w.take(p + "mlp.c_fc.bias")},
                    "wo": {"kernel": w.take(p + "mlp.c_proj.weight"), "bias": w.take(p + "mlp.c_proj.bias")}}}
    embedder = {"token": {"embedding": w.take("wte.weight")}, "position": {"embedding": w.take("wpe.weight")}}
    if cfg.tie_embeddings:
        w.drop("lm_head.weight")  # a tied copy (.bin state dicts hold one)
    else:
        embedder["unembed"] = {"kernel": w.take("lm_head.weight").T}
    return {"embedder": embedder, "decoder": layers, "final_norm": norm("ln_f")}


def check_exportable(cfg: ModelConfig) -> None:
    why = [f"{k}={getattr(cfg, k)!r} (GPT-2 needs {v!r})" for k, v in dict(
        family="decoder", position="learned", norm="layernorm", norm_position="pre", use_bias=True,
        embed_norm=False, embed_scale=False, scale_tied_logits=False).items() if getattr(cfg, k) != v]
    if cfg.activation not in ("gelu_tanh", "gelu", "relu"):
        why.append(f"activation={cfg.activation!r} (GPT-2 needs gelu_tanh, gelu or relu)")
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
        why.append("grouped-query heads or head_dim*num_heads != d_model (GPT-2 needs plain multi-head)")
    require(not why, "cannot export as GPT-2: " + "; ".join(why))


def config_to_hf(cfg: ModelConfig, vocab_size: int, params: dict) -> dict:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
    return dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab_size, n_embd=cfg.d_model,
        n_head=cfg.num_heads, n_inner=cfg.d_ff, n_layer=cfg.num_layers, n_positions=cfg.max_len,
        activation_function=act, layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=cfg.attn_logit_scale,
        tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.dropout_rate)


def params_to_hf(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    out = {"transformer.wte.weight": p["embedder"]["token"]["embedding"],
           "transformer.wpe.weight": p["embedder"]["position"]["embedding"]}
    norm = lambda name, n: {f"{name}.weight": n["scale"], f"{name}.bias": n["bias"]}  # noqa: E731
    for i in range(cfg.num_layers):
        lp, pre = p["decoder"][f"layer_{i}"], f"transformer.h.{i}."
        a = lp["self_attention"]
        out[pre + "attn.c_attn.weight"] = np.concatenate(
            [a[n]["kernel"].reshape(cfg.d_model, -1) for n in ("query", "key", "value")], axis=1)
        out[pre + "attn.c_attn.bias"] = np.concatenate([a[n]["bias"].reshape(-1) for n in ("query", "key", "value")])
        out[pre + "attn.c_proj.weight"] = a["out"]["kernel"].reshape(-1, cfg.d_model)
        out[pre + "attn.c_proj.bias"] = a["out"]["bias"]
        out[pre + "mlp.c_fc.weight"], out[pre + "mlp.c_fc.bias"] = lp["mlp"]["wi"]["kernel"], lp["mlp"]["wi"]["bias"]
        out[pre + "mlp.c_proj.weight"], out[pre + "mlp.c_proj.bias"] = lp["mlp"]["wo"]["kernel"], lp["mlp"]["wo"]["bias"]
        out.update(norm(pre + "ln_1", lp["attention_norm"]))
        out.update(norm(pre + "ln_2", lp["mlp_norm"]))
    out.update(norm("transformer.ln_f", p["final_norm"]))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["embedder"]["unembed"]["kernel"].T
    return out
