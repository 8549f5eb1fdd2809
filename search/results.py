"""Stage results: the reference's printed blocks and the JSON files that hand them to the next stage."""
import ast
import json
import os
import re
from pathlib import Path
from typing import Any

from utils.errors import UsageError
from utils.files import atomic_path


def format_block(title: str, rows: dict[str, list]) -> str:
    """The reference's text block: ``===title===`` then ``name: [values]`` lines.

    A ``folds`` row prints as the bare list the reference prints under its title, and archs as a
    list of tuples, so the block pastes into the reference's scripts unchanged.
    """
    lines = [f"==={title}==="]
    for name, values in rows.items():
        if name.endswith("archs"):
            values = [tuple(a) for a in values]
        lines.append(f"{values}" if name == "folds" else f"{name}: {values}")
    return "\n".join(lines)


_HEADER = re.compile(r"===([\w-]+)===")
_ROW = re.compile(r"(\**[A-Za-z_]+): (\[.*\])\s*$")
_FOLDS = re.compile(r"(?:^|[^\w\]])(\[[\d,\s]*\])\s*$")


def parse_block(text: str, titles: tuple[str, ...] = ("total-result", "final-result")) -> dict[str, list]:
    """The rows of the last block titled one of ``titles`` in ``text``, as ``format_block`` or the
    reference prints it, pasted from a terminal or a log: anything before the title or before a
    row's name on its line (a log prefix such as ``{02/22 06:44:32 AM}-(2484025)-``) is ignored.
    The bare list under the title is ``folds``. ``{}`` when there is no such block.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines)
              if (m := _HEADER.search(line)) and m.group(1) in titles]
    rows: dict[str, list] = {}
    for number, line in enumerate(lines[starts[-1] + 1:] if starts else []):
        if _HEADER.search(line):
            break
        if (row := _ROW.search(line)) is not None:
            name, value = row.groups()
        elif number == 0 and (bare := _FOLDS.search(line)) is not None:
            name, value = "folds", bare.group(1)
        else:
            continue
        try:
            values = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue
        if isinstance(values, list):
            rows[name] = [list(v) if isinstance(v, tuple) else v for v in values]
    return rows


# Stage 2's result: one record per searched fold (``folds/fold{i}.json``), and ``search_result.json``
# with the rows of the printed block, each fold's ``num_candidates`` and the search's settings.
BLOCK_ROWS = ("folds", "fold_accs", "full_accs", "archs")


def fold_record(fold: int, fold_acc: float, full_acc: float, arch: list[int], num_candidates: int,
                settings: dict) -> dict:
    """A searched fold: its winner, the winner's accuracies, and the settings it was searched with."""
    return {"fold": fold, "fold_acc": fold_acc, "full_acc": full_acc, "arch": arch,
            "num_candidates": num_candidates, "settings": settings}


def read_fold_record(path: Path, settings: dict) -> dict | None:
    """A fold searched earlier with these ``settings``, or ``None`` (none, another search's, or an
    unreadable file): a rerun then searches it again."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("settings") != settings or "num_candidates" not in record:
        return None
    return record


def search_result_file(records: list[dict], settings: dict) -> dict:
    """``search_result.json`` from the fold records, in fold order."""
    return {"folds": [r["fold"] for r in records], "fold_accs": [r["fold_acc"] for r in records],
            "full_accs": [r["full_acc"] for r in records], "archs": [r["arch"] for r in records],
            "num_candidates": [r["num_candidates"] for r in records], **settings}


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def read_search_result(path: str | os.PathLike, config: dict[str, Any], num_layers: int,
                       num_branches: int, k: int | None = None) -> dict:
    """A stage-2 ``search_result.json``, or a text file holding a printed ``===total-result===``
    block (pasted from a terminal or a log, ours or the reference's), checked against the model the
    flags describe. A pasted block has no ``config``: only its archs can be checked."""
    path = Path(path)
    what = f"--search-result {path}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file (run 02kfold_evolution.py first)") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what}: not a JSON search result nor a printed ===total-result=== block "
                         "(not text)") from None
    try:
        result = json.loads(text)
    except json.JSONDecodeError as e:
        result, error = parse_block(text), e
    else:
        error = None
    if error is not None:  # a pasted block
        if not result:
            raise UsageError(f"{what}: not a JSON search result ({error}) nor a printed "
                             "===total-result=== block")
        missing = [k for k in ("fold_accs", "full_accs", "archs") if k not in result]
        if missing:
            raise UsageError(f"{what}: the printed block lacks {', '.join(missing)}")
        return check_search_result(result, what, None, num_layers, num_branches, k)
    keys = ("fold_accs", "full_accs", "archs", "config")
    if not isinstance(result, dict) or any(k not in result for k in keys):
        raise UsageError(f"{what}: not a search result (needs {', '.join(keys)})")
    if not isinstance(result["config"], dict):
        raise UsageError(f"{what}: its config is not an object")
    return check_search_result(result, what, config, num_layers, num_branches, k)


def check_search_result(result: dict, what: str, config: dict[str, Any] | None, num_layers: int,
                        num_branches: int, k: int | None = None) -> dict:
    """``result`` with ``folds`` (0..n-1 when absent), after checking its lists and archs, its
    ``config`` against ``config`` unless that is ``None``, and, when it says neither its folds nor
    its ``k``, that it has ``k`` archs (one per fold)."""
    for key in ("fold_accs", "full_accs", "archs"):
        if not isinstance(result[key], list):
            raise UsageError(f"{what}: {key} is not a list")
    for key in ("fold_accs", "full_accs"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in result[key]):
            raise UsageError(f"{what}: {key} holds something other than accuracies")
    for key in ("arch", "quantizer", "bits", "l2_vals") if config is not None else ():
        theirs = result["config"].get(key, "basq" if key == "quantizer" else None)  # older files: basq
        if theirs != config[key]:
            raise UsageError(f"{what} belongs to {key}={theirs}, the flags say {config[key]}")
    archs = result["archs"]
    if k is not None and "folds" not in result and "k" not in result and len(archs) != k:
        raise UsageError(f"{what} has {len(archs)} folds, --k is {k}")
    result.setdefault("folds", list(range(len(archs))))
    if not (len(archs) == len(result["fold_accs"]) == len(result["full_accs"]) == len(result["folds"])):
        raise UsageError(f"{what}: folds, fold_accs, full_accs and archs differ in length")
    if not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in result["folds"]):
        raise UsageError(f"{what}: folds are not fold numbers")
    for i, arch in enumerate(archs):
        if (not isinstance(arch, list) or len(arch) != num_layers
                or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < num_branches
                           for b in arch)):
            raise UsageError(f"{what}: arch {i} is not {num_layers} branch indices in 0..{num_branches - 1}")
    return result
