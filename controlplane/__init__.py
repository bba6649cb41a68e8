"""The control plane: what connects users to providers and keeps their data coming in.

- ``auth``: developers and API keys, widget sessions, OAuth 2 flows, connections, tokens, lifecycle events;
- ``api``: the ``/v2`` HTTP API and ``healthflow serve``;
- ``polling``: rate-limited polling of provider APIs, backfills, notification fetching;
- ``webhooks``: provider webhooks in, verified and published as raw events.

It sits above ``transforms`` and the provider layer (``connectors``), beside ``pipelines``.
"""
