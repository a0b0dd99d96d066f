"""Checkpoints: orbax CheckpointManager with CRC-32C manifests, fallback past corrupt steps,
restore onto any mesh, data-iterator state, `init_from` for fine-tuning, SIGTERM handling.

    ckpt = Checkpointer(workdir / "checkpoints", CheckpointConfig(keep_last=3, keep_every=10_000),
                        tokenizer_dir=tok_dir)
    restored = ckpt.restore(abstract_state)          # None on a fresh run
    ...
    ckpt.save(step, state, data_state=it.get_state(), config_json=cfg.to_json(), metadata={...})
    ckpt.wait_until_finished()
"""
from transformer_jax.checkpoint.finetune import InitFromReport, init_from, resolve_step_dir
from transformer_jax.checkpoint.integrity import MANIFEST_NAME, verify_step_dir, write_manifest
from transformer_jax.checkpoint.manager import CheckpointConfig, CheckpointIntegrityError, Checkpointer, Restored
from transformer_jax.checkpoint.preemption import PreemptionGuard

__all__ = [
    "Checkpointer", "CheckpointConfig", "CheckpointIntegrityError", "Restored",
    "init_from", "InitFromReport", "resolve_step_dir",
    "PreemptionGuard",
    "MANIFEST_NAME", "verify_step_dir", "write_manifest",
]
