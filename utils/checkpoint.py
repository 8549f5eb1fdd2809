"""Reading and writing checkpoints: safe loading, atomic saving, readable mismatch errors."""
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

PLAIN_REFUSED = ("not a plain checkpoint (it contains Python objects that would have to be "
                 "executed to load it)")


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file and the cause."""


# Stage 1's phases and its checkpoint names, as the released checkpoint is named.
PHASES = {1: "actbin", 2: "actwbin"}


def checkpoint_name(phase: int, iteration: int) -> str:
    """``model_actwbin_best_466000it.pth``: stage 1's checkpoint at ``iteration`` of ``phase``."""
    return f"model_{PHASES[phase]}_best_{iteration:05d}it.pth"


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The stage-1 checkpoint furthest into training in ``folder`` (phase, then iteration), if any."""
    def progress(path: Path) -> tuple[int, int]:
        phase = 2 if f"_{PHASES[2]}_" in path.name else 1
        return phase, int(path.stem.rsplit("_", 1)[1].removesuffix("it"))

    return max(Path(folder).glob("model_*_best_*it.pth"), key=progress, default=None)


def load_file(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """The one way the project reads a ``.pth`` file: ``torch.load(weights_only=True)``.

    Safe loading accepts tensors, numbers, strings and plain containers and executes nothing.
    ``trust_pickle`` (the stages' ``--trust-pickled-checkpoint-DANGEROUS``) falls back to full
    unpickling, which runs whatever code the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # safe loading met a class or function it would have to call
            raise CheckpointError(f"{path}: {PLAIN_REFUSED}") from None
        # torch's message advises loading unsafely: not advice to pass on for a damaged file.
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or a damaged one") from None
    except Exception as e:  # torch.load reports a damaged file in many exception types
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint, or a damaged one ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def save_file(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def state_dict_of(checkpoint: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state of a released-format checkpoint or a bare state dict, without ``module.``."""
    if isinstance(checkpoint, Mapping) and "model_state_dict" in checkpoint:
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise CheckpointError(f"{path}: not a model checkpoint (no 'model_state_dict' of tensors)")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _branch_count(keys: set[str]) -> int:
    branches = {int(m.group(1)) for k in keys if (m := re.search(r"\.branch_bn_q_\d+\.(\d+)\.", k))}
    return max(branches) + 1 if branches else 0


def _layer_count(keys: set[str]) -> int:
    """Searchable layers: each has exactly one ``branch_bn_q_{i}`` list, whatever the arch."""
    return len({m.group(0) for k in keys if (m := re.match(r".*\.branch_bn_q_\d+\.", k))})


def describe_mismatch(state: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    """Why ``state`` does not fit ``model``, in words, or ``None`` when it fits exactly."""
    expected = model.state_dict()
    have, want = set(state), set(expected)
    if (a := _branch_count(have)) != (b := _branch_count(want)):
        return f"checkpoint has {a} branches per layer, the model {b}"
    if (a := _layer_count(have)) != (b := _layer_count(want)):
        return f"checkpoint has {a} searchable layers, the model {b} (depth or arch differs)"
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model entries missing from the checkpoint (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint entries the model lacks (first: {unexpected[0]})")
        return "layout differs (another arch?): " + "; ".join(parts)
    for k, v in expected.items():
        if state[k].shape != v.shape:
            what = "number of classes" if k.startswith("classifier") else "width"
            return (f"{what} differs: {k} is {list(state[k].shape)}, "
                    f"the model expects {list(v.shape)}")
    return None


def load_model_state(model: nn.Module, source: str | os.PathLike | Mapping,
                     path: str | os.PathLike | None = None) -> Any:
    """Load a checkpoint (a path, or an already loaded object) into ``model`` strictly.

    Returns the loaded checkpoint object. Raises ``CheckpointError`` naming the file and the cause.
    """
    if isinstance(source, (str, os.PathLike)):
        path = source
        source = load_file(source)
    state = state_dict_of(source, path)
    if (why := describe_mismatch(state, model)) is not None:
        raise CheckpointError(f"{path}: does not fit the model: {why}")
    model.load_state_dict(state, strict=True)
    return source


def load_supernet(path: str | os.PathLike, config: dict, trust_pickle: bool = False) -> tuple[nn.Module, Any]:
    """Build the supernet ``config`` describes and load ``path`` into it (stages 2 and 3).

    Our own checkpoints carry their ``config``: a different one is named setting by setting
    before any shape is compared. Released checkpoints are checked by their layout.
    """
    from models import build_supernet

    from .cli import check_config

    checkpoint = load_file(path, trust_pickle)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("config"), Mapping):
        check_config(dict(checkpoint["config"]), config, f"{path}")
    model = build_supernet(**config)
    load_model_state(model, checkpoint, path)
    return model, checkpoint
