"""transformer_jax: Transformer models in JAX/Flax, sharded with jax.sharding meshes."""
__version__ = "0.1.0"
