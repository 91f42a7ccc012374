"""Lightning callbacks of spr_lightning: shard writers (and, as stages land, adapter export)."""

from callbacks.shards import ShardWriter

__all__ = ["ShardWriter"]
