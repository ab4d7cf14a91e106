"""The lookup on one rank: a local ``QuantizedEmbeddingBagCollection`` over that rank's shards.

TorchRec's ``EmbeddingSharding`` classes decide which shards a rank holds (``ShardedEmbeddingTable``:
row and column offsets and sizes in table coordinates ``[N, D]``) and in which order their features
arrive after the input dist. This module turns them into one local QEBC table per table, so each
rank runs the same lookup as the unsharded module and holds one parameter per table, as TorchRec's
sharded EBC does:

- a compressed shard of rows ``[r0, r0 + n)`` and columns ``[c0, c0 + c)`` holds
  ``codes[r0:r0 + n, c0/d : (c0 + c)/d]`` and ``codebooks[c0/d : (c0 + c)/d]`` (``d = D / M``): a
  column split is a split of the subspaces, so its boundaries must fall on multiples of ``d``;
- a full shard holds ``weight[r0:r0 + n, c0:c0 + c]``;
- several column shards of one table on one rank (``column_wise(ranks=[0, 1, 0, 1])``) are the
  column blocks of one local table, in the order their features arrive: the lookup reads each
  feature once and puts the pooled columns back in the order the output dist expects.
"""
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Tuple
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.types import ShardMetadata
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec.modules.initialization import (
    init_codebooks_,
    init_codes_,
    init_fallback_,
    init_weight_,
)
from torchrec_mec.modules.quantized_embedding_bag_collection import (
    EMPTY_SLOT,
    ProductQuantizedTable,
    QuantizedEmbeddingBagCollection,
)
from torchrec_mec.modules.quantized_embedding_configs import (
    CodebookLargerThanTableWarning,
    QuantizedEmbeddingBagConfig,
)


