"""The README stays true: CI runs its test command verbatim, and its usage example runs and trains."""
import re
from pathlib import Path

import chex
import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f"README test command {test_command!r} is not a line of .ci/run"


def test_main_command_trains_the_default_experiment():
    main_command = next(b.strip() for b in _blocks("bash") if "transformer-jax train" in b)
    assert main_command.startswith("python3 -m venv .venv") and main_command.endswith("transformer-jax train")


def test_usage_example_runs_and_its_train_step_learns():
    scope = {}
    exec(compile(_blocks("python")[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    chex.assert_shape(scope["y"], (2, 10, 64))
    params, opt_state, tokens = scope["params"], scope["opt_state"], scope["tokens"]
    losses = []
    for _ in range(5):
        params, opt_state, loss = scope["train_step"](params, opt_state, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(jax.numpy.isfinite(jax.numpy.array(losses)))


@pytest.mark.slow
def test_nnx_example_runs_on_a_mesh():
    scope = {}
    for block in _blocks("python")[:2]:  # the NNX example continues the usage example
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    chex.assert_shape(scope["logits"], (4, 32, scope["cfg"].vocab_size))
    kernel = scope["lm"].decoder["layers"]["mlp"]["wo"]["kernel"].get_value()  # [layers, mlp, embed]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
