"""Stage results: the reference's printed blocks and the JSON files that hand them to the next stage."""
import ast
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .cli import UsageError

Arch = tuple[int, ...]


def format_block(title: str, rows: dict[str, list]) -> str:
    """The reference's text block: ``===title===`` then ``name: [values]`` lines.

    Archs print as a list of tuples, so the block pastes into the reference's scripts unchanged.
    """
    lines = [f"==={title}==="]
    for name, values in rows.items():
        if name.endswith("archs"):
            values = [tuple(a) for a in values]
        lines.append(f"{name}: {values}")
    return "\n".join(lines)


def parse_block(text: str) -> dict[str, list]:
    """Read a block printed by ``format_block`` (or by the reference) back into lists."""
    rows = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.startswith("["):
            rows[name.strip()] = [list(v) if isinstance(v, tuple) else v for v in ast.literal_eval(value)]
    return rows


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_search_result(path: str | os.PathLike, config: dict[str, Any], num_layers: int,
                       num_branches: int) -> dict:
    """A stage-2 ``search_result.json``, checked against the model the flags describe."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--search-result {path}: no such file (run 02kfold_evolution.py first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--search-result {path}: not a JSON search result ({e})") from None
    keys = ("fold_accs", "full_accs", "archs", "config")
    if not isinstance(result, dict) or any(k not in result for k in keys):
        raise UsageError(f"--search-result {path}: not a search result (needs {', '.join(keys)})")
    if not isinstance(result["config"], dict):
        raise UsageError(f"--search-result {path}: its config is not an object")
    for key in ("fold_accs", "full_accs", "archs"):
        if not isinstance(result[key], list):
            raise UsageError(f"--search-result {path}: {key} is not a list")
    for key in ("fold_accs", "full_accs"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in result[key]):
            raise UsageError(f"--search-result {path}: {key} holds something other than accuracies")
    for key in ("arch", "quantizer", "bits", "l2_vals"):
        theirs = result["config"].get(key, "basq" if key == "quantizer" else None)  # older files: basq
        if theirs != config[key]:
            raise UsageError(f"--search-result {path} belongs to {key}={theirs}, "
                             f"the flags say {config[key]}")
    archs = result["archs"]
    result.setdefault("folds", list(range(len(archs))))
    if not (len(archs) == len(result["fold_accs"]) == len(result["full_accs"]) == len(result["folds"])):
        raise UsageError(f"--search-result {path}: folds, fold_accs, full_accs and archs differ in length")
    if not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in result["folds"]):
        raise UsageError(f"--search-result {path}: folds are not fold numbers")
    for i, arch in enumerate(archs):
        if (not isinstance(arch, list) or len(arch) != num_layers
                or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < num_branches
                           for b in arch)):
            raise UsageError(f"--search-result {path}: arch {i} is not {num_layers} branch indices "
                             f"in 0..{num_branches - 1}")
    return result
