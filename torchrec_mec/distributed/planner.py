"""What TorchRec's planner sees of a QEBC: each table's logical shape and its compressed size.

TorchRec 1.8's ``EmbeddingShardingPlanner`` sizes a table from the tensor that the sharder's
``shardable_parameters`` returns: its shape gives the row and column splits, and
``numel() * element_size()`` its bytes (``compute_storage_usage``; a sharder's own
``storage_usage`` is no longer consulted). So for a compressed table the sharder hands the planner
a meta tensor of the table's logical shape ``[N, D]`` whose byte count is what the table really
holds: ``codes`` at their packed size plus ``codebooks``. Row- and column-wise shard sizes then come
out in table coordinates, as for an ``EmbeddingBagCollection``, and a memory budget fits tables
that would not fit uncompressed. Nothing here needs user-written ``ParameterConstraints``.
"""
from typing import Dict, List

import torch
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

from torchrec_mec.modules.quantized_embedding_bag_collection import (
    ProductQuantizedTable,
    QuantizedEmbeddingBagCollection,
)


FALLBACK_SHARDING_TYPES: List[str] = [
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
]
"""The sharding types of a compressed table with a fallback for new ids: each rank holds all of
it or none (a row-wise shard would have to route new ids by their fallback row, a column-wise one
to split the fallback's columns; neither is implemented)."""


class CompressedTableTensor(torch.Tensor):
    """A ``meta`` stand-in for a compressed table: shape ``[N, D]``, ``nbytes`` compressed bytes.

    Its dtype is ``uint8`` and its ``numel()`` the byte count, so TorchRec's
    ``numel() * element_size()`` is the compressed size exactly (the planner splits it over shards
    in proportion to their ``rows x columns``, which is exact for table-wise, data-parallel and
    column-wise shards; row-wise shards each hold a full copy of the codebooks, a few KiB that the
    proportional split spreads over the ranks).

    Args:
        rows: N.
        dim: D.
        nbytes: bytes the table holds.

    Example::

        >>> t = CompressedTableTensor(1000, 16, nbytes=4000 + 4096)
        >>> tuple(t.shape), t.numel() * t.element_size()
        ((1000, 16), 8096)
    """

    nbytes_: int

    @staticmethod
    def __new__(cls, rows: int, dim: int, nbytes: int) -> "CompressedTableTensor":
        t = torch.empty(rows, dim, dtype=torch.uint8, device="meta").as_subclass(cls)
        t.nbytes_ = nbytes
        return t

    def numel(self) -> int:
        return self.nbytes_

    def __deepcopy__(self, memo: Dict[int, object]) -> "CompressedTableTensor":
        # The planner deep-copies its search space; a meta tensor has no data to copy.
        return CompressedTableTensor(self.shape[0], self.shape[1], self.nbytes_)

    def __reduce_ex__(self, protocol):
        return CompressedTableTensor, (self.shape[0], self.shape[1], self.nbytes_)


def shardable_tables(module: QuantizedEmbeddingBagCollection) -> Dict[str, torch.Tensor]:
    """Per table, the tensor the planner sizes: ``weight`` for a full table (as for an EBC), a
    :class:`CompressedTableTensor` for a compressed one.

    Example::

        >>> from torchrec_mec import QuantizedEmbeddingBagConfig
        >>> qebc = QuantizedEmbeddingBagCollection([QuantizedEmbeddingBagConfig(name="t",
        ...     num_embeddings=100_000, embedding_dim=64, feature_names=["f"], num_subspaces=8,
        ...     codebook_size=256)])
        >>> t = shardable_tables(qebc)["t"]
        >>> t.numel() * t.element_size() == qebc.memory_report().total_bytes
        True
    """
    tables: Dict[str, torch.Tensor] = {}
    report = module.memory_report().tables
    for cfg in module.embedding_bag_configs():
        table = module.embedding_bags[cfg.name]
        if isinstance(table, ProductQuantizedTable):
            tables[cfg.name] = CompressedTableTensor(
                cfg.num_embeddings, cfg.embedding_dim, report[cfg.name].total_bytes
            )
        else:
            assert isinstance(table, nn.EmbeddingBag)
            tables[cfg.name] = table.weight
    return tables


def new_id_constraints(module: QuantizedEmbeddingBagCollection) -> Dict[str, ParameterConstraints]:
    """``ParameterConstraints`` for TorchRec's planner that keep every table with a fallback for
    new ids to :data:`FALLBACK_SHARDING_TYPES` (the sharder refuses the others for them); pass
    them as ``EmbeddingShardingPlanner(..., constraints=...)``, merged with your own.

    Example::

        >>> from torchrec_mec import QuantizedEmbeddingBagConfig
        >>> qebc = QuantizedEmbeddingBagCollection([QuantizedEmbeddingBagConfig(name="t",
        ...     num_embeddings=1200, embedding_dim=16, feature_names=["f"], num_subspaces=4,
        ...     codebook_size=256, coded_rows=1000, fallback_rows=20, promotion_slots=50)])
        >>> new_id_constraints(qebc)["t"].sharding_types
        ['data_parallel', 'table_wise']
    """
    return {
        cfg.name: ParameterConstraints(sharding_types=list(FALLBACK_SHARDING_TYPES))
        for cfg in module.embedding_bag_configs()
        if getattr(cfg, "has_fallback", False)
    }
