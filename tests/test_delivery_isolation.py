"""Delivery contains a poison event: a batch a sink refuses as a whole for its content is written again event by
event, so only the event it cannot take is dead-lettered and the rest of the batch is delivered, in order."""

from __future__ import annotations

from collections.abc import Sequence

from core.events import NormalizedEvent
from sinks.base import Sink, SinkResult
from sinks.policy import RetryPolicy, Target
from transforms.deliver import DeadLettered, Delivered, Delivery


class RefusesWholeBatches(Sink):
    """A sink that, like a driver refusing a statement, raises for a whole batch holding one value it cannot take."""

    def __init__(self) -> None:
        super().__init__("strict")
        self.written: list[str] = []

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        if any(event.data.get("note") == "poison" for event in events):
            raise ValueError("value out of range for this destination")
        self.written.extend(event.natural_key for event in events)
        return SinkResult(delivered=[event.event_id for event in events])


def _event(n: int, note: str) -> NormalizedEvent:
    return NormalizedEvent.create(
        type="daily", user={"user_id": "u1", "provider": "OURA"}, natural_key=f"day-{n}", ordering_timestamp_ms=n,
        sequence=f"{n:05d}", raw_idempotency_key=f"raw-{n}",
        data={"metadata": {"start_time": f"2024-01-{n:02d}T00:00:00+00:00",
                           "end_time": f"2024-01-{n + 1:02d}T00:00:00+00:00", "upload_type": 1}, "note": note})


def test_one_poison_event_fails_alone_and_the_rest_of_its_batch_is_delivered_in_order() -> None:
    sink = RefusesWholeBatches()
    events = [_event(n, "poison" if n == 3 else "ok") for n in range(1, 7)]
    outcomes = list(Delivery(Target(sink, RetryPolicy(max_attempts=1))).deliver(events))
    delivered = [o.event_id for o in outcomes if isinstance(o, Delivered)]
    dead = [o for o in outcomes if isinstance(o, DeadLettered)]
    assert delivered == [e.event_id for e in events if e.natural_key != "day-3"]
    assert sink.written == ["day-1", "day-2", "day-4", "day-5", "day-6"]
    assert len(dead) == 1 and dead[0].record["event_id"] == events[2].event_id
    assert "value out of range" in dead[0].record["error_message"]
