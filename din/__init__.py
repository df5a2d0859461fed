"""The Deep Interest Network (Zhou et al., KDD 2018) built on din_kernels' public ops."""
from .model import DIN, BaseModel, ModelConfig, build_model
from .serve import Scorer

__all__ = ["DIN", "BaseModel", "ModelConfig", "Scorer", "build_model"]
