"""The typed config machinery: construction, validation, overrides, JSON round-trip."""
import dataclasses
from typing import Literal

import pytest

from transformer_jax.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class Inner(Config):
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"

    def validate(self):
        if self.rate < 0:
            raise ConfigError(f"rate={self.rate} must be >= 0")


@dataclasses.dataclass(frozen=True)
class Outer(Config):
    steps: int = 10
    name: str = "x"
    flag: bool = False
    size: int | None = None
    shape: tuple[int, ...] = (1, 2)
    inner: Inner = Inner()


def test_overrides_parse_to_field_types():
    cfg = Outer().apply_overrides(["steps=20", "flag=true", "inner.rate=1e-3", "inner.kind=b", "size=none",
                                   "shape=[4, 8]", "name=hello"])
    assert cfg == Outer(steps=20, flag=True, size=None, shape=(4, 8), name="hello", inner=Inner(rate=1e-3, kind="b"))


def test_json_round_trip():
    cfg = Outer(steps=3, inner=Inner(rate=0.5))
    assert Outer.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("override, message", [
    ("stepz=3", "unknown key 'stepz'; valid keys: steps, name, flag, size, shape, inner"),
    ("inner.rat=3", "unknown key 'inner.rat'; valid keys: rate, kind"),
    ("steps=ten", "steps='ten' must be an integer"),
    ("flag=maybe", "flag='maybe' must be true or false"),
    ("inner.rate=-1", "rate=-1.0 must be >= 0"),
    ("inner.kind=c", "Inner.kind='c' is not one of 'a', 'b'"),
    ("steps", "override 'steps' must look like key.path=value"),
    ("steps.x=1", "'steps' is an int, it has no key 'x'"),
    ("size=1.5", "size='1.5' must be an integer"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        Outer().apply_overrides([override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_wrong_type_at_construction():
    with pytest.raises(ConfigError, match="Outer.steps must be an int, got '3'"):
        Outer(steps="3")
    with pytest.raises(ConfigError, match="unknown key 'inner.x'"):
        Outer.from_dict({"inner": {"x": 1}})
