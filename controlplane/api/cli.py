"""``healthflow serve`` and ``healthflow developers``: argparse wiring for runners/cli.py.

    from controlplane.api.cli import COMMANDS, add_parsers
    add_parsers(sub)              # in parser(), next to the other sub-commands
    {..., **COMMANDS}[args.command](args)   # in main()
"""

from __future__ import annotations

import argparse
import os

DEFAULT_STATE = "sqlite:///.healthflow/state.db"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from controlplane.api.serve_limits import ServeLimits

    serve = sub.add_parser("serve", help="serve the /v2 API: connect widget, OAuth callbacks, users (needs "
                                         "HEALTHFLOW_SECRET_KEY and HEALTHFLOW_<PROVIDER>_CLIENT_ID/_SECRET)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--public-url", default=os.environ.get("HEALTHFLOW_PUBLIC_URL"),
                       help="URL browsers reach this server at (OAuth redirect URIs are built from it; "
                            "default http://HOST:PORT, or $HEALTHFLOW_PUBLIC_URL)")
    serve.add_argument("--state", default=DEFAULT_STATE, help="control-plane store (sqlite:///… or postgresql://…)")
    serve.add_argument("--bootstrap-servers", help="Kafka of the ingestion topic: also receive provider webhooks")
    serve.add_argument("--destinations", help="destinations file: deliver lifecycle events (auth, deauth, …) there")
    serve.add_argument("--redis", help="redis://host:port/db: rate limits shared with `healthflow poll`")
    serve.add_argument("--dead-letters", default=".healthflow/dead-letters", help="dead-letter store root")
    defaults = ServeLimits()
    serve.add_argument("--auth-failures-per-client", default=defaults.auth_failures_per_client,
                       help="failed API-key checks allowed per client address before 429 (default %(default)s; "
                            "counted in --redis when given, so shared by every API process)")
    serve.add_argument("--auth-failures-per-dev-id", default=defaults.auth_failures_per_dev_id,
                       help="failed API-key checks allowed per dev-id before 429 (default %(default)s)")
    serve.add_argument("--purge-interval", type=float, default=defaults.purge_interval_s, metavar="SECONDS",
                       help="purge expired widget sessions and authorizations at start and then this often "
                            "(default %(default)g)")
    serve.add_argument("--history-max-days", type=int, default=defaults.history_max_days,
                       help="days one historical request (GET /v2/{type}) may cover (default %(default)s)")
    serve.add_argument("--backfill-workers", type=int, default=defaults.backfill_workers,
                       help="historical requests fetched at once (default %(default)s)")
    serve.add_argument("--backfill-queue", type=int, default=defaults.backfill_queue,
                       help="historical requests waiting at most; more answer 503 (default %(default)s)")
    serve.add_argument("--publish-timeout", type=float, default=defaults.publish_timeout_s, metavar="SECONDS",
                       help="how long a webhook waits for the broker's acknowledgement before 503 with Retry-After "
                            "(default %(default)g)")

    devs = sub.add_parser("developers", help="developer ids and API keys of the /v2 API")
    devs_sub = devs.add_subparsers(dest="action", required=True)
    create = devs_sub.add_parser("create", help="a new developer id and its first API key (shown once)")
    create.add_argument("--name")
    create.add_argument("--dev-id", help="choose the id instead of generating one")
    key = devs_sub.add_parser("add-key", help="another API key for a developer (shown once)")
    key.add_argument("dev_id")
    revoke = devs_sub.add_parser("revoke-key", help="revoke an API key by its key id (hfk_<KEY ID>.…)")
    revoke.add_argument("key_id")
    for command in (create, key, revoke):
        command.add_argument("--state", default=DEFAULT_STATE)


def cmd_serve(args: argparse.Namespace) -> int:
    from controlplane.api.serve_limits import ServeLimits
    from controlplane.api.server import serve

    emit = None
    if args.destinations:
        from sinks.config import load_destinations
        from transforms.lifecycle import LifecycleDelivery

        emit = LifecycleDelivery(load_destinations(args.destinations).targets(), args.dead_letters).emit
    limiter = None
    if args.redis:
        from controlplane.polling import RedisRateLimiter

        limiter = RedisRateLimiter(url=args.redis)
    limits = ServeLimits(args.auth_failures_per_client, args.auth_failures_per_dev_id, args.redis or "memory://",
                         args.purge_interval, args.history_max_days, args.backfill_workers, args.backfill_queue,
                         publish_timeout_s=args.publish_timeout)
    serve(args.port, args.state, host=args.host, public_url=args.public_url, bootstrap_servers=args.bootstrap_servers,
          emit=emit, limiter=limiter, limits=limits)
    return 0


def cmd_developers(args: argparse.Namespace) -> int:
    from controlplane.auth.control_plane import ControlPlane

    with ControlPlane(args.state) as control_plane:
        if args.action == "create":
            dev_id = control_plane.create_developer(args.dev_id, args.name)
            print(f"dev-id:    {dev_id}\nx-api-key: {control_plane.create_api_key(dev_id)}\n"
                  "(the key is shown only now; keep it secret)")
        elif args.action == "add-key":
            print(f"x-api-key: {control_plane.create_api_key(args.dev_id)}\n(the key is shown only now)")
        else:
            control_plane.revoke_api_key(args.key_id)
            print(f"key {args.key_id} revoked")
    return 0


COMMANDS = {"serve": cmd_serve, "developers": cmd_developers}
