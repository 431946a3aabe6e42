"""Federated training on desensitized data (paper Section 3.4): FedAvg (or FedBN) over K clients.

    python launch/federated.py --clients=3 --rounds=5 --local_steps=20 [--data=DIR] \
        [--model=fsm --mask=runs/search/mask.png] [--split=iid|identity] [--bn=average|local] \
        [--client_optimizer=reset|local] [--engine=simulation|flower] --workdir=DIR

Each client holds its own part of the training identities' images (--split), masks them with
the server's mask and trains --local_steps steps per round; the server averages the parameters
weighted by example counts. After every round the global model's held-out verification accuracy
(clean, and masked when training on masks) is printed and appended to WORKDIR/rounds.jsonl, and
each client's evaluation of it on its own images to WORKDIR/clients.jsonl. Re-running with the
same --workdir resumes after the last finished round.

--engine=simulation (default): all clients in this process, sharded over devices.
--engine=flower: Flower's Deployment Runtime. --role=all (default) starts a SuperLink, the
clients' SuperNodes and the run on 127.0.0.1. On several machines (see the README):
    server:   python launch/federated.py --engine=flower --role=server --server_address=0.0.0.0:9092 \
                  --eval_data=HELD_OUT_DIR --workdir=DIR ...   (the run's training flags)
    client:   python launch/federated.py --engine=flower --role=client --server_address=SERVER:9092 \
                  --data=MY_DIR --federation_key=KEY --workdir=LOCAL_DIR   (no training flags)
"""

from __future__ import annotations

import argparse
import sys

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.config import TRAIN_HELP, TrainConfig

HELP = {
    **TRAIN_HELP,
    "data": "identity folder (a client: its own; the server: the common layout it splits); none = synthetic",
    "mask": "the server's mask (.png/.npy, from launch/search.py); a client: the only mask it accepts",
    "steps": "not used: federated training runs rounds x local_steps steps",
    "holdout": "share of identities held out (the server's verification set)",
    "clients": "number of clients K", "rounds": "communication rounds R",
    "local_steps": "training steps per client per round",
    "split": "iid (images shuffled over clients) or identity (identity-disjoint clients)",
    "bn": "average (BatchNorm averaged like the other layers) or local (FedBN: every BatchNorm layer stays on "
          "its client)",
    "client_optimizer": "reset (momentum restarts every round: stateless clients) or local (kept per client)",
    "partition_seed": "seed of the split of the training images over clients",
    "eval_images": "images of its own each client evaluates the global model on after every round",
}
DEFAULTS = {"model": "fsm", "batch_size": 32, "lr": 0.05, "image_size": 64, "width": 0.25}
CLIENT_FLAGS = ("--data", "--mask", "--workdir", "--engine", "--role", "--server_address", "--partition",
                "--federation_key", "--client_name", "--connect_timeout", "--progress")


def client_flags_only(argv: list[str]) -> None:
    """A client takes the run's configuration from the server: refuse training flags it would ignore."""
    ignored = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in CLIENT_FLAGS]
    if ignored:
        raise ValueError(f"--role=client takes the run's configuration from the server; remove {', '.join(ignored)} "
                         f"(a client accepts only {', '.join(CLIENT_FLAGS)})")


def main(argv: list[str] | None = None) -> None:
    from jaxdesens.federation.config import ENGINES, FederatedConfig, ServerOptions

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/federated", help="checkpoints, rounds.jsonl, eval.json (resumable)")
    add_progress_flag(parser, default=False)
    parser.add_argument("--engine", choices=ENGINES, default="simulation", help="simulation (one process) or flower")
    parser.add_argument("--role", choices=("all", "server", "client"), default="all",
                        help="flower: all = server + clients on 127.0.0.1; server or client for one machine each")
    parser.add_argument("--server_address", default=None,
                        help="flower: HOST:PORT the server listens on (server, default 0.0.0.0:9092) or connects "
                             "to (client)")
    parser.add_argument("--partition", type=int, default=-1,
                        help="flower client: -1 (default) = all of --data is this client's own folder; i = part i "
                             "of a common layout the server also holds")
    parser.add_argument("--federation_key", default=None,
                        help="file with the clients' shared secret that names identities by HMAC (never give it to "
                             "the server); --role=all makes one in the workdir")
    parser.add_argument("--client_name", default=None, help="flower client: how the server names this client")
    parser.add_argument("--eval_data", default=None,
                        help="flower server: its own held-out identity folder, used whole for verification "
                             "(otherwise the held-out split of --data)")
    parser.add_argument("--min_clients", type=int, default=None,
                        help="flower server: clients a round needs (default all); with fewer the run ends")
    parser.add_argument("--round_timeout", type=float, default=1800.0, help="flower server: seconds a round waits")
    parser.add_argument("--connect_timeout", type=float, default=600.0,
                        help="flower: seconds the server waits for clients / a client keeps trying to reach it")
    parser.add_argument("--stop_after", type=int, default=None,
                        help="stop after this round (a later run with the same workdir resumes)")
    add_dataclass_flags(parser, TrainConfig, HELP, defaults=DEFAULTS)
    add_dataclass_flags(parser, FederatedConfig, HELP)
    args = parser.parse_args(argv)
    if args.steps != TrainConfig.steps:
        raise ValueError("--steps is not used in federated training: it runs --rounds x --local_steps steps")

    if args.engine == "flower" and args.role == "client":
        from jaxdesens.federation import flower_deploy
        from jaxdesens.federation.participant import NodeSettings

        client_flags_only(argv)
        if args.server_address is None:
            raise ValueError("--role=client needs --server_address=HOST:PORT of the server")
        settings = NodeSettings(workdir=args.workdir, data=args.data, partition=args.partition,
                                federation_key=args.federation_key, mask=args.mask, name=args.client_name)
        try:
            flower_deploy.run_client(settings, args.server_address, args.connect_timeout)
        except flower_deploy.FlowerError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        return

    config = dataclass_from_args(TrainConfig, args)
    fed = FederatedConfig(**{k: getattr(args, k) for k in FederatedConfig.__dataclass_fields__})
    if args.engine == "simulation":
        from jaxdesens.federation.simulation import run_simulation

        result = run_simulation(config, fed, args.workdir, stop_after=args.stop_after,
                                federation_key=args.federation_key, progress=args.progress)
    else:
        from pathlib import Path

        from jaxdesens.federation import flower_deploy

        options = ServerOptions(min_clients=args.min_clients, round_timeout=args.round_timeout,
                                connect_timeout=args.connect_timeout)
        options.required(fed)
        job = flower_deploy.server_job(config, fed, Path(args.workdir).resolve(), options, args.eval_data,
                                       args.stop_after)
        try:
            if args.role == "server":
                flower_deploy.run_server(job, args.server_address or flower_deploy.DEFAULT_SERVER_ADDRESS)
            else:
                flower_deploy.run_all(job, args.data, args.federation_key, args.connect_timeout)
        except flower_deploy.FlowerError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        result = flower_deploy.last_evaluation(job)
    if result is not None:
        text = ", ".join(f"{name} accuracy {result[name]['accuracy']:.4f}" for name in ("clean", "masked")
                         if name in result)
        print(f"after round {result['round']}: held-out {text}; per-round results in {args.workdir}/rounds.jsonl")


if __name__ == "__main__":
    run(main)
