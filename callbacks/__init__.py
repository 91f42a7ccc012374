"""Lightning callbacks of spr_lightning: shard writers, run-directory checkpoints, adapter and model export."""

from callbacks.adapter import AdapterExport
from callbacks.checkpoint import RunDirCheckpoint
from callbacks.model_export import ModelExport
from callbacks.shards import ShardWriter

__all__ = ["AdapterExport", "ModelExport", "RunDirCheckpoint", "ShardWriter"]
