"""The books of one fault: per destination, events in = delivered + dead-lettered + lost, by event id."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table


@dataclass
class Row:
    """One line of the table: what was injected, what went in and where each event ended up.

    ``lost`` is what is neither at the destination nor in its dead letters; ``duplicates`` counts extra rows at an
    upsert destination (a webhook's redeliveries are at-least-once and reported, not counted); ``crashed`` counts a
    process that ended on its own or a request answered 5xx; ``hung`` counts what did not answer in time; ``kept``
    is false when the fault's own promise broke (the notes say which).
    """

    fault: str
    destination: str
    injected: str
    events_in: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicates: int = 0
    crashed: int = 0
    hung: int = 0
    recover_s: float | None = None
    kept: bool = True  # the fault's own promise: others on time, the backlog drained, the controls unchanged
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.crashed == 0 and self.hung == 0 and self.kept

    def note(self, text: str) -> Row:
        self.notes.append(text)
        return self


def balance(fault: str, destination: str, injected: str, expected: Iterable[str], delivered: Iterable[str],
            dead_lettered: Iterable[str]) -> Row:
    """Books by event id: each expected id is delivered, else dead-lettered, else lost."""
    expected_ids, delivered_ids = set(expected), set(delivered)
    arrived = expected_ids & delivered_ids
    parked = (expected_ids - arrived) & set(dead_lettered)
    return Row(fault, destination, injected, events_in=len(expected_ids), delivered=len(arrived),
               dead_lettered=len(parked), lost=len(expected_ids - arrived - parked))


def render(rows: Sequence[Row], console: Console | None = None) -> None:
    """Print the table (fault, injected, in, delivered, dead-lettered, lost, duplicates, crashes/hangs, recovery)."""
    table = Table(title="make reliability: every event accounted for by id")
    for name, justify in (("fault", "left"), ("destination", "left"), ("injected", "left"), ("in", "right"),
                          ("delivered", "right"), ("dead-lettered", "right"), ("lost", "right"),
                          ("dup", "right"), ("crash/hang", "right"), ("time to recover", "right"),
                          ("result", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        recover = "-" if row.recover_s is None else f"{row.recover_s:.1f} s"
        verdict = "[green]ok[/]" if row.ok else "[red]FAIL[/]"
        if row.notes:
            verdict += " " + "; ".join(row.notes)
        table.add_row(row.fault, row.destination, row.injected, str(row.events_in), str(row.delivered),
                      str(row.dead_lettered), str(row.lost), str(row.duplicates), f"{row.crashed}/{row.hung}",
                      recover, verdict)
    (console or Console(width=200)).print(table)
