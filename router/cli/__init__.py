"""The ``stellwerk`` command line: one sub-command per job, each owned by the module that does it.

Every sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when chosen, so ``stellwerk check`` does not pay for the daemon's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("router.daemon.main", "run the routing daemon"),
    "check": (
        "router.cli.check",
        "validate a routing file (exit 0, or 1 with file:line:column errors)",
    ),
    "explain": ("router.cli.explain", "show which rule routes a ContactEvent, and why"),
    "normalize": ("router.cli.normalize", "turn one native payload into ContactEvent JSON"),
    "simulate": ("router.cli.simulate", "run the engine on virtual time and report per queue"),
    "replay": ("router.cli.replay", "run a recorded journal against a routing file"),
    "loadgen": ("router.cli.loadgen", "drive a running daemon with realistic traffic"),
    "experts": ("router.cli.experts", "the crowd's health: experts' activity and waits"),
    "broker-config": (
        "router.daemon.broker_config",
        "MQTT accounts + ACLs for Mosquitto and HTTP tokens, from a routing file",
    ),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    """Build the parser; only the chosen sub-command's module is imported."""
    # The docstring's first line, without its reStructuredText literal markup.
    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="stellwerk", description=description)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (path, help_text) in SUBCOMMANDS.items():
        sub = subs.add_parser(name, help=help_text)
        if name == chosen:
            try:
                module = importlib.import_module(path)
            except ModuleNotFoundError as exc:
                if exc.name != path:
                    raise
                parser.error(f"'{name}' is not available in this build")
            sub.description = help_text
            module.add_arguments(sub)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stellwerk`` console script."""
    args_list = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(args_list)
    args = parser.parse_args(args_list)
    assert module is not None
    return int(module.run(args))  # type: ignore[attr-defined]
