"""The lookup on one rank: a local ``QuantizedEmbeddingBagCollection`` over that rank's shards.

TorchRec's ``EmbeddingSharding`` classes decide which shards a rank holds (``ShardedEmbeddingTable``:
row and column offsets and sizes in table coordinates ``[N, D]``) and in which order their features
arrive after the input dist. This module turns those shards into local QEBC tables, so each rank
runs the same FBGEMM-backed lookup as the unsharded module:

- a compressed shard of rows ``[r0, r0 + n)`` and columns ``[c0, c0 + c)`` holds
  ``codes[r0:r0 + n, c0/d : (c0 + c)/d]`` and ``codebooks[c0/d : (c0 + c)/d]`` (``d = D / M``): a
  column split is a split of the subspaces, so its boundaries must fall on multiples of ``d``;
- a full shard holds ``weight[r0:r0 + n, c0:c0 + c]``.
"""
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.types import ShardMetadata
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec.modules.quantized_embedding_bag_collection import (
    ProductQuantizedTable,
    QuantizedEmbeddingBagCollection,
)
from torchrec_mec.modules.quantized_embedding_configs import QuantizedEmbeddingBagConfig


@dataclass(frozen=True)
class LocalShard:
    """One shard held by this rank: its table, its local name, where it sits in ``[N, D]``, and
    its metadata in the plan (``None`` for a data-parallel replica)."""

    table: str
    local_name: str
    offsets: Tuple[int, int]
    sizes: Tuple[int, int]
    metadata: Optional[ShardMetadata]


