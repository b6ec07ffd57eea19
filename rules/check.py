"""``stellwerk check ROUTING.yaml``: validate a routing file and its experts file.

Exit 0 with a one-line summary on stdout, or exit 1 with one ``file:line:column: message`` line
per problem on stderr.
"""

from __future__ import annotations

import argparse
import sys

from rules.load import RoutingFileError, load_routing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-command's arguments."""
    parser.add_argument("routing", metavar="ROUTING.yaml", help="the routing file to validate")


def run(args: argparse.Namespace) -> int:
    """Validate; print the summary or the problems."""
    try:
        table = load_routing(args.routing)
    except RoutingFileError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    file = table.file
    print(
        f"{args.routing}: ok: {len(file.rules)} rules, {len(file.queues)} queues,"
        f" {len(file.agents)} agents, {len(table.experts)} experts, {len(file.skills)} skills"
    )
    return 0
