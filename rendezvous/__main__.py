"""``python -m rendezvous``: run the rendezvous service until SIGINT/SIGTERM.

The options are those of ``peerlearn rendezvous`` (``rendezvous.options``), plus --log-level.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rendezvous.options import add_arguments, serve_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rendezvous", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    return serve_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
