"""Scratch experiment: peers-with-averaging vs centralized training, in one process.

Benchmark target: 3 peers x 3 epochs on the "digits" data (each peer trains one local epoch on its
1/3 IID shard of the 8,000 training digits, then the 3 models are averaged weighted by sample count
and every peer continues from the average with its own Adadelta + StepLR) must end within 0.5
accuracy points of centralized training on all 8,000 digits for 3 epochs (batch 64, Adadelta
lr 1.0, StepLR gamma 0.7), on the 2,000 test digits.

No networking: the exchange is simulated by averaging the state dicts in memory. Variants:

- ``independent``: each peer starts from its own random init (the original prototype).
- ``shared``: all peers start from the same init (seeded from the job name in the real system).
- ``shared+opt``: shared init, and the Adadelta state (square_avg, acc_delta) is averaged too.
- ``shared+sum``: shared init; peers apply the *sum* of the peers' weighted updates since the
  last common model (FedAvg with server learning rate = number of peers), instead of their mean.

Usage: ``python -m benchmarks._centralized_sim [--seeds 0 1 2] [--variants ...]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from learner.averaging import weighted_average
from learner.data import load_dataset, shard
from learner.model import Net, build_model
from learner.train import (
    BATCH_SIZE,
    TEST_BATCH_SIZE,
    evaluate,
    make_optimizer,
    make_scheduler,
    train_epoch,
)

PEERS = 3
EPOCHS = 3
DEVICE = torch.device("cpu")


def _loader(dataset: Dataset, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def centralized(train: Dataset, test: Dataset, seed: int) -> list[float]:
    torch.manual_seed(seed)  # dropout
    model = build_model(seed)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    loader = _loader(train, seed)
    test_loader = DataLoader(test, batch_size=TEST_BATCH_SIZE)
    accuracies = []
    for _ in range(EPOCHS):
        train_epoch(model, loader, optimizer, DEVICE)
        scheduler.step()
        accuracies.append(float(evaluate(model, test_loader, DEVICE)["accuracy"]))
    return accuracies


def _average_optimizer_state(optimizers: list[torch.optim.Optimizer], weights: list[float]) -> None:
    """Set every optimizer's per-parameter tensors to their weighted mean (Adadelta: square_avg,
    acc_delta). Parameters are matched by position in the param group."""
    states = []
    for opt in optimizers:
        params = opt.param_groups[0]["params"]
        states.append({
            f"{i}.{key}": value
            for i, p in enumerate(params)
            for key, value in opt.state[p].items()
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0
        })
    averaged = weighted_average(list(zip(states, weights, strict=True)))
    for opt in optimizers:
        params = opt.param_groups[0]["params"]
        for key, value in averaged.items():
            index, name = key.split(".", 1)
            opt.state[params[int(index)]][name].copy_(value)


def federated(train: Dataset, test: Dataset, seed: int, variant: str) -> list[float]:
    torch.manual_seed(seed)  # dropout
    if variant == "independent":
        models: list[Net] = [build_model(seed * 1000 + 1 + i) for i in range(PEERS)]
    else:
        models = [build_model(seed) for _ in range(PEERS)]
    shards = [shard(train, i, PEERS, seed=seed) for i in range(PEERS)]
    loaders = [_loader(s, seed * 1000 + i) for i, s in enumerate(shards)]
    optimizers = [make_optimizer(m) for m in models]
    schedulers = [make_scheduler(o) for o in optimizers]
    test_loader = DataLoader(test, batch_size=TEST_BATCH_SIZE)
    accuracies = []
    for _ in range(EPOCHS):
        start = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
        samples = []
        for model, loader, optimizer, scheduler in zip(models, loaders, optimizers, schedulers,
                                                       strict=True):
            samples.append(float(train_epoch(model, loader, optimizer, DEVICE)["samples"]))
            scheduler.step()
        states = [m.state_dict() for m in models]
        merged = weighted_average(list(zip(states, samples, strict=True)))
        if variant == "shared+sum":
            # All peers start each round from the same model, so start[0] is the common point.
            # new = common + PEERS * mean(update)  (the sum of equally-weighted updates)
            merged = {
                k: (start[0][k] + PEERS * (v - start[0][k])) if v.is_floating_point() else v
                for k, v in merged.items()
            }
        for model in models:
            model.load_state_dict(merged)
        if variant == "shared+opt":
            _average_optimizer_state(optimizers, samples)
        accuracies.append(float(evaluate(models[0], test_loader, DEVICE)["accuracy"]))
    return accuracies


VARIANTS: dict[str, Callable[[Dataset, Dataset, int], list[float]]] = {
    "centralized": centralized,
    "independent": lambda tr, te, s: federated(tr, te, s, "independent"),
    "shared": lambda tr, te, s: federated(tr, te, s, "shared"),
    "shared+opt": lambda tr, te, s: federated(tr, te, s, "shared+opt"),
    "shared+sum": lambda tr, te, s: federated(tr, te, s, "shared+sum"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_dataset("digits")
    results: dict[str, dict[int, list[float]]] = {v: {} for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            t0 = time.perf_counter()
            acc = VARIANTS[variant](train, test, seed)
            results[variant][seed] = acc
            elapsed = time.perf_counter() - t0
            print(f"seed {seed} {variant:12s} per-epoch acc {acc}  ({elapsed:.0f}s)", flush=True)
    if "centralized" in results:
        print("\nfinal accuracy (%) and gap to centralized (points, negative = behind)")
        base = results["centralized"]
        for variant, per_seed in results.items():
            finals = [per_seed[s][-1] for s in args.seeds]
            gaps = [per_seed[s][-1] - base[s][-1] for s in args.seeds]
            print(f"{variant:12s} acc {' '.join(f'{a:6.2f}' for a in finals)}  "
                  f"gap {' '.join(f'{g:+5.2f}' for g in gaps)}  "
                  f"mean gap {statistics.mean(gaps):+5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
