"""The train state: everything a step reads and writes, and a checkpoint holds.

    TrainState(step int32[], params, opt_state, rng uint32[2])

`params` and `opt_state` are plain (unboxed) pytrees of jax.Arrays. `rng` is the raw key
data of the run's base key; a step's dropout key is fold_in(rng, step) (and the micro-
batch index), so a resumed run draws exactly the keys an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: steps taken (applied or skipped)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data of the base key

    def step_key(self) -> jax.Array:
        """The typed key of this step's randomness."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
