"""The documented check that ``requirements.txt``'s oldest torch runs the project: every module
imports and stage 1 takes one step in each phase. ``make torch-floor`` runs it in a virtual
environment of its own with exactly that release (installing an old torch in CI would double its
time); run it when the floor or the code's use of new torch features changes.

    .venv-floor/bin/python -m tests.torch_floor
"""
import importlib
import sys
import tempfile
from pathlib import Path

import torch

from bench.images import make_image_folder
from utils.torch_floor import TORCH_FLOOR, release

from .conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "cpu_kernels", "export", "models", "quant", "reproduction", "search", "training",
            "utils")


def main() -> None:
    if release(torch.__version__) != TORCH_FLOOR:
        raise SystemExit(f"torch {torch.__version__} is not the floor {TORCH_FLOOR}: install that release")
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    for name in modules:
        importlib.import_module(name)
    scripts = [p.name for p in sorted(ROOT.glob("0*.py"))] + ["reproduce.py"]
    stage1 = [load_script(name) for name in scripts][0]
    with tempfile.TemporaryDirectory() as tmp:
        data = make_image_folder(Path(tmp) / "data")
        stage1.train(stage1.parse_args([
            "--data", str(data), "--teacher", "none", "--width_multiplier", "0.25", "--width_divisor", "8",
            "--base_resolution", "32", "--l2_bounds", "0.01,0.001", "--batch_size", "8", "--replicas", "2",
            "-j", "2", "--abin_total_iters", "1", "--awbin_total_iters", "1",
            "--save", str(Path(tmp) / "out")]))
        if not (Path(tmp) / "out" / "model_actwbin_best_00001it.pth").is_file():
            raise SystemExit("stage 1 wrote no phase-2 checkpoint")
    print(f"torch {torch.__version__}: {len(modules)} modules and {len(scripts)} scripts import, "
          "stage 1 ran one step per phase", file=sys.stderr)


if __name__ == "__main__":
    main()
