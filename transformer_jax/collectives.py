"""The textbook communication of one train step, per device, by collective kind.

    want = textbook_bytes(setup, batch)   # {"all-gather": bytes, "reduce-scatter": ..., "all-reduce": ...}
    got = measured_bytes(analyze_hlo(setup.compiled_train_step(batch).as_text(), n))
    table = compare(setup, batch, got)    # rows of (kind, measured, textbook, ratio)

Bytes are those of the whole arrays a collective is about (an all-gather's result, an
all-reduce's or reduce-scatter's operand), as "How to Scale Your Model" (ch. 5) counts them;
ring link bytes follow from them (hlo_analysis.py). Over a mesh (data d, fsdp f, tensor t),
with P_f the gradient bytes of the parameters split over fsdp and P_r those of the others,
both per tensor shard, T_f the part of P_f in tables (embeddings, and the untied output layer
when the loss is fused), E_f the part in untied token tables, and A one [batch rows per device,
length, d_model] activation:

    all-gather      2 P_f - T_f - E_f FSDP: every weight gathered for the forward and again for the backward,
                                        except T_f, the tables: an embedding lookup's backward needs no
                                        weights, nor does a fused output layer's (train/fused_loss.py
                                        makes dW in the forward pass), so a table is gathered once, and
                                        a token table the output layer does not share not at all (its
                                        lookup runs in each device's columns: layers/embeddings.py)
    reduce-scatter  P_f - E_f         FSDP: every gradient reduce-scattered once per step, except an
                                        untied token table's, whole in each device's columns
    all-reduce      P_r (d f > 1)     DP: every replicated gradient all-reduced once per step,
                    + P_f / f (d > 1)     the FSDP shards of the others across data replicas
                    + A (t > 1, the fused loss in more than one chunk: its dh, chunk by chunk)

except that over data (d > 1) the weight update is split (parallel/partition.py: split_update):
the part U of those data reductions whose update is split is a reduce-scatter of the gradients
and an all-gather of the new weights instead of an all-reduce (the same link bytes):

    all-reduce      - U               reduce-scatter + U      all-gather + U

FSDP's token lookup (layers/embeddings.py) adds an all-to-all forward and one backward, of at most
A each: fewer bytes than gathering and reduce-scattering the table whenever a device holds fewer
tokens than the vocabulary has rows (not one of the three kinds above).

And, with tensor parallelism (t > 1), Megatron's activation traffic with sequence parallelism
(Korthikanti et al. 2022: the residual stream split over tensor along length, layers/blocks.py):

    all-gather      + (4 N + 2) A     per layer 2 forward (the attention and MLP inputs, gathered
                                        whole) and 2 backward (their outputs' gradients), plus the
                                        output layer's input and the embedding's gradient
    reduce-scatter  + (4 N + 2) A     the transposes: the attention and MLP outputs forward, their
                                        inputs' gradients backward, the vocab-split embedding
                                        lookup and the output layer's dh (- A when the fused loss
                                        runs in chunks: then that one is the all-reduce above)

Each all-gather + reduce-scatter pair moves the link bytes of the one all-reduce of Megatron
TP without sequence parallelism, while norms, residuals and dropout run on 1/t of the positions.
The weights those run on (S: the bytes of the parameters tensor does not split: norm scales and
biases, the output projections' biases, a learned position table) get gradients summed over each
device's positions only, all-reduced whole over tensor (Korthikanti et al., sec. 4.2.2):

    all-reduce      + S               (t > 1; over data replicas without fsdp, S is part of P_r
                                        and that all-reduce over data x tensor is the one above)

Gradient accumulation does not change any of it: one reduction per step, not per microbatch
(FSDP's reduce-scatter excepted, which runs per microbatch so that no device ever holds a
whole gradient; that is P_f per microbatch). Under fsdp presets P_r holds no gradient of a
replicated weight: every parameter is split over fsdp, the biases of projections into heads or
mlp included (parallel/partition.py: logical_shardings), as GSPMD gives a loop's carried partial sum no
sharding to stay unreduced in and would all-reduce a replicated one per microbatch (gpt2_xl,
`plan`: 4.10 MiB of all-reduce against 2.05 before, 800 B of loss sums since).

The TP term is that of decoder-only (lm) and encoder-only (mlm) models; scalars (the loss sums,
softmax statistics) are left out.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from transformer_jax.parallel.partition import mesh_axes_of
from transformer_jax.train.fused_loss import chunk_positions
from transformer_jax.train.losses import FUSED_TASKS

KINDS = ("all-gather", "reduce-scatter", "all-reduce")


def _axes(spec) -> set[str]:
    return {a for entry in spec for a in mesh_axes_of(entry)}


def textbook_bytes(setup: Any, batch: Any) -> dict[str, float]:
    """The formula of the module docstring for a TrainSetup and a batch (arrays or shapes)."""
    mesh = setup.mesh
    d, f, t = (mesh.shape[a] for a in ("data", "fsdp", "tensor"))
    fused = bool(setup.task_cfg.loss_chunk) and setup.task_cfg.task in FUSED_TASKS
    p_fsdp = p_rest = t_fsdp = e_fsdp = seq = 0.0
    for path, x in jax.tree_util.tree_leaves_with_path(setup.abstract_state.params):
        axes = _axes(x.sharding.spec)
        nbytes = math.prod(x.shape) * x.dtype.itemsize / (t if "tensor" in axes else 1)
        seq += nbytes if "tensor" not in axes else 0.0
        if f > 1 and "fsdp" in axes:
            p_fsdp += nbytes
            names = {str(getattr(k, "key", k)) for k in path}
            t_fsdp += nbytes if "embedding" in names or (fused and "unembed" in names) else 0.0
            e_fsdp += nbytes if {"token", "embedding"} <= names and not setup.model_cfg.tie_embeddings else 0.0
        else:
            p_rest += nbytes
    k = setup.optim_cfg.grad_accum_steps
    out = {"all-gather": k * (2 * p_fsdp - t_fsdp - e_fsdp), "reduce-scatter": k * (p_fsdp - e_fsdp),
           "all-reduce": 0.0}
    if d * f > 1:
        out["all-reduce"] += p_rest
    if d > 1:
        out["all-reduce"] += p_fsdp / f
    split = update_split_bytes(setup)
    out["all-reduce"] -= split
    out["reduce-scatter"] += split
    out["all-gather"] += split
    if t > 1:
        cfg = setup.model_cfg
        rows, length = batch["inputs"].shape
        act = rows // (d * f) * length * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
        # the fused loss's chunks run along length, not along its split: with more than one
        # chunk, each chunk's dh is all-reduced whole (the same elements, once)
        chunked = fused and chunk_positions(setup.task_cfg.loss_chunk, rows // (d * f), length) < length
        out["all-gather"] += (4 * cfg.num_layers + 2) * act
        out["reduce-scatter"] += (4 * cfg.num_layers + 2 - chunked) * act
        out["all-reduce"] += chunked * act + (seq if d == 1 or f > 1 else 0.0)
    return out


def update_split_bytes(setup: Any) -> float:
    """U: the bytes of the gradients whose update is split over data, per fsdp x tensor shard
    (each is reduce-scattered over data, and its weight all-gathered, once per step)."""
    if setup.mesh.shape["data"] == 1:
        return 0.0
    params, updates = jax.tree.leaves(setup.abstract_state.params), jax.tree.leaves(setup.update_shardings)
    return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                     for x, u in zip(params, updates) if "data" in _axes(u.spec)))


def measured_bytes(stats: Any) -> dict[str, float]:
    """{kind: array bytes} of an hlo_analysis.HloStats (loop trip counts applied)."""
    return {k: stats.collectives[k].array_bytes for k in KINDS}


def compare(setup: Any, batch: Any, measured: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(kind, measured, textbook, measured / textbook) for each kind that either side has."""
    want = textbook_bytes(setup, batch)
    rows = []
    for k in KINDS:
        if measured.get(k, 0.0) or want[k]:
            rows.append((k, measured.get(k, 0.0), want[k], measured.get(k, 0.0) / want[k] if want[k] else math.inf))
    return rows
