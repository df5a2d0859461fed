"""din-kernels: the Deep Interest Network's hot paths as fused ops for PyTorch.

Public API (see DESIGN.md): ``din_attention`` / ``LocalActivationUnit`` (local activation unit),
``dice`` / ``Dice``, ``dice_mlp`` / ``DiceMLP`` (DIN's head: Linear and Dice layers as one op), the MBA
regularisation ops, ``set_backend``, and for the C++ CPU ops (local activation unit, Dice, the head)
``cpu_op_available`` and ``set_cpu_threads`` / ``get_cpu_threads``;
``set_length_check("device")`` checks lengths without a host sync (CUDA graphs); ``explain(...)`` says which
path a ``din_attention`` call takes and why; ``ACTIVATIONS`` names the local activation unit's activations,
``MBA_OPTIMIZERS`` the optimizers ``MBAEmbedding`` fuses into its backward; ``embedding_concat`` looks up
several plain tables into one concatenated output (DIN's item vector) with a fast dense gradient.
"""
from ._backend import get_backend, set_backend
from .activations import ACTIVATIONS
from ._checks import get_length_check, set_length_check
from .attention import LocalActivationUnit, din_attention, explain
from .cpu_extension import available as cpu_op_available
from .cpu_extension import get_num_threads as get_cpu_threads
from .cpu_extension import set_num_threads as set_cpu_threads
from .dice import Dice, dice
from .embedding import embedding_concat
from .mlp import DiceMLP, dice_mlp
from .mba import MBA_OPTIMIZERS, MBAEmbedding, inverse_frequencies, mba_adagrad_, mba_embedding, mba_sgd_, row_frequencies

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "MBA_OPTIMIZERS",
    "Dice",
    "DiceMLP",
    "LocalActivationUnit",
    "MBAEmbedding",
    "dice",
    "dice_mlp",
    "cpu_op_available",
    "embedding_concat",
    "din_attention",
    "explain",
    "get_cpu_threads",
    "get_backend",
    "get_length_check",
    "inverse_frequencies",
    "mba_adagrad_",
    "mba_embedding",
    "mba_sgd_",
    "row_frequencies",
    "set_backend",
    "set_cpu_threads",
    "set_length_check",
]
