"""Sub-commands of the wsld CLI, and ``one_of`` for parser modules that must not import torch.

``wsld.cli`` imports every ``wsld.commands.*`` module to build its parser, so a parser module
imports only the standard library and light wsld modules at top level; torch and the modules that
need it are imported inside the command's ``func``. ``tests/test_data_cli_light.py`` checks it.
"""

from __future__ import annotations

import argparse
import importlib


class one_of:
    """argparse ``type`` accepting only the names in ``module.attr``, read when a value is parsed
    (argparse reads ``choices`` to build any help text, which would import ``module`` and its torch)."""

    def __init__(self, module: str, attr: str):
        self.module, self.attr = module, attr
        self.__name__ = attr.lower()  # argparse names the type in some errors

    def __call__(self, text: str) -> str:
        allowed = list(getattr(importlib.import_module(self.module), self.attr))
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from {', '.join(map(repr, allowed))})")
        return text
