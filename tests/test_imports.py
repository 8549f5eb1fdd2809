"""Imports run downward, and the CPU back end plugs in from above and can be removed.

``quant`` and ``models`` are pure PyTorch: they import nothing of the back end or of the layers
above them. The back end (``cpu_kernels``) stands on ``quant`` and ``models`` and registers its
fused paths with ``quant.fused``; nothing below the entry points imports it.
"""
import ast
import shutil

import pytest

from tests.conftest import ROOT, run_script

ABOVE_THE_MODEL = {"utils", "search", "training", "reproduction", "export", "bench", "tests"}
# package -> the packages it must not import
BELOW = {"quant": {"models", "cpu_kernels"} | ABOVE_THE_MODEL,
         "models": {"cpu_kernels"} | ABOVE_THE_MODEL,
         "cpu_kernels": ABOVE_THE_MODEL,
         # infrastructure: the model's packages, nothing of the pipeline's parts above them
         "utils": {"cpu_kernels"} | ABOVE_THE_MODEL - {"utils"},
         "search": {"cpu_kernels"}, "training": {"cpu_kernels"},
         "export": {"cpu_kernels"}, "reproduction": {"cpu_kernels"}}


def imported_packages(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(BELOW))
def test_package_imports_nothing_above_it(package):
    files = sorted((ROOT / package).glob("*.py"))
    assert files
    for path in files:
        assert not imported_packages(path) & BELOW[package], path.name


def test_the_check_sees_an_upward_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import torch\nfrom utils.files import atomic_path\nimport cpu_kernels.units\n")
    assert imported_packages(path) & BELOW["quant"] == {"utils", "cpu_kernels"}
    path.write_text("from quant import fused\nfrom training.pieces import Share\n")  # utils/data.py's, once
    assert imported_packages(path) & BELOW["utils"] == {"training"}


def test_the_back_end_registers_its_fused_paths_from_above():
    from quant import fused

    assert {"quant", "models"} <= set().union(*map(imported_packages, (ROOT / "cpu_kernels").glob("*.py")))
    import cpu_kernels  # noqa: F401  (conftest imported it first)

    assert all(fused.path(name) is not None for name in fused.NAMES)
    with fused.pytorch_only():
        assert all(fused.path(name) is None for name in fused.NAMES)


def test_the_project_trains_without_the_back_end(tmp_path, image_folder):
    """A copy of the project without ``cpu_kernels/`` runs stage 1 (PyTorch's ops), silently."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        "cpu_kernels", "tests", ".git", ".venv", "data", "demo", "runs", "__pycache__", "*.pth"))
    assert not (copy / "cpu_kernels").exists()
    run = run_script("01train_supernet.py", "--data", str(image_folder), "--teacher", "none",
                     "--save", str(tmp_path / "out"), "--width_multiplier", "0.25", "--width_divisor", "8",
                     "--base_resolution", "32", "--l2_bounds", "0.01,0.001", "--batch_size", "8",
                     "--replicas", "1", "-j", "0", "--abin_total_iters", "1", "--awbin_total_iters", "1",
                     cwd=copy)
    assert run.returncode == 0, run.stderr
    assert "kernels" not in run.stderr
    assert (tmp_path / "out" / "model_actwbin_best_00001it.pth").is_file()
