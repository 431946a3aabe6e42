"""What server and clients say to each other (Section 3.4, steps I-II), independent of the engine.

* The server is the authority on the run: it sends the training configuration, the global model
  and its masks (the searched mask, or the bank of random hole-ratio-level masks) with their
  sha256 digest. A client checks the digest against the arrays it received and trains only under
  them; a client started with `--mask=FILE` accepts no other mask and refuses the run otherwise.
* Clients send back only parameters, example counts and metrics.
* No identity name leaves a client or the server. A client names each of its identities by
  `identity_digest` = HMAC-SHA256(federation key, name); the key is shared by the clients and
  never given to the server. At registration the server collects the digests, sorts their union
  into the classifier head's label table (row i of the head = the i-th digest) and sends each
  client only the rows of its own digests. The server therefore learns how many identities each
  client holds and which digests two clients share, never a name; a client learns the head's size
  and its own rows, never which digests other clients hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from jaxdesens.config import TrainConfig
from jaxdesens.federation.config import FederatedConfig

PROTOCOL = 1
# The simulation (one process, nothing crosses a boundary) orders its head with this public key
# unless given the federation's; a real federation's clients are given a secret one.
PUBLIC_KEY = b"jaxdesens-public-federation-key"
# TrainConfig fields a client takes from its own command line, never from the server
CLIENT_SIDE_FIELDS = ("data", "mask")


class ProtocolError(RuntimeError):
    """A message that breaks the protocol: a client refuses to train on it."""


def identity_digest(key: bytes, name: str) -> str:
    return hmac.new(key, name.encode("utf-8"), hashlib.sha256).hexdigest()


def label_table(digests: Iterable[str]) -> list[str]:
    """The classifier head's rows: the sorted union of the clients' identity digests."""
    return sorted(set(digests))


def head_order(names: Iterable[str], key: bytes) -> np.ndarray:
    """The head row of each name (in the given order) under the label-table scheme."""
    digests = [identity_digest(key, n) for n in names]
    row = {d: i for i, d in enumerate(label_table(digests))}
    return np.asarray([row[d] for d in digests], np.int32)


def read_key(path: str | None) -> bytes:
    """The federation key from a file (its raw bytes, at least 16), or the public key for None."""
    if path is None:
        return PUBLIC_KEY
    from pathlib import Path

    from jaxdesens.data.errors import DataError

    file = Path(path)
    if not file.is_file():
        raise DataError(f"--federation_key={path}: file not found (any secret of at least 16 bytes that every "
                        "client holds and the server does not, e.g. `head -c 32 /dev/urandom > federation.key`)")
    key = file.read_bytes()
    if len(key) < 16:
        raise DataError(f"--federation_key={path}: holds {len(key)} bytes; use at least 16 random bytes")
    return key


# ------------------------------------------------------------------------------------ masks


def mask_arrays(fixed: np.ndarray | None, bank: np.ndarray | None) -> dict[str, np.ndarray]:
    """The server's masks as they travel: a fixed mask or a level bank, uint8 0/1."""
    arrays = {}
    if fixed is not None:
        arrays["mask"] = (np.asarray(fixed) > 0.5).astype(np.uint8)
    if bank is not None:
        arrays["bank"] = np.asarray(bank).astype(np.uint8)
    return arrays


def masks_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over each array's name, shape and bytes (empty for clean training)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name], np.uint8)
        h.update(f"{name}{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def check_masks(arrays: dict[str, np.ndarray], digest: str, pinned: np.ndarray | None, who: str) -> None:
    """A client's checks on the masks it received: intact, and the one it was told to accept."""
    if masks_digest(arrays) != digest:
        raise ProtocolError(f"{who}: the masks received do not match their sha256 digest {digest[:16]}; "
                            "refusing to train on them")
    if pinned is not None:
        mine = mask_arrays(pinned, None)
        if "mask" not in arrays or masks_digest(mine) != masks_digest({"mask": arrays["mask"]}):
            got = f"mask sha256 {masks_digest({'mask': arrays['mask']})[:16]}" if "mask" in arrays else \
                ("random level masks" if "bank" in arrays else "no mask (clean images)")
            raise ProtocolError(f"{who} refuses the run: it accepts only the mask given by its --mask (sha256 "
                                f"{masks_digest(mine)[:16]}), the server sends {got}")


# ------------------------------------------------------------------------------------ config


def encode_run(config: TrainConfig, fed: FederatedConfig) -> str:
    """The run's configuration as the server sends it (no paths: data and mask stay local)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in CLIENT_SIDE_FIELDS}
    return json.dumps({"protocol": PROTOCOL, "config": values, "federated": dataclasses.asdict(fed)}, sort_keys=True)


def decode_run(text: str, data: str | None) -> tuple[TrainConfig, FederatedConfig]:
    """A client's view of the run: the server's configuration with its own data folder."""
    values = json.loads(text)
    if values.get("protocol") != PROTOCOL:
        raise ProtocolError(f"the server speaks protocol {values.get('protocol')}, this client {PROTOCOL}: run the "
                            "same jaxdesens version on every machine")
    return (TrainConfig.from_json({**values["config"], "data": data}),
            FederatedConfig(**values["federated"]))


def rows_for(table: list[str], digests: Iterable[str]) -> dict[str, int]:
    """The head rows of one client's digests (digests unknown to the table are left out)."""
    index = {d: i for i, d in enumerate(table)}
    return {d: index[d] for d in digests if d in index}


def encode_rows(rows: dict[str, int]) -> str:
    return json.dumps(rows, sort_keys=True)


def decode_rows(text: str) -> dict[str, int]:
    rows = json.loads(text)
    if not isinstance(rows, dict) or not all(isinstance(v, int) for v in rows.values()):
        raise ProtocolError("malformed label rows from the server")
    return rows


def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}


# ------------------------------------------------------------------------------- messages


@dataclasses.dataclass
class Payload:
    """One message's content in either direction, engine-neutral (the Flower adapters map it to
    Flower's ArrayRecord / ConfigRecord / MetricRecord)."""

    arrays: list[np.ndarray] = dataclasses.field(default_factory=list)
    masks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Reply:
    """A client's answer to one message: its payload, or why there is none."""

    payload: Payload | None = None
    error: str | None = None


def error_text(reason: str) -> str:
    """The readable part of an error a client raised ("<class 'X'>:<'text'>" -> "text")."""
    if reason.startswith("<class ") and ":<'" in reason:
        return reason.split(":<'", 1)[1].rstrip(">").rstrip("'")
    return reason
