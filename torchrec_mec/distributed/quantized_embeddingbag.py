"""ShardedQuantizedEmbeddingBagCollection and its TorchRec sharder.

The sharded module is a thin layer over TorchRec: per sharding type it builds TorchRec's own
``EmbeddingSharding`` (the one ``ShardedEmbeddingBagCollection`` uses), takes its input dist (KJT
all-to-all, row bucketization) and output dist (pooled all-to-all, reduce-scatter), and replaces
only the lookup with a local QEBC over the rank's shards (``QuantizedShardsLookup``).
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, TensorProperties
from torch.nn.modules.module import _IncompatibleKeys
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embedding_sharding import (
    EmbeddingSharding,
    EmbeddingShardingContext,
    EmbeddingShardingInfo,
    KJTListSplitsAwaitable,
)
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    EmbeddingComputeKernel,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionAwaitable,
    EmbeddingBagCollectionContext,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardedTensor,
    ShardedTensorMetadata,
    ShardingEnv,
    ShardingType,
    ShardMetadata,
)
from torchrec.distributed.utils import none_throws
from torchrec.modules.embedding_configs import EmbeddingTableConfig, PoolingType
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_mec.distributed.embedding_lookup import LocalShard, QuantizedShardsLookup
from torchrec_mec.distributed.fused_optimizer import InBackwardOptimizer, fused_optimizer_spec
from torchrec_mec.distributed.planner import FALLBACK_SHARDING_TYPES, shardable_tables
from torchrec_mec.modules.quantized_embedding_bag_collection import (
    QuantizedEmbeddingBagCollection,
    check_promoted_ids,
)
from torchrec_mec.modules.quantized_embedding_configs import QuantizedEmbeddingBagConfig

SHARDING_TYPES: List[str] = [
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
]


class ShardedQuantizedEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, EmbeddingBagCollectionContext],
    FusedOptimizerModule,
):
    """A ``QuantizedEmbeddingBagCollection`` sharded across ranks; built by
    :class:`QuantizedEmbeddingBagCollectionSharder` (through ``DistributedModelParallel``).

    Per table, as its ``ParameterSharding`` says:

    - ``data_parallel``: a full replica per rank; gradients averaged by DDP, like TorchRec's
      data-parallel tables (train them with the dense optimizer).
    - ``table_wise``: codes and codebooks (or weight) on one rank.
    - ``row_wise``: rows split into ranges; each rank holds its codes rows and a replica of the
      codebooks, pools its partial sums, the output dist reduces them, and the codebook gradient is
      summed over ranks in backward. A full table keeps its weight rows, as in TorchRec.
    - ``column_wise``: subspaces split across ranks (codes columns and their codebooks); a full
      table splits its weight columns. Boundaries must fall on multiples of ``D / M``.

    Gradients of model-parallel shards are divided by the world size as in TorchRec
    (``GRADIENT_DIVISION``), so with a per-rank mean loss they equal the unsharded module's
    gradients for the mean loss over the global batch. ``state_dict()`` has the unsharded keys
    (``embedding_bags.<t>.codes`` / ``.codebooks`` / ``.weight``): ``ShardedTensor`` for sharded
    tables, plain tensors for replicated ones (data-parallel tables, row-wise codebooks);
    ``named_parameters()`` and ``named_buffers()`` give the same names, and the fused optimizer's
    state is keyed by them and sharded like its parameter, so both reshard through
    ``torch.distributed.checkpoint``.

    Args:
        module: the unsharded QEBC. On ``meta``, each rank allocates its shards only and fills
            them with their part of the tables' initial values (the values the QEBC built on the
            CPU with the same seed holds); otherwise the shards copy the module's values.
        table_name_to_parameter_sharding: the module's plan, per table.
        env: the sharding environment (process group).
        fused_params: the sharder's ``fused_params``; an ``"optimizer"`` there is applied in
            backward (see ``fused_optimizer.py``).
        device: where the shards live.
        qcomm_codecs_registry: quantized communication codecs for TorchRec's dists.

    Example: see :class:`QuantizedEmbeddingBagCollectionSharder`.
    """

    def __init__(
        self,
        module: QuantizedEmbeddingBagCollection,
        table_name_to_parameter_sharding: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._env = env
        self._device = device
        self._is_weighted = module.is_weighted()
        self._configs: Dict[str, QuantizedEmbeddingBagConfig] = {
            cfg.name: cfg for cfg in module.embedding_bag_configs()
        }
        self.module_sharding_plan = EmbeddingModuleShardingPlan(
            {name: table_name_to_parameter_sharding[name] for name in self._configs}
        )
        infos = self._sharding_infos(module, fused_params)
        self._sharding_types: List[str] = list(infos)
        self._embedding_shardings: List[EmbeddingSharding] = [
            ShardedEmbeddingBagCollection.create_embedding_bag_sharding(
                infos[st], env, device, permute_embeddings=True,
                qcomm_codecs_registry=self.qcomm_codecs_registry,
            )
            for st in self._sharding_types
        ]
        # Plain lists, as in TorchRec's sharded EBC: the tables' tensors are registered once, under
        # ``embedding_bags`` (below), so that parameter and buffer names are the state dict's keys.
        self._lookups: List[nn.Module] = [
            self._create_lookup(st, s, module)
            for st, s in zip(self._sharding_types, self._embedding_shardings)
        ]
        self._input_dists: List[nn.Module] = [s.create_input_dist() for s in self._embedding_shardings]
        self._output_dists: List[nn.Module] = [
            s.create_output_dist(device=device) for s in self._embedding_shardings
        ]
        self._layouts = {
            (table, key): self._layout(table, key)
            for table, cfg in self._configs.items() for key in _state_keys(cfg)
        }
        self.embedding_bags = nn.ModuleDict({table: nn.Module() for table in self._configs})
        self._feature_splits = [len(s.feature_names()) for s in self._embedding_shardings]
        self._feature_names = [f for s in self._embedding_shardings for f in s.feature_names()]
        self._embedding_names = [n for s in self._embedding_shardings for n in s.embedding_names()]
        self._embedding_dims = [d for s in self._embedding_shardings for d in s.embedding_dims()]
        self._features_order: Optional[List[int]] = None
        self._input_keys: Optional[List[str]] = None
        self._row_wise_mean = self._find_row_wise_mean()
        self._optim = self._create_fused_optimizer(module, fused_params)
        self._register_tables(module, fused_params)

    # -- construction ----------------------------------------------------------------------
    def _sharding_infos(
        self, module: QuantizedEmbeddingBagCollection, fused_params: Optional[Dict[str, Any]]
    ) -> Dict[str, List[EmbeddingShardingInfo]]:
        tensors = shardable_tables(module)
        infos: Dict[str, List[EmbeddingShardingInfo]] = {}
        for name, cfg in self._configs.items():
            ps = self.module_sharding_plan[name]
            if ps.sharding_type not in SHARDING_TYPES:
                raise ValueError(
                    f"table {name!r}: sharding type {ps.sharding_type!r} is not supported for a "
                    f"QuantizedEmbeddingBagCollection (supported: {SHARDING_TYPES})"
                )
            if cfg.has_fallback and ps.sharding_type not in FALLBACK_SHARDING_TYPES:
                raise ValueError(
                    f"table {name!r}: sharding type {ps.sharding_type!r} is not supported for a "
                    f"table with a fallback for new ids (supported: {FALLBACK_SHARDING_TYPES}); "
                    "plan it with torchrec_mec.distributed.new_id_constraints"
                )
            infos.setdefault(ps.sharding_type, []).append(
                EmbeddingShardingInfo(
                    embedding_config=EmbeddingTableConfig(
                        num_embeddings=cfg.num_embeddings,
                        embedding_dim=cfg.embedding_dim,
                        name=name,
                        data_type=cfg.data_type,
                        feature_names=list(cfg.feature_names),
                        pooling=cfg.pooling,
                        is_weighted=self._is_weighted,
                        has_feature_processor=False,
                        embedding_names=list(cfg.feature_names),
                    ),
                    param_sharding=ps,
                    param=tensors[name],
                    fused_params=dict(fused_params or {}),
                )
            )
        return infos

    def _create_lookup(
        self, sharding_type: str, sharding: EmbeddingSharding, module: QuantizedEmbeddingBagCollection
    ) -> nn.Module:
        row_wise = sharding_type == ShardingType.ROW_WISE.value
        lookup = QuantizedShardsLookup(
            sharding._grouped_embedding_configs,  # private in TorchRec: why torchrec is pinned to 1.8.*
            module,
            self._device,
            pool_mean_as_sum=row_wise,
            sum_codebook_gradients_over=self._env.process_group if row_wise else None,
        )
        if sharding_type != ShardingType.DATA_PARALLEL.value:
            return lookup
        # As TorchRec does for its data-parallel tables. Codes are identical on every rank and
        # frozen: no buffer broadcast per step.
        return DistributedDataParallel(
            lookup,
            process_group=self._env.process_group,
            gradient_as_bucket_view=True,
            broadcast_buffers=False,
            static_graph=True,
        )

    def _create_fused_optimizer(
        self, module: QuantizedEmbeddingBagCollection, fused_params: Optional[Dict[str, Any]]
    ) -> KeyedOptimizer:
        optims: List[Tuple[str, KeyedOptimizer]] = []
        for table in self._configs:
            for key in _parameter_keys(self._configs[table]):
                layout = self._layouts[(table, key)]
                local = layout.local()
                if local is None or layout.data_parallel:
                    continue
                spec = fused_optimizer_spec(_source_parameter(module, table, key), fused_params)
                if spec is not None:
                    assert isinstance(local, nn.Parameter)  # a parameter key's tensor
                    optims.append(("", InBackwardOptimizer({layout.name: local}, *spec,
                                                           {layout.name: layout})))
        return CombinedOptimizer(optims) if optims else EmptyFusedOptimizer()

    def _register_tables(
        self, module: QuantizedEmbeddingBagCollection, fused_params: Optional[Dict[str, Any]]
    ) -> None:
        """Registers this rank's tensors of each table under ``embedding_bags.<table>``; a table
        this rank holds nothing of gets empty ones, as in TorchRec's sharded EBC."""
        for (table, key), layout in self._layouts.items():
            holder, local = self.embedding_bags[table], layout.local()
            if key in _BUFFER_KEYS:
                holder.register_buffer(key, local if local is not None else torch.empty(
                    0, dtype=_key_dtype(self._configs[table], key), device=self._device))
                continue
            if local is None:
                local = nn.Parameter(torch.empty(0, device=self._device))
                if fused_optimizer_spec(_source_parameter(module, table, key),
                                        fused_params) is not None:
                    # Left out of the dense optimizer (in_backward_optimizer_filter), as TorchRec does.
                    local._in_backward_optimizers = [EmptyFusedOptimizer()]  # type: ignore[attr-defined]
            assert isinstance(local, nn.Parameter)  # a parameter key's tensor
            holder.register_parameter(key, local)

    def _layout(self, table: str, key: str) -> "_TableLayout":
        cfg, ps = self._configs[table], self.module_sharding_plan[table]
        lookup, shards = None, []
        for candidate in self._lookups:
            inner = _unwrapped(candidate)
            held = [s for s in inner.shards if s.table == table]
            if held:
                lookup, shards = inner, held
        replicated = ps.sharding_type == ShardingType.DATA_PARALLEL.value or (
            ps.sharding_type == ShardingType.ROW_WISE.value and key == "codebooks"
        )
        return _TableLayout(
            name=f"embedding_bags.{table}.{key}",
            config=cfg,
            key=key,
            lookup=lookup,
            shards=shards,
            global_shards=None if replicated else [
                _key_metadata(cfg, key, m) for m in ps.sharding_spec.shards
            ],
            data_parallel=ps.sharding_type == ShardingType.DATA_PARALLEL.value,
            process_group=self._env.process_group,
        )

    # -- ShardedModule ---------------------------------------------------------------------
    def create_context(self) -> EmbeddingBagCollectionContext:
        return EmbeddingBagCollectionContext()

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if features.variable_stride_per_key():
            raise ValueError("KeyedJaggedTensors with a variable batch size per feature are not supported")
        if features.keys() != self._input_keys:
            self._set_features_order(features.keys())
        with torch.no_grad():
            if self._features_order is not None:
                features = features.permute(self._features_order)
            splits = features.split(self._feature_splits)
            ctx.divisor = self._mean_divisor(splits)
            awaitables = []
            for dist, split in zip(self._input_dists, splits):
                awaitables.append(dist(split))
                ctx.sharding_contexts.append(
                    EmbeddingShardingContext(
                        batch_size_per_feature_pre_a2a=split.stride_per_key(),
                        variable_batch_per_feature=split.variable_stride_per_key(),
                    )
                )
            return KJTListSplitsAwaitable(awaitables, ctx)

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        return [lookup(features) for lookup, features in zip(self._lookups, dist_input)]

    def output_dist(
        self, ctx: EmbeddingBagCollectionContext, output: List[torch.Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        awaitables = []
        for st, dist, sctx, embeddings in zip(
            self._sharding_types, self._output_dists, ctx.sharding_contexts, output
        ):
            awaitable = dist(embeddings, sctx)
            if st == ShardingType.ROW_WISE.value and ctx.divisor is not None:
                divisor = ctx.divisor
                awaitable.callbacks.append(lambda pooled: pooled / divisor)
            awaitables.append(awaitable)
        return EmbeddingBagCollectionAwaitable(
            awaitables=awaitables,
            embedding_dims=self._embedding_dims,
            embedding_names=self._embedding_names,
        )

    def _set_features_order(self, keys: List[str]) -> None:
        missing = [f for f in self._feature_names if f not in keys]
        unknown = [k for k in keys if k not in self._feature_names]
        if missing or unknown:
            raise ValueError(
                f"KeyedJaggedTensor keys do not match the collection's features: missing "
                f"{missing}, unknown {unknown}"
            )
        order = [keys.index(f) for f in self._feature_names]
        self._features_order = None if order == list(range(len(keys))) else order
        self._input_keys = list(keys)

    def _mean_divisor(self, splits: List[KeyedJaggedTensor]) -> Optional[torch.Tensor]:
        """Row-wise shards pool MEAN tables as partial sums: per bag and column, what to divide by."""
        if self._row_wise_mean is None:
            return None
        i, is_mean, dims = self._row_wise_mean
        lengths = splits[i].lengths().view(len(is_mean), -1).to(torch.float32)
        is_mean = is_mean.to(lengths.device).unsqueeze(1)
        lengths = torch.where(is_mean, lengths.clamp(min=1), torch.ones_like(lengths))
        return torch.repeat_interleave(lengths.t(), dims.to(lengths.device), dim=1)

    def _find_row_wise_mean(self) -> Optional[Tuple[int, torch.Tensor, torch.Tensor]]:
        """(index of the row-wise sharding, which of its features are MEAN, their dims)."""
        if ShardingType.ROW_WISE.value not in self._sharding_types:
            return None
        i = self._sharding_types.index(ShardingType.ROW_WISE.value)
        pooling = {f: c.pooling for c in self._configs.values() for f in c.feature_names}
        sharding = self._embedding_shardings[i]
        is_mean = torch.tensor([pooling[f] == PoolingType.MEAN for f in sharding.feature_names()])
        if not bool(is_mean.any()):
            return None
        return i, is_mean, torch.tensor(sharding.embedding_dims())

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    @property
    def unsharded_module_type(self) -> Type[QuantizedEmbeddingBagCollection]:
        return QuantizedEmbeddingBagCollection

    # -- state: the unsharded keys ---------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sets every shard to its part of the tables' initial values: the values the unsharded
        collection gets at construction with the same seed, whatever the plan."""
        for lookup in self._lookups:
            inner = _unwrapped(lookup)
            if inner.qebc.device.type != "meta":
                inner.reset_parameters()

    def state_dict(
        self,
        destination: Optional[Dict[str, Any]] = None,
        prefix: str = "",
        keep_vars: bool = False,
    ) -> Dict[str, Any]:
        if destination is None:
            destination = OrderedDict()
        for layout in self._layouts.values():
            local = layout.local()
            if local is not None and not keep_vars:
                local = local.detach()
            destination[prefix + layout.name] = layout.to_global(local)
        return destination

    @torch.no_grad()
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> _IncompatibleKeys:
        """Loads the unsharded keys from ``ShardedTensor``s laid out as this module's own
        ``state_dict()`` (use ``torch.distributed.checkpoint`` to reshard), or from plain tensors
        of the full table (e.g. an unsharded QEBC's ``state_dict()``)."""
        expected = {layout.name: layout for layout in self._layouts.values()}
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error loading state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        for name, layout in expected.items():
            local = layout.local()
            if name in state_dict and local is not None:
                layout.copy_local(state_dict[name], local)
        return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


@dataclass
class _TableLayout:
    """Where this rank's tensor of one state key (``embedding_bags.<t>.codes``, ``.codebooks`` or
    ``.weight``) sits in the table: the one place that turns local tensors (the parameter, its
    optimizer state) into the table-wide ``ShardedTensor`` of a state dict, and back.

    Args:
        name: the state key.
        config: the table's config.
        key: ``codes``, ``codebooks`` or ``weight``.
        lookup: the lookup holding this rank's shards of the table (``None``: it holds none).
        shards: those shards.
        global_shards: every rank's shards of this key; ``None`` when every rank holds a replica
            (data-parallel tables, row-wise codebooks).
        data_parallel: whether the table is data-parallel.
        process_group: the sharding's process group.
    """

    name: str
    config: QuantizedEmbeddingBagConfig
    key: str
    lookup: Optional[QuantizedShardsLookup]
    shards: List[LocalShard]
    global_shards: Optional[List[ShardMetadata]]
    data_parallel: bool
    process_group: Any

    def local(self) -> Optional[torch.Tensor]:
        """This rank's tensor of the key, all its shards together (``None`` if it holds none)."""
        return None if self.lookup is None else self.lookup.table_tensors(self.config.name)[self.key]

    def parts(self, local: torch.Tensor) -> List[Tuple[Optional[ShardMetadata], torch.Tensor]]:
        """Per shard held here: its metadata for this key (``None`` if replicated) and its part of
        ``local`` (any tensor shaped like :meth:`local`)."""
        assert self.lookup is not None
        return [
            (None if self.global_shards is None else _key_metadata(self.config, self.key, none_throws(s.metadata)),
             self.lookup.shard_part(s, self.key, local))
            for s in self.shards
        ]

    def to_global(self, local: Optional[torch.Tensor]) -> Any:
        """``local`` (shaped like :meth:`local`) as the table-wide value: itself when replicated,
        else a ``ShardedTensor`` over this rank's parts (views of ``local``, or copies where a
        part is a column block of several shards held here)."""
        if self.global_shards is None:
            assert local is not None, f"{self.name}: a replicated key missing on this rank"
            return local
        shards = [] if local is None else [
            Shard(part if part.is_contiguous() else part.contiguous(), none_throws(meta))
            for meta, part in self.parts(local)
        ]
        metadata = ShardedTensorMetadata(
            shards_metadata=self.global_shards,
            size=_global_size(self.config, self.key),
            tensor_properties=TensorProperties(
                dtype=local.dtype if local is not None else _key_dtype(self.config, self.key)
            ),
        )
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, metadata, process_group=self.process_group
        )

    @torch.no_grad()
    def copy_local(self, value: Any, local: torch.Tensor) -> None:
        """Copies this rank's part of ``value`` (a ``ShardedTensor`` laid out as
        :meth:`to_global` lays it out, or the whole table's tensor) into ``local``, after
        checking every part (dtype, shape, and codes against the codebook size)."""
        pairs = []
        for meta, target in self.parts(local):
            source = _local_source(self.name, value, meta)
            if source.dtype != target.dtype or source.shape != target.shape:
                raise ValueError(
                    f"{self.name}: got {source.dtype} {tuple(source.shape)} for a local part of "
                    f"{target.dtype} {tuple(target.shape)}"
                )
            if self.key == "codes" and source.numel():
                top = int(source.to(torch.int32).max())
                if top >= self.config.codebook_size:
                    raise ValueError(
                        f"{self.name}: code {top} >= codebook_size {self.config.codebook_size}"
                    )
            if self.key == "promoted_ids":
                check_promoted_ids(self.config, source)
            pairs.append((source, target))
        for source, target in pairs:
            target.copy_(source)


class QuantizedEmbeddingBagCollectionSharder(BaseEmbeddingSharder[QuantizedEmbeddingBagCollection]):
    """TorchRec sharder for :class:`~torchrec_mec.QuantizedEmbeddingBagCollection`.

    Pass it to ``DistributedModelParallel`` (next to TorchRec's default sharders) and to
    ``EmbeddingShardingPlanner``; the planner then sizes compressed tables by their codes and
    codebooks. Sharding types: ``data_parallel``, ``table_wise``, ``row_wise`` (on CPU too) and
    ``column_wise``, for compressed and full tables alike.

    Args:
        fused_params: as for TorchRec's ``EmbeddingBagCollectionSharder``; an ``"optimizer"``
            (``EmbOptimType.EXACT_SGD``, ``EXACT_ADAGRAD`` or ``ADAM``, with ``"learning_rate"``
            etc.) is applied in backward to model-parallel codebooks and weights, as is an
            optimizer set by ``apply_optimizer_in_backward`` on the module's parameters. Without
            one, those parameters keep their gradients for any torch optimizer.
        qcomm_codecs_registry: quantized communication codecs for TorchRec's dists.

    Example (one rank; run it under ``torchrun`` for more)::

        >>> import tempfile, torch, torch.distributed as dist
        >>> from torchrec.distributed.model_parallel import DistributedModelParallel
        >>> from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg",
        ...                         rank=0, world_size=1)
        >>> qebc = QuantizedEmbeddingBagCollection([QuantizedEmbeddingBagConfig(name="t",
        ...     num_embeddings=1000, embedding_dim=8, feature_names=["f"], num_subspaces=4,
        ...     codebook_size=16)])
        >>> model = torch.nn.ModuleDict({"qebc": qebc})
        >>> sharders = [QuantizedEmbeddingBagCollectionSharder()]
        >>> plan = EmbeddingShardingPlanner(Topology(world_size=1, compute_device="cpu")).collective_plan(
        ...     model, sharders, dist.GroupMember.WORLD)
        >>> dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
        ...     sharders=sharders)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([3, 999]), torch.tensor([1, 1]))
        >>> tuple(dmp.module.qebc(kjt).to_dict()["f"].shape)
        (2, 8)
        >>> dist.destroy_process_group()
    """

    def shard(
        self,
        module: QuantizedEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedQuantizedEmbeddingBagCollection:
        return ShardedQuantizedEmbeddingBagCollection(
            module, params, env, self.fused_params, device, self.qcomm_codecs_registry
        )

    def shardable_parameters(self, module: QuantizedEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        return shardable_tables(module)  # type: ignore[return-value]

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        # TorchRec's labels (its planner accepts "dense" for data-parallel tables only); whatever
        # the label, the lookup is the QEBC's own, and an optimizer is fused only if one is given.
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            return [EmbeddingComputeKernel.DENSE.value]
        return [EmbeddingComputeKernel.FUSED.value]

    @property
    def module_type(self) -> Type[QuantizedEmbeddingBagCollection]:
        return QuantizedEmbeddingBagCollection


_BUFFER_KEYS = ("codes", "promoted_ids")


def _unwrapped(lookup: nn.Module) -> QuantizedShardsLookup:
    """The lookup itself, out of the DistributedDataParallel that wraps a data-parallel one."""
    inner = lookup.module if isinstance(lookup, DistributedDataParallel) else lookup
    assert isinstance(inner, QuantizedShardsLookup)
    return inner


def _state_keys(cfg: QuantizedEmbeddingBagConfig) -> List[str]:
    if not cfg.compressed:
        return ["weight"]
    return ["codes", "codebooks"] + (["fallback", "promoted_ids"] if cfg.has_fallback else [])


def _parameter_keys(cfg: QuantizedEmbeddingBagConfig) -> List[str]:
    return [k for k in _state_keys(cfg) if k not in _BUFFER_KEYS]


def _source_parameter(module: QuantizedEmbeddingBagCollection, table: str, key: str) -> nn.Parameter:
    return getattr(module.embedding_bags[table], key)


def _global_size(cfg: QuantizedEmbeddingBagConfig, key: str) -> torch.Size:
    if key == "weight":
        return torch.Size([cfg.num_embeddings, cfg.embedding_dim])
    if key == "codes":
        return torch.Size([cfg.code_rows, cfg.num_subspaces])
    if key == "fallback":
        return torch.Size([cfg.fallback_rows, cfg.embedding_dim])
    if key == "promoted_ids":
        return torch.Size([cfg.promotion_slots])
    return torch.Size([cfg.num_subspaces, cfg.codebook_size, cfg.subspace_dim])


def _key_dtype(cfg: QuantizedEmbeddingBagConfig, key: str) -> torch.dtype:
    if key == "codes":
        return cfg.code_dtype
    return torch.int64 if key == "promoted_ids" else torch.float32


def _key_metadata(cfg: QuantizedEmbeddingBagConfig, key: str, meta: ShardMetadata) -> ShardMetadata:
    """A shard of the table (rows x embedding columns) as a shard of ``codes``, ``codebooks`` or
    ``weight``: embedding columns ``[c0, c0 + c)`` are subspaces ``[c0/d, (c0 + c)/d)``. A table
    with a fallback is held whole (table-wise): its keys' shards are the whole tensors."""
    (r0, c0), (rows, cols) = meta.shard_offsets, meta.shard_sizes
    if key == "weight":
        return meta
    if cfg.has_fallback and key != "codebooks":
        size = list(_global_size(cfg, key))
        return ShardMetadata([0] * len(size), size, meta.placement)
    d = cfg.subspace_dim
    if key == "codes":
        return ShardMetadata([r0, c0 // d], [rows, cols // d], meta.placement)
    return ShardMetadata([c0 // d, 0, 0], [cols // d, cfg.codebook_size, d], meta.placement)


def _local_source(name: str, value: Any, meta: Optional[ShardMetadata]) -> torch.Tensor:
    """The part of a loaded value that a local tensor with shard ``meta`` (None: whole) holds."""
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            if meta is not None and shard.metadata.shard_offsets == meta.shard_offsets and (
                shard.metadata.shard_sizes == meta.shard_sizes
            ):
                return shard.tensor
        raise ValueError(
            f"{name}: the ShardedTensor is laid out differently from this module's shards; load "
            "it through torch.distributed.checkpoint, which reshards"
        )
    if meta is None:
        return value
    return value[tuple(slice(o, o + n) for o, n in zip(meta.shard_offsets, meta.shard_sizes))]
