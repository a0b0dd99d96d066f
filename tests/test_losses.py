"""Losses: cross-entropy sums against a numpy reference, padding never counts, z-loss and
label smoothing as defined, and every task consumes the data pipeline's batches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from transformer_jax.config import ConfigError
from transformer_jax.models import build_model, get_config
from transformer_jax.train import TaskConfig, cross_entropy_sums, forward, synthetic_batch
from transformer_jax.train.losses import init_inputs, model_inputs

_sums = jax.jit(cross_entropy_sums, static_argnames=("z_loss", "label_smoothing"))


def _reference(logits, targets, weights, z, s):
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    loss = (1 - s) * nll + s * (lse - logits.mean(-1)) + z * lse ** 2
    correct = logits.argmax(-1) == targets
    return dict(loss=(loss * weights).sum(), nll=(nll * weights).sum(), correct=(correct * weights).sum(),
                tokens=weights.sum(), z_loss=(z * lse ** 2 * weights).sum())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), z=st.sampled_from([0.0, 1e-4, 0.1]), s=st.sampled_from([0.0, 0.1]))
def test_sums_match_a_numpy_reference(seed, z, s):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (4, 6, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (4, 6)).astype(np.int32)
    weights = (rng.random((4, 6)) < 0.6).astype(np.float32)
    got = jax.device_get(_sums(logits, targets, weights, z_loss=z, label_smoothing=s))
    want = _reference(logits, targets, weights, z, s)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-4, err_msg=k)


def test_label_smoothing_is_optax_cross_entropy_on_smoothed_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (3, 5)).astype(np.int32)
    w = np.ones((3, 5), np.float32)
    got = _sums(logits, targets, w, z_loss=0.0, label_smoothing=0.1)["loss"]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, 7), 0.1)
    np.testing.assert_allclose(got, optax.softmax_cross_entropy(logits, labels).sum(), rtol=1e-5)


def test_padding_neither_counts_nor_gets_gradient():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (2, 8, 13)).astype(np.float32)
    targets = rng.integers(0, 13, (2, 8)).astype(np.int32)
    w = np.ones((2, 8), np.float32)
    w[1, 5:] = 0.0  # padding
    grad = jax.jit(jax.grad(lambda x: cross_entropy_sums(x, targets, w, z_loss=1e-4, label_smoothing=0.1)["loss"]))
    g = np.asarray(grad(logits))
    assert np.all(g[1, 5:] == 0.0) and np.all(np.abs(g[0]).sum(-1) > 0)
    scrambled = logits.copy()
    scrambled[1, 5:] = 1e4  # whatever sits under padding
    a, b = _sums(logits, targets, w, z_loss=1e-4, label_smoothing=0.0), _sums(scrambled, targets, w, z_loss=1e-4,
                                                                              label_smoothing=0.0)
    assert all(float(a[k]) == float(b[k]) for k in a) and float(a["tokens"]) == 13.0


# -- every task, on batches the data pipeline's own tasks build ---------------------------

TASKS = [("lm", "gpt2-tiny"), ("mlm", "bert-tiny"), ("span", "t5-tiny"), ("seq2seq", "transformer-tiny"),
         ("classify", "bert-tiny")]


@pytest.mark.parametrize("task,name", TASKS)
def test_forward_consumes_pipeline_batches(task, name):
    cfg = get_config(name, num_classes=3)
    model = build_model(cfg)
    batch = synthetic_batch(task, 4, 16, cfg.vocab_size, num_classes=3, fill=0.8)
    args, kw = model_inputs(init_inputs(task, 4, 16), task)
    params = jax.jit(lambda: model.init(jax.random.key(0), *args, **kw))()["params"]

    @jax.jit
    def run(params, batch):
        logits, targets, weights = forward(model, params, batch, task)
        return logits, cross_entropy_sums(logits, targets, weights)

    logits, sums = jax.device_get(run(params, batch))
    targets = batch["label"] if task == "classify" else batch["targets"]
    assert logits.shape == targets.shape + ((3,) if task == "classify" else (cfg.vocab_size,))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert sums["tokens"] == batch["weights"].sum() > 0
    want = _reference(logits, targets, batch["weights"], 0.0, 0.0)
    np.testing.assert_allclose(sums["nll"], want["nll"], rtol=1e-5)
    if task != "classify":  # untrained token predictions are near uniform
        assert sums["nll"] / sums["tokens"] == pytest.approx(np.log(logits.shape[-1]), rel=0.3)


def test_task_and_model_must_match():
    TaskConfig(task="span").check_model("encoder_decoder")
    with pytest.raises(ConfigError, match=r"^task='lm' needs a model of family 'decoder', got 'encoder'; "
                                          r"change task.task or the model$"):
        TaskConfig(task="lm").check_model("encoder")


@pytest.mark.parametrize("kwargs,message", [
    (dict(z_loss=-1.0), r"^task.z_loss=-1.0 must be >= 0$"),
    (dict(label_smoothing=1.0), r"^task.label_smoothing=1.0 must be in \[0, 1\)$"),
    (dict(task="clm"), r"^TaskConfig.task='clm' is not one of 'lm', 'mlm', 'span', 'seq2seq', 'classify'$"),
    (dict(on_nonfinite="ignore"), r"^TaskConfig.on_nonfinite='ignore' is not one of 'skip', 'halt'$"),
    (dict(loss_chunk=-1), r"^task.loss_chunk=-1 must be >= 0 \(0: whole logits\)$"),
])
def test_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TaskConfig(**kwargs)


# -- the fused, chunked output layer + loss equals the whole-logits one -----------------------

@pytest.mark.parametrize("task,name,extra", [
    ("lm", "llama-tiny", dict(tie_embeddings=False)),  # untied output layer
    ("span", "t5-tiny", {}),  # tied, logits scaled by d_model^-0.5 (seq2seq is the same path)
])
def test_fused_chunked_loss_equals_whole_logits(task, name, extra):
    from transformer_jax.train.losses import batch_loss_sums
    cfg = get_config(name, **extra)
    model = build_model(cfg)
    batch = synthetic_batch(task, 4, 20, cfg.vocab_size)  # 20 positions: chunks of 8 leave a padded tail
    args, kw = model_inputs(init_inputs(task, 4, 8), task)
    params = jax.jit(lambda: model.init(jax.random.key(0), *args, **kw))()["params"]
    results = {}
    for chunk in (0, 32):  # 32 tokens: 8 positions of the 4 rows
        task_cfg = TaskConfig(task=task, loss_chunk=chunk, z_loss=1e-2, label_smoothing=0.1)

        def loss(p, b, task_cfg=task_cfg):
            sums = batch_loss_sums(model, p, b, task_cfg)
            return sums["loss"], sums
        results[chunk] = jax.device_get(jax.jit(jax.grad(loss, has_aux=True))(params, batch))
    (g_whole, s_whole), (g_fused, s_fused) = results[0], results[32]
    for k in s_whole:
        np.testing.assert_allclose(s_fused[k], s_whole[k], rtol=1e-5, err_msg=k)
    scale = max(np.abs(x).max() for x in jax.tree.leaves(g_whole))  # key-bias gradients are float noise
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_fused_loss_chunks_count_tokens_per_device_and_transpose_w_once():
    # Each chunk adds a whole [D, V] partial into dW: with the batch split over 8 devices the
    # chunks must grow (same tokens per chunk), not multiply. And W^T for the logits is made once,
    # not once per chunk.
    from transformer_jax.hlo_analysis import analyze_hlo
    from transformer_jax.parallel import MeshConfig, get_rules, make_mesh
    from transformer_jax.train import OptimizerConfig, make_train_setup
    b, length, d, v = 8, 128, 128, 4096
    cfg = get_config("bench", num_layers=1, d_model=d, num_heads=8, d_ff=4 * d, vocab_size=v, max_len=length,
                     scan_layers=False)  # the loss's chunk loop is the step's only loop (xla attention)
    batch = synthetic_batch("lm", b, length, v)
    for mesh_cfg, n, rows in ((MeshConfig(data=1), 1, b), (MeshConfig(data=8, preset="dp"), 8, 1)):
        setup = make_train_setup(cfg, OptimizerConfig(), TaskConfig(task="lm", loss_chunk=64),
                                 make_mesh(mesh_cfg, jax.devices()[:n]), get_rules(mesh_cfg.preset), 10)
        stats = analyze_hlo(setup.compiled_train_step(batch).as_text(), n)
        assert list(stats.loops.values()) == [rows * length // 64], n
        w_copies = [t for (t, _, nbytes), kind in zip(stats.ops, stats.op_kinds)
                    if kind == "transpose" and nbytes >= d * v * 4]
        assert w_copies and max(w_copies) == 1, (n, w_copies)


# -- the MLM head at the masked positions only equals the head at every position ---------------

def test_mlm_head_at_masked_positions_equals_every_position():
    from transformer_jax.train.losses import batch_loss_sums, mlm_predictions
    cfg = get_config("bert-tiny")
    model = build_model(cfg)
    batch = synthetic_batch("mlm", 4, 40, cfg.vocab_size, fill=0.8)  # padding rows' tails: fewer targets
    args, kw = model_inputs(init_inputs("mlm", 4, 8), "mlm")
    params = jax.jit(lambda: model.init(jax.random.key(0), *args, **kw))()["params"]
    results = {}
    for fraction in (0.0, 0.25):
        task_cfg = TaskConfig(task="mlm", mlm_predict_fraction=fraction, z_loss=1e-2, label_smoothing=0.1)

        def loss(p, b, task_cfg=task_cfg):
            sums = batch_loss_sums(model, p, b, task_cfg)
            return sums["loss"], sums
        results[fraction] = jax.device_get(jax.jit(jax.grad(loss, has_aux=True))(params, batch))
    assert mlm_predictions(TaskConfig(task="mlm", mlm_predict_fraction=0.25), 40) == 10  # of 40 positions
    assert 0 < (batch["weights"] > 0).sum(1).max() <= 10
    (g_all, s_all), (g_masked, s_masked) = results[0.0], results[0.25]
    assert s_all["tokens"] == batch["weights"].sum()
    for k in s_all:  # loss, nll, accuracy (correct), tokens, z_loss
        np.testing.assert_allclose(s_masked[k], s_all[k], rtol=1e-5, err_msg=k)
    scale = max(np.abs(x).max() for x in jax.tree.leaves(g_all))
    for a, b in zip(jax.tree.leaves(g_masked), jax.tree.leaves(g_all)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_mlm_batch_with_more_targets_than_the_head_computes_is_an_error():
    from transformer_jax.train.losses import check_mlm_batch
    cfg = TaskConfig(task="mlm", mlm_predict_fraction=0.25)
    weights = np.zeros((2, 40), np.float32)
    weights[1, :10] = 1.0
    check_mlm_batch(cfg, weights)  # 10 of 40: fits
    weights[1, :11] = 1.0
    with pytest.raises(ValueError, match=r"a row has 11 MLM targets .* raise it to >= 0.275"):
        check_mlm_batch(cfg, weights)
    with pytest.raises(ConfigError, match=r"task.mlm_predict_fraction=1.5 must be in \[0, 1\]"):
        TaskConfig(task="mlm", mlm_predict_fraction=1.5)


def test_argmax_hits_is_argmax_equal_to_the_target_ties_included():
    from transformer_jax.train.losses import argmax_hits
    logits = jax.random.normal(jax.random.key(3), (6, 50))
    logits = logits.at[0].set(0.0)  # a constant row: argmax is index 0
    logits = logits.at[1, 7].set(9.0).at[1, 30].set(9.0)  # a tie for the max: the first index wins
    targets = jnp.array([0, 30, 4, 5, 6, 7]).at[2:].set(jnp.argmax(logits[2:], -1))
    targets = targets.at[5].set(targets[5] - 1)  # a miss
    expected = jnp.argmax(logits, -1) == targets
    assert expected.tolist() == [True, False, True, True, True, False]
    np.testing.assert_array_equal(argmax_hits(logits, targets), expected)
    assert not argmax_hits(logits, jnp.full((6,), 1)).tolist()[0]  # the constant row hits index 0 only
