"""The streaming job: one long-running pipeline from an ingestion topic to every destination.

``run_streaming`` launches the normalize graph (``pipelines.normalize.build``) in streaming mode on
the runner the Beam options name (locally: the bundle-based streaming runner, see
``pipelines.launch``) and runs scheduled redelivery of due dead letters beside it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines.launch import is_dry_run, make_pipeline
from pipelines.normalize import NormalizeJob, build, check_portable
from pipelines.replay import replay_deliveries
from transforms import reuse
from transforms.streams import close_local_readers

log = logging.getLogger(__name__)


@dataclass
class StreamingJob:
    """A running streaming job: ``stop()`` cancels it; ``result`` is the runner's."""

    result: object
    pipeline: object = None
    dry_run: bool = False  # translated and not submitted (``--dry_run``): nothing runs
    redelivery: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self._stop.set()
        cancel = getattr(self.result, "cancel", None)
        if cancel is not None:
            try:
                cancel()
            except Exception as exc:  # already ended
                log.debug("cancel: %s", exc)
        close_local_readers(self.pipeline)
        reuse.close_all()  # idle connections only: a job still running keeps the ones it uses

    def wait(self) -> None:
        """Block until the job ends (it fails, or it is stopped)."""
        self.result.wait_until_finish()


def run_streaming(job: NormalizeJob, beam_args: Sequence[str] = (), redeliver_every_s: float | None = 60.0,
                  ) -> StreamingJob:
    """Launch the long-running streaming job (returns once it runs; ``wait()`` blocks).

    Scheduled redelivery of dead letters whose time has come runs beside the job, every
    ``redeliver_every_s`` (``healthflow deadletters replay --due`` does the same from a scheduler).
    """
    pipeline = make_pipeline(beam_args, streaming=True)
    check_portable(job, pipeline.options)
    build(pipeline, job, streaming=True)
    running = StreamingJob(pipeline.run(), pipeline, dry_run=is_dry_run(pipeline.options))
    if running.dry_run:
        return running
    if redeliver_every_s:
        running.redelivery = threading.Thread(target=_redeliver_due, args=(job, redeliver_every_s, running._stop),
                                              daemon=True, name="healthflow-redelivery")
        running.redelivery.start()
    return running


def _redeliver_due(job: NormalizeJob, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            replay_deliveries(job.dead_letter_root, job.targets, due_only=True, status_url=job.state_url)
        except Exception as exc:
            log.warning("scheduled redelivery failed: %s", exc)
