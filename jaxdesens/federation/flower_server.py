"""The server as a Flower ServerApp (Deployment Runtime: `flower-superlink` + `flwr run`).

The ServerApp process is started by the SuperLink for each `flwr run`; it reads its job from the
file named by the run config key `job` and drives `coordinator.Coordinator` through Flower's
Grid. Replies are pulled every half second (the Grid's own `send_and_receive` sleeps 3 s between
pulls), and a round waits at most `--round_timeout`.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from jaxdesens.federation.coordinator import ServerJob, run_server_job
from jaxdesens.federation.flower_records import from_records, to_records
from jaxdesens.federation.protocol import Payload, Reply

POLL_SECONDS = 0.5
# grain (imported by the data pipeline) gives the root logger a handler: without this every Flower
# record, DEBUG included, would be printed a second time. Flower's own handler still prints its own.
logging.getLogger("flwr").propagate = False
app = ServerApp()


class GridTransport:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.exchanges = 0

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def exchange(self, kind: str, payloads: dict[int, Payload], timeout: float) -> dict[int, Reply]:
        self.exchanges += 1
        nodes = sorted(payloads)
        messages = [Message(to_records(payloads[n]), dst_node_id=n, message_type=kind,
                            group_id=str(self.exchanges), ttl=timeout + 60.0) for n in nodes]
        ids = list(self.grid.push_messages(messages))
        waiting = dict(zip(ids, nodes))
        replies: dict[int, Reply] = {}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for message in self.grid.pull_messages(list(waiting)):
                node = waiting.pop(message.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                replies[node] = (Reply(error=message.error.reason) if message.has_error()
                                 else Reply(payload=from_records(message.content)))
            if waiting:
                time.sleep(POLL_SECONDS)
        for node in waiting.values():
            replies[node] = Reply(error=f"no reply within {timeout:.0f} s (--round_timeout): its SuperNode or "
                                        "ClientApp is stuck or was stopped")
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    job = ServerJob.read(str(context.run_config["job"]))
    run_server_job(job, GridTransport(grid), log=lambda text: print(text, flush=True))
