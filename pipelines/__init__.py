"""Pipeline graphs (``normalize``, ``replay``), their runner launch config (``launch``), and the local environment
they run against on one machine (``embedded`` broker and moto, ``webhook_receiver``, simulated ``demo_data``).

Logging is set up once per command by ``core.logs.configure_logging`` (Beam's own chatter quieted there)."""
