"""Issue 53's acceptance: the metrics of `kdist run --quick --seed 3` (--shards none and --shards auto) before and
after the tidy-up must be equal. Usage: python compare_runs.py BEFORE_DIR AFTER_DIR > comparison.json
(each DIR holding none/results.json and auto/results.json). Compares every val/test metric of every model."""

import json
import sys
from pathlib import Path


def metrics(path: Path) -> dict:
    models = json.loads(path.read_text())["models"]
    return {
        f"{name}/{split}/{key}": value
        for name, entry in models.items()
        for split in ("val", "test")
        for key, value in entry[split].items()
        if not isinstance(value, dict)
    }


before, after = Path(sys.argv[1]), Path(sys.argv[2])
report = {}
for shards in ("none", "auto"):
    old, new = metrics(before / shards / "results.json"), metrics(after / shards / "results.json")
    report[shards] = {
        "metrics": len(old),
        "equal": old == new,
        "differing": {key: [old[key], new.get(key)] for key in old if old[key] != new.get(key)},
    }
print(json.dumps(report, indent=1))
