"""Distillation losses: one pure function per method (``ce``, ``kd``, ``wsld``, ``dkd``, ``dist``), chosen by name in ``registry``."""
