"""``make reliability``: run every fault (or ``--only`` some), print the books, exit 1 if anything was lost.

``python -m reliability.run [--quick] [--only kill-batch,webhook-down,...] [--webhook-down-s 180] [--json FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from rich.console import Console

from pipelines.demo_data import Simulator
from pipelines.embedded import EmbeddedBroker
from reliability import faults, fuzz
from reliability.books import Row, render
from reliability.mechanics import new_webhook_secret, reference_rows
from tests.servers.postgres import PrivatePostgres

FAULTS: dict[str, Callable[[faults.Context], list[Row]]] = {
    "kill-batch": faults.kill_batch,
    "kill-stream": faults.kill_stream,
    "webhook-down": faults.webhook_down,
    "webhook-slow": faults.webhook_slow,
    "webhook-answers": faults.webhook_errors,
    "broker-restart": faults.broker_restart,
    "database-restart": faults.database_restart,
    "hostile-events": fuzz.hostile_events,
    "hostile-requests": fuzz.hostile_requests,
}


@contextlib.contextmanager
def context(settings: faults.Settings, workdir: Path | None = None) -> Iterator[faults.Context]:
    """The shared components (broker, private PostgreSQL) and the clean reference run, torn down after."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hf-reliability-")))
        secret = new_webhook_secret()
        payloads = list(Simulator(users=settings.users, days=settings.days).payloads())
        broker = stack.enter_context(EmbeddedBroker())
        postgres = stack.enter_context(PrivatePostgres())
        reference = reference_rows(workdir / "reference", payloads, secret)
        yield faults.Context(workdir, settings, secret, broker, postgres, payloads, reference)


def run_faults(names: Sequence[str], settings: faults.Settings, workdir: Path | None = None,
               console: Console | None = None) -> list[Row]:
    """Run the named faults in order on one context; a fault that raises becomes a crashed row."""
    rows: list[Row] = []
    with context(settings, workdir) as ctx:
        for name in names:
            started = time.monotonic()
            try:
                produced = FAULTS[name](ctx)
            except Exception as exc:  # the harness reports, it does not stop
                produced = [Row(name, "-", "-", crashed=1).note(f"harness: {type(exc).__name__}: {exc}"[:300])]
            if console is not None:
                console.log(f"{name}: {time.monotonic() - started:.0f} s, "
                            f"{'ok' if all(r.ok for r in produced) else 'FAILED'}")
            rows.extend(produced)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the bounded form (small sizes, short outages)")
    parser.add_argument("--only", help=f"comma-separated faults out of: {', '.join(FAULTS)}")
    parser.add_argument("--webhook-down-s", type=float, help="how long the webhook is down")
    parser.add_argument("--database-down-s", type=float, help="how long PostgreSQL is down")
    parser.add_argument("--broker-down-s", type=float, help="how long the broker is down")
    parser.add_argument("--hostile-events", type=int, help="size of the hostile raw-event corpus")
    parser.add_argument("--hostile-requests", type=int, help="number of hostile API requests")
    parser.add_argument("--workdir", type=Path, help="keep logs, dead letters and databases' files here")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    settings = faults.Settings.quick() if args.quick else faults.Settings()
    for option in ("webhook_down_s", "database_down_s", "broker_down_s", "hostile_events", "hostile_requests"):
        if getattr(args, option) is not None:
            setattr(settings, option, getattr(args, option))
    names = args.only.split(",") if args.only else list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}: choose from {', '.join(FAULTS)}")
    console = Console(width=200)
    rows = run_faults(names, settings, args.workdir, console)
    render(rows, console)
    if args.json:
        args.json.write_text(json.dumps([{**dataclasses.asdict(r), "ok": r.ok} for r in rows], indent=1))
    failed = [r for r in rows if not r.ok]
    console.print(f"{len(rows) - len(failed)}/{len(rows)} rows hold" + (": FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
