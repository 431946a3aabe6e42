"""Federated training on desensitized data (paper Section 3.4): FedAvg (and FedBN) over K clients.

The paper's flow: the server searches a mask on data it may see (`launch/search.py`); clients
download it with the model, desensitize their own images locally (`x * m`), train the FSM model
on them and upload parameters; the server averages them and sends the global model back.

  config.py      FederatedConfig (what is computed) and ServerOptions (what a server tolerates)
  data.py        each client's share, its labels as head rows, its batches and evaluation images
  protocol.py    what crosses a process boundary: config, masks + digest, keyed identity digests
  fedbn.py       which layers stay on a client under --bn=local; the server's stand-in for them
  client.py      one client's round and evaluation, the aggregation (pure, shared by both engines)
  server.py      the server's data, global model, checkpoints and per-round record
  simulation.py  all clients in one process, one jitted call per round over a (clients, data) mesh
  flower_*.py    the same on Flower's Deployment Runtime (ServerApp, ClientApp, the processes)

Nothing here imports flwr at module level: `jaxdesens.federation` imports without it.
"""
