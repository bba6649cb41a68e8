"""Large payloads by reference (Terra's "ping" mode): the body goes to S3, the message carries a URL.

Used by destinations with a size limit (SQS: 256 KiB; webhooks: ``max_body_bytes``). The pointer
message is Terra's ``s3_payload`` shape: ``{"status": "success", "type": "s3_payload", "url":
<presigned GET>, "expires_in": s, "user_id", "event_id", "payload_type"[, "reference_id"]}``. The
object name is the event id, so a retried upload overwrites instead of piling up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core.errors import FatalError
from core.events import NormalizedEvent
from sinks.s3 import classify_aws_error, make_client

POINTER_EXPIRES_IN_S = 600


@dataclass(frozen=True)
class LargePayloadS3:
    """Where bodies too large for a destination go; pointers stay valid ``expires_in`` seconds."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    expires_in: int = POINTER_EXPIRES_IN_S

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise FatalError(f"large_payload_s3.bucket must be a bucket name, got {self.bucket!r}")


class PayloadStore:
    """Uploads event bodies and builds pointer messages; the client lives between open() and close()."""

    def __init__(self, config: LargePayloadS3, folder: str, max_attempts: int = 3, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 30.0) -> None:
        self.config, self.folder = config, folder
        self.max_attempts, self.connect_timeout_s, self.read_timeout_s = max_attempts, connect_timeout_s, read_timeout_s
        self._s3: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _s3=None)

    def open(self, region: str | None = None) -> None:
        if self._s3 is None:
            self._s3 = make_client("s3", self.config.endpoint_url, self.config.region or region, self.max_attempts,
                                   self.connect_timeout_s, self.read_timeout_s)

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.close()
            self._s3 = None

    def key(self, event: NormalizedEvent) -> str:
        parts = [self.config.prefix.strip("/"), self.folder, event.version, event.type, f"{event.event_id}.json"]
        return "/".join(p for p in parts if p)

    def pointer(self, event: NormalizedEvent) -> bytes:
        """Upload the event's body; return the pointer message (classified AWS errors on failure)."""
        self.open()
        key, cfg = self.key(event), self.config
        try:
            self._s3.put_object(Bucket=cfg.bucket, Key=key, Body=event.body(), ContentType="application/json",
                                Metadata={"event-id": event.event_id})
            url = self._s3.generate_presigned_url("get_object", Params={"Bucket": cfg.bucket, "Key": key},
                                                  ExpiresIn=cfg.expires_in)
        except Exception as exc:
            raise classify_aws_error(exc, f"uploading large payload to s3://{cfg.bucket}/{key}") from exc
        message: dict[str, Any] = {"status": "success", "type": "s3_payload", "url": url,
                                   "expires_in": cfg.expires_in, "user_id": event.user_id,
                                   "event_id": event.event_id, "payload_type": event.type}
        if event.user.get("reference_id"):
            message["reference_id"] = event.user["reference_id"]
        return json.dumps(message, separators=(",", ":")).encode()
