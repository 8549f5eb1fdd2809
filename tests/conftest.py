"""Shared test set-up: where the reference fixtures are, and small helpers."""
import os
from pathlib import Path

import pytest
import torch

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
def load_fixture(fixtures_dir):
    cache = {}

    def load(name: str):
        if name not in cache:
            # The fixtures are our own trusted test vectors recorded with full pickling.
            cache[name] = torch.load(fixtures_dir / name, weights_only=False)
        return cache[name]

    return load
