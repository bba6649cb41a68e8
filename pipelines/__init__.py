"""Pipeline graphs (``normalize``, ``replay``), their runner launch config (``launch``), and the local environment
they run against on one machine (``embedded`` broker and moto, ``webhook_receiver``, simulated ``demo_data``)."""

from __future__ import annotations

import logging


def quiet_beam() -> None:
    # Beam warns about optional cloud clients (GCS, BigQuery) on import; they are not used locally.
    for name in ("apache_beam.io.filesystems", "root", "apache_beam.io.gcp.bigquery"):
        logging.getLogger(name).setLevel(logging.ERROR)
