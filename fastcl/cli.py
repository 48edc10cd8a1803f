"""The ``fastcl`` command: ``fastcl train ...`` (reference trainer), ``fastcl bench ...`` (kernel profiler), ...

Exit status: 0 done, 2 a usage error (the message names the option), 1 a missing extra (one line naming it:
``pip install 'fastcl[train]'``) or a run that produced nothing.
"""

from __future__ import annotations

import importlib
import sys

from fastcl._extras import MissingExtraError

_COMMANDS = {
    "train": ("fastcl.train", "train a SimCLR / SupCon / DirectCLR model (fastcl train --help)"),
    "bench": ("fastcl.profiler", "time and profile the losses side by side (fastcl bench --help)"),
    "repro": ("fastcl.repro", "reproduce a paper's finding, with verdicts (fastcl repro --list)"),
    "doctor": ("fastcl.doctor", "environment, backends and the fused kernels' self-check (fastcl doctor --help)"),
}


def _usage() -> str:
    lines = [f"usage: fastcl {{{','.join(_COMMANDS)}}} [options]", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a bare `fastcl` is a usage error, as argparse treats a missing subcommand
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fastcl import __version__

        print(f"fastcl {__version__}")
        return 0
    if argv[0] not in _COMMANDS:
        print(f"fastcl: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:  # an extra's module raises on import (even for --help) or when a feature first needs it
        module = importlib.import_module(_COMMANDS[argv[0]][0])
        return module.main(argv[1:]) or 0
    except MissingExtraError as error:
        print(f"fastcl {argv[0]}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
