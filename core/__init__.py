"""The core types every layer shares: errors, events, raw messages, dead letters, the SQL dialects
and the store built on them, the Kafka producer.

Nothing here imports another healthflow package (third-party libraries only): ``schemas``, ``connectors``,
``sinks``, ``transforms``, ``pipelines``, ``controlplane``, ``runners`` and ``bench`` all build on it.
"""
