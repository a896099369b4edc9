"""Sub-commands of the wsld CLI, and ``lazy_choices`` for parser modules that must not import torch.

``wsld.cli`` imports every ``wsld.commands.*`` module to build its parser, so a parser module
imports only the standard library and light wsld modules at top level; torch and the modules that
need it are imported inside the command's ``func``. ``tests/test_data_cli_light.py`` checks it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence


class lazy_choices(Sequence):
    """argparse ``choices`` read from ``module.attr`` when first consulted (parsing or help of that
    sub-command), not when the parser is built; give the argument a ``metavar`` so that building
    the parser does not list them."""

    def __init__(self, module: str, attr: str):
        self._where = (module, attr)
        self._values: list[str] | None = None

    def _load(self) -> list[str]:
        if self._values is None:
            module, attr = self._where
            self._values = list(getattr(importlib.import_module(module), attr))
        return self._values

    def __getitem__(self, i):
        return self._load()[i]

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, value: object) -> bool:
        return value in self._load()
