"""Reading and writing checkpoints: safe loading, atomic saving, readable mismatch errors."""
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import Supernet, build_supernet

from .errors import CheckpointError, UsageError
from .files import atomic_path

PLAIN_REFUSED = ("not a plain checkpoint (it contains Python objects that would have to be "
                 "executed to load it)")


# Stage 1's phases and its checkpoint names, as the released checkpoint is named.
PHASES = {1: "actbin", 2: "actwbin"}


def checkpoint_name(phase: int, iteration: int) -> str:
    """``model_actwbin_best_466000it.pth``: stage 1's checkpoint at ``iteration`` of ``phase``."""
    return f"model_{PHASES[phase]}_best_{iteration:05d}it.pth"


# What a stage-1 checkpoint holds beyond the released layout (``iter``, ``model_state_dict``,
# ``best_top1_acc``): everything an exact resume needs.
RESUME_KEYS = ("config", "phase", "epoch", "batch", "optimizer", "scheduler", "meters", "rng", "args")


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict on the CPU, as checkpoints store it."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def stage1_checkpoint(model: nn.Module, iteration: int, top1: float, **resume: Any) -> dict:
    """A stage-1 checkpoint: the released layout, the ``RESUME_KEYS`` given as ``resume``, and the
    gradient scaler's state (``scaler``: empty without fp16 mixed precision)."""
    assert set(resume) - {"scaler"} == set(RESUME_KEYS), sorted(set(resume) ^ set(RESUME_KEYS))
    return {"iter": iteration, "model_state_dict": cpu_state(model), "best_top1_acc": top1, **resume}


def load_resume_state(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """A stage-1 checkpoint of ours to resume from (a released one holds weights only)."""
    checkpoint = load_file(path, trust_pickle)
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in RESUME_KEYS):
        raise UsageError(f"--resume {path}: not a stage-1 checkpoint with resume state "
                         "(a released checkpoint holds weights only: use it in stage 2)")
    return checkpoint


def finetuned_name(fold: int, bits: int, epoch: int) -> str:
    """``arch3_model_actwbin_2_2_bn_0ep.pth``: stage 3's checkpoint of fold 3's arch after epoch 0."""
    return f"arch{fold}_model_actwbin_{bits}_{bits}_bn_{epoch}ep.pth"


def finetuned_checkpoint(model: nn.Module, epoch: int, top1: float, config: dict, selection: list[int],
                         fold: int, evaluation: dict) -> dict:
    """A stage-3 checkpoint: the reference's layout (``epoch``, ``model_state_dict``,
    ``best_top1_acc``), with the config, the fine-tuned selection, its fold and how it was evaluated
    (``evaluation``: ``val_batch_size`` and ``replicas``, which set LSQ's steps in evaluation)."""
    return {"epoch": epoch, "model_state_dict": cpu_state(model), "best_top1_acc": top1, "config": config,
            "selection": list(selection), "fold": fold, "evaluation": dict(evaluation)}


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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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


def check_config(saved: dict[str, Any], wanted: dict[str, Any], what: str) -> None:
    """Refuse a file made for another configuration, naming the first setting that differs."""
    for key, value in wanted.items():
        if key in saved and saved[key] != value:
            raise UsageError(f"{what} was made with {key}={saved[key]}, the flags say {value}")


def load_supernet(path: str | os.PathLike, config: dict, trust_pickle: bool = False) -> tuple[Supernet, Any]:
    """Build the supernet ``config`` describes and load ``path`` into it (stages 2 and 3).

    Our own checkpoints carry their ``config``: a different one is named setting by setting
    before any shape is compared. Released checkpoints are checked by their layout.
    """
    checkpoint = load_file(path, trust_pickle)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("config"), Mapping):
        check_config(dict(checkpoint["config"]), config, f"{path}")
    model = build_supernet(**config)
    load_model_state(model, checkpoint, path)
    return model, checkpoint
