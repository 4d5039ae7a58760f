"""``python -m rendezvous``: run the rendezvous service until SIGINT/SIGTERM.

The options are those of ``peerlearn rendezvous`` (``rendezvous.options``), plus --log-level.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rendezvous.options import add_arguments, config_from_args
from rendezvous.server import serve

log = logging.getLogger("rendezvous")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rendezvous", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("rendezvous: %s", exc)
        return 2
    try:
        serve(config)
    except OSError as exc:  # a port already taken, an address not ours
        log.error("rendezvous: cannot bind: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
