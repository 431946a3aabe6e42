"""The client as a Flower ClientApp (Deployment Runtime: `flower-supernode`).

The SuperNode starts a fresh ClientApp process for every message (flwr 1.42 still does), so
each handler rebuilds the client from its node config (the flags of `launch/federated.py
--role=client`) and the message; its state between rounds lives in its `--workdir`.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from jaxdesens.federation.flower_records import from_records, to_records
from jaxdesens.federation.participant import Client, NodeSettings

# grain (imported by the data pipeline) gives the root logger a handler: without this every Flower
# record, DEBUG included, would be printed a second time. Flower's own handler still prints its own.
logging.getLogger("flwr").propagate = False
app = ClientApp()


def _answer(action: str, message: Message, context: Context) -> Message:
    client = Client(NodeSettings.from_node_config(dict(context.node_config)),
                    log=lambda text: print(text, flush=True))
    reply = client.handle(action, from_records(message.content))
    return Message(to_records(reply), reply_to=message)


@app.query("register")
def register(message: Message, context: Context) -> Message:
    return _answer("register", message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    return _answer("train", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _answer("evaluate", message, context)
