"""Where the evolutionary search's random draws come from (SPEC 4, 5a).

Two streams, one interface: ``below(n)`` (an integer in ``0 .. n-1``), ``uniform()`` (a float in
``[0, 1)``), ``either(a, b)`` (one of two values), ``batch`` (how many candidates a breeding call
draws at once) and a JSON-able ``state`` to save and restore the stream.

* ``FoldDraws`` (the default): Python's ``random`` seeded ``seed + fold`` per fold, one candidate at
  a time. A fold's search depends on the seed and the fold alone, so folds can be searched in any
  order, in several processes, and a subset gives those folds of the full run.
* ``ReferenceDraws`` (``--rng reference``): the reference's stream, numpy's legacy generator seeded
  once; every fold continues it, so fold ``i`` depends on every earlier fold. Their ``choice(x)`` is
  ``x[np.random.randint(len(x))]`` and their crossover takes ``choice([a, b])`` per gene; their
  ``stack_random_cand`` draws candidates ten at a time and drops the rest of a batch when a call
  ends.
"""
import random
from typing import Any, Protocol

import numpy as np


class Draws(Protocol):
    batch: int

    def below(self, n: int) -> int: ...

    def uniform(self) -> float: ...

    def either(self, a: int, b: int) -> int: ...

    @property
    def state(self) -> Any: ...

    @state.setter
    def state(self, value: Any) -> None: ...


class FoldDraws:
    """Python's ``random.Random(seed)``; ``either`` is the first value when ``random() < 0.5``."""

    batch = 1

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def below(self, n: int) -> int:
        return self.rng.randrange(n)  # the same draw as rng.choice on n items

    def uniform(self) -> float:
        return self.rng.random()

    def either(self, a: int, b: int) -> int:
        return a if self.rng.random() < 0.5 else b

    @property
    def state(self) -> list:
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    @state.setter
    def state(self, value: list) -> None:
        version, internal, gauss = value
        self.rng.setstate((version, tuple(internal), gauss))


class ReferenceDraws:
    """numpy's legacy ``RandomState(seed)``: the stream of ``np.random.seed(seed)``, drawn as the
    reference draws (``randint``, ``random_sample``, ten candidates per batch)."""

    batch = 10

    def __init__(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def below(self, n: int) -> int:
        return int(self.rng.randint(n))

    def uniform(self) -> float:
        return float(self.rng.random_sample())

    def either(self, a: int, b: int) -> int:
        return (a, b)[self.rng.randint(2)]

    @property
    def state(self) -> list:
        name, keys, pos, has_gauss, gauss = self.rng.get_state()
        return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]

    @state.setter
    def state(self, value: list) -> None:
        name, keys, pos, has_gauss, gauss = value
        self.rng.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
