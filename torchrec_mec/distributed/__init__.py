"""Sharding a QuantizedEmbeddingBagCollection with TorchRec (DistributedModelParallel, planner)."""
from torchrec_mec.distributed.fused_optimizer import InBackwardOptimizer
from torchrec_mec.distributed.planner import (
    FALLBACK_SHARDING_TYPES,
    CompressedTableTensor,
    new_id_constraints,
    shardable_tables,
)
from torchrec_mec.distributed.quantized_embeddingbag import (
    QuantizedEmbeddingBagCollectionSharder,
    ShardedQuantizedEmbeddingBagCollection,
)

__all__ = [
    "FALLBACK_SHARDING_TYPES",
    "CompressedTableTensor",
    "InBackwardOptimizer",
    "QuantizedEmbeddingBagCollectionSharder",
    "ShardedQuantizedEmbeddingBagCollection",
    "new_id_constraints",
    "shardable_tables",
]
