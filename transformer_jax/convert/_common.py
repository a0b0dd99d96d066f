"""Helpers shared by the per-architecture converters: a checkpoint reader that records which
tensors were used, layout changes between torch Linear weights and this library's kernels,
and the unrolled <-> scanned layer layouts."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from transformer_jax.config import ConfigError


class Weights:
    """A Hugging Face state dict (name -> numpy array) that records what was taken.

    `take("wte.weight")` finds the tensor with or without the model's base prefix
    (GPT2LMHeadModel stores "transformer.wte.weight", GPT2Model "wte.weight").
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], prefix: str = ""):
        self.source = arrays  # may read lazily (hf.read_state_dict): a tensor is read when peeked
        self.names = {_rename_legacy(k): k for k in arrays}
        self.prefix = prefix
        self.used: set[str] = set()

    def _key(self, name: str) -> str | None:
        for key in (self.prefix + name, name):
            if key in self.names:
                return key
        return None

    def has(self, name: str) -> bool:
        return self._key(name) is not None

    def peek(self, name: str) -> np.ndarray:
        key = self._key(name)
        if key is None:
            raise KeyError(f"checkpoint has no tensor {self.prefix + name!r} (nor {name!r}); "
                           "is this the right model directory?")
        return self.source[self.names[key]]

    def take(self, name: str) -> np.ndarray:
        key = self._key(name)
        arr = self.peek(name)
        self.used.add(key)
        return np.asarray(arr, np.float32)

    def drop(self, name: str) -> None:
        """Mark a tensor as deliberately not imported (a tied copy, a buffer)."""
        key = self._key(name)
        if key is not None:
            self.used.add(key)

    def unused(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.names) - self.used))


def _rename_legacy(key: str) -> str:
    """Old BERT checkpoints name LayerNorm parameters gamma/beta."""
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


# -- torch Linear weight [out, in]  <->  kernels [in..., out...] ----------------------------------
def linear_kernel(w_OI: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w_OI.T)


def heads_in(kernel_DF: np.ndarray, num_heads: int) -> np.ndarray:
    """[d, H*Dh] -> [d, H, Dh] (query/key/value kernels)."""
    return kernel_DF.reshape(kernel_DF.shape[0], num_heads, -1)


def heads_out(kernel_FD: np.ndarray, num_heads: int) -> np.ndarray:
    """[H*Dh, d] -> [H, Dh, d] (attention output kernels)."""
    return kernel_FD.reshape(num_heads, -1, kernel_FD.shape[-1])


def flat_in(kernel_DHK: np.ndarray) -> np.ndarray:
    return kernel_DHK.reshape(kernel_DHK.shape[0], -1)


def flat_out(kernel_HKD: np.ndarray) -> np.ndarray:
    return kernel_HKD.reshape(-1, kernel_HKD.shape[-1])


def torch_linear(kernel_IO: np.ndarray) -> np.ndarray:
    """A 2-D kernel [in, out] as a torch Linear weight [out, in]."""
    return np.ascontiguousarray(np.asarray(kernel_IO).T)


# -- layer layouts -------------------------------------------------------------------------------
def stack_layers(tree: Any) -> Any:
    """{"layer_0": p0, "layer_1": p1, ...} -> {"layers": stacked}, recursively (nn.scan's layout)."""
    if not isinstance(tree, dict):
        return tree
    if "layer_0" in tree:
        n = sum(k.startswith("layer_") for k in tree)
        layers = [tree[f"layer_{i}"] for i in range(n)]
        return {"layers": _map(lambda *xs: np.stack(xs), *layers)}
    return {k: stack_layers(v) for k, v in tree.items()}


def unstack_layers(tree: Any) -> Any:
    """The inverse of `stack_layers`; unrolled trees pass through."""
    if not isinstance(tree, dict):
        return tree
    if "layers" in tree and len(tree) == 1:
        stacked = tree["layers"]
        n = len(next(iter(_leaves(stacked))))
        return {f"layer_{i}": _map(lambda x, i=i: x[i], stacked) for i in range(n)}
    return {k: unstack_layers(v) for k, v in tree.items()}


def _map(f, *trees):
    if isinstance(trees[0], dict):
        return {k: _map(f, *(t[k] for t in trees)) for k in trees[0]}
    return f(*trees)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def to_numpy(tree: Any) -> Any:
    """Plain nested dicts of float32 numpy arrays (accepts jax arrays, flax FrozenDicts, boxed leaves)."""
    if hasattr(tree, "unbox"):
        tree = tree.unbox()
    if hasattr(tree, "items"):
        return {k: to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
