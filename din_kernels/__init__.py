"""din-kernels: the Deep Interest Network's hot paths as fused ops for PyTorch.

Public API (see DESIGN.md): ``din_attention`` / ``LocalActivationUnit`` (local activation unit),
``dice`` / ``Dice``, the MBA regularisation ops, and ``set_backend``.
"""
from ._backend import get_backend, set_backend
from .attention import LocalActivationUnit, din_attention
from .dice import Dice, dice
from .mba import MBAEmbedding, inverse_frequencies, mba_adagrad_, mba_embedding, mba_sgd_, row_frequencies

__version__ = "0.1.0"

__all__ = [
    "Dice",
    "LocalActivationUnit",
    "MBAEmbedding",
    "dice",
    "din_attention",
    "get_backend",
    "inverse_frequencies",
    "mba_adagrad_",
    "mba_embedding",
    "mba_sgd_",
    "row_frequencies",
    "set_backend",
]
