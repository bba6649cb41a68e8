"""Bodies over a destination's size limit travel by reference (Terra's ping mode), never dropped."""

from __future__ import annotations

import json
import uuid

import boto3
import requests

from core.errors import PermanentError
from pipelines.webhook_receiver import WebhookReceiver
from sinks.large_payloads import LargePayloadS3
from sinks.webhook import WebhookSink


def test_an_oversized_webhook_body_is_sent_as_a_signed_s3_pointer(moto_endpoint, webhook_secret, make_sink_event):
    bucket = f"payloads-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    big = make_sink_event("u-big", notes="x" * 5000)
    small = make_sink_event("u-small")
    with WebhookReceiver(webhook_secret) as receiver:
        sink = WebhookSink("hook", receiver.url, webhook_secret, max_body_bytes=2000,
                           large_payload_s3=LargePayloadS3(bucket, "p", endpoint_url=moto_endpoint))
        sink.open()
        try:
            result = sink.write([big, small])
        finally:
            sink.close()
        assert sorted(result.delivered) == sorted([big.event_id, small.event_id]) and not result.failures
        assert receiver.rejected_signature == 0
        pointer = receiver.events[big.event_id]
        assert pointer["type"] == "s3_payload" and pointer["event_id"] == big.event_id
        assert pointer["payload_type"] == "sleep" and pointer["expires_in"] == 600
        assert requests.get(pointer["url"], timeout=10).content == big.body()
        assert receiver.events[small.event_id] == json.loads(small.body())  # small ones go inline


def test_an_oversized_body_without_a_bucket_is_a_permanent_failure(webhook_secret, make_sink_event):
    big = make_sink_event("u-big", notes="x" * 5000)
    with WebhookReceiver(webhook_secret) as receiver:
        sink = WebhookSink("hook", receiver.url, webhook_secret, max_body_bytes=2000)
        sink.open()
        result = sink.write([big])
        sink.close()
    (failure,) = result.failures
    assert isinstance(failure.error, PermanentError) and "large_payload_s3" in str(failure.error)
    assert receiver.received == 0
