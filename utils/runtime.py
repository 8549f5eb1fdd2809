"""How a stage script runs: seeded, and failing on a user error with one line instead of a traceback."""
import argparse
import random
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import distributed
from .cpu_memory import keep_freed_memory
from .data import rank_seed
from .errors import BasqError


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; torch's generator gets a sequence of its own on each rank.

    That generator draws the training augmentation when there are no loader workers: the ranks
    must not crop their images alike. Rank 0 keeps the single-process seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(rank_seed(seed, rank))


def fail_cleanly(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """Run a stage; a user error (``BasqError``) prints ``error: ...`` and exits with status 2,
    without a traceback. Any other exception is a defect: it keeps its traceback.

    The process keeps freed memory for reuse (``utils.cpu_memory``), which makes large CPU steps
    faster (README, "Speed").

    Under torchrun the message starts with ``rank N:``; the failed process's exit makes torchrun
    stop the others. (Once the process group is up, torch also tags tracebacks with ``[rankN]``.)
    """
    keep_freed_memory()
    try:
        result = main(args)
    except BasqError as e:
        print(f"{distributed.rank_prefix()}error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{distributed.rank_prefix()}interrupted; the last checkpoint written is intact",
              file=sys.stderr)
        raise SystemExit(130) from None
    distributed.teardown()
    return result
