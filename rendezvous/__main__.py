"""``python -m rendezvous``: run the rendezvous service until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging

from rendezvous.config import RendezvousConfig
from rendezvous.server import serve


def main(argv: list[str] | None = None) -> None:
    defaults = RendezvousConfig()
    parser = argparse.ArgumentParser(prog="python -m rendezvous", description=__doc__)
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--ttl", type=float, default=defaults.ttl)
    parser.add_argument("--heartbeat-interval", type=float, default=defaults.heartbeat_interval)
    parser.add_argument("--dialback-timeout", type=float, default=defaults.dialback_timeout)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = RendezvousConfig(
            host=args.host,
            port=args.port,
            ttl=args.ttl,
            heartbeat_interval=args.heartbeat_interval,
            dialback_timeout=args.dialback_timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))
    serve(config)


if __name__ == "__main__":
    main()
