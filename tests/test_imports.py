"""Imports run downward: the CPU back end and the quantizers know nothing of the layers above them."""
import ast

import pytest

from tests.conftest import ROOT

# package -> the packages it must not import
BELOW = {"quant": {"models", "utils"}, "cpu_kernels": {"models", "utils"}}


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
    path.write_text("import torch\nfrom utils.files import atomic_path\n")
    assert imported_packages(path) & BELOW["quant"] == {"utils"}
