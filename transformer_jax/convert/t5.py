"""T5 (`T5ForConditionalGeneration`; v1.0 ReLU and v1.1 / mT5 gated-GELU) <-> `EncoderDecoder`.

T5 has pre-RMSNorm without bias, no 1/sqrt(head_dim) in attention, and one relative-position
bias table per stack, stored in block 0's self-attention and shared by all its layers; here
those tables are the model-level `encoder_bias` / `decoder_bias`.

The output layer: v1.0 ties it to `shared` and scales the decoder output by d_model**-0.5
(`scale_tied_logits=True`); v1.1 has its own `lm_head` and no scaling (`tie_embeddings=False`).
Whether to scale is `scale_decoder_outputs` in configs written by transformers 5, else
`tie_word_embeddings` (false = no scaling); the head is untied when the checkpoint holds an
`lm_head.weight` that differs from `shared.weight`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from transformer_jax.convert._common import (
    Weights, flat_in, flat_out, heads_in, heads_out, linear_kernel, require, same, torch_linear)
from transformer_jax.models.config import ModelConfig

MODEL_TYPES = ("t5", "mt5")
PREFIX = ""
_PLAIN = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_GATED = {"gelu_new": "geglu", "gelu_pytorch_tanh": "geglu", "silu": "swiglu", "swish": "swiglu"}
_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "geglu": "gated-gelu", "swiglu": "gated-silu"}
_REL = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def scales_outputs(hf: dict) -> bool:
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def _activation(hf: dict) -> str:
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # transformers' own special case
    table = _GATED if gated else _PLAIN
    require(len(parts) <= 2 and act in table, f"T5 feed_forward_proj={proj!r} is not supported; supported: "
            "relu, gelu, gelu_new, gated-gelu, gated-silu")
    return table[act]


def config_from_hf(hf: dict, w: Weights) -> dict:
    scale = scales_outputs(hf)
    untied = w.has("lm_head.weight") and not same(w.peek("lm_head.weight"), _shared(w))
    return dict(
        family="encoder_decoder", vocab_size=hf.get("vocab_size", 32128), d_model=hf.get("d_model", 512),
        num_heads=hf.get("num_heads", 8), head_dim=hf.get("d_kv", 64), d_ff=hf.get("d_ff", 2048),
        num_layers=hf.get("num_layers", 6), num_decoder_layers=hf.get("num_decoder_layers") or hf.get("num_layers", 6),
        max_len=hf.get("n_positions", 512), position="t5_bias",
        rel_num_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128), norm="rmsnorm", norm_position="pre",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=_activation(hf), use_bias=False,
        # An untied head that is also scaled (possible in a transformers-5 config) has the scale folded in.
        tie_embeddings=not untied, scale_tied_logits=scale and not untied, attn_logit_scale=False,
        dropout_rate=hf.get("dropout_rate", 0.1))


def _shared(w: Weights) -> np.ndarray:
    return w.peek("shared.weight") if w.has("shared.weight") else w.peek("encoder.embed_tokens.weight")


def _attention(w: Weights, name: str, h: int) -> dict:
    k = lambda x: linear_kernel(w.take(f"{name}.{x}.weight"))  # noqa: E731
    return {"query": {"kernel": heads_in(k("q"), h)}, "key": {"kernel": heads_in(k("k"), h)},
            "value": {"kernel": heads_in(k("v"), h)}, "out": {"kernel": heads_out(k("o"), h)}}


def _mlp(w: Weights, name: str, gated: bool) -> dict:
    names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    return {n: {"kernel": linear_kernel(w.take(f"{name}.{n}.weight"))} for n in names}


def params_from_hf(cfg: ModelConfig, w: Weights, hf: dict) -> dict[str, Any]:
    h, gated = cfg.num_heads, cfg.activation in ("geglu", "swiglu")
    scale = lambda name: {"scale": w.take(f"{name}.weight")}  # noqa: E731
    enc, dec = {}, {}
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        enc[f"layer_{i}"] = {"self_attention": _attention(w, p + "0.SelfAttention", h),
                             "attention_norm": scale(p + "0.layer_norm"),
                             "mlp": _mlp(w, p + "1.DenseReluDense", gated), "mlp_norm": scale(p + "1.layer_norm")}
    for i in range(cfg.decoder_layers):
        p = f"decoder.block.{i}.layer."
        dec[f"layer_{i}"] = {"self_attention": _attention(w, p + "0.SelfAttention", h),
                             "attention_norm": scale(p + "0.layer_norm"),
                             "cross_attention": _attention(w, p + "1.EncDecAttention", h),
                             "cross_attention_norm": scale(p + "1.layer_norm"),
                             "mlp": _mlp(w, p + "2.DenseReluDense", gated), "mlp_norm": scale(p + "2.layer_norm")}
    w.drop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")  # unused by transformers too
    shared = w.take("shared.weight") if w.has("shared.weight") else w.take("encoder.embed_tokens.weight")
    for tied_copy in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if w.has(tied_copy):
            require(same(w.peek(tied_copy), shared), f"T5 checkpoint's {tied_copy} differs from shared.weight; "
                    "separate encoder/decoder embeddings are not supported")
            w.drop(tied_copy)
    embedder = {"token": {"embedding": shared}}
    if cfg.tie_embeddings:
        w.drop("lm_head.weight")
    else:
        kernel = linear_kernel(w.take("lm_head.weight"))
        embedder["unembed"] = {"kernel": kernel * cfg.d_model ** -0.5 if scales_outputs(hf) else kernel}
    return {"embedder": embedder, "encoder": enc, "decoder": dec,
            "encoder_norm": scale("encoder.final_layer_norm"), "decoder_norm": scale("decoder.final_layer_norm"),
            "encoder_bias": {"rel_embedding": w.take("encoder." + _REL)},
            "decoder_bias": {"rel_embedding": w.take("decoder." + _REL)}}


def check_exportable(cfg: ModelConfig) -> None:
    why = [f"{k}={getattr(cfg, k)!r} (T5 needs {v!r})" for k, v in dict(
        family="encoder_decoder", position="t5_bias", norm="rmsnorm", norm_position="pre", use_bias=False,
        embed_norm=False, embed_scale=False, attn_logit_scale=False).items() if getattr(cfg, k) != v]
    if cfg.kv_heads != cfg.num_heads:
        why.append(f"num_kv_heads={cfg.num_kv_heads} (T5 needs plain multi-head)")
    require(not why, "cannot export as T5: " + "; ".join(why))


def config_to_hf(cfg: ModelConfig, vocab_size: int, params: dict) -> dict:
    scaled = cfg.tie_embeddings and cfg.scale_tied_logits
    # transformers 4 reads tie_word_embeddings=false as "own lm_head, no scaling"; 5 reads
    # scale_decoder_outputs and ties lm_head only when it equals shared. Both hold here.
    return dict(
        model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=vocab_size, d_model=cfg.d_model,
        num_heads=cfg.num_heads, d_kv=cfg.dim_per_head, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_decoder_layers=cfg.decoder_layers, relative_attention_num_buckets=cfg.rel_num_buckets,
        relative_attention_max_distance=cfg.rel_max_distance, layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=_TO_HF[cfg.activation], tie_word_embeddings=scaled, scale_decoder_outputs=scaled,
        dropout_rate=cfg.dropout_rate, is_encoder_decoder=True)


def params_to_hf(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    gated = cfg.activation in ("geglu", "swiglu")

    def attention(name, a):
        return {f"{name}.q.weight": torch_linear(flat_in(a["query"]["kernel"])),
                f"{name}.k.weight": torch_linear(flat_in(a["key"]["kernel"])),
                f"{name}.v.weight": torch_linear(flat_in(a["value"]["kernel"])),
                f"{name}.o.weight": torch_linear(flat_out(a["out"]["kernel"]))}

    def mlp(name, m):
        return {f"{name}.{n}.weight": torch_linear(m[n]["kernel"]) for n in (("wi_0", "wi_1", "wo") if gated else ("wi", "wo"))}

    shared = p["embedder"]["token"]["embedding"]
    out = {"shared.weight": shared}
    for i in range(cfg.num_layers):
        lp, pre = p["encoder"][f"layer_{i}"], f"encoder.block.{i}.layer."
        out.update(attention(pre + "0.SelfAttention", lp["self_attention"]))
        out[pre + "0.layer_norm.weight"] = lp["attention_norm"]["scale"]
        out.update(mlp(pre + "1.DenseReluDense", lp["mlp"]))
        out[pre + "1.layer_norm.weight"] = lp["mlp_norm"]["scale"]
    for i in range(cfg.decoder_layers):
        lp, pre = p["decoder"][f"layer_{i}"], f"decoder.block.{i}.layer."
        out.update(attention(pre + "0.SelfAttention", lp["self_attention"]))
        out[pre + "0.layer_norm.weight"] = lp["attention_norm"]["scale"]
        out.update(attention(pre + "1.EncDecAttention", lp["cross_attention"]))
        out[pre + "1.layer_norm.weight"] = lp["cross_attention_norm"]["scale"]
        out.update(mlp(pre + "2.DenseReluDense", lp["mlp"]))
        out[pre + "2.layer_norm.weight"] = lp["mlp_norm"]["scale"]
    out["encoder." + _REL] = p["encoder_bias"]["rel_embedding"]
    out["decoder." + _REL] = p["decoder_bias"]["rel_embedding"]
    out["encoder.final_layer_norm.weight"] = p["encoder_norm"]["scale"]
    out["decoder.final_layer_norm.weight"] = p["decoder_norm"]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = torch_linear(p["embedder"]["unembed"]["kernel"])
    elif not cfg.scale_tied_logits:
        out["lm_head.weight"] = shared  # tied but unscaled: an explicit copy reads right in transformers 4 and 5
    return out
