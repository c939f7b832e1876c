"""The ``emclip`` command line: ``emclip segment``, ``emclip train``, ``emclip evaluate``, ...

Each subcommand is a module in this package exposing ``add_parser(subparsers)`` and
``run(args) -> int``; :data:`emclip.cli.main.SUBCOMMANDS` lists them. Modules import torch and
the model code only inside ``run``, so ``emclip --version`` and ``emclip --help`` stay instant.
(Nothing is imported here, so ``python -m emclip.cli.main`` runs without a double import.)
"""
