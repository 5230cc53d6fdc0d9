"""The ``swinv2`` command line: one function per subcommand over the library.

Each group of subcommands is a module that adds its parsers (``add_parsers``) and holds one
``cmd_*`` function per subcommand, which checks its arguments, calls the library and prints.
:func:`main` turns the errors a user can fix (bad values, missing files or extras, unwritable
outputs) into one line on stderr and exit code 2; anything else is a bug and shows in full.
"""

from __future__ import annotations

import sys

from ..hub import DownloadError
from . import conversion, inference, measure, models, training
from .common import (
    MissingExtraError,
    Parser,
    UsageError,
    describe_os_error,
    missing_extra,
    missing_optional,
    require,
)

GROUPS = (models, conversion, inference, training, measure)  # in the order --help lists them
# Optional modules a command needs whatever its arguments, checked before it starts (commands
# whose needs depend on their arguments check them themselves, with ``require``).
NEEDS = {"reconstruct": ("matplotlib",)}


def build_parser() -> Parser:
    parser = Parser(prog="swinv2", description="Swin Transformer V2 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(f"swinv2: error: {err}", file=sys.stderr)
        return 2
    try:
        require(args.command, *NEEDS.get(args.command, ()))
        return args.func(args)
    except MissingExtraError as err:
        print(f"swinv2: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        missing = missing_optional(err)
        if missing is None:
            raise
        print(f"swinv2: error: {missing_extra(args.command, missing)}", file=sys.stderr)
        return 2
    except (ValueError, DownloadError) as err:  # incl. checkpoint and config errors
        print(f"swinv2: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file that cannot be read or written (missing, read-only, disk full, ...)
        print(f"swinv2: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
