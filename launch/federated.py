"""Federated training on desensitized data (paper Section 3.4): FedAvg over K clients.

    python launch/federated.py --clients=3 --rounds=5 --local_steps=20 [--data=DIR] \
        [--model=fsm --mask=runs/search/mask.png] [--split=iid|identity] [--bn=average|local] \
        [--client_optimizer=reset|local] [--engine=simulation|flower] --workdir=DIR

Each client holds its own part of the training identities' images (--split), masks them with
the server's mask and trains --local_steps steps per round; the server averages the parameters
weighted by example counts. After every round the global model's held-out verification accuracy
(clean, and masked when training on masks) is printed and appended to WORKDIR/rounds.jsonl.
Re-running with the same --workdir resumes after the last finished round.

--engine=simulation (default): all clients in this process, vmapped and sharded over devices.
--engine=flower: a real federation on Flower. --role=all (default) starts the server here and
the clients as subprocesses on 127.0.0.1. On several machines:
    server:   python launch/federated.py --engine=flower --role=server --server_address=0.0.0.0:8080 ...
    client i: python launch/federated.py --engine=flower --role=client --partition=i \
                  --server_address=SERVER:8080 --workdir=LOCAL_DIR ...   (same training flags)
"""

from __future__ import annotations

import argparse
import os
import sys

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.config import TRAIN_HELP, TrainConfig

HELP = {
    **TRAIN_HELP,
    "mask": "the server's mask file (.png/.npy, from launch/search.py); none = random level masks",
    "steps": "not used: federated training runs rounds x local_steps steps",
    "holdout": "share of identities held out (the server's verification set)",
    "clients": "number of clients K", "rounds": "communication rounds R",
    "local_steps": "training steps per client per round",
    "split": "iid (images shuffled over clients) or identity (identity-disjoint clients)",
    "bn": "average (BatchNorm statistics averaged like parameters) or local (kept on each client, FedBN)",
    "client_optimizer": "reset (momentum restarts every round: stateless clients) or local (kept per client)",
    "partition_seed": "seed of the split of the training images over clients",
}
DEFAULTS = {"model": "fsm", "batch_size": 32, "lr": 0.05, "image_size": 64, "width": 0.25}


def main(argv: list[str] | None = None) -> None:
    from jaxdesens.federated import ENGINES, FederatedConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/federated", help="checkpoints, rounds.jsonl, eval.json (resumable)")
    add_progress_flag(parser, default=False)
    parser.add_argument("--engine", choices=ENGINES, default="simulation", help="simulation (one process) or flower")
    parser.add_argument("--role", choices=("all", "server", "client"), default="all",
                        help="flower: all = server + clients on 127.0.0.1; server or client for one machine each")
    parser.add_argument("--server_address", default=None,
                        help="flower: host:port the server listens on (server, default 0.0.0.0:8080) or connects "
                             "to (client); --role=all picks a free 127.0.0.1 port")
    parser.add_argument("--partition", type=int, default=None,
                        help="flower client: which part of --data is this client's (0..clients-1); -1 = all of "
                             "--data is this client's own folder (real deployment)")
    parser.add_argument("--stop_after", type=int, default=None,
                        help="stop after this round (a later run with the same workdir resumes)")
    add_dataclass_flags(parser, TrainConfig, HELP, defaults=DEFAULTS)
    add_dataclass_flags(parser, FederatedConfig, HELP)
    args = parser.parse_args(argv)
    if args.steps != TrainConfig.steps:
        raise ValueError("--steps is not used in federated training: it runs --rounds x --local_steps steps")
    config = dataclass_from_args(TrainConfig, args)
    fed = FederatedConfig(**{k: getattr(args, k) for k in FederatedConfig.__dataclass_fields__})

    if args.engine == "simulation":
        from jaxdesens.federated import run_simulation

        result = run_simulation(config, fed, args.workdir, stop_after=args.stop_after, progress=args.progress)
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # server and clients may share a device
        from jaxdesens import flower_app

        if args.role == "client":
            if args.partition is None or args.server_address is None:
                raise ValueError("--role=client needs --partition and --server_address=HOST:PORT")
            flower_app.start_client(config, fed, args.partition, args.server_address, args.workdir)
            return
        if args.role == "server":
            from jaxdesens.federated import prepare

            setup = prepare(config, fed, progress=args.progress)
            print(setup.describe("flower server"))
            server_address = args.server_address or flower_app.DEFAULT_SERVER_ADDRESS
            result = flower_app.start_server(setup, args.workdir, server_address, stop_after=args.stop_after)
        else:
            script = os.path.abspath(__file__)

            def client_command(i: int, address: str, workdir) -> list[str]:
                return [sys.executable, script, *argv, "--role=client", f"--partition={i}",
                        f"--server_address={address}", f"--workdir={workdir}"]

            result = flower_app.run_local_federation(config, fed, args.workdir, client_command,
                                                     stop_after=args.stop_after)
    if result is not None:
        text = ", ".join(f"{name} accuracy {result[name]['accuracy']:.4f}" for name in ("clean", "masked")
                         if name in result)
        print(f"after round {result['round']}: held-out {text}; per-round results in {args.workdir}/rounds.jsonl")


if __name__ == "__main__":
    run(main)
