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
- ``shared+sum``: shared init; peers move from the last common model by ``--server-lr`` times
  the mean update (FedAvg with a server learning rate; the default, the number of peers, applies
  the *sum* of the peers' updates as if they had been taken one after the other).

Usage: ``python -m benchmarks._centralized_sim [--seeds 0 1 2] [--variants ...]``

Measured (CPU, 2 threads, final test accuracy after 3 epochs; gap = variant - centralized):

    variant              seed 0          seed 1          seed 2          mean gap
    centralized          97.10           97.35           97.50
    independent          94.65 (-2.45)   95.70 (-1.65)   95.15 (-2.35)   -2.15
    shared               96.20 (-0.90)   96.25 (-1.10)   96.35 (-1.15)   -1.05
    shared+opt           96.20 (-0.90)   -               -
    shared+sum (x3)      64.45 (-32.65, diverges in round 2)
    shared+sum (x1.5)    96.05 (-1.05)   96.40 (-0.95)   96.75 (-0.75)   -0.92

A shared init halves the gap; the rest (~1 point) is the usual cost of averaging: each peer takes
42 optimizer steps per epoch instead of 125, and averaging three 42-step trajectories from one point
is roughly one 42-step trajectory with a 3x batch. Averaging the Adadelta state changes nothing
(IID peers have nearly identical state); a server learning rate does not fix it either.

Exchange-protocol variants (``federated_sync``; seed 0 screen, cyclic on 3 seeds; CPU, 2 threads):

    variant              seed 0          seed 1          seed 2          mean gap
    sync14 (merge every 14 steps)   96.00 (-1.10)
    sync1 (merge every step)        96.25 (-0.85)
    central-b192 (diagnostic)       96.30 (-0.80)   centralized with batch 192: same as sync1
    slr2 (server lr 2)              93.75 (-3.35)   round 2 drops to 86.65
    slr3-1 (lr 3 then 1)            95.35 (-1.75)
    avgm0.5 (FedAvgM)               95.45 (-1.65)
    avgm0.9 (FedAvgM)               95.00 (-2.10)
    adam.01 (FedAdam, eta 0.01)     93.65 (-3.45)   eta not tuned
    cyclic (weight transfer)        97.10 (+0.00)   97.35 (+0.00)   97.45 (-0.05)   -0.02

Averaging IID peers behaves like one run with a 3x batch and 1/3 of the steps, however often it
happens (sync1 = central-b192); extrapolating the merged update (server lr, momentum, Adam) only
destabilises 3 rounds. Only handing the model from peer to peer (sequential, 125 steps an epoch,
no parallel speed-up) matches centralized training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
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
SERVER_LR = float(PEERS)  # for shared+sum; set by --server-lr


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
            # new = common + SERVER_LR * mean(update)
            merged = {
                k: (start[0][k] + SERVER_LR * (v - start[0][k])) if v.is_floating_point() else v
                for k, v in merged.items()
            }
        for model in models:
            model.load_state_dict(merged)
        if variant == "shared+opt":
            _average_optimizer_state(optimizers, samples)
        accuracies.append(float(evaluate(models[0], test_loader, DEVICE)["accuracy"]))
    return accuracies


# --------------------------------------------------------------------------------------------
# Exchange-protocol variants: merge every ``sync_every`` local steps, and a "server" rule that
# turns (common model, average of the peers) into the next common model. Every peer applies the
# same rule to the same inputs, so they stay in sync without a coordinator.


class ServerRule:
    """FedOpt-style server update on the pseudo-gradient ``delta = average - common``
    (Reddi et al. 2021, "Adaptive Federated Optimization"). ``kind``:

    - ``avg``: new = average (plain FedAvg).
    - ``lr``: new = common + eta_r * delta, ``eta`` a list per merge (last value repeats).
    - ``momentum``: v = beta * v + delta; new = common + v (FedAvgM, Hsu et al. 2019).
    - ``adam`` / ``yogi``: m = b1 m + (1-b1) delta; v per Adam / Yogi; new = common + eta * m /
      (sqrt(v) + tau), v_0 = tau^2, no bias correction (Reddi et al., Algorithm 2).
    """

    def __init__(self, kind: str = "avg", eta: float | list[float] = 1.0, beta: float = 0.9,
                 b2: float = 0.99, tau: float = 1e-3) -> None:
        self.kind, self.beta, self.b2, self.tau = kind, beta, b2, tau
        self.eta = eta if isinstance(eta, list) else [eta]
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.merges = 0

    def __call__(self, common: dict[str, torch.Tensor], average: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        eta = self.eta[min(self.merges, len(self.eta) - 1)]
        self.merges += 1
        if self.kind == "avg":
            return average
        out = {}
        for k, a in average.items():
            if not a.is_floating_point():
                out[k] = a
                continue
            d = a - common[k]
            if self.kind == "lr":
                out[k] = common[k] + eta * d
            elif self.kind == "momentum":
                v = self.v[k] = self.beta * self.v.get(k, torch.zeros_like(d)) + d
                out[k] = common[k] + v
            elif self.kind in ("adam", "yogi"):
                m = self.m[k] = self.beta * self.m.get(k, torch.zeros_like(d)) + (1 - self.beta) * d
                v = self.v.get(k, torch.full_like(d, self.tau ** 2))
                d2 = d * d
                if self.kind == "adam":
                    v = self.b2 * v + (1 - self.b2) * d2
                else:
                    v = v - (1 - self.b2) * d2 * torch.sign(v - d2)
                self.v[k] = v
                out[k] = common[k] + eta * m / (v.sqrt() + self.tau)
            else:
                raise ValueError(self.kind)
        return out


def federated_sync(train: Dataset, test: Dataset, seed: int, sync_every: int | None = None,
                   rule: Callable[[], ServerRule] = ServerRule, cyclic: bool = False
                   ) -> list[float]:
    """Shared init; merge every ``sync_every`` local steps (None: once per epoch, like
    ``shared``, and with the same RNG consumption order). ``cyclic``: no averaging -- the model is
    handed from peer to peer (cyclical weight transfer, Chang et al. 2018), each peer keeping its
    own Adadelta + StepLR; one epoch = one pass over every shard in turn."""
    torch.manual_seed(seed)  # dropout
    server = rule()
    models = [build_model(seed) for _ in range(PEERS)]
    shards = [shard(train, i, PEERS, seed=seed) for i in range(PEERS)]
    loaders = [_loader(s, seed * 1000 + i) for i, s in enumerate(shards)]
    optimizers = [make_optimizer(m) for m in models]
    schedulers = [make_scheduler(o) for o in optimizers]
    test_loader = DataLoader(test, batch_size=TEST_BATCH_SIZE)
    accuracies = []
    steps = len(loaders[0])
    k = steps if sync_every is None else sync_every
    for _ in range(EPOCHS):
        iterators = [iter(loader) for loader in loaders]
        if cyclic:
            for i in range(PEERS):
                if i:
                    models[i].load_state_dict(models[i - 1].state_dict())
                _run_steps(models[i], iterators[i], optimizers[i], steps)
            for m in models[:-1]:
                m.load_state_dict(models[-1].state_dict())
        else:
            done = 0
            while done < steps:
                n = min(k, steps - done)
                common = {key: v.clone() for key, v in models[0].state_dict().items()}
                for model, it, optimizer in zip(models, iterators, optimizers, strict=True):
                    _run_steps(model, it, optimizer, n)
                done += n
                average = weighted_average([(m.state_dict(), 1.0) for m in models])
                merged = server(common, average)
                for model in models:
                    model.load_state_dict(merged)
        for s in schedulers:
            s.step()
        accuracies.append(float(evaluate(models[0], test_loader, DEVICE)["accuracy"]))
    return accuracies


def _run_steps(model: Net, iterator, optimizer: torch.optim.Optimizer, n: int) -> None:
    model.train()
    for _ in range(n):
        data, target = next(iterator)
        optimizer.zero_grad(set_to_none=True)
        F.nll_loss(model(data), target).backward()
        optimizer.step()


def centralized_batch(batch: int) -> Callable[[Dataset, Dataset, int], list[float]]:
    """Diagnostic only (changes the batch size): centralized with ``batch`` examples a step."""
    def run(train: Dataset, test: Dataset, seed: int) -> list[float]:
        torch.manual_seed(seed)
        model = build_model(seed)
        optimizer = make_optimizer(model)
        scheduler = make_scheduler(optimizer)
        loader = DataLoader(train, batch_size=batch, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        test_loader = DataLoader(test, batch_size=TEST_BATCH_SIZE)
        accuracies = []
        for _ in range(EPOCHS):
            train_epoch(model, loader, optimizer, DEVICE)
            scheduler.step()
            accuracies.append(float(evaluate(model, test_loader, DEVICE)["accuracy"]))
        return accuracies
    return run


def _fs(**kw):
    return lambda tr, te, s: federated_sync(tr, te, s, **kw)


VARIANTS: dict[str, Callable[[Dataset, Dataset, int], list[float]]] = {
    "centralized": centralized,
    "independent": lambda tr, te, s: federated(tr, te, s, "independent"),
    "shared": lambda tr, te, s: federated(tr, te, s, "shared"),
    "shared+opt": lambda tr, te, s: federated(tr, te, s, "shared+opt"),
    "shared+sum": lambda tr, te, s: federated(tr, te, s, "shared+sum"),
    "sync-epoch": _fs(),  # = shared, via the new loop (check)
    "sync14": _fs(sync_every=14),
    "sync1": _fs(sync_every=1),
    "slr2": _fs(rule=lambda: ServerRule("lr", eta=2.0)),
    "slr3-1": _fs(rule=lambda: ServerRule("lr", eta=[3.0, 1.0])),
    "avgm0.5": _fs(rule=lambda: ServerRule("momentum", beta=0.5)),
    "avgm0.9": _fs(rule=lambda: ServerRule("momentum", beta=0.9)),
    "sync14+avgm0.5": _fs(sync_every=14, rule=lambda: ServerRule("momentum", beta=0.5)),
    "sync14+avgm0.9": _fs(sync_every=14, rule=lambda: ServerRule("momentum", beta=0.9)),
    "adam.01": _fs(rule=lambda: ServerRule("adam", eta=0.01)),
    "adam.003": _fs(rule=lambda: ServerRule("adam", eta=0.003)),
    "yogi.01": _fs(rule=lambda: ServerRule("yogi", eta=0.01)),
    "cyclic": _fs(cyclic=True),
    "central-b192": centralized_batch(192),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-lr", type=float, default=float(PEERS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global SERVER_LR
    SERVER_LR = args.server_lr
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
