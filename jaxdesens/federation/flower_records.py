"""Engine-neutral payloads to Flower's records and back (flwr's Message API, flwr >= 1.21)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from jaxdesens.federation.protocol import Payload


def to_records(payload: Payload) -> RecordDict:
    records = {"config": ConfigRecord(dict(payload.config)), "metrics": MetricRecord(dict(payload.metrics))}
    if payload.arrays:
        records["arrays"] = ArrayRecord([np.ascontiguousarray(a) for a in payload.arrays])
    if payload.masks:
        records["masks"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.masks.items()})
    return RecordDict(records)


def from_records(content: RecordDict) -> Payload:
    arrays = content["arrays"].to_numpy_ndarrays() if "arrays" in content else []
    masks = {k: v.numpy() for k, v in content["masks"].items()} if "masks" in content else {}
    config = dict(content["config"]) if "config" in content else {}
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    return Payload(arrays=arrays, masks=masks, config=config, metrics=metrics)
