"""The processes of a federation on Flower's Deployment Runtime, started and stopped for the user.

  server  `flower-superlink` (one HTTP port for the clients' SuperNodes and for `flwr`; its state
          in WORKDIR/flower/superlink.db, so clients stay registered across a server restart),
          then `flwr run` of the jaxdesens Flower App with the job file; waits for the run.
  client  `flower-supernode` connecting to the server (it retries until `--connect_timeout`),
          configured by the client's own flags (its data, workdir, key, partition); exits when
          the server ends the run.
  all     one server and `--clients` clients on 127.0.0.1, one command.

Each process is started in its own process group and stopped with it (SuperNodes start
`flower-superexec` and a `flwr-clientapp` per message). Flower's executables are found next to
the running Python.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxdesens.config import TrainConfig
from jaxdesens.federation.config import FederatedConfig, ServerOptions
from jaxdesens.federation.coordinator import ServerJob
from jaxdesens.federation.participant import FAILED, FINISHED, NodeSettings

APP_NAME = "jaxdesens-federation"
CONNECTION = "jaxdesens"
DEFAULT_SERVER_ADDRESS = "0.0.0.0:9092"
REPLY_GRACE = 5.0  # seconds a client's SuperNode stays up after its last reply (see wait_for_reply)


class FlowerError(RuntimeError):
    """A Flower process failed or the run did not finish (the message says which and why)."""


def require_flwr() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("--engine=flower needs Flower: pip install 'jaxdesens[federated]'") from err


def executable(name: str) -> str:
    """A Flower command installed beside this Python (a venv need not be activated)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FlowerError(f"cannot find Flower's `{name}` next to {sys.executable} or on PATH; "
                          "pip install 'jaxdesens[federated]'")
    return found


def process_env(flower_home: Path) -> dict[str, str]:
    """The environment of Flower's processes: its home, this Python's bin first on PATH (SuperNodes
    start `flower-superexec` and `flwr-clientapp` by name) and this source tree importable."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flower_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes may share one accelerator
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--server_address={address!r}: expected HOST:PORT")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerError(f"{what} exited with status {process.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((target, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise FlowerError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def write_toml(path: Path, values: dict[str, Any]) -> Path:
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values))
    return path


def write_app(folder: Path) -> Path:
    """The Flower App `flwr run` packages: a pyproject.toml naming jaxdesens' ServerApp and
    ClientApp (the code itself is the installed jaxdesens on every machine)."""
    write_toml(folder / "pyproject.toml", {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": "1.0.0", "description": "jaxdesens federated training",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "jaxdesens",
                                  "components": {"serverapp": "jaxdesens.federation.flower_server:app",
                                                 "clientapp": "jaxdesens.federation.flower_client:app"},
                                  "config": {"job": ""}}}}})
    return folder


class Processes:
    """Child processes, each in its own group, stopped together (SIGTERM, then SIGKILL)."""

    def __init__(self):
        self.children: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, what: str, command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.children.append((what, process, log_path))
        return process

    def died(self) -> tuple[str, subprocess.Popen, Path] | None:
        for child in self.children:
            if child[1].poll() is not None:
                return child
        return None

    def stop(self, grace: float = 10.0) -> None:
        for _, process, _ in self.children:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, process, _ in self.children:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # what the group started (SuperExec, ClientApps) goes too
            process.wait()
        self.children.clear()


def terminate_on_sigterm() -> None:
    """SIGTERM ends this process through its `finally` blocks, so the processes it started stop too."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log)"
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


# ------------------------------------------------------------------------------------ server


