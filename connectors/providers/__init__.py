"""The providers: one folder each (``<slug>/``: ``__init__.py`` with ``PROVIDER`` and its mappers, ``manifest.yaml``,
an optional ``client.py``), discovered by ``connectors.registry()``."""
