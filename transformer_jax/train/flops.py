"""Model FLOPs of one training step, for MFU.

Convention (that of the bench model in docs/architecture.md, PaLM appendix B without causal halving):

    train FLOPs = 3 x forward FLOPs  (backward = 2 x forward)
    forward     = 2 x (matmul parameters each token passes through)      -> 6 * N * T overall
                + 4 x (query tokens) x (keys they see) x heads x head_dim -> full-square attention

N counts every matmul weight a token meets, the (tied or untied) unembedding included and
the embedding lookups excluded; T counts every position of the batch, padding included
(the hardware computes it). The attention term counts the whole L x L square even for
causal masks. Norms, softmax, activations and the optimizer are not counted. Remat's
recomputation is not counted either (it is hardware FLOPs, not model FLOPs). The MLM head
counts the positions it computes (`head_positions` per row: the step gathers the masked ones).
"""
from __future__ import annotations

from typing import Any, Mapping

from transformer_jax.models.config import ModelConfig


def attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(query+output, key+value) projection weights of one attention block."""
    hd = cfg.dim_per_head
    return 2 * cfg.d_model * cfg.num_heads * hd, 2 * cfg.d_model * cfg.kv_heads * hd


def mlp_params(cfg: ModelConfig) -> int:
    return cfg.d_model * cfg.d_ff * (3 if cfg.activation in ("swiglu", "geglu") else 2)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)


def train_flops(cfg: ModelConfig, task: str, batch: Mapping[str, Any], head_positions: int | None = None) -> float:
    """Training FLOPs of one step on `batch` (arrays, ShapeDtypeStructs or shape tuples
    under the data pipeline's keys: inputs [B, L], decoder_inputs [B, T] for span/seq2seq).
    `head_positions`: MLM only, positions per row the head computes (None: every position)."""
    return 6.0 * sum(_macs(cfg, task, batch, head_positions))


def remat_flops(cfg: ModelConfig, task: str, batch: Mapping[str, Any]) -> float:
    """The matmul FLOPs `cfg.remat` adds on top of `train_flops` (hardware work, not model work).

    "full" runs each layer's forward again in the backward pass. With pre-norm layers that is
    less the MLP's down projection, whose output (the layer's output) the backward never reads:
    XLA drops it. The attention output projection stays (the MLP's norm needs its sum with the
    residual), as does every matmul of a post-norm layer (its last norm needs the down
    projection's output). The heads (unembedding) are not rematerialised. Checked against
    XLA's matmul count for scanned layers (the default) in tests/test_flops.py; unrolled
    post-norm layers (scan_layers=False) were seen to recompute less (no attention scores). For llama_8b that is 1.25x the model FLOPs, not
    the 8/6 = 1.33x of "recompute the whole forward": the down projection is 27% of a layer's
    weights and the 128k-vocabulary unembedding, 7% of the weights, is never recomputed.
    "dots_no_batch" recomputes the attention's QK^T and AV (no weights), "dots" and "none" no matmul."""
    weights, scores, _ = _macs(cfg, task, batch)
    if cfg.remat == "full":
        layer = sum(attention_params(cfg)) + mlp_params(cfg)
        dropped = cfg.d_model * cfg.d_ff if cfg.norm_position == "pre" else 0
        return 2.0 * (weights * (layer - dropped) / layer + scores)
    return 2.0 * scores if cfg.remat == "dots_no_batch" else 0.0


def _macs(cfg: ModelConfig, task: str, batch: Mapping[str, Any],
          head_positions: int | None = None) -> tuple[float, float, float]:
    """Forward multiply-accumulates: (layer weights, attention scores and values, heads)."""
    b, l = _shape(batch["inputs"])
    d, v, hd, h = cfg.d_model, cfg.vocab_size, cfg.dim_per_head, cfg.num_heads
    qo, kv = attention_params(cfg)
    layer = qo + kv + mlp_params(cfg)

    def scores(queries: int, keys: int) -> int:  # forward MACs of QK^T and AV, one layer
        return 2 * queries * keys * h * hd

    if task in ("span", "seq2seq"):
        t = _shape(batch["decoder_inputs"])[1]
        # encoder; decoder: self-attention + MLP and cross-attention q/o on targets, cross k/v on the inputs
        weights = cfg.num_layers * b * l * layer + cfg.decoder_layers * (b * t * (layer + qo) + b * l * kv)
        attn = cfg.num_layers * b * scores(l, l) + cfg.decoder_layers * b * (scores(t, t) + scores(t, l))
        return weights, attn, b * t * d * v  # + unembedding
    if task not in ("lm", "mlm", "classify"):
        raise ValueError(f"task={task!r} is unknown; choose lm, mlm, span, seq2seq or classify")
    weights, attn = b * l * cfg.num_layers * layer, b * cfg.num_layers * scores(l, l)
    if task == "lm":
        head = b * l * d * v
    elif task == "mlm":
        head = b * (head_positions or l) * (d * d + d * v)  # transform + unembedding where the head runs
    else:
        head = b * (d * d + d * cfg.num_classes)  # pooler + classifier, first token
    return weights, attn, head
