"""Sharding a QuantizedEmbeddingBagCollection with TorchRec (DistributedModelParallel, planner)."""
from torchrec_mec.distributed.fused_optimizer import InBackwardOptimizer
from torchrec_mec.distributed.planner import CompressedTableTensor, shardable_tables
from torchrec_mec.distributed.quantized_embeddingbag import (
    QuantizedEmbeddingBagCollectionSharder,
    ShardedQuantizedEmbeddingBagCollection,
)

__all__ = [
    "CompressedTableTensor",
    "InBackwardOptimizer",
    "QuantizedEmbeddingBagCollectionSharder",
    "ShardedQuantizedEmbeddingBagCollection",
    "shardable_tables",
]
