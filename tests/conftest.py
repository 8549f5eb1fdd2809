"""Shared test set-up: where the reference fixtures are, and small helpers."""
import os
from pathlib import Path

import pytest
import torch

import cpu_kernels  # noqa: F401  the tests run the back end's fused paths, as the stages do
from bench.images import make_image_folder
from bench.memory import stage_script as load_script  # noqa: F401  (the tests' way to a stage script)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("BASQ_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The reference fixtures; skip (or fail under ``BASQ_REQUIRE_FIXTURES=1``, as CI sets) without them."""
    if not (FIXTURES / "quantizers.pt").is_file():
        why = (f"reference fixtures not found at {FIXTURES} "
               "(set BASQ_FIXTURES to the folder holding quantizers.pt)")
        if os.environ.get("BASQ_REQUIRE_FIXTURES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return FIXTURES


@pytest.fixture(scope="session")
def replay(fixtures_dir) -> dict:
    """``search_replay.json``: the reference's search, recorded candidate by candidate."""
    import json

    path = fixtures_dir / "search_replay.json"
    if not path.is_file():
        why = f"{path} not found (the reference's search, recorded candidate by candidate)"
        if os.environ.get("BASQ_REQUIRE_FIXTURES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return json.loads(path.read_text())


def require_native() -> None:
    """Skip without the fused CPU kernels (cpu_kernels/library.py); CI (``BASQ_REQUIRE_FIXTURES=1``) fails."""
    from cpu_kernels import library as native

    if native.library() is None:
        why = "the fused CPU kernels did not build here (no working C compiler; see the warning)"
        if os.environ.get("BASQ_REQUIRE_FIXTURES") == "1":
            pytest.fail(why)
        pytest.skip(why)


def require_exact(is_exact, why: str) -> None:
    """Skip where this process's check turned a fused BatchNorm kernel off (``is_exact()`` false):
    PyTorch's baseline CPU kernels (``ATEN_CPU_CAPABILITY=default``) round BatchNorm otherwise, and
    the kernels then stand aside by design. Where PyTorch runs its vectorised kernels (AVX2,
    AVX-512), the kernels must match, so CI (``BASQ_REQUIRE_FIXTURES=1``) fails there instead."""
    require_native()
    if is_exact():
        return
    if (os.environ.get("BASQ_REQUIRE_FIXTURES") == "1"
            and torch.backends.cpu.get_cpu_capability() != "DEFAULT"):
        pytest.fail(f"{why}, under PyTorch's {torch.backends.cpu.get_cpu_capability()} kernels")
    pytest.skip(why)


@pytest.fixture(params=["fused", "pytorch"])
def kernels(request, monkeypatch) -> str:
    """Run a test with the quantizers' fused CPU kernels, then with PyTorch's ops."""
    from cpu_kernels import library as native

    if request.param == "pytorch":
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    else:
        require_native()
    return request.param


@pytest.fixture(scope="session")
def load_fixture(fixtures_dir):
    cache = {}

    def load(name: str):
        if name not in cache:
            # The fixtures are our own trusted test vectors recorded with full pickling.
            cache[name] = torch.load(fixtures_dir / name, weights_only=False)
        return cache[name]

    return load


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float,
                          floor: float = 1e-5, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with an absolute tolerance of at least ``floor`` times the
    tensor's largest element. A sum of many terms (a convolution's weight gradient, a BatchNorm's
    bias gradient) carries float noise of the order of its terms' size, which another CPU's kernels
    (AVX2, AVX-512) or another thread count change: an element that nearly cancels, or is zero
    in exact arithmetic, is off by that much however small it is."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=max(atol, floor * scale), msg=msg)


def normalised(images: torch.Tensor) -> torch.Tensor:
    """The loaders' uint8 images as the model takes them, by torchvision's ``ToTensor`` arithmetic
    and ``Normalize`` (not the project's ``to_device``): for independent checks."""
    from torchvision.transforms import functional

    return functional.normalize(images.float().div(255), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagenet-layout"))


def run_script(*args: str, cwd: Path | None = None):
    """Run a stage script as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=600)


def assert_clean_failure(result, *words: str) -> None:
    """A user error: non-zero exit, no traceback, and every word of the message on stderr."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
