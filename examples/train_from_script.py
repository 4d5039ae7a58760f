"""Train one peer from Python, with your own model, data and partition.

Start a rendezvous (``peerlearn rendezvous --port 5555``), then run this script once per peer::

    python examples/train_from_script.py --num 0 --total 2 --rendezvous 127.0.0.1:5555
    python examples/train_from_script.py --num 1 --total 2 --rendezvous 127.0.0.1:5555

Each peer keeps its part of the training set (here a Dirichlet label skew, alpha 0.5), trains
the MLP of ``examples/my_model.py``, and averages with the other peers after every epoch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from examples.my_data import load  # noqa: E402
from examples.my_model import factory  # noqa: E402
from learner import DataConfig, NetworkConfig, PeerConfig, TrainConfig, run_peer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, required=True, help="this peer's number")
    parser.add_argument("--total", type=int, required=True, help="number of peers")
    parser.add_argument("--rendezvous", default="127.0.0.1:5555", help="HOST:PORT")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--partition", default="dirichlet:0.5",
                        help="iid, dirichlet:ALPHA or classes:K")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    train_set, test_set = load()
    config = PeerConfig(
        args.num,
        args.total,
        args.rendezvous,
        # these replace --dataset; the peer keeps its partition's part
        data=DataConfig(train_set=train_set, test_set=test_set, partition=args.partition),
        train=TrainConfig(model_factory=factory, epochs=args.epochs),
        # reachable over ZeroMQ on this machine (port 0 picks one); peers of one job train
        # the same model. Fields can also be given flat: PeerConfig(..., epochs=3, job="x").
        network=NetworkConfig(listen="127.0.0.1:0", job="my-mlp"),
    )
    result = asyncio.run(run_peer(config))
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
