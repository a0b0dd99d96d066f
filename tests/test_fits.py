"""`train/fits.py`: a compiled step that needs more memory than a device has free is a ConfigError
before it runs (the CLI's end-to-end case is in tests/test_cli.py)."""
import jax
import numpy as np
import pytest

from transformer_jax.config import ConfigError
from transformer_jax.train.fits import check_fits
from transformer_jax.train.hardware import free_device_bytes


def test_check_fits_compares_the_compiled_step_with_free_memory():
    class Closable:
        closed = False

        def close(self):
            self.closed = True

    free, source = free_device_bytes()
    assert 0 < free and "available on this host" in source  # CPU: the host's MemAvailable
    outer = jax.jit(lambda x: x[:, None] * x[None, :])  # an [n, n] f32 output: 4 n^2 bytes
    small, c = outer.lower(jax.ShapeDtypeStruct((1024,), np.float32)).compile(), Closable()
    check_fits(small, "train step", closing=[c])
    assert not c.closed
    n = int((2 * free / 4) ** 0.5)  # twice what is free
    huge = outer.lower(jax.ShapeDtypeStruct((n,), np.float32)).compile()  # compiled, never run
    with pytest.raises(ConfigError, match=r"the train step needs [\d,.]+ GiB per device .* lower train.global_batch_size"):
        check_fits(huge, "train step", closing=[c])
    assert c.closed
