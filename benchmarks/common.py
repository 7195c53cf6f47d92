"""What every benchmark script shares: writing its results as JSON."""

import json
import os


def write_json(path: str, results) -> None:
    """results as indented JSON at ``path`` (its folder made if needed); says where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
