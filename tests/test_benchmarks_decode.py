"""benchmarks/decode.py --quick runs end to end: its table has every row and JAX's greedy tokens
with and without the KV cache agree (the script asserts it; here we read its report)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(*extra):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick", *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| jax |", "| hf |"))]
    assert all(float(r.split("|")[10].replace(",", "")) > 0 for r in rows)  # tokens/s
    for b in (1, 2):
        assert f"batch {b}: jax cache vs jax no cache: equal (16 tokens x {b} rows)" in run.stdout
    return run.stdout, rows


def test_decode_benchmark_quick_jax_cache_and_no_cache_agree():
    _, rows = run_quick("--skip-hf")
    assert len(rows) == 4  # {cache, no cache} x batch {1, 2}


@pytest.mark.slow  # ~20-30 s: importing torch + transformers and HF generate's first calls
def test_decode_benchmark_quick_with_hf_agrees():
    out, rows = run_quick()
    assert len(rows) == 8  # {jax, hf} x {cache, no cache} x batch {1, 2}
    for b in (1, 2):  # same weights, tiny model: no near-ties in 16 greedy steps
        assert f"batch {b}: jax cache vs hf cache: equal (16 tokens x {b} rows)" in out
        assert f"batch {b}: jax cache vs hf no cache: equal (16 tokens x {b} rows)" in out
