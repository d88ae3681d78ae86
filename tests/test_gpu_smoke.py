"""benchmarks/gpu-smoke.sh, the one prepared command for a GPU's first run, kept from rotting: its checks
reduced on this CPU (KDIST_SMOKE_CPU=1) all pass, one PASS line each, and its figures land in $OUT."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from launching import REPO

pytestmark = pytest.mark.processes


def test_the_gpu_smoke_script_passes_reduced_on_cpus(tmp_path, real_root):
    out = tmp_path / "smoke"
    env = {**os.environ, "KDIST_SMOKE_CPU": "1", "OUT": str(out), "KDIST_DATA_ROOT": str(real_root)}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu-smoke.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + (out / "log.txt").read_text()[-3000:]
    assert sum(line.startswith("PASS ") for line in lines) == 8 and not any(line.startswith("FAIL") for line in lines)
    assert "epochs" in json.loads((out / "bench.json").read_text())
    assert json.loads((out / "quick.json").read_text())["models"].keys() == {"teacher", "student", "distilled"}
