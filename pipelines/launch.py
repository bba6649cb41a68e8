"""Runner launch config: turn Beam arguments into a Pipeline, the same code on every runner.

Locally (no ``--runner`` or ``--runner=DirectRunner``) batch pipelines run on Beam's FnApiRunner
directly. Beam 2.77's DirectRunner would first try to download the Prism runner, which fails
without internet; FnApiRunner is what it falls back to for batch anyway. Any other runner
(``DataflowRunner``, ``FlinkRunner``, ``SparkRunner``, ``PrismRunner``...) is passed to Beam as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

LOCAL_RUNNERS = {None, "DirectRunner", "direct", "FnApiRunner"}


def pipeline_options(beam_args: Sequence[str] = ()) -> PipelineOptions:
    return PipelineOptions(list(beam_args))


def make_pipeline(beam_args: Sequence[str] = ()) -> beam.Pipeline:
    options = pipeline_options(beam_args)
    standard = options.view_as(StandardOptions)
    if standard.runner in LOCAL_RUNNERS and not standard.streaming:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)
