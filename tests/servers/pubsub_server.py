"""An in-process gRPC Pub/Sub server for tests, speaking google-cloud-pubsub's own wire types on loopback.

google-cloud-pubsub ships no ``*_pb2_grpc`` servicer bases (its GAPIC layer uses proto-plus types), so the services
are registered as generic gRPC handlers for ``google.pubsub.v1.Publisher`` and ``google.pubsub.v1.Subscriber``,
(de)serialising with the protobuf classes behind ``google.pubsub_v1.types`` (exactly what the real client sends).

Implemented: Publisher ``CreateTopic``, ``GetTopic``, ``Publish``; Subscriber ``CreateSubscription``,
``GetSubscription``, ``Pull``, ``Acknowledge``, ``ModifyAckDeadline``. Anything else answers UNIMPLEMENTED.

Semantics (close enough to Pub/Sub for sink tests):
- ``Publish`` to a missing topic -> NOT_FOUND; each message gets a unique ``message_id`` and ``publish_time``; every
  published message is kept in ``messages(topic)`` in arrival order (ordering keys, attributes and data intact).
- A subscription receives the messages published to its topic after it was created, in publish order. ``Pull`` leases
  up to ``max_messages`` unacknowledged messages for the subscription's ack deadline; ``Acknowledge`` removes them.
- Failure injection: ``fail_publish(code, times, topic=, ordering_key=)`` makes the next ``times`` matching ``Publish``
  RPCs fail with ``code`` (nothing of a failed RPC is stored).

Usage::

    with PubSubTestServer() as server:            # 127.0.0.1:<free port>
        server.create_topic("projects/p/topics/t")
        PubSubSink("ps", "p", "t", emulator_host=server.host)   # or PUBSUB_EMULATOR_HOST=server.host

In a process of its own (``make bench``)::

    python -m tests.servers.pubsub_server --topic projects/p/topics/t   # prints PUBSUB_EMULATOR_HOST=127.0.0.1:<port>
                                                                         # once listening; serves until stdin closes
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.pubsub_v1 import types as pubsub_types

_Topic = pubsub_types.Topic.pb()
_GetTopicRequest = pubsub_types.GetTopicRequest.pb()
_PublishRequest = pubsub_types.PublishRequest.pb()
_PublishResponse = pubsub_types.PublishResponse.pb()
_PubsubMessage = pubsub_types.PubsubMessage.pb()
_Subscription = pubsub_types.Subscription.pb()
_GetSubscriptionRequest = pubsub_types.GetSubscriptionRequest.pb()
_PullRequest = pubsub_types.PullRequest.pb()
_PullResponse = pubsub_types.PullResponse.pb()
_AcknowledgeRequest = pubsub_types.AcknowledgeRequest.pb()
_ModifyAckDeadlineRequest = pubsub_types.ModifyAckDeadlineRequest.pb()


@dataclass
class _Rule:
    code: grpc.StatusCode
    remaining: int
    topic: str | None
    ordering_key: str | None
    message: str

    def matches(self, request: Any) -> bool:
        if self.remaining <= 0 or (self.topic is not None and request.topic != self.topic):
            return False
        return self.ordering_key is None or any(m.ordering_key == self.ordering_key for m in request.messages)


@dataclass
class _SubscriptionState:
    subscription: Any
    pending: list[Any] = field(default_factory=list)  # PubsubMessage, publish order
    leases: dict[str, tuple[Any, float]] = field(default_factory=dict)  # ack_id -> (message, lease expiry)


class PubSubTestServer:
    """A Pub/Sub Publisher + Subscriber on ``127.0.0.1:<free port>``; ``host`` is the ``PUBSUB_EMULATOR_HOST`` value."""

    def __init__(self, pull_wait_s: float = 0.5, max_workers: int = 16) -> None:
        self.pull_wait_s = pull_wait_s
        self.max_workers = max_workers
        self.host = ""
        self.port = 0
        self.publish_calls = 0
        self._server: grpc.Server | None = None
        self._cond = threading.Condition()
        self._topics: dict[str, Any] = {}
        self._messages: dict[str, list[Any]] = {}
        self._subscriptions: dict[str, _SubscriptionState] = {}
        self._rules: list[_Rule] = []
        self._ids = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------------------------------
    def start(self) -> PubSubTestServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers))
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("google.pubsub.v1.Publisher", {
                "CreateTopic": _unary(self._create_topic, _Topic),
                "GetTopic": _unary(self._get_topic, _GetTopicRequest),
                "Publish": _unary(self._publish, _PublishRequest),
            }),
            grpc.method_handlers_generic_handler("google.pubsub.v1.Subscriber", {
                "CreateSubscription": _unary(self._create_subscription, _Subscription),
                "GetSubscription": _unary(self._get_subscription, _GetSubscriptionRequest),
                "Pull": _unary(self._pull, _PullRequest),
                "Acknowledge": _unary(self._acknowledge, _AcknowledgeRequest),
                "ModifyAckDeadline": _unary(self._modify_ack_deadline, _ModifyAckDeadlineRequest),
            }),
        ))
        self.port = server.add_insecure_port("127.0.0.1:0")
        if not self.port:
            raise RuntimeError("could not bind the Pub/Sub test server on 127.0.0.1")
        server.start()
        self._server = server
        self.host = f"127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> PubSubTestServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- test helpers --------------------------------------------------------------------------------------------------
    def create_topic(self, name: str) -> None:
        """Create ``projects/<p>/topics/<t>`` directly (no-op when it exists)."""
        with self._cond:
            if name not in self._topics:
                self._topics[name] = _Topic(name=name)
                self._messages[name] = []

    def create_subscription(self, name: str, topic: str, ack_deadline_seconds: int = 10) -> None:
        """Create ``projects/<p>/subscriptions/<s>`` on an existing topic directly (no-op when it exists)."""
        with self._cond:
            if topic not in self._topics:
                raise KeyError(f"topic {topic} does not exist")
            if name not in self._subscriptions:
                sub = _Subscription(name=name, topic=topic, ack_deadline_seconds=ack_deadline_seconds)
                self._subscriptions[name] = _SubscriptionState(sub)

    def fail_publish(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, times: int = 1, *,
                     topic: str | None = None, ordering_key: str | None = None,
                     message: str = "injected failure") -> None:
        """The next ``times`` Publish RPCs (of ``topic`` / holding ``ordering_key`` when given) fail with ``code``."""
        with self._cond:
            self._rules.append(_Rule(code, times, topic, ordering_key, message))

    def clear_failures(self) -> None:
        with self._cond:
            self._rules.clear()

    def outstanding(self, subscription: str) -> int:
        """Messages of ``subscription`` not acknowledged yet (waiting or leased)."""
        with self._cond:
            state = self._subscriptions[subscription]
            return len(state.pending) + len(state.leases)

    def leased(self, subscription: str) -> int:
        """Messages of ``subscription`` pulled and not acknowledged (in flight at a subscriber)."""
        with self._cond:
            return len(self._subscriptions[subscription].leases)

    def messages(self, topic: str) -> list[Any]:
        """Copies of every PubsubMessage stored for ``topic``, in publish order."""
        with self._cond:
            return [_copy(m) for m in self._messages.get(topic, [])]

    # -- Publisher -----------------------------------------------------------------------------------------------------
    def _create_topic(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            if request.name in self._topics:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"Topic already exists: {request.name}")
            self._topics[request.name] = _copy(request)
            self._messages[request.name] = []
            return _copy(request)

    def _get_topic(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            topic = self._topics.get(request.topic)
            if topic is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Resource not found (resource={request.topic}).")
            return _copy(topic)

    def _publish(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            self.publish_calls += 1
            for rule in self._rules:
                if rule.matches(request):
                    rule.remaining -= 1
                    context.abort(rule.code, rule.message)
            if request.topic not in self._topics:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Resource not found (resource={request.topic}).")
            if not request.messages:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "The request contains no messages.")
            ids: list[str] = []
            now = time.time()
            for incoming in request.messages:
                if not incoming.data and not incoming.attributes:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "A message must have data or attributes.")
            for incoming in request.messages:
                message = _copy(incoming)
                message.message_id = str(next(self._ids))
                message.publish_time.FromNanoseconds(int(now * 1e9))
                self._messages[request.topic].append(message)
                for state in self._subscriptions.values():
                    if state.subscription.topic == request.topic:
                        state.pending.append(message)
                ids.append(message.message_id)
            self._cond.notify_all()
            return _PublishResponse(message_ids=ids)

    # -- Subscriber ----------------------------------------------------------------------------------------------------
    def _create_subscription(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            if request.name in self._subscriptions:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"Subscription already exists: {request.name}")
            if request.topic not in self._topics:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Resource not found (resource={request.topic}).")
            sub = _copy(request)
            if not sub.ack_deadline_seconds:
                sub.ack_deadline_seconds = 10
            self._subscriptions[request.name] = _SubscriptionState(sub)
            return _copy(sub)

    def _get_subscription(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            state = self._subscriptions.get(request.subscription)
            if state is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Resource not found (resource={request.subscription}).")
            return _copy(state.subscription)

    def _pull(self, request: Any, context: grpc.ServicerContext) -> Any:
        deadline = time.monotonic() + self.pull_wait_s
        with self._cond:
            while True:
                state = self._subscriptions.get(request.subscription)
                if state is None:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"Resource not found (resource={request.subscription}).")
                now = time.monotonic()
                for ack_id, (message, expiry) in list(state.leases.items()):  # expired leases are redelivered first
                    if expiry <= now:
                        del state.leases[ack_id]
                        state.pending.insert(0, message)
                if state.pending or now >= deadline or request.return_immediately:
                    break
                self._cond.wait(deadline - now)
            limit = request.max_messages or 100
            batch, state.pending = state.pending[:limit], state.pending[limit:]
            response = _PullResponse()
            for message in batch:
                ack_id = f"ack-{next(self._ids)}"
                state.leases[ack_id] = (message, now + state.subscription.ack_deadline_seconds)
                received = response.received_messages.add(ack_id=ack_id)
                received.message.CopyFrom(message)
            return response

    def _modify_ack_deadline(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            state = self._subscriptions.get(request.subscription)
            if state is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Resource not found (resource={request.subscription}).")
            now = time.monotonic()
            for ack_id in request.ack_ids:
                if ack_id in state.leases:  # 0 s hands the message back at once, like Pub/Sub
                    state.leases[ack_id] = (state.leases[ack_id][0], now + request.ack_deadline_seconds)
            return empty_pb2.Empty()

    def _acknowledge(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            state = self._subscriptions.get(request.subscription)
            if state is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Resource not found (resource={request.subscription}).")
            for ack_id in request.ack_ids:
                state.leases.pop(ack_id, None)
            return empty_pb2.Empty()


def _unary(handler: Callable[[Any, grpc.ServicerContext], Any], request_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=request_type.FromString,
                                               response_serializer=lambda message: message.SerializeToString())


def _copy(message: Any) -> Any:
    clone = type(message)()
    clone.CopyFrom(message)
    return clone


def main(argv: list[str] | None = None) -> None:
    """Serve until stdin closes (the parent ends it by closing the pipe, or by exiting)."""
    parser = argparse.ArgumentParser(description="A Pub/Sub test server on 127.0.0.1 (a free port).")
    parser.add_argument("--topic", action="append", default=[], help="create this topic, projects/P/topics/T")
    parser.add_argument("--subscription", action="append", default=[],
                        help="create this subscription of the first topic, projects/P/subscriptions/S")
    args = parser.parse_args(argv)
    with PubSubTestServer(pull_wait_s=0.2) as server:
        for topic in args.topic:
            server.create_topic(topic)
        for subscription in args.subscription:
            server.create_subscription(subscription, args.topic[0], ack_deadline_seconds=60)
        print(f"PUBSUB_EMULATOR_HOST={server.host}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
