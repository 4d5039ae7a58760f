"""A peer's configuration: small typed sections, each field's default and help written once.

:class:`PeerConfig` names the peer (``num`` of ``total``) and its rendezvous and composes the
sections :class:`DataConfig`, :class:`TrainConfig`, :class:`MergeConfig`,
:class:`NetworkConfig`, :class:`JobAccessConfig` and :class:`FilesConfig`. A field's help is
its metadata; ``peerlearn peer`` builds its options from it (:mod:`learner.options`), so the
command line, the Python API and the demo fill in the same dataclasses with the same
defaults. Sections can be given whole or field by field::

    PeerConfig(0, 3, "host:5555", train=TrainConfig(epochs=5))
    PeerConfig(num=0, total=3, rendezvous="host:5555", epochs=5)   # the same config

and read field by field too (``config.train.epochs``; ``config.epochs`` also works).

This module imports neither torch nor numpy: the CLI builds its parser from it on the base
install.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from learner.robust_rule import Robust
from overlay.membership import JOB_SECRET_ENV, JobPolicy, policy_from_files

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from overlay.wire import Limits

__all__ = [
    "CODEC_CHOICES",
    "DATASET_CHOICES",
    "DataConfig",
    "FilesConfig",
    "JobAccessConfig",
    "MergeConfig",
    "NetworkConfig",
    "PeerConfig",
    "TrainConfig",
    "option",
]

DATASET_CHOICES = ("digits", "mnist", "fashion-mnist", "folder")
CODEC_CHOICES = ("raw", "fp16", "int8")
REQUIRED: Any = dataclasses.MISSING
"""The default of a field that has none."""
"""The codecs of :mod:`overlay.codecs` (a test checks they agree; no numpy here)."""


def option(default: Any, help: str, *flags: str, kind: str | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    """A config field: its default (:data:`REQUIRED`: none) and its help, once.
    ``flags``: its command-line spellings (none: Python API only). ``kind`` names the
    argument's parser in :mod:`learner.options` (``int``, ``float``, ``host_port``,
    ``partition``, ``robust``) or its action (``store_true``, ``store_false``)."""
    metadata = {"help": help, "flags": flags, "kind": kind, "choices": choices,
                "metavar": metavar}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DataConfig:
    """What this peer trains on and how the training set is split among the peers."""

    dataset: str = option(
        "digits", "digits: 10,000 real MNIST digits, offline; mnist: full MNIST (downloads, "
        "or IDX files in --data-dir); fashion-mnist: Debian's package; folder: your images "
        "in --data-dir, ImageFolder layout", "--dataset", choices=DATASET_CHOICES)
    data_dir: str | None = option(None, "look for data set files here first", "--data-dir")
    data_hook: str | None = option(
        None, "your own data: a function returning (train, test) datasets", "--data",
        metavar="MODULE:FUNCTION")
    train_set: Dataset[Any] | None = option(
        None, "your own training data as an object (Python API); overrides dataset and "
        "data_hook")
    test_set: Dataset[Any] | None = option(
        None, "your own test data as an object (Python API)")
    partition: str = option(
        "iid", "how the training set is split among peers: iid, dirichlet:ALPHA (label "
        "skew), classes:K (K classes per peer)", "--partition", kind="partition")

    def __post_init__(self) -> None:
        if (self.train_set is None) != (self.test_set is None):
            raise ValueError("give both train_set and test_set, or neither")


@dataclass(frozen=True)
class TrainConfig:
    """The model and the local training."""

    model_spec: str | None = option(
        None, "your own model: a function returning an nn.Module (default: the MNIST CNN); "
        "every peer of a job must use the same architecture", "--model",
        metavar="MODULE:FACTORY")
    model_factory: Callable[[], nn.Module] | None = option(
        None, "your own model factory as an object (Python API); overrides model_spec")
    epochs: int = option(3, "epochs this peer trains (a resumed peer trains only the rest)",
                         "--epochs", kind="int")
    batch_size: int = option(64, "training batch", "--batch-size", kind="int")
    test_batch_size: int = option(1000, "evaluation batch")
    lr: float = option(1.0, "Adadelta learning rate", "--lr", kind="float")
    gamma: float = option(0.7, "StepLR decay per epoch", "--gamma", kind="float")
    seed: int | None = option(
        None, "initial weights seed (default: derived from the job name, so that all peers "
        "start alike)", "--seed", kind="int")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", "--device")
    threads: int | None = option(None, "torch CPU threads (default: torch's)", "--threads",
                                 kind="int")
    progress: bool = option(True, "no progress bar while training", "--no-progress",
                            kind="store_false")


@dataclass(frozen=True)
class MergeConfig:
    """How received models are waited for, weighted, filtered and combined with ours."""

    merge_wait: float = option(
        60.0, "seconds to wait for the neighbours' models of an epoch before merging what "
        "came; later models are merged at the next epoch, weighted down as stale",
        "--merge-wait", kind="float")
    fanout: int | None = option(
        None, "send each epoch's model to K neighbours (default: to every member)",
        "--fanout", kind="int", metavar="K")
    graph: str = option(
        "exponential", "the fan-out graph: exponential (a model reaches everyone in about "
        "log2 N epochs; fewest NATed-NATed links) or ring (K successors, reshuffled per epoch)",
        "--graph", choices=("exponential", "ring"))
    staleness_exponent: float = option(
        0.5, "a model S epochs behind weighs (S+1)^-A times its samples (0: no decay)",
        "--staleness-exponent", kind="float", metavar="A")
    max_staleness: int = option(10, "refuse models more epochs behind than this",
                                "--max-staleness", kind="int")
    gate: bool = option(
        False, "refuse received models that score clearly worse than ours on a local "
        "validation split (10% of our data)", "--gate", kind="store_true")
    gate_margin: float = option(5.0, "accuracy points below ours that the gate tolerates",
                                "--gate-margin", kind="float")
    val_fraction: float = option(
        0.1, "part of the local training data held out for the gate (only with the gate)")
    robust: Robust = option(
        Robust(), "how received models are combined with ours: none = weighted average; "
        "median = coordinate-wise median; trimmed:B = coordinate-wise mean without the B "
        "fraction (0 <= B < 0.5, at least one) at each end; clip:T = differences from our "
        "model scaled down to at most T times the median difference norm, then the weighted "
        "average. Bounds what a poisoned model can do", "--robust", kind="robust",
        metavar="none|median|trimmed:B|clip:T")
    bootstrap_peers: int = option(
        3, "a newcomer starts from the average of up to this many members' models",
        "--bootstrap-peers", kind="int")
    bootstrap_timeout: float = option(
        20.0, "seconds a newcomer waits for its donors, then uses what arrived",
        "--bootstrap-timeout", kind="float")

    def __post_init__(self) -> None:
        if self.graph not in ("exponential", "ring"):
            raise ValueError(f"--graph must be exponential or ring, got {self.graph!r}")
        if self.fanout is not None and self.fanout < 1:
            raise ValueError(f"--fanout must be at least 1, got {self.fanout}")


@dataclass(frozen=True)
class NetworkConfig:
    """How this peer takes part in the job: addresses, the wire codec, when to start and leave."""

    listen: str | None = option(
        None, "listen for peers on HOST:PORT over ZeroMQ (port 0 picks one; --client is the "
        "old spelling; default: reached over WebRTC only)", "--listen", "--client",
        kind="host_port")
    advertise: str | None = option(
        None, "announce this HOST:PORT instead of the listen address (port forwarding)",
        "--advertise", kind="host_port")
    job: str = option("mnist", "swarm name; all peers of a job train the same model", "--job")
    codec: str = option("raw", "how our model travels: raw, fp16, int8 (blockwise), or auto (a "
                        "codec per neighbour from its link kind and measured throughput)",
                        "--codec",
                        choices=(*CODEC_CHOICES, "auto"))
    limits: Limits | None = option(
        None, "what we accept from other peers (default: sized to our own model)")
    min_peers: int = option(
        1, "wait until this many peers (this one included) are in the job before training "
        "(1: start at once)", "--min-peers", kind="int")
    min_peers_timeout: float = option(
        600.0, "train with whoever is there after waiting this long for --min-peers; a peer "
        "resuming from its checkpoint does not wait", "--min-peers-timeout", kind="float",
        metavar="SECONDS")
    linger: float = option(2.0, "seconds to keep serving after the last epoch (late fetches, "
                           "final deliveries)", "--linger", kind="float")
    lanes: int = option(3, "WebRTC peer connections per link; large models stripe over them "
                        "(1: a single SCTP association)", "--lanes", kind="int", metavar="N")

    def __post_init__(self) -> None:
        if not 1 <= self.lanes <= 16:
            raise ValueError(f"--lanes must be 1..16, got {self.lanes}")
        if self.codec not in (*CODEC_CHOICES, "auto"):
            raise ValueError(f"--codec must be one of {sorted(CODEC_CHOICES)}, "
                             f"got {self.codec!r}")


@dataclass(frozen=True)
class JobAccessConfig:
    """A closed job: the join secret we prove and the peers we accept."""

    job_secret_file: str | None = option(
        None, "closed job: file holding the job's join secret (not the secret: command lines "
        f"show in ps; default: the environment variable {JOB_SECRET_ENV}, if set); members "
        "without a valid proof of it are ignored", "--job-secret", metavar="PATH")
    job_secret_env: str | None = option(
        None, "closed job: the name of an environment variable holding the join secret")
    allow_peers_file: str | None = option(
        None, "closed job: file of the peer ids allowed in the job, one per line (# comments); "
        "other members are ignored even if the rendezvous admits them", "--allow-peers",
        metavar="PATH")

    def policy(self) -> JobPolicy | None:
        """The job's policy (ValueError if a file cannot be read or holds no valid entry);
        None for an open job."""
        return policy_from_files(self.job_secret_file, self.job_secret_env,
                                 self.allow_peers_file)


@dataclass(frozen=True)
class FilesConfig:
    """Where this peer keeps its key, its checkpoint and its event log."""

    key_file: str | None = option(
        None, "identity key file (created on first run; default "
        "~/.local/share/peerlearn/peer-NUM.pem)", "--key")
    checkpoint_file: str | None = option(
        None, "saved after every epoch (default ~/.local/share/peerlearn/JOB-peer-NUM.ckpt)",
        "--checkpoint")
    resume: bool = option(True, "start afresh even if a checkpoint exists", "--no-resume",
                          kind="store_false")
    events_file: str | None = option(
        None, "append JSON lines of progress events (start, epoch, done, ...) to this file",
        "--events")


SECTIONS: Mapping[str, type[Any]] = {
    "data": DataConfig, "train": TrainConfig, "merge": MergeConfig,
    "network": NetworkConfig, "access": JobAccessConfig, "files": FilesConfig,
}
"""PeerConfig's sections by attribute name."""

_SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(init=False)
class PeerConfig:
    """Everything a peer needs; the CLI only fills it in (and so can a Python script)."""

    num: int = option(REQUIRED, "this peer's part of the data, 0..TOTAL-1", "--num",
                      kind="int")
    total: int = option(REQUIRED, "number of parts the training set is split into",
                        "--total", kind="int")
    rendezvous: str = option(REQUIRED, "rendezvous HOST:PORT (--server is the old spelling)",
                             "--rendezvous", "--server", kind="host_port")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    access: JobAccessConfig = field(default_factory=JobAccessConfig)
    files: FilesConfig = field(default_factory=FilesConfig)

    def __init__(self, num: int, total: int, rendezvous: str, *,
                 data: DataConfig | None = None, train: TrainConfig | None = None,
                 merge: MergeConfig | None = None, network: NetworkConfig | None = None,
                 access: JobAccessConfig | None = None, files: FilesConfig | None = None,
                 **flat: Any) -> None:
        """Sections given whole, or any of their fields by name (``epochs=5``): a field given
        by name replaces that field of the section given (or of the default section)."""
        self.num, self.total, self.rendezvous = num, total, rendezvous
        given: dict[str, Any] = {"data": data, "train": train, "merge": merge,
                                 "network": network, "access": access, "files": files}
        unknown = sorted(set(flat) - set(_SECTION_OF))
        if unknown:
            raise TypeError(f"PeerConfig got unknown fields {unknown}")
        for name, cls in SECTIONS.items():
            section = given[name] if given[name] is not None else cls()
            mine = {k: v for k, v in flat.items() if _SECTION_OF[k] == name}
            setattr(self, name, dataclasses.replace(section, **mine) if mine else section)
        if not 0 <= self.num < self.total:
            raise ValueError(f"--num must be in 0..{self.total - 1}, got {self.num}")

    if not TYPE_CHECKING:  # flat reads for scripts (config.epochs); the library reads sections
        def __getattr__(self, name: str) -> Any:
            section = _SECTION_OF.get(name)
            if section is None:
                raise AttributeError(f"'PeerConfig' object has no attribute {name!r}")
            return getattr(object.__getattribute__(self, section), name)

    def membership(self) -> JobPolicy | None:
        """The closed job's policy (:meth:`JobAccessConfig.policy`); None for an open job."""
        return self.access.policy()

    def flat(self) -> dict[str, Any]:
        """Every field by its own name (``num``, ..., ``epochs``, ...), sections flattened."""
        values: dict[str, Any] = {"num": self.num, "total": self.total,
                                  "rendezvous": self.rendezvous}
        for name in SECTIONS:
            section = getattr(self, name)
            values.update({f.name: getattr(section, f.name) for f in fields(section)})
        return values
