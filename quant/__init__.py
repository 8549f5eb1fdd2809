"""2- to 4-bit quantizers with straight-through gradients."""
from . import fused
from .clip import ClipActivation
from .conv import QConv
from .lsq import LsqActivation, LsqWeight

__all__ = ["fused", "ClipActivation", "LsqActivation", "LsqWeight", "QConv"]
