"""2- to 4-bit quantizers with straight-through gradients."""
from .clip import ClipActivation
from .conv import QConv
from .lsq import LsqActivation, LsqWeight

__all__ = ["ClipActivation", "LsqActivation", "LsqWeight", "QConv"]
