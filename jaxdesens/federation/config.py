"""The federated settings: what changes the computation (FederatedConfig, stored in run.json and
checked on resume) and how a real federation waits for and tolerates its clients (ServerOptions)."""

from __future__ import annotations

import dataclasses

from jaxdesens.config import TrainConfig

SPLITS = ("iid", "identity")
BN_MODES = ("average", "local")
OPTIMIZER_MODES = ("reset", "local")
ENGINES = ("simulation", "flower")


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """`bn=local` is FedBN (Li et al., ICLR 2021): every BatchNorm layer (scale, bias and running
    statistics) stays on its client; `eval_images` is how many of its own images each client
    evaluates the received global model on, with its own BatchNorm under `local`."""

    clients: int = 3
    rounds: int = 5
    local_steps: int = 10
    split: str = "iid"
    bn: str = "average"
    client_optimizer: str = "reset"
    partition_seed: int = 0
    eval_images: int = 256

    def __post_init__(self):
        for name in ("clients", "rounds", "local_steps", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("split", SPLITS), ("bn", BN_MODES), ("client_optimizer", OPTIMIZER_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps

    def stateful_clients(self) -> bool:
        """Whether clients carry state between rounds (their BatchNorm layers or their momentum)."""
        return self.bn == "local" or self.client_optimizer == "local"

    def train_config(self, config: TrainConfig) -> TrainConfig:
        """The training config a client step uses: its schedule spans all rounds' local steps."""
        return dataclasses.replace(config, steps=self.total_steps)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How a Flower server waits for clients and what it tolerates (not part of the run's identity).

    `min_clients` (default: all) is how many clients a round needs: a round in which fewer answer
    ends the run with a message naming each missing client and why; with enough, it proceeds with
    the rest. `round_timeout` bounds the wait for one round's replies, `connect_timeout` the wait
    for the clients to connect at the start.
    """

    min_clients: int | None = None
    round_timeout: float = 1800.0
    connect_timeout: float = 600.0

    def required(self, fed: FederatedConfig) -> int:
        needed = fed.clients if self.min_clients is None else self.min_clients
        if not 1 <= needed <= fed.clients:
            raise ValueError(f"--min_clients must be in 1..{fed.clients} (--clients), got {needed}")
        return needed
