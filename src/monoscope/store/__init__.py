"""Activation store: sharded, checksummed, resumable; read back in order or as shuffled batches."""

from monoscope.store.batches import Batch, RowStream
from monoscope.store.manifest import Manifest, RowPolicy, ShardInfo
from monoscope.store.reader import ActivationStore, RowLocation, StoreBatches
from monoscope.store.shard import Shard

__all__ = [
    "ActivationStore",
    "Batch",
    "Manifest",
    "RowLocation",
    "RowPolicy",
    "RowStream",
    "Shard",
    "ShardInfo",
    "StoreBatches",
]
