"""BERT (`BertForMaskedLM`, `BertForSequenceClassification`, `BertForPreTraining`, `BertModel`)
<-> `Encoder`: post-LayerNorm, LayerNorm after the embeddings, token types, erf GELU.

Heads: the MLM head (`cls.predictions`: transform dense + act + LayerNorm, tied decoder, bias)
becomes `mlm_head`; the pooler and a sequence classifier become `classifier/{pooler,out}`.
A checkpoint with a pooler but no classifier (BertForPreTraining, BertModel) gives
`classifier/pooler` only: merge it into a fresh `head="classify"` init to fine-tune.
BertForPreTraining's next-sentence head (`cls.seq_relationship`) is not imported.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from transformer_jax.convert._common import (
    Weights, flat_in, flat_out, heads_in, heads_out, linear_kernel, require, same, torch_linear)
from transformer_jax.models.config import ModelConfig

MODEL_TYPES = ("bert",)
PREFIX = "bert."
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_DECODER = "cls.predictions.decoder."


def config_from_hf(hf: dict, w: Weights) -> dict:
    pos = hf.get("position_embedding_type", "absolute")
    require(pos == "absolute", f"BERT position_embedding_type={pos!r} is not supported; only 'absolute'")
    require(not hf.get("is_decoder", False) and not hf.get("add_cross_attention", False),
            "BERT as a decoder (is_decoder / add_cross_attention) is not supported; import an encoder")
    act = hf.get("hidden_act", "gelu")
    require(act in ACTIVATIONS, f"BERT hidden_act={act!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}")
    num_classes = (w.peek("classifier.weight").shape[0] if w.has("classifier.weight")
                   else hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
    untied = w.has(_DECODER + "weight") and not same(w.peek(_DECODER + "weight"),
                                                     w.peek("embeddings.word_embeddings.weight"))
    return dict(
        family="encoder", vocab_size=hf.get("vocab_size", 30522), d_model=hf.get("hidden_size", 768),
        num_heads=hf.get("num_attention_heads", 12), d_ff=hf.get("intermediate_size", 3072),
        num_layers=hf.get("num_hidden_layers", 12), max_len=hf.get("max_position_embeddings", 512),
        position="learned", norm="layernorm", norm_position="post", norm_eps=hf.get("layer_norm_eps", 1e-12),
        embed_norm=True, activation=ACTIVATIONS[act], use_bias=True, tie_embeddings=not untied,
        type_vocab_size=hf.get("type_vocab_size", 2), num_classes=num_classes,
        dropout_rate=hf.get("hidden_dropout_prob", 0.1))


def _dense(w: Weights, name: str) -> dict:
    return {"kernel": linear_kernel(w.take(f"{name}.weight")), "bias": w.take(f"{name}.bias")}


def _norm(w: Weights, name: str) -> dict:
    return {"scale": w.take(f"{name}.weight"), "bias": w.take(f"{name}.bias")}


def params_from_hf(cfg: ModelConfig, w: Weights, hf: dict) -> dict[str, Any]:
    h = cfg.num_heads
    e = "embeddings."
    embedder = {"token": {"embedding": w.take(e + "word_embeddings.weight")},
                "position": {"embedding": w.take(e + "position_embeddings.weight")},
                "token_type": w.take(e + "token_type_embeddings.weight"), "norm": _norm(w, e + "LayerNorm")}
    w.drop(e + "position_ids")  # a buffer in old checkpoints
    w.drop(e + "token_type_ids")
    layers = {}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        attn = {}
        for name in ("query", "key", "value"):
            d = _dense(w, f"{p}attention.self.{name}")
            attn[name] = {"kernel": heads_in(d["kernel"], h), "bias": d["bias"].reshape(h, -1)}
        out = _dense(w, p + "attention.output.dense")
        attn["out"] = {"kernel": heads_out(out["kernel"], h), "bias": out["bias"]}
        layers[f"layer_{i}"] = {
            "self_attention": attn, "attention_norm": _norm(w, p + "attention.output.LayerNorm"),
            "mlp": {"wi": _dense(w, p + "intermediate.dense"), "wo": _dense(w, p + "output.dense")},
            "mlp_norm": _norm(w, p + "output.LayerNorm")}
    params = {"embedder": embedder, "encoder": layers}
    if w.has("cls.predictions.transform.dense.weight"):
        bias_name = "cls.predictions.bias" if w.has("cls.predictions.bias") else _DECODER + "bias"
        params["mlm_head"] = {"transform": _dense(w, "cls.predictions.transform.dense"),
                              "norm": _norm(w, "cls.predictions.transform.LayerNorm"), "bias": w.take(bias_name)}
        w.drop(_DECODER + "bias")  # the same tensor as cls.predictions.bias
        if cfg.tie_embeddings:
            w.drop(_DECODER + "weight")
        else:
            embedder["unembed"] = {"kernel": linear_kernel(w.take(_DECODER + "weight"))}
    classifier = {}
    if w.has("pooler.dense.weight"):
        classifier["pooler"] = _dense(w, "pooler.dense")
    if w.has("classifier.weight"):
        require("pooler" in classifier, "BERT checkpoint has classifier.weight but no pooler.dense; "
                "only BertForSequenceClassification-style heads (pooler + classifier) are supported")
        classifier["out"] = _dense(w, "classifier")
    if classifier:
        params["classifier"] = classifier
    return params


def check_exportable(cfg: ModelConfig) -> None:
    why = [f"{k}={getattr(cfg, k)!r} (BERT needs {v!r})" for k, v in dict(
        family="encoder", position="learned", norm="layernorm", norm_position="post", use_bias=True,
        embed_norm=True, embed_scale=False, attn_logit_scale=True, scale_tied_logits=False).items()
        if getattr(cfg, k) != v]
    if cfg.activation not in ("gelu", "gelu_tanh", "relu"):
        why.append(f"activation={cfg.activation!r} (BERT needs gelu, gelu_tanh or relu)")
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
        why.append("grouped-query heads or head_dim*num_heads != d_model (BERT needs plain multi-head)")
    require(not why, "cannot export as BERT: " + "; ".join(why))


def config_to_hf(cfg: ModelConfig, vocab_size: int, params: dict) -> dict:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.activation]
    head = "mlm_head" in params
    arch = "BertForMaskedLM" if head else ("BertForSequenceClassification"
                                           if "out" in params.get("classifier", {}) else "BertModel")
    return dict(
        model_type="bert", architectures=[arch], vocab_size=vocab_size, hidden_size=cfg.d_model,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
        max_position_embeddings=cfg.max_len, layer_norm_eps=cfg.norm_eps, hidden_act=act,
        type_vocab_size=max(cfg.type_vocab_size, 1), num_labels=cfg.num_classes,
        tie_word_embeddings=cfg.tie_embeddings, hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.dropout_rate, position_embedding_type="absolute")


def params_to_hf(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    e, emb = "bert.embeddings.", p["embedder"]
    # A model without token types exports one all-zero type row: identical outputs.
    types = emb["token_type"] if cfg.type_vocab_size else np.zeros((1, cfg.d_model), np.float32)
    out = {e + "word_embeddings.weight": emb["token"]["embedding"],
           e + "position_embeddings.weight": emb["position"]["embedding"], e + "token_type_embeddings.weight": types}
    dense = lambda name, d: {f"{name}.weight": torch_linear(d["kernel"]), f"{name}.bias": d["bias"]}  # noqa: E731
    norm = lambda name, n: {f"{name}.weight": n["scale"], f"{name}.bias": n["bias"]}  # noqa: E731
    out.update(norm(e + "LayerNorm", emb["norm"]))
    for i in range(cfg.num_layers):
        lp, pre = p["encoder"][f"layer_{i}"], f"bert.encoder.layer.{i}."
        a = lp["self_attention"]
        for name in ("query", "key", "value"):
            out.update(dense(f"{pre}attention.self.{name}",
                             {"kernel": flat_in(a[name]["kernel"]), "bias": a[name]["bias"].reshape(-1)}))
        out.update(dense(pre + "attention.output.dense", {"kernel": flat_out(a["out"]["kernel"]), "bias": a["out"]["bias"]}))
        out.update(norm(pre + "attention.output.LayerNorm", lp["attention_norm"]))
        out.update(dense(pre + "intermediate.dense", lp["mlp"]["wi"]))
        out.update(dense(pre + "output.dense", lp["mlp"]["wo"]))
        out.update(norm(pre + "output.LayerNorm", lp["mlp_norm"]))
    if "mlm_head" in p:
        m = p["mlm_head"]
        out.update(dense("cls.predictions.transform.dense", m["transform"]))
        out.update(norm("cls.predictions.transform.LayerNorm", m["norm"]))
        out["cls.predictions.bias"] = m["bias"]
        if not cfg.tie_embeddings:
            out[_DECODER + "weight"] = torch_linear(emb["unembed"]["kernel"])
    c = p.get("classifier", {})
    if "pooler" in c:
        out.update(dense("bert.pooler.dense", c["pooler"]))
    if "out" in c:
        out.update(dense("classifier", c["out"]))
    return out
