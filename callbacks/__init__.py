"""Lightning callbacks of spr_lightning: shard writers and adapter export."""

from callbacks.adapter import AdapterExport
from callbacks.shards import ShardWriter

__all__ = ["AdapterExport", "ShardWriter"]
