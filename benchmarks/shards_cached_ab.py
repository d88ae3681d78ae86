"""Issue 51's shards target, cached distillation only: `kdist distill --teacher-mode cached` with `--shards none`
and with `--shards auto` (compare.py's two jobs), alternated over 3 rounds of 5 epochs; prints each round's median
s/epoch and the shards/npz ratio.

    KDIST_DATA_ROOT=../shared/data .venv/bin/python benchmarks/shards_cached_ab.py
"""

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # compare.py, beside this file
import compare

root = os.environ["KDIST_DATA_ROOT"]
with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    teacher, student = compare.write_models(folder, root)
    table = compare.jobs(folder, teacher, student, root, 5, True)
    names = ["kdist distill, cached teacher", "kdist distill, cached, default shards path"]
    for r in range(3):
        order = names if r % 2 == 0 else names[::-1]
        got = {}
        for name in order:
            got[name] = statistics.median(compare.epoch_seconds(table[name], folder / f"r{r}-{names.index(name)}"))
        print(
            f"round {r + 1}: npz {got[names[0]]:.2f}  shards {got[names[1]]:.2f}  "
            f"ratio {got[names[1]] / got[names[0]]:.3f}",
            flush=True,
        )