def start_superlink(processes: Processes, address: str, flower_home: Path) -> str:
    """Starts the SuperLink on `address`; returns the address `flwr` and local SuperNodes use."""
    host, port = split_address(address)
    command = [executable("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
               "--database", str(flower_home / "superlink.db"), "--disable-runtime-dependency-installation"]
    process = processes.start("the SuperLink", command, flower_home / "superlink.log", process_env(flower_home))
    wait_for_port(host, port, process, 120, f"the SuperLink ({flower_home / 'superlink.log'})")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def run_app(job: ServerJob, link_address: str, flower_home: Path, processes: Processes,
            log: Callable[[str], None] = print, watch: Callable[[], None] | None = None) -> dict[str, Any]:
    """`flwr run` of the jaxdesens App with `job`; streams the server's output; returns its status."""
    workdir = Path(job.workdir)
    job_path = workdir / "server-job.json"
    job.write(job_path)
    status_path = workdir / ServerJob.STATUS
    status_path.unlink(missing_ok=True)
    write_toml(flower_home / "config.toml", {"superlink": {"default": CONNECTION, CONNECTION: {
        "address": link_address, "insecure": True}}})
    app = write_app(flower_home / "app")
    run_config = write_toml(flower_home / "run-config.toml", {"job": str(job_path)})
    command = [executable("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config), "--stream"]
    env = process_env(flower_home)
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                              start_new_session=True)
    import threading

    def forward():
        for line in runner.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    finished_at = None
    try:
        while runner.poll() is None:
            if watch is not None:
                watch()
            if status_path.exists():
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > 30:  # the log stream did not end with the run
                    _signal_group(runner, signal.SIGTERM)
            time.sleep(0.5)
    finally:
        if runner.poll() is None:
            _signal_group(runner, signal.SIGKILL)
        reader.join(timeout=5)
    if not status_path.exists():
        raise FlowerError(f"the ServerApp ended without a result (`flwr run` status {runner.returncode}); see "
                          f"{flower_home / 'superlink.log'}")
    import json

    status = json.loads(status_path.read_text())
    if status["state"] != "finished":
        raise FlowerError(f"the federation failed: {status['message']}")
    return status


def server_job(config: TrainConfig, fed: FederatedConfig, workdir: Path, options: ServerOptions,
               eval_data: str | None, stop_after: int | None) -> ServerJob:
    return ServerJob(config=config.to_json(), federated=dataclasses.asdict(fed), workdir=str(workdir),
                     eval_data=eval_data, options=dataclasses.asdict(options), stop_after=stop_after)


def last_evaluation(job: ServerJob) -> dict[str, Any] | None:
    """The held-out evaluation of the run's last round (WORKDIR/eval.json), if any round ran."""
    import json

    path = Path(job.workdir) / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_server(job: ServerJob, address: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`--role=server`: the SuperLink on `address` and the run; clients connect on their own."""
    require_flwr()
    flower_home = Path(job.workdir).resolve() / "flower"
    processes = Processes()
    try:
        terminate_on_sigterm()
        link = start_superlink(processes, address, flower_home)
        log(f"Flower SuperLink on {address} (log {flower_home / 'superlink.log'}); waiting for "
            f"{job.federated['clients']} clients")
        return run_app(job, link, flower_home, processes, log)
    finally:
        processes.stop()


# ------------------------------------------------------------------------------------ clients


def supernode_command(settings: NodeSettings, link_address: str, connect_timeout: float) -> list[str]:
    node_config = write_toml(Path(settings.workdir).resolve() / "node-config.toml", settings.to_node_config())
    return [executable("flower-supernode"), "--insecure", "--superlink", link_address,
            "--port", str(free_port()), "--node-config", str(node_config),
            "--max-wait-time", str(int(connect_timeout))]


def run_client(settings: NodeSettings, server_address: str, connect_timeout: float,
               log: Callable[[str], None] = print) -> None:
    """`--role=client`: this machine's SuperNode until the server ends the run (or it cannot
    reach the server for `connect_timeout` seconds)."""
    require_flwr()
    workdir = Path(settings.workdir).resolve()
    settings = dataclasses.replace(settings, workdir=str(workdir))
    for marker in (FINISHED, FAILED):
        (workdir / marker).unlink(missing_ok=True)
    flower_home = workdir / "flower"
    processes = Processes()
    log_path = workdir / "supernode.log"
    try:
        terminate_on_sigterm()
        node = processes.start(settings.label(), supernode_command(settings, server_address, connect_timeout), log_path,
                               process_env(flower_home))
        (workdir / "supernode.pid").write_text(str(node.pid))  # its process group: the SuperNode and its children
        log(f"{settings.label()}: SuperNode connecting to {server_address} (log {log_path}); waiting for the run")
        while node.poll() is None and not (workdir / FINISHED).exists() and not (workdir / FAILED).exists():
            time.sleep(0.5)
        wait_for_reply(log_path, node)  # a final evaluation, or why it refused, must reach the server
        if (workdir / FAILED).exists():
            import json

            reason = json.loads((workdir / FAILED).read_text())["reason"]
            raise FlowerError(f"{settings.label()} left the run: {reason}")
        if node.poll() is not None:
            raise FlowerError(f"{settings.label()}: its SuperNode exited with status {node.returncode} (could not "
                              f"reach {server_address} within --connect_timeout={connect_timeout:.0f} s, or failed); "
                              f"the end of {log_path}:\n{tail(log_path)}")
        log(f"{settings.label()}: the server ended the run")
    finally:
        processes.stop()


def wait_for_reply(log_path: Path, node: subprocess.Popen, timeout: float = 60.0) -> None:
    """The ClientApp marks the run finished (or refused) before its SuperNode sends the reply:
    stopping the SuperNode at once lost that reply (the clients' final evaluation; a refusal's
    reason). Waits until the log shows a reply sent after the last message received, the
    SuperNode exits, or `timeout`; then lingers `REPLY_GRACE` seconds, because the SuperLink
    answers "Node Unavailable" instead of handing over the stored reply of a node that went
    offline before the server pulled it (flwr 1.42; the server pulls every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while node.poll() is None and time.monotonic() < deadline:
        lines = log_path.read_text(errors="replace").splitlines()
        received = max((i for i, line in enumerate(lines) if "Receiving:" in line), default=-1)
        sending = max((i for i, line in enumerate(lines) if "Sending:" in line), default=-1)
        if sending > received and any("Sent successfully" in line for line in lines[sending:]):
            time.sleep(REPLY_GRACE)
            return
        time.sleep(0.5)


# ------------------------------------------------------------------------ one command, loopback


def federation_key(workdir: Path, given: str | None) -> str:
    """The clients' key: the one given, or a random one kept in the workdir (for resuming)."""
    if given is not None:
        return given
    path = workdir / "federation.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
    return str(path)


def run_all(job: ServerJob, data: str | None, key: str | None, connect_timeout: float,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """`--role=all`: the server and `clients` SuperNodes on 127.0.0.1. A client process that dies
    ends the run at once with the end of its log."""
    require_flwr()
    workdir = Path(job.workdir).resolve()
    flower_home = workdir / "flower"
    processes = Processes()
    key = federation_key(workdir, key)
    try:
        terminate_on_sigterm()
        link = start_superlink(processes, f"127.0.0.1:{free_port()}", flower_home)
        for i in range(job.federated["clients"]):
            settings = NodeSettings(workdir=str(workdir / f"client_{i}"), data=data, partition=i, federation_key=key)
            processes.start(f"client {i}", supernode_command(settings, link, connect_timeout),
                            workdir / f"client_{i}.log", process_env(workdir / f"client_{i}" / "flower"))
        log(f"Flower SuperLink on {link} and {job.federated['clients']} SuperNodes (logs {workdir}/client_<i>.log)")

        def watch():
            dead = processes.died()
            if dead is not None:
                what, process, path = dead
                raise FlowerError(f"{what} exited with status {process.returncode}; the end of {path}:\n{tail(path)}")

        return run_app(job, link, flower_home, processes, log, watch=watch)
    finally:
        processes.stop()
