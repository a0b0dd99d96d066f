"""The experiment configs: each validates, its docstring says how to run it, on what, with
which data and what `plan` predicts; each plans on CPU scaled down (one layer, short rows, 8
fake devices), and at full size on its own hardware's device count (slow)."""
import importlib.util
import math
import re

import jax
import pytest

from transformer_jax.experiment import EXPERIMENTS_DIR, load_experiment
from transformer_jax.plan import plan
from transformer_jax.train.hardware import CHIPS

jax.devices()  # backends up: the scaled-down plans compile here, on conftest's 8 fake devices

EXPERIMENTS = ["gpt2_small", "gpt2_medium", "gpt2_xl", "bert_base", "t5_base", "transformer_base_wmt14",
               "llama_1b", "llama_8b"]


def _doc(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.__doc__


def _chip_and_count(doc):
    chip = re.search(r"transformer-jax plan --config \w+ --chip (\w+)", doc).group(1)
    m = re.search(r"Hardware: .*?(\d+) chips", doc) or re.search(r"Hardware: (\d+) x [AH]\d00", doc)
    return chip, int(m.group(1))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_validates_and_docstring_says_how_to_run_it(name):
    cfg = load_experiment(name)  # validates every section and their agreement
    assert cfg.name == name and cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    assert cfg.data.source.startswith("tfds:") and cfg.data.vocab_size == cfg.model.vocab_size
    doc = _doc(name)
    chip, chips = _chip_and_count(doc)
    assert chip in CHIPS and math.prod(cfg.mesh.sizes) == chips, (chip, chips, cfg.mesh.sizes)
    assert re.search(rf"launch/(tpu_vm\.sh|gpu_slurm\.sbatch)( .*)? -- --config {name}\b", doc)
    for needle in ("Mesh", "preset", "Data:", "tokens/s/chip", "MFU", "predict"):
        assert needle.lower() in doc.lower(), needle
    assert cfg.train.global_batch_size % (cfg.mesh.data * cfg.mesh.fsdp) == 0


def _scaled_down(name):
    """One layer (one of each in an encoder-decoder), rows of 256, on 8 devices: the experiment's
    mesh shape shrunk (its largest data/fsdp axis takes what tensor leaves)."""
    cfg = load_experiment(name)
    data, fsdp, tensor = cfg.mesh.sizes
    tensor = min(tensor, 8)
    data, fsdp = (8 // tensor, 1) if data >= fsdp else (1, 8 // tensor)
    over = ["model.num_layers=1", "train.seq_len=256", "train.global_batch_size=16", f"mesh.data={data}",
            f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", "optimizer.grad_accum_steps=1"]
    if cfg.model.family == "encoder_decoder":
        over += ["model.num_decoder_layers=1", "train.target_seq_len=64"]
    return cfg.apply_overrides(over)


# One per model family and parallelism (decoder/FSDP, encoder/DP, encoder-decoder/DP, GQA+RoPE+
# SwiGLU/FSDP) in the default run; the other four share their code paths and run with -m slow.
QUICK = ("gpt2_small", "bert_base", "t5_base", "llama_8b")


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in EXPERIMENTS])
def test_plan_runs_scaled_down(name):
    cfg = _scaled_down(name)
    chip, _ = _chip_and_count(_doc(name))
    r = plan(cfg, chip=chip, suggest=False)
    m, p = r["measured"], r["prediction"]
    assert r["devices"] == 8 and m["compiled_layers"] == [1]
    assert m["params"] > 0.9 * cfg.model.vocab_size * cfg.model.d_model  # full width: the embedding alone
    # Adam's two moments, split over data with the weight update (parallel/partition.py: split_update)
    assert 0 < m["param_bytes"] and m["opt_bytes"] == pytest.approx(2 * m["param_bytes"] / cfg.mesh.data, rel=0.01)
    assert m["dot_flops"] > 0.5 * m["model_flops"] / 8
    kinds = {k for k, c in m["collectives"].items() if c["count"]}
    assert {"all-gather", "reduce-scatter"} <= kinds  # FSDP's, or DP's split weight update
    assert p["chip"] == chip and 0 < p["step_s"] <= p["step_slow_s"] and 0 < p["mfu"] <= 1.0 + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_plan_at_full_size_fits_its_hardware(name):
    """The whole model on as many fake devices as the hardware has chips (a subprocess)."""
    chip, chips = _chip_and_count(_doc(name))
    r = plan(load_experiment(name), chip=chip, suggest=False)
    assert r["devices"] == chips and r["prediction"]["fits"], r["prediction"]["peak_bytes"] / 2 ** 30


def test_default_experiment_validates_and_its_docstring_gives_the_command():
    cfg = load_experiment("default")  # the README's main command: no download, one CPU host
    assert cfg.name == "default" and cfg.data.source == "python_source" and cfg.data.vocab_size == cfg.model.vocab_size
    assert cfg.train.seq_len <= cfg.model.max_len and cfg.train.time_budget_s and math.prod(cfg.mesh.sizes) in (-1, 1)
    assert re.search(r"^    transformer-jax train\s", _doc("default"), re.M)
