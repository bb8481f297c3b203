"""``cryoposeml <command>``: the command line the Scipion protocols, the demo and scripts use.

Each command is a module here with ``add_args(parser)`` and ``main(args)``; its help is the
module docstring. Exit codes: 0 success, 1 bad input (the message names the file and the
problem), 2 usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__

#: what the [engine] extra installs (see setup.py)
ENGINE_MODULES = {"torch", "healpy", "e3nn", "escnn", "roma", "safetensors", "sklearn"}

COMMANDS = ["simulate", "train", "predict", "cleanup", "reconstruct", "refine", "evaluate", "abinitio", "hetero", "demo"]


def add_run_options(p, reference_help: str, map_help: str, several_maps: bool = False) -> None:
    """The options of the commands that learn a map (ab initio, heterogeneity) besides their
    configuration: the truth they are measured against (metrics only) and ``--resume``."""
    p.add_argument("--reference", help=reference_help)
    p.add_argument("--reference-map", help=map_help, **({"nargs": "+", "default": []} if several_maps else {}))
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (it ends as an "
                   "uninterrupted run would)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, given ``command``, of that one only: the others are then
    listed but their modules (and the engine they import: torch, healpy, e3nn ...) not loaded, which
    saves seconds on every call."""
    parser = argparse.ArgumentParser(prog="cryoposeml", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"cryoposeml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if command is not None and name != command:
            sub.add_parser(name)
            continue
        module = importlib.import_module(f".{name}", __name__)
        doc = module.__doc__ or ""
        p = sub.add_parser(name, help=doc.strip().split("\n")[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        module.add_args(p)
        p.set_defaults(_main=module.main)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names (its first word), if it is one; else None (``--help``, a typo)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv=None) -> int:
    from ..core.errors import InputError

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser(_command_of(argv)).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args._main(args)
    except InputError as e:
        print(f"cryoposeml {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cryoposeml {args.command}: interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        if getattr(e, "name", None) in ENGINE_MODULES or "engine" in str(e):
            print(f"cryoposeml {args.command}: error: the engine is not installed in {sys.executable} ({e}); "
                  "install it with: pip install 'scipion-em-cryoposeml[engine]'", file=sys.stderr)
            return 1
        raise
    return 0


def console_main() -> None:
    sys.exit(main())
