"""Stage 2's record of a search as it runs: what a user watches, and what a killed search continues
from (search/evolution.py's ``SearchState``).

* ``history.jsonl`` in ``--save``: one line per evaluated candidate, written (one ``write`` on a file
  opened for appending, so the processes of a torchrun job can share it) as soon as it is scored:
  ``{"fold", "epoch", "index", "candidate", "fold_acc"}``. ``epoch`` is the epoch whose ranking the
  candidate enters: 0 for the initial population, ``e + 1`` for the children bred in epoch ``e``
  (``max_epochs`` for the last generation, which only the final ranking sees); ``index`` counts the
  fold's candidates from 0.
* ``folds/fold{i}.state.json``: the fold's search state after its last complete generation, with
  the search's settings and the full accuracies computed so far; replaced atomically.

A rerun takes a fold's state, then the scores of the history lines written after it (the candidates
the search draws again, in the same order) instead of scoring them again, so the history keeps one
line per candidate and the search ends as the uninterrupted one.
"""
import json
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

from utils.errors import DataError, UsageError

from .evolution import Candidate, SearchState
from .results import write_json

HISTORY = "history.jsonl"


def state_path(save: Path, fold: int) -> Path:
    return save / "folds" / f"fold{fold}.state.json"


def write_state(path: Path, state: SearchState, settings: dict, full_accs: dict[Candidate, float]) -> None:
    write_json({"settings": settings, **state.to_json(),
                "full_accs": [[list(c), acc] for c, acc in full_accs.items()]}, path)


def read_state(path: Path) -> tuple[SearchState, dict[Candidate, float]] | None:
    """The state saved in ``path`` and its full accuracies, or ``None`` when there is none."""
    data = _read(path)
    if data is None or "generation" not in data:
        return None
    return SearchState.from_json(data), {tuple(c): acc for c, acc in data["full_accs"]}


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "settings" in data else None


def check_settings(save: Path, settings: dict) -> None:
    """Refuse to continue a search in ``save`` that was run with other settings (fold results and
    fold states alike), naming the settings that differ."""
    for path in sorted((save / "folds").glob("fold*.json")):
        data = _read(path) if path.is_file() else None
        if data is None or data["settings"] == settings:
            continue
        theirs = data["settings"]
        differ = [f"{key} {theirs.get(key)!r} (the flags say {settings.get(key)!r})"
                  for key in sorted(set(theirs) | set(settings)) if theirs.get(key) != settings.get(key)]
        raise UsageError(f"{save} holds a search with other settings ({path.name}: {'; '.join(differ)}): "
                         "rerun with the same flags to continue it, or give another --save")


def history_lines(save: Path, fold: int) -> list[tuple[Candidate, float]]:
    """The fold's lines of ``history.jsonl``, in order, as ``(candidate, fold accuracy)``.

    Only whole lines count: another process may be writing one at the end of the file."""
    try:
        text = (save / HISTORY).read_text()
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines(keepends=True):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(entry, dict) and entry.get("fold") == fold:
            lines.append((tuple(entry["candidate"]), entry["fold_acc"]))
    return lines


class FoldHistory:
    """``score_fn`` of one fold with ``history.jsonl``: the scores written after ``state`` by an
    earlier, stopped run are taken first, in order; every other score is appended as a line.

    ``epoch`` is written with each new line; the search sets it as its epochs go.
    """

    def __init__(self, save: Path, fold: int, score_fn: Callable[[Candidate], float],
                 state: SearchState | None) -> None:
        self.path = save / HISTORY
        self.fold = fold
        self.score_fn = score_fn
        self.epoch = state.generation if state is not None else 0
        kept = history_lines(save, fold)
        done = list(state.evaluated) if state is not None else []
        if [c for c, _ in kept[:len(done)]] != done:
            raise DataError(f"{self.path} does not hold the {len(done)} candidates fold {fold}'s search "
                            f"state holds ({state_path(save, fold)}): move both away to search the fold "
                            "again")
        self.pending = deque(kept[len(done):])
        self.index = len(kept)

    def __call__(self, cand: Candidate) -> float:
        if self.pending:
            kept, acc = self.pending.popleft()
            if kept != cand:
                raise DataError(f"{self.path} belongs to another search: fold {self.fold}'s line for "
                                f"{kept} where this search drew {cand}; move it away to search again")
            return acc
        acc = float(self.score_fn(cand))
        line = json.dumps({"fold": self.fold, "epoch": self.epoch, "index": self.index,
                           "candidate": list(cand), "fold_acc": acc}) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        self.index += 1
        return acc
