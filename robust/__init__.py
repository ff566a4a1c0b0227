"""robust: adversarially robust image classifiers with PyTorch Lightning."""

from robust.export import load_model

__all__ = ["load_model"]
