"""``stellwerk experts report``: the crowd's health, as a community manager needs it.

Asks a running daemon (``GET /v1/experts``) and prints a summary — how many experts were active
in the last day, in the last week, inactive for longer, never seen, never answered — then one
row per expert: level, activity, when last seen, answers given in the community, and how the
expert's own contacts to the company went (answered / abandoned, mean and longest wait).
``--json`` prints the daemon's report unchanged, for scripts.

The daemon is found by ``--url``, else ``$STELLWERK_HTTP_ADDR``, else the ``http.addr`` of the
settings file (``--config``, ``$STELLWERK_CONFIG`` or ``config/stellwerk.yaml``). A daemon that
cannot be reached, or does not route (a standby), is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "config/stellwerk.yaml"
TIMEOUT = 10.0
ACTIVITY_ORDER = ("active_day", "active_week", "inactive", "never_seen")
ACTIVITY_LABEL = {
    "active_day": "today",
    "active_week": "this week",
    "inactive": "inactive",
    "never_seen": "never seen",
}


class ReportError(Exception):
    """The report could not be fetched; the message is the one line the user sees."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``experts`` sub-command's options."""
    parser.add_argument(
        "action",
        choices=["report"],
        help="report: the experts' activity, answers and own contacts' waits",
    )
    parser.add_argument(
        "--url",
        help="the daemon's HTTP base URL (default: http://$STELLWERK_HTTP_ADDR, else the "
        "http.addr of the settings file)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("STELLWERK_CONFIG"),
        help="settings file to take the HTTP address from (default: $STELLWERK_CONFIG, else "
        "config/stellwerk.yaml when it exists)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="a supervisor (or admin) bearer token (default: $STELLWERK_TOKEN, else "
        "$STELLWERK_ADMIN_TOKEN); better from the environment than on the command line",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``stellwerk experts``."""
    try:
        url = args.url or default_url(args.config)
        token = (
            args.token
            or os.environ.get("STELLWERK_TOKEN")
            or os.environ.get("STELLWERK_ADMIN_TOKEN")
        )
        report = fetch_report(url, token)
    except ReportError as exc:
        print(f"stellwerk experts: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report, time.time(), source=url))
    return 0


def default_url(config: str | None) -> str:
    """The daemon's base URL from the environment or the settings file."""
    addr = os.environ.get("STELLWERK_HTTP_ADDR")
    if addr is None:
        # Imported here: the settings module is only needed when no address was given.
        from router.daemon.config import SettingsError, load_settings

        path = config
        if path is None and Path(DEFAULT_CONFIG).is_file():
            path = DEFAULT_CONFIG
        try:
            addr = load_settings(path).settings.http.addr
        except SettingsError as exc:
            raise ReportError("; ".join(str(p) for p in exc.problems)) from None
    if not addr:
        raise ReportError("the daemon's HTTP server is off (http.addr is empty); pass --url")
    host, _, port = addr.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"  # listening on every interface: this host is one of them
    return f"http://{host}:{port}"


def fetch_report(base_url: str, token: str | None = None) -> dict[str, Any]:
    """``GET {base_url}/v1/experts``, decoded; ReportError with a readable reason otherwise."""
    url = base_url.rstrip("/") + "/v1/experts"
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc.read())
        if exc.code == 503:
            raise ReportError(
                f"{base_url} does not route right now ({detail}); ask the daemon that holds "
                "the routing lease"
            ) from None
        if exc.code in (401, 403):
            raise ReportError(
                f"{url}: HTTP {exc.code} {detail} (a supervisor token: --token or $STELLWERK_TOKEN)"
            ) from None
        raise ReportError(f"{url}: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReportError(f"cannot reach the daemon at {base_url}: {reason}") from None
    try:
        report = json.loads(body)
    except ValueError:
        raise ReportError(f"{url} did not answer with JSON") from None
    if not isinstance(report, dict) or not isinstance(report.get("experts"), list):
        raise ReportError(f"{url} did not answer with an experts report")
    return report


def _error_detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(data, dict):
        return str(data.get("detail") or data.get("error") or "")
    return ""


def ago(then: float | None, now: float) -> str:
    """``"3 d ago"``, ``"5 h ago"``, ``"12 min ago"``, ``"just now"``; ``"never"`` for None."""
    if then is None:
        return "never"
    seconds = max(0.0, now - then)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86_400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86_400)} d ago"


def duration(seconds: float | None) -> str:
    """A wait for people: ``"8 s"``, ``"2.5 min"``, ``"1.2 h"``; ``"-"`` when there is none."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_report(report: dict[str, Any], now: float, *, source: str = "") -> str:
    """The report as text: the summary, then one row per expert (most active first)."""
    s = report.get("summary", {})
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now))
    lines = [f"Crowd experts — {stamp}" + (f" — {source}" if source else ""), ""]
    total = int(s.get("experts", 0))

    def share(n: int) -> str:
        return f"{n:>4}  ({100 * n / total:.0f} %)" if total else f"{n:>4}"

    lines += [
        f"  experts                      {total:>4}",
        f"  active in the last day       {share(int(s.get('active_day', 0)))}",
        f"  active in the last week      {share(int(s.get('active_week', 0)))}"
        "   (not in the last day)",
        f"  inactive for longer          {share(int(s.get('inactive', 0)))}",
        f"  never seen                   {share(int(s.get('never_seen', 0)))}",
        f"  never answered               {share(int(s.get('never_answered', 0)))}",
        "",
    ]
    rows = sorted(
        report.get("experts", []),
        key=lambda r: (
            ACTIVITY_ORDER.index(r["activity"]) if r.get("activity") in ACTIVITY_ORDER else 9,
            -int(r.get("answers") or 0),
            str(r.get("name") or r.get("id")),
        ),
    )
    if not rows:
        lines.append("No experts registered (routing file `experts:` or PUT /v1/experts/{id}).")
        return "\n".join(lines)
    header = (
        "NAME",
        "ID",
        "LVL",
        "ACTIVITY",
        "LAST SEEN",
        "ANSWERS",
        "OWN CONTACTS",
        "ANSWERED",
        "ABANDONED",
        "MEAN WAIT",
        "MAX WAIT",
    )
    table = [header]
    for r in rows:
        table.append(
            (
                str(r.get("name") or "-"),
                str(r.get("id")),
                str(r.get("level", "")),
                ACTIVITY_LABEL.get(str(r.get("activity")), str(r.get("activity"))),
                ago(r.get("last_seen"), now),
                str(r.get("answers", 0)),
                str(r.get("contacts", 0)),
                str(r.get("answered", 0)),
                str(r.get("abandoned", 0)),
                duration(r.get("mean_wait")),
                duration(r.get("max_wait")),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = {2, 5, 6, 7, 8, 9, 10}
    for row in table:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
