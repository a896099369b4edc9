"""wsld: knowledge distillation of image classifiers with Weighted Soft Label Distillation."""

__version__ = "0.1.0"
