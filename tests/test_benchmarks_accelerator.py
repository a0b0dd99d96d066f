"""benchmarks/accelerator.py --quick runs end to end on CPU: its one table has the attention
(chunked vs xla, forward + backward, agreeing), train (tokens/s, MFU) and decode rows (beside
Hugging Face `generate` on the same weights, `--hf yes`), and it exits 0 (a kernel mismatch or
a failed part exits 1)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~1-2 min on 2 cores: compiles two train steps and four decode loops
def test_accelerator_quick_prints_every_row_and_agrees():
    command = [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--quick", "--repeats", "1", "--hf", "yes"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    parts = [r.split("|")[1].strip() for r in rows]
    assert parts == ["attention"] * 2 + ["train"] * 2 + ["decode"] * 2, run.stdout
    assert all(r.rstrip(" |").endswith("ok") for r in rows[:2]), run.stdout
    assert all("tokens/s" in r for r in rows[2:]) and all("MFU" in r for r in rows[2:4]), run.stdout
    # greedy on the same exported weights agrees with HF's tokens (bf16: a near-tie may flip one
    # argmax on some CPU, and the row goes its own way after it)
    for r, total in zip(rows[4:], (16, 32)):
        equal, of = re.search(r"(\d+)/(\d+) equal to hf's", r).groups()
        assert int(of) == total and int(equal) >= total // 2, r
