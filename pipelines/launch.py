"""Runner launch config: turn Beam arguments into a Pipeline, the same graph on every runner.

Locally (no ``--runner``, or ``DirectRunner``):
- batch runs on Beam's FnApiRunner directly (Beam 2.77's DirectRunner would first try to download
  the Prism runner, which fails without internet; FnApiRunner is what it falls back to anyway);
  ``--direct_num_workers=N --direct_running_mode=multi_processing`` runs it on N processes, forked by a warm
  parent that imported Beam and healthflow once (``pipelines.warm_workers``) rather than each started cold;
- streaming runs on the bundle-based streaming runner, which executes keyed state and
  processing-time timers, with ``ReadStream`` executed as a polled root read
  (``transforms.streams``), since that runner cannot run unbounded splittable DoFns.
Any other runner (``DataflowRunner``, ``FlinkRunner``, ``SparkRunner``, ``PrismRunner``...) is
passed to Beam as given, with the portable expansion of every transform.
"""

from __future__ import annotations

import inspect
import logging
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions, TestOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.transforms.environments import SubprocessSDKEnvironment

from pipelines.warm_workers import LOCAL_RUNNERS, WarmWorkers, take_prestarted

log = logging.getLogger(__name__)


def pipeline_options(beam_args: Sequence[str] = (), streaming: bool = False) -> PipelineOptions:
    options = PipelineOptions(list(beam_args))
    if streaming:
        options.view_as(StandardOptions).streaming = True
    return options


def is_local(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS


def is_dry_run(options: PipelineOptions) -> bool:
    """``--dry_run=true``: the runner translates the job and submits nothing (nothing runs, nothing to read)."""
    return str(options.view_as(TestOptions).dry_run).lower() in ("true", "1", "yes")


class LocalStreamingRunner(BundleBasedDirectRunner):
    """Beam's bundle-based streaming runner, taught to execute ``ReadStream`` (see the module doc).

    A step that runs one bundle at a time (every stateful step) takes waiting bundles oldest first, so
    each user's messages pass it in the order they were read (Beam's runner takes the newest first).
    Beam runs the whole graph on one worker thread: a destination that waits (a slow endpoint, a long
    timeout) holds up the local job, though not its retries, which wait on timers. Dataflow and Flink run
    steps in parallel.
    """

    executes_local_stream_reads = True

    def run_pipeline(self, pipeline: beam.Pipeline, options: PipelineOptions):  # type: ignore[override]
        from apache_beam.runners.direct import executor

        from transforms.streams import register_local_stream_read

        register_local_stream_read()
        executor._SerialEvaluationState._update_currently_evaluating = _first_in_first_out
        _look_up_signatures_once()
        return super().run_pipeline(pipeline, options)


class WarmMultiProcessRunner(FnApiRunner):
    """FnApiRunner for ``--direct_running_mode=multi_processing``, on worker processes that start warm
    (``pipelines.warm_workers``). The warm parent starts with the runner, so that its imports overlap the graph's
    construction; it ends with the run."""

    def __init__(self) -> None:
        self._environment: Any = None
        self._warm: WarmWorkers | None = _warm_workers()
        super().__init__()

    @property  # type: ignore[override]
    def _default_environment(self) -> Any:
        return self._environment

    @_default_environment.setter
    def _default_environment(self, environment: Any) -> None:
        # FnApiRunner.run_pipeline sets Beam's cold worker command for multi_processing: ours replaces it
        if self._warm is not None and isinstance(environment, SubprocessSDKEnvironment):
            environment = SubprocessSDKEnvironment.from_command_string(self._warm.command)
        self._environment = environment

    def run_pipeline(self, pipeline: beam.Pipeline, options: PipelineOptions):  # type: ignore[override]
        if self._warm is None or not self._warm.claim():  # a second run, or a parent that ended idle
            self._warm = _warm_workers()
            if self._warm is not None:
                self._warm.claim()
        try:
            return super().run_pipeline(pipeline, options)
        finally:
            if self._warm is not None:
                self._warm.close()
            self._warm = None


def _warm_workers() -> WarmWorkers | None:
    """A warm parent for a run (the one ``pipelines.warm_workers.prestart`` started, if any), or None (Beam's cold
    workers) when one cannot be started here."""
    prestarted = take_prestarted()
    if prestarted is not None:
        return prestarted
    try:
        return WarmWorkers()
    except OSError as exc:  # no Unix socket (a temp folder path too long for one, say), no process to spare
        log.warning("worker processes start cold: no warm parent (%s)", exc)
        return None


def _first_in_first_out(steps: Any, new_work: Any, completed_work: Any) -> None:
    """Beam's serial step queue, taken in the order bundles arrived (Beam's own takes the newest first)."""
    with steps._lock:
        if new_work:
            steps.serial_queue.append(new_work)
        if completed_work:
            steps.currently_evaluating = None
        if steps.serial_queue and not steps.currently_evaluating:
            steps.currently_evaluating = steps.serial_queue.popleft()
            super(type(steps), steps).schedule(steps.currently_evaluating)


_signatures: weakref.WeakKeyDictionary[Callable[..., Any], inspect.Signature] = weakref.WeakKeyDictionary()
_bound_signatures: weakref.WeakKeyDictionary[Callable[..., Any], inspect.Signature] = weakref.WeakKeyDictionary()


def _look_up_signatures_once() -> None:
    """Remember Beam's ``get_signature`` of each function and method (once per process).

    This runner builds every ParDo's DoFn signature, state and timer specs again for each bundle, inspecting every
    method of the DoFn each time (2 to 5 ms a bundle, for bundles of a few elements at the end of the graph). The
    signature of a function (and of a method bound to any instance: the function's without its first parameter) is
    the same every time, so it is taken once; callables of other kinds are inspected every time, as Beam does.
    The remembered signatures are process-wide and kept for as long as their function lives (weakly keyed), and
    ``get_signature`` stays replaced in Beam's modules for the rest of the process, for every pipeline it runs.
    """
    from apache_beam.transforms import core, ptransform, util
    from apache_beam.typehints import decorators

    inspect_signature = decorators.get_signature
    if getattr(inspect_signature, "remembers", False):
        return

    def get_signature(func: Any) -> inspect.Signature:
        if type(func) is types.MethodType and type(func.__func__) is types.FunctionType:
            cache, key = _bound_signatures, func.__func__
        elif type(func) is types.FunctionType:
            cache, key = _signatures, func
        else:
            return inspect_signature(func)
        found = cache.get(key)
        if found is None:
            found = cache[key] = inspect_signature(func)
        return found

    get_signature.remembers = True  # type: ignore[attr-defined]
    for module in (decorators, core, ptransform, util):
        module.get_signature = get_signature  # type: ignore[attr-defined]


def make_pipeline(beam_args: Sequence[str] = (), streaming: bool = False) -> beam.Pipeline:
    options = pipeline_options(beam_args, streaming)
    if not is_local(options):
        return beam.Pipeline(options=options)
    if options.view_as(StandardOptions).streaming:
        if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
            from core.errors import FatalError

            raise FatalError("the local streaming runner runs in one process: drop --direct_running_mode, or "
                             "run the streaming job on Dataflow or Flink")
        return beam.Pipeline(runner=LocalStreamingRunner(), options=options)
    if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
        return beam.Pipeline(runner=WarmMultiProcessRunner(), options=options)
    return beam.Pipeline(runner=FnApiRunner(), options=options)
