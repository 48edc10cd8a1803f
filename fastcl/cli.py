"""The ``fastcl`` command: ``fastcl train ...`` (reference trainer) and ``fastcl bench ...`` (kernel profiler)."""

from __future__ import annotations

import importlib
import sys

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
    module = importlib.import_module(_COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
