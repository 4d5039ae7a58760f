"""A bare overlay host in its own process, for tests that kill a peer for real.

    python -m testkit.hostproc --rendezvous ws://HOST:PORT/ws --job J [--listen tcp://...]

Joins the job, prints one JSON line ``{"peer_id": ...}`` on stdout, then accepts every model
sent to it (counted in its log) until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from overlay.host import Host, HostConfig
from overlay.identity import Identity
from overlay.models import ReceivedModel


async def main(args: argparse.Namespace) -> None:
    host: Host[ReceivedModel] = Host(Identity.generate(),
                              HostConfig(rendezvous=args.rendezvous, job=args.job,
                                         listen=args.listen))
    await host.start()
    print(json.dumps({"peer_id": host.peer_id}), flush=True)
    try:
        while True:
            model = await host.inbox.get()
            logging.info("got a model: %s", model)
    finally:
        await host.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--listen", default=None)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(parser.parse_args()))
