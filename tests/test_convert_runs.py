"""Hugging Face checkpoints in runs: a tiny random Llama (bfloat16 shards) with a tiny trained
tokenizer beside it is fine-tuned from the CLI (`init_from=hf:`), exported, and reloaded in
transformers with the same logits as our final state; mismatches are one-line errors."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from transformer_jax import cli
from transformer_jax.convert.runs import hf_dir
from transformer_jax.experiment import ExperimentConfig
from transformer_jax.train.loop import Run

TEXTS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n" * 6,
    "import os\n\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)\n" * 6,
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(9)])\n" * 6,
] * 4
PROBE = "def add(x, y):\n    return x + y\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers directory, text directory): Llama 2 layers x 32, GQA, untied head, vocab 320
    rows for a 300-token byte-level BPE with <s> and </s>; float32 reference model."""
    root = tmp_path_factory.mktemp("hf")
    texts = root / "texts"
    texts.mkdir()
    for i, t in enumerate(TEXTS):
        (texts / f"doc{i}.py").write_text(t.replace("add", f"add{i}"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = root / "llama"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        dict(bos_token="<s>", eos_token="</s>", tokenizer_class="PreTrainedTokenizerFast")))
    cfg = T.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        bos_token_id=0, eos_token_id=1, rope_theta=500000.0)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, max_shard_size="30KB")
    assert (d / "model.safetensors.index.json").is_file()
    return d, texts


def train_args(d, texts, tmp_path, *extra):
    return ["train", "--config", "finetune_hf", "--workdir", str(tmp_path / "run"),
            "--set", f"init_from=hf:{d}", "--set", f"data.source=text_files:{texts}",
            "--set", f"data.data_dir={tmp_path / 'data'}", "--set", "train.steps=3", "--set", "train.seq_len=32",
            "--set", "train.global_batch_size=8", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0",
            "--set", "optimizer.warmup_steps=1", "--set", "optimizer.learning_rate=0.05", *extra]


def logits_of_run(workdir, tokens):
    run = Run(ExperimentConfig.from_json((workdir / "config.json").read_text()), workdir)
    state = run.ckpt.restore(run.setup.abstract_state, restore_data_state=False).state
    with run.setup.context():
        out = np.asarray(run.setup.model.apply({"params": state.params}, jnp.asarray(tokens)))
    run.ckpt.close()
    return run, out


@pytest.mark.slow
def test_finetune_from_the_cli_then_export_reloads_in_transformers(checkpoint, tmp_path, capsys):
    d, texts = checkpoint
    assert cli.main(train_args(d, texts, tmp_path)) == 0
    log = capsys.readouterr().out
    assert "restored all 12 parameter arrays" in log and "8 cpu device(s)" in log
    run_dir = tmp_path / "run"
    assert cli.main(["export", "--workdir", str(run_dir), "--to", str(tmp_path / "export")]) == 0
    assert "tokenizer files copied" in capsys.readouterr().out

    tok = T.AutoTokenizer.from_pretrained(tmp_path / "export")
    ids = np.tile(tok(PROBE)["input_ids"], (8, 1))  # a batch the 8-device data axis divides
    run, ours = logits_of_run(run_dir, ids)
    assert run.tokenizer.encode(PROBE) == ids[0].tolist()  # trained on the checkpoint's own ids
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        reloaded = model(torch.as_tensor(ids)).logits.numpy()
        before = T.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(torch.as_tensor(ids)).logits.numpy()
    diff = np.abs(reloaded - ours).max()
    print(f"export round trip: max abs logit difference {diff:.3g}; fine-tuning moved logits by "
          f"{np.abs(ours - before).max():.3g}")
    assert diff <= 1e-4
    assert np.abs(ours - before).max() > 1e-2  # the LoRA steps changed the model that was exported


def test_a_directory_with_weights_is_a_checkpoint_without_the_prefix(checkpoint, tmp_path):
    d, _ = checkpoint
    assert hf_dir(str(d)) == d and hf_dir(f"hf:{d}") == d
    (tmp_path / "config.json").write_text("{}")  # one of this library's runs: no weights file
    assert hf_dir(str(tmp_path)) is None and hf_dir(None) is None
    assert hf_dir(f"hf:{tmp_path / 'gone'}", required=False) is None


def _variant(d, tmp_path, name, drop=None, **changes):
    out = tmp_path / name
    shutil.copytree(d, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, **changes)))
    if drop:
        shards = sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
        (out / shards[drop]).unlink()
    return out


@pytest.mark.parametrize("name, changes, message", [
    ("falcon", dict(model_type="falcon"), "model_type='falcon' in"),
    ("small_vocab", dict(vocab_size=256), "tokens but the model's embedding has 256 rows"),
    ("no_shard", dict(drop=1), "shard(s) that are not in"),
    ("gone", None, "does not exist"),
    ("empty", None, "holds no config.json"),
])
def test_mismatches_are_one_line_errors(checkpoint, tmp_path, capsys, name, changes, message):
    d, texts = checkpoint
    target = tmp_path / name if changes is None else _variant(d, tmp_path, name, **changes)
    if name == "empty":
        target.mkdir()
    assert cli.main(train_args(target, texts, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("transformer-jax: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