class QuantizedShardsLookup(nn.Module):
    """Pooled lookup of one rank's shards of a QEBC for one sharding type.

    Args:
        grouped_configs: this rank's shards, grouped as the TorchRec ``EmbeddingSharding`` groups
            them (their features arrive from the input dist in this order).
        source: the unsharded QEBC (its configs; its values unless it is on ``meta``).
        device: where the shards live.
        pool_mean_as_sum: pool MEAN tables as SUM (row-wise shards hold partial sums; the mean is
            taken after the output dist has reduced them).
        sum_codebook_gradients_over: a process group over which codebook gradients are summed in
            backward (row-wise shards hold replicated codebooks, each rank a part of the gradient).

    Example::

        >>> from torchrec.distributed.embedding_types import EmbeddingComputeKernel, ShardedEmbeddingTable
        >>> from torchrec.modules.embedding_configs import DataType
        >>> from torchrec_mec import QuantizedEmbeddingBagConfig
        >>> qebc = QuantizedEmbeddingBagCollection([QuantizedEmbeddingBagConfig(name="t",
        ...     num_embeddings=10, embedding_dim=8, feature_names=["f"], num_subspaces=4,
        ...     codebook_size=16)])
        >>> shard = ShardedEmbeddingTable(name="t", num_embeddings=10, embedding_dim=8,
        ...     feature_names=["f"], local_rows=10, local_cols=8,
        ...     compute_kernel=EmbeddingComputeKernel.DENSE)
        >>> group = GroupedEmbeddingConfig(DataType.FP32, PoolingType.SUM, False, False,
        ...     EmbeddingComputeKernel.DENSE, [shard])
        >>> lookup = QuantizedShardsLookup([group], qebc, torch.device("cpu"))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 2]), torch.tensor([2]))
        >>> torch.equal(lookup(kjt), qebc(kjt).values())
        True
    """

    def __init__(
        self,
        grouped_configs: List[GroupedEmbeddingConfig],
        source: QuantizedEmbeddingBagCollection,
        device: Optional[torch.device],
        pool_mean_as_sum: bool = False,
        sum_codebook_gradients_over: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        configs: Dict[str, QuantizedEmbeddingBagConfig] = {
            cfg.name: cfg for cfg in source.embedding_bag_configs()  # type: ignore[misc]
        }
        self.shards: List[LocalShard] = []
        local_configs: List[QuantizedEmbeddingBagConfig] = []
        self._feature_names: List[str] = []
        for group in grouped_configs:
            for table in group.embedding_tables:
                cfg = configs[table.name]
                meta = table.local_metadata
                offsets = (meta.shard_offsets[0], meta.shard_offsets[1]) if meta else (0, 0)
                sizes = (table.local_rows, table.local_cols)
                count = sum(s.table == cfg.name for s in self.shards)
                shard = LocalShard(cfg.name, f"{cfg.name}#{count}" if count else cfg.name,
                                   offsets, sizes, meta)
                local_configs.append(_local_config(cfg, shard, pool_mean_as_sum))
                self._feature_names += local_configs[-1].feature_names
                self.shards.append(shard)
        self.qebc = QuantizedEmbeddingBagCollection(
            local_configs, is_weighted=source.is_weighted(), device=device
        )
        if source.device.type != "meta":
            self._copy_from(source, configs)
        if sum_codebook_gradients_over is not None:
            for shard in self.shards:
                table = self.qebc.embedding_bags[shard.local_name]
                if isinstance(table, ProductQuantizedTable):
                    table.codebooks.register_hook(
                        partial(_sum_over_ranks, group=sum_codebook_gradients_over)
                    )

    def local_tensors(self, shard: LocalShard) -> Dict[str, torch.Tensor]:
        """The shard's state under the unsharded names: ``codes`` and ``codebooks``, or ``weight``."""
        table = self.qebc.embedding_bags[shard.local_name]
        if isinstance(table, ProductQuantizedTable):
            return {"codes": table.codes, "codebooks": table.codebooks}
        return {"weight": table.weight}

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if not self.shards:
            # Requires grad (as TorchRec's empty-rank lookup does) so that this rank joins the
            # output dist's backward collective like the others.
            return torch.empty(
                features.stride(), 0, device=features.values().device, requires_grad=True
            )
        # Rename positionally: the input dist delivers features in shard order, and a rank may hold
        # several column shards of one table, each reading the same feature.
        local = KeyedJaggedTensor(
            keys=self._feature_names,
            values=features.values(),
            weights=features.weights_or_none(),
            lengths=features.lengths(),
            stride=features.stride(),
        )
        return self.qebc(local).values()

    @torch.no_grad()
    def _copy_from(
        self, source: QuantizedEmbeddingBagCollection, configs: Dict[str, QuantizedEmbeddingBagConfig]
    ) -> None:
        for shard in self.shards:
            (r0, c0), (rows, cols) = shard.offsets, shard.sizes
            table = source.embedding_bags[shard.table]
            if isinstance(table, ProductQuantizedTable):
                d = configs[shard.table].subspace_dim
                books = table.codebooks[c0 // d : (c0 + cols) // d]
                codes = table.codes[r0 : r0 + rows, c0 // d : (c0 + cols) // d]
                self.qebc.load_codes(shard.local_name, codes.to(self.qebc.device),
                                     books.to(self.qebc.device))
            else:
                self.qebc.embedding_bags[shard.local_name].weight.copy_(
                    table.weight[r0 : r0 + rows, c0 : c0 + cols]
                )


def _local_config(
    cfg: QuantizedEmbeddingBagConfig, shard: LocalShard, pool_mean_as_sum: bool
) -> QuantizedEmbeddingBagConfig:
    (_, c0), (rows, cols) = shard.offsets, shard.sizes
    subspaces = 1
    if cfg.compressed:
        d = cfg.subspace_dim
        if c0 % d or cols % d:
            raise ValueError(
                f"table {cfg.name!r}: a column-wise shard [{c0}, {c0 + cols}) does not fall on "
                f"subspace boundaries (multiples of embedding_dim / num_subspaces = {d}); give "
                f"column_wise(size_per_rank=...) sizes that are multiples of {d}"
            )
        subspaces = cols // d
    return QuantizedEmbeddingBagConfig(
        name=shard.local_name,
        num_embeddings=rows,
        embedding_dim=cols,
        feature_names=[f"{f}@{shard.local_name}" for f in cfg.feature_names],
        pooling=PoolingType.SUM if pool_mean_as_sum else cfg.pooling,
        weight_init_max=cfg.weight_init_max,
        weight_init_min=cfg.weight_init_min,
        init_fn=cfg.init_fn,
        num_subspaces=subspaces,
        codebook_size=cfg.codebook_size,
    )


def _sum_over_ranks(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    grad = grad.contiguous()
    dist.all_reduce(grad, group=group)
    return grad
