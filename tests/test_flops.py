"""Model FLOPs per training step: the bench model's published number, and the formula
against XLA's own count of the compiled forward + backward for each family and task."""
import jax
import pytest

from transformer_jax.models import build_model, get_config
from transformer_jax.train import cross_entropy_sums, forward, synthetic_batch, train_flops
from transformer_jax.train.losses import TaskConfig, batch_loss_sums, init_inputs, mlm_predictions, model_inputs


def test_bench_model_is_the_design_number():
    # 6 * N * T with N = 6 layers * 3.1M + unembedding 16.8M, T = 4096, plus 12 * L * d * layers * T.
    n = 6 * (4 * 512 * 512 + 2 * 512 * 2048) + 512 * 32768
    want = 6 * n * 4096 + 12 * 512 * 512 * 6 * 4096
    assert want == 953_482_739_712  # "953.5 GFLOP/step" in docs/architecture.md
    assert train_flops(get_config("bench"), "lm", {"inputs": (8, 512)}) == want


def test_scales_with_tokens_and_counts_the_attention_square():
    cfg = get_config("bench")
    one = train_flops(cfg, "lm", {"inputs": (1, 512)})
    assert train_flops(cfg, "lm", {"inputs": (8, 512)}) == 8 * one
    f = lambda l: train_flops(cfg, "lm", {"inputs": (1, l)})  # noqa: E731  a * l + b * l^2
    b = 12 * cfg.num_layers * cfg.d_model  # full square: QK^T and AV, forward and backward
    assert f(1024) - 2 * f(512) == 2 * b * 512 ** 2

@pytest.mark.parametrize("task,name", [("lm", "gpt2-tiny"), ("lm", "llama-tiny"), ("mlm", "bert-tiny"),
                                       ("span", "t5-tiny"), ("classify", "bert-tiny")])
def test_formula_is_xla_count_minus_elementwise(task, name):
    """XLA counts every flop of the program (norms, softmax, activations too): the model
    FLOPs are the matmuls, 90-100% of it at these sizes (the activations recompute their
    derivative in the backward pass: layers/activations.py)."""
    cfg = get_config(name, d_model=128, num_heads=4, d_ff=512, scan_layers=False, max_len=128, vocab_size=512)
    model = build_model(cfg)
    batch = synthetic_batch(task, 4, 64, cfg.vocab_size)
    args, kw = model_inputs(init_inputs(task, 4, 64), task)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw))["params"]
    grad = jax.grad(lambda p, b: cross_entropy_sums(*forward(model, p, b, task))["loss"])
    xla = jax.jit(grad).lower(params, batch).compile().cost_analysis()["flops"]
    assert 0.90 * xla <= train_flops(cfg, task, batch) <= xla


def test_mlm_head_is_counted_where_it_runs():
    """The step's MLM head runs at ceil(mlm_predict_fraction * L) gathered positions per row; the
    model FLOPs count those, still 90-100% of XLA's count of the real loss."""
    cfg = get_config("bert-tiny", d_model=128, num_heads=4, d_ff=512, scan_layers=False, max_len=128, vocab_size=512)
    model, task = build_model(cfg), TaskConfig(task="mlm")
    batch = synthetic_batch("mlm", 4, 64, cfg.vocab_size)
    k = mlm_predictions(task, 64)
    assert 0 < k < 64
    args, kw = model_inputs(init_inputs("mlm", 4, 64), "mlm")
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw))["params"]
    grad = jax.grad(lambda p, b: batch_loss_sums(model, p, b, task)["loss"])
    xla = jax.jit(grad).lower(params, batch).compile().cost_analysis()["flops"]
    assert 0.90 * xla <= train_flops(cfg, "mlm", batch, head_positions=k) <= xla
    saved = train_flops(cfg, "mlm", batch) - train_flops(cfg, "mlm", batch, head_positions=k)
    assert saved == 6 * 4 * (64 - k) * (128 * 128 + 128 * 512)  # transform + unembedding at the other positions


def test_remat_recomputation_is_counted_separately():
    from transformer_jax.train.flops import remat_flops
    batch = {"inputs": (64, 8192)}
    cfg = get_config("llama-8b", remat="full")
    model = train_flops(cfg, "lm", batch)
    assert model == train_flops(get_config("llama-8b"), "lm", batch)  # model FLOPs: remat does not change them
    # the layers' forward again, less the MLP down projection; the unembedding is not recomputed:
    # 1.25x (8/6 = 1.33x would recompute every matmul of the forward)
    assert (model + remat_flops(cfg, "lm", batch)) / model == pytest.approx(1.25, abs=0.01)
    assert remat_flops(get_config("llama-8b", remat="dots"), "lm", batch) == 0
    assert 0 < remat_flops(get_config("llama-8b", remat="dots_no_batch"), "lm", batch) < remat_flops(cfg, "lm", batch)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_remat_flops_match_xla_count(norm_position):
    from transformer_jax.hlo_analysis import analyze_hlo
    from transformer_jax.train.flops import remat_flops
    task = "lm"
    counts = {}
    for remat in ("none", "full"):
        cfg = get_config("gpt2-tiny", d_model=128, num_heads=4, d_ff=512, max_len=128, vocab_size=512,
                         remat=remat, norm_position=norm_position, attention="xla")  # scanned layers, the default
        model = build_model(cfg)
        batch = synthetic_batch(task, 4, 64, cfg.vocab_size)
        args, kw = model_inputs(init_inputs(task, 4, 64), task)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw))["params"]
        grad = jax.grad(lambda p, b: cross_entropy_sums(*forward(model, p, b, task))["loss"])
        counts[remat] = analyze_hlo(jax.jit(grad).lower(params, batch).compile().as_text()).dot_flops
    # XLA's matmuls: post-norm recomputes every matmul of the layers, pre-norm all but the down projection
    assert counts["full"] - counts["none"] == pytest.approx(remat_flops(cfg, task, batch), rel=0.01)
