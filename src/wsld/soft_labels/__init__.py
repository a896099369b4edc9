"""Offline teacher soft labels with crop replay (Fast Knowledge Distillation, Shen & Xing, ECCV 2022)."""
