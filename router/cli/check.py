"""``stellwerk check ROUTING.yaml``: validate a routing file and its experts file.

Exit 0 with a one-line summary on stdout, or exit 1 with one ``file:line:column: message`` line
per problem on stderr.
"""

from __future__ import annotations

import argparse
import sys

from rules.load import load_routing_or_problems
from rules.table import RoutingTable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-command's arguments."""
    parser.add_argument("routing", metavar="ROUTING.yaml", help="the routing file to validate")


def load_or_report(path: str, prefix: str = "") -> RoutingTable | None:
    """The routing table, or None after printing each problem (``file:line:column: message``)
    on stderr: what every command that takes a routing file does with a bad one."""
    table, problems = load_routing_or_problems(path)
    for problem in problems:
        print(f"{prefix}{problem}", file=sys.stderr)
    return table


def run(args: argparse.Namespace) -> int:
    """Validate; print the summary or the problems."""
    table = load_or_report(args.routing)
    if table is None:
        return 1
    file = table.file
    print(
        f"{args.routing}: ok: {len(file.rules)} rules, {len(file.queues)} queues,"
        f" {len(file.agents)} agents, {len(table.experts)} experts, {len(file.skills)} skills"
    )
    return 0
