"""Training: an SAE on an activation store (or a streamed model), with exact resume.

    from monoscope.train import train
    res = train("runs/x/sae", store="runs/x/acts", arch="topk", k=32, width="16x", tokens="50M")
    res.sae, res.metrics["fvu"], res.tokens_per_s

Modules: `config` (TrainConfig), `schedules` (λ warm-up, LR decay), `dead` (dead-feature counters,
resampling), `checkpoint` (atomic step folders), `trainer` (the loop, on small protocols), `data`
(store or stream), `log` (train_log.jsonl), `run` (`train`), `distributed` (`train_distributed`: torchrun,
data parallel and feature sharded), `cli` (`monoscope train`).
"""

from monoscope.train.checkpoint import Checkpoint, CheckpointDir, CheckpointSink, MemorySink
from monoscope.train.config import TrainConfig, TrainConfigError
from monoscope.train.dead import DeadFeatureTracker, resample_dead
from monoscope.train.distributed import DistributedError, train_distributed
from monoscope.train.run import TrainResult, train
from monoscope.train.trainer import BatchSource, NonFiniteError, Trainer, TrainingInterrupted

__all__ = [
    "BatchSource",
    "Checkpoint",
    "CheckpointDir",
    "CheckpointSink",
    "DeadFeatureTracker",
    "DistributedError",
    "MemorySink",
    "NonFiniteError",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "resample_dead",
    "train",
    "train_distributed",
]
