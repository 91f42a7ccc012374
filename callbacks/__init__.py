"""Lightning callbacks of spr_lightning: shard writers, adapter and model export."""

from callbacks.adapter import AdapterExport
from callbacks.model_export import ModelExport
from callbacks.shards import ShardWriter

__all__ = ["AdapterExport", "ModelExport", "ShardWriter"]