@dataclass(frozen=True)
class LocalShard:
    """One shard held by this rank: its table, where it sits in ``[N, D]``, the first column of its
    block in the rank's local table, and its metadata in the plan (``None`` for a data-parallel
    replica)."""

    table: str
    offsets: Tuple[int, int]
    sizes: Tuple[int, int]
    local_column: int
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
        self._configs: Dict[str, QuantizedEmbeddingBagConfig] = {
            cfg.name: cfg for cfg in source.embedding_bag_configs()
        }
        self.shards: List[LocalShard] = []
        rows: Dict[str, Tuple[int, int]] = {}  # per table: first row and row count held here
        widths: Dict[str, int] = {}  # per table, in order of first arrival: columns held here
        for group in grouped_configs:
            for table in group.embedding_tables:
                meta = table.local_metadata
                offsets = (meta.shard_offsets[0], meta.shard_offsets[1]) if meta else (0, 0)
                sizes = (table.local_rows, table.local_cols)
                _check_subspace_boundaries(self._configs[table.name], offsets[1], sizes[1])
                if rows.setdefault(table.name, (offsets[0], sizes[0])) != (offsets[0], sizes[0]):
                    raise ValueError(
                        f"table {table.name!r}: the shards of a table held by one rank must hold the "
                        f"same rows; got rows {rows[table.name]} and {(offsets[0], sizes[0])}"
                    )
                self.shards.append(
                    LocalShard(table.name, offsets, sizes, widths.get(table.name, 0), meta)
                )
                widths[table.name] = widths.get(table.name, 0) + sizes[1]
        self._widths = widths
        self._seeds = {name: source.table(name).init_seed for name in widths}
        local_configs = [
            _local_config(self._configs[name], rows[name][1], widths[name], pool_mean_as_sum)
            for name in widths
        ]
        # Built on meta under a forked generator: the local tables' own seeds are never used (the
        # values come from the source, or from the source tables' seeds by position).
        with torch.random.fork_rng(devices=[]):
            qebc = QuantizedEmbeddingBagCollection(
                local_configs, is_weighted=source.is_weighted(), device=torch.device("meta")
            )
        self.qebc = qebc.to_empty(device=device or torch.device("cpu"))
        self._feature_names = [f for cfg in local_configs for f in cfg.feature_names]
        self._select, self._columns = _feature_routing(self.shards, self._configs, local_configs)
        if self.qebc.device.type != "meta":
            if source.device.type == "meta":
                self.reset_parameters()
            else:
                self._copy_from(source)
        if sum_codebook_gradients_over is not None:
            for name in widths:
                table = self.qebc.embedding_bags[name]
                if isinstance(table, ProductQuantizedTable):
                    table.codebooks.register_hook(
                        partial(_sum_over_ranks, group=sum_codebook_gradients_over)
                    )

    def table_tensors(self, table: str) -> Dict[str, torch.Tensor]:
        """This rank's state of ``table``, all its shards together, under the unsharded names:
        ``codes`` (buffer) and ``codebooks`` (parameter), with ``fallback`` (parameter) and
        ``promoted_ids`` (buffer) for a table with a fallback, or ``weight`` (parameter)."""
        module = self.qebc.table(table)
        if isinstance(module, ProductQuantizedTable):
            tensors = {"codes": module.codes, "codebooks": module.codebooks}
            if module.fallback is not None:
                assert module.promoted_ids is not None  # held with the fallback
                tensors.update(fallback=module.fallback, promoted_ids=module.promoted_ids)
            return tensors
        return {"weight": module.weight}

    def shard_part(self, shard: LocalShard, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` (shaped like ``table_tensors(shard.table)[key]``, e.g. the
        parameter itself or its optimizer state) that belongs to ``shard``: the tensor itself when
        the shard is the rank's only one of its table, else a view of its column block."""
        first, width = shard.local_column, shard.sizes[1]
        if first == 0 and width == self._widths[shard.table]:
            return tensor
        if key == "weight":
            return tensor[:, first : first + width]
        d = self._configs[shard.table].subspace_dim
        subspaces = slice(first // d, (first + width) // d)
        return tensor[:, subspaces] if key == "codes" else tensor[subspaces]

    def local_tensors(self, shard: LocalShard) -> Dict[str, torch.Tensor]:
        """The shard's state under the unsharded names: ``codes`` and ``codebooks``, or ``weight``."""
        return {
            key: self.shard_part(shard, key, tensor)
            for key, tensor in self.table_tensors(shard.table).items()
        }

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sets every shard to its part of the source tables' initial values (see
        ``torchrec_mec/modules/initialization.py``): the same values, whatever the plan, as the
        unsharded collection built with the same seed."""
        for shard in self.shards:
            cfg, seed, parts = self._configs[shard.table], self._seeds[shard.table], self.local_tensors(shard)
            (r0, c0) = shard.offsets
            if cfg.compressed:
                init_codes_(parts["codes"], cfg, seed, r0, c0 // cfg.subspace_dim)
                init_codebooks_(parts["codebooks"], cfg, seed, c0 // cfg.subspace_dim)
                if cfg.has_fallback:  # held whole (table-wise or data-parallel)
                    init_fallback_(parts["fallback"], cfg, seed)
                    parts["promoted_ids"].fill_(EMPTY_SLOT)
            else:
                init_weight_(parts["weight"], cfg, seed, r0, c0)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if not self.shards:
            # Requires grad (as TorchRec's empty-rank lookup does) so that this rank joins the
            # output dist's backward collective like the others.
            return torch.empty(
                features.stride(), 0, device=features.values().device, requires_grad=True
            )
        if self._select is not None:  # several column shards of a table: read its features once
            features = features.permute(self._select)
        # Rename positionally: the input dist delivers features in shard order.
        local = KeyedJaggedTensor(
            keys=self._feature_names,
            values=features.values(),
            weights=features.weights_or_none(),
            lengths=features.lengths(),
            stride=features.stride(),
        )
        pooled = self.qebc(local).values()
        if self._columns is None:
            return pooled
        return pooled.index_select(1, self._columns.to(pooled.device))

    @torch.no_grad()
    def _copy_from(self, source: QuantizedEmbeddingBagCollection) -> None:
        for shard in self.shards:
            (r0, c0), (rows, cols) = shard.offsets, shard.sizes
            table, parts = source.table(shard.table), self.local_tensors(shard)
            if isinstance(table, ProductQuantizedTable) and table.fallback is not None:
                for key in ("codes", "codebooks", "fallback", "promoted_ids"):  # held whole
                    parts[key].copy_(getattr(table, key))
            elif isinstance(table, ProductQuantizedTable):
                d = self._configs[shard.table].subspace_dim
                parts["codes"].copy_(table.codes[r0 : r0 + rows, c0 // d : (c0 + cols) // d])
                parts["codebooks"].copy_(table.codebooks[c0 // d : (c0 + cols) // d])
            else:
                parts["weight"].copy_(table.weight[r0 : r0 + rows, c0 : c0 + cols])


def _check_subspace_boundaries(cfg: QuantizedEmbeddingBagConfig, first: int, width: int) -> None:
    d = cfg.subspace_dim
    if cfg.compressed and (first % d or width % d):
        raise ValueError(
            f"table {cfg.name!r}: a column-wise shard [{first}, {first + width}) does not fall on "
            f"subspace boundaries (multiples of embedding_dim / num_subspaces = {d}); give "
            f"column_wise(size_per_rank=...) sizes that are multiples of {d}"
        )


def _local_config(
    cfg: QuantizedEmbeddingBagConfig, rows: int, columns: int, pool_mean_as_sum: bool
) -> QuantizedEmbeddingBagConfig:
    # A table with a fallback is held whole (the sharder allows table-wise and data-parallel).
    new_ids: Dict[str, Any] = ({"coded_rows": cfg.coded_rows, "fallback_rows": cfg.fallback_rows,
                "promotion_slots": cfg.promotion_slots} if cfg.has_fallback else {})
    with warnings.catch_warnings():  # a row-wise shard may hold fewer rows than K
        warnings.simplefilter("ignore", CodebookLargerThanTableWarning)
        return QuantizedEmbeddingBagConfig(
            name=cfg.name,
            num_embeddings=rows,
            embedding_dim=columns,
            feature_names=[f"{f}@{cfg.name}" for f in cfg.feature_names],
            pooling=PoolingType.SUM if pool_mean_as_sum else cfg.pooling,
            weight_init_max=cfg.weight_init_max,
            weight_init_min=cfg.weight_init_min,
            init_fn=cfg.init_fn,
            num_subspaces=columns // cfg.subspace_dim if cfg.compressed else 1,
            codebook_size=cfg.codebook_size,
            **new_ids,
        )


def _feature_routing(
    shards: List[LocalShard],
    configs: Dict[str, QuantizedEmbeddingBagConfig],
    local_configs: List[QuantizedEmbeddingBagConfig],
) -> Tuple[Optional[List[int]], Optional[torch.Tensor]]:
    """Which delivered features the local QEBC reads (the first copy of each), and which of its
    output columns make the layout the output dist expects (per shard, per feature, the shard's
    columns); ``None`` where nothing moves (each table held as one shard)."""
    delivered = [f"{f}@{s.table}" for s in shards for f in configs[s.table].feature_names]
    first_copy: Dict[str, int] = {}
    for i, name in enumerate(delivered):
        first_copy.setdefault(name, i)
    select = [first_copy[f] for cfg in local_configs for f in cfg.feature_names]
    start: Dict[Tuple[str, int], int] = {}
    position = 0
    for cfg in local_configs:
        for i in range(len(cfg.feature_names)):
            start[(cfg.name, i)] = position
            position += cfg.embedding_dim
    columns = [
        start[(s.table, i)] + s.local_column + c
        for s in shards
        for i in range(len(configs[s.table].feature_names))
        for c in range(s.sizes[1])
    ]
    return (
        None if select == list(range(len(delivered))) else select,
        None if columns == list(range(position)) else torch.tensor(columns),
    )


def _sum_over_ranks(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    grad = grad.contiguous()
    dist.all_reduce(grad, group=group)
    return grad
