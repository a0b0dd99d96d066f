"""Meshes, parallelism presets (logical-axis rules) and sharded initialisation."""
from transformer_jax.parallel.mesh import (AXES, MeshConfig, check_batch, describe_mesh, make_mesh,
                                           maybe_initialize_distributed)
from transformer_jax.parallel.partition import check_divisible, init_sharded, logical_shardings
from transformer_jax.parallel.rules import PRESETS, Rules, get_rules

__all__ = ["AXES", "MeshConfig", "make_mesh", "maybe_initialize_distributed", "check_batch", "describe_mesh",
           "PRESETS", "Rules", "get_rules", "logical_shardings", "check_divisible", "init_sharded"]
