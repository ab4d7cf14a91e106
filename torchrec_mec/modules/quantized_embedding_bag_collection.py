"""QuantizedEmbeddingBagCollection: a drop-in, product-quantized EmbeddingBagCollection."""
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType, pooling_type_to_str
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_mec.modules.initialization import (
    draw_seed,
    init_codebooks_,
    init_codes_,
    init_fallback_,
    init_weight_,
)
from torchrec_mec.modules.quantized_embedding_configs import (
    QuantizedEmbeddingBagConfig,
    as_quantized_config,
)
from torchrec_mec.ops import triton_lookup
from torchrec_mec.ops.fast_lookup import (
    assert_ids_in_range,
    cpu_operator_available,
    fused_pooled_lookup,
)
from torchrec_mec.ops.reference import fallback_embedding_bag, pq_embedding_bag
from torchrec_mec.ops.tbe import FlatParameterBuffer, TableBatchedLookup, tbe_available


EMPTY_SLOT = torch.iinfo(torch.int64).max
"""The value of an unused promotion slot in ``promoted_ids`` (sorts after every id)."""


def check_promoted_ids(config: QuantizedEmbeddingBagConfig, promoted: torch.Tensor) -> None:
    """Raises ``ValueError`` naming the table unless ``promoted`` holds the config's
    ``promotion_slots`` int64 values: new ids in increasing order, then unused slots
    (:data:`EMPTY_SLOT`).

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=12, embedding_dim=4,
        ...     num_subspaces=2, codebook_size=4, coded_rows=10, fallback_rows=1, promotion_slots=2)
        >>> check_promoted_ids(cfg, torch.tensor([11, EMPTY_SLOT]))
        >>> check_promoted_ids(cfg, torch.tensor([11, 10]))
        Traceback (most recent call last):
        ...
        ValueError: table 't': promoted_ids must be new ids in [10, 12) in increasing order,
        then unused slots (9223372036854775807)
    """
    if tuple(promoted.shape) != (config.promotion_slots,) or promoted.dtype != torch.int64:
        raise ValueError(f"table {config.name!r}: promoted_ids are {promoted.dtype} "
                         f"{tuple(promoted.shape)}, expected torch.int64 ({config.promotion_slots},)")
    if promoted.device.type == "meta" or not promoted.numel():
        return
    used = promoted[promoted != EMPTY_SLOT]
    assert config.coded_rows is not None  # set by the config
    if (not torch.equal(promoted[: used.numel()], used) or bool((used[1:] <= used[:-1]).any())
            or (used.numel() and (int(used[0]) < config.coded_rows
                                  or int(used[-1]) >= config.num_embeddings))):
        raise ValueError(f"table {config.name!r}: promoted_ids must be new ids in "
                         f"[{config.coded_rows}, {config.num_embeddings}) in increasing order, "
                         f"then unused slots ({EMPTY_SLOT})")


class ProductQuantizedTable(nn.Module):
    """One product-quantized table: frozen ``codes`` [N, M] and trainable ``codebooks`` [M, K, D/M].

    Row ``i`` is ``concat_m codebooks[m, codes[i, m]]``. Codes are stored in the smallest
    unsigned dtype that holds ``K - 1`` (uint8 for K <= 256, else uint16). The initial codes are
    uniform in ``[0, K)`` (an untrained QEBC is then a usable, hashing-like model; MEC replaces
    them) and the codebooks come from the config's ``init_fn``, both drawn from a seed taken from
    torch's global generator at construction (see ``initialization.py``). On the ``meta`` device
    nothing is allocated; ``to_empty(device=...)`` then :meth:`reset_parameters` gives the values
    construction would have given.

    A table whose config has a fallback (``coded_rows < num_embeddings``, see
    ``QuantizedEmbeddingBagConfig``) also holds ``fallback`` [fallback_rows, D] (trainable, from
    ``init_fn``) and ``promoted_ids`` [promotion_slots] (int64, sorted, unused slots
    :data:`EMPTY_SLOT`); its ``codes`` then have ``coded_rows + promotion_slots`` rows, row
    ``coded_rows + s`` holding the codes of ``promoted_ids[s]``. :meth:`embeddings` gives the row
    any id reads.

    Args:
        config: the table's config (``codebook_size > 0``).
        device: where to allocate.

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4,
        ...     feature_names=["f"], num_subspaces=2, codebook_size=4)
        >>> table = ProductQuantizedTable(cfg)
        >>> table.codes.dtype, tuple(table.codebooks.shape), tuple(table.decode().shape)
        (torch.uint8, (2, 4, 2), (10, 4))
        >>> grown = ProductQuantizedTable(QuantizedEmbeddingBagConfig(name="t", num_embeddings=14,
        ...     embedding_dim=4, num_subspaces=2, codebook_size=4, coded_rows=10, fallback_rows=2,
        ...     promotion_slots=3))
        >>> tuple(grown.codes.shape), tuple(grown.fallback.shape), grown.num_promoted
        ((13, 2), (2, 4), 0)
        >>> torch.equal(grown.embeddings(torch.tensor([12])), grown.fallback[[0]])  # (12-10) % 2
        True
    """

    codes: torch.Tensor  # a buffer
    fallback: Optional[nn.Parameter]
    promoted_ids: Optional[torch.Tensor]

    def __init__(self, config: QuantizedEmbeddingBagConfig, device: Optional[torch.device] = None):
        super().__init__()
        self.config = config
        self.name = config.name
        self.num_embeddings = config.num_embeddings
        self.num_subspaces = config.num_subspaces
        self.codebook_size = config.codebook_size
        assert config.coded_rows is not None  # set by the config
        self.coded_rows: int = config.coded_rows
        self.init_seed = draw_seed()
        self.register_buffer(
            "codes",
            torch.empty(config.code_rows, config.num_subspaces, dtype=config.code_dtype, device=device),
        )
        self.codebooks = nn.Parameter(
            torch.empty(
                config.num_subspaces, config.codebook_size, config.subspace_dim, device=device
            )
        )
        if config.has_fallback:
            self.fallback = nn.Parameter(
                torch.empty(config.fallback_rows, config.embedding_dim, device=device))
            self.register_buffer(
                "promoted_ids", torch.empty(config.promotion_slots, dtype=torch.int64, device=device))
        else:
            self.fallback = None
            self.promoted_ids = None
        if self.codebooks.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Sets codes and codebooks (and the fallback, with no id promoted) to the values
        construction gives them."""
        init_codes_(self.codes, self.config, self.init_seed)
        init_codebooks_(self.codebooks, self.config, self.init_seed)
        if self.fallback is not None:
            assert self.promoted_ids is not None
            init_fallback_(self.fallback, self.config, self.init_seed)
            with torch.no_grad():
                self.promoted_ids.fill_(EMPTY_SLOT)

    @property
    def num_promoted(self) -> int:
        """How many new ids have been given codes of their own."""
        if self.promoted_ids is None:
            return 0
        return int((self.promoted_ids != EMPTY_SLOT).sum())

    def decode(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The reconstructed rows of ``codes`` (all of them by default): [len(rows), D]."""
        codes = self.codes if rows is None else self.codes[rows]
        parts = [self.codebooks[m][codes[:, m].long()] for m in range(self.num_subspaces)]
        return torch.cat(parts, dim=1)

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The row each id reads, [len(ids), D]: its decoded codes (coded or promoted ids), or its
        fallback row (other new ids). Differentiable w.r.t. codebooks and fallback.

        Raises:
            ValueError: an id outside ``[0, num_embeddings)`` (names the table).
        """
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"id {bad} is out of range for table {self.name!r} with "
                             f"{self.num_embeddings} rows")
        if self.fallback is None:
            return self.decode(ids)
        rows, in_fallback = self.resolve(ids)
        coded = self.decode(torch.where(in_fallback, 0, rows))
        return torch.where(in_fallback.unsqueeze(1), self.fallback[torch.where(in_fallback, rows, 0)],
                           coded)

    def resolve(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Where each (valid) id's row lives: ``(rows, in_fallback)``, a row of ``codes`` where
        ``in_fallback`` is False, else a row of ``fallback``."""
        ids = ids.long()
        if self.fallback is None:
            return ids, torch.zeros_like(ids, dtype=torch.bool)
        assert self.promoted_ids is not None
        new = ids >= self.coded_rows
        slot = torch.searchsorted(self.promoted_ids, ids).clamp(max=max(self.promoted_ids.numel() - 1, 0))
        promoted = (new & (self.promoted_ids[slot] == ids) if self.promoted_ids.numel()
                    else torch.zeros_like(new))
        in_fallback = new & ~promoted
        rows = torch.where(promoted, self.coded_rows + slot,
                           torch.where(in_fallback, (ids - self.coded_rows) % self.config.fallback_rows, ids))
        return rows, in_fallback

    @torch.no_grad()
    def promote(self, ids: torch.Tensor, codes: torch.Tensor) -> None:
        """Gives new ids codes of their own: each id of ``ids`` then reads its ``codes`` row
        instead of its fallback row (see ``torchrec_mec.quantize.promote_ids``, which encodes the
        fallback rows with the codebooks).

        Raises:
            ValueError: (naming the table) the table has no fallback, an id is not new
                (``< coded_rows`` or ``>= num_embeddings``), repeated or already promoted,
                there are not enough free slots, or ``codes`` do not fit.
        """
        if self.promoted_ids is None:
            raise ValueError(f"table {self.name!r} has no fallback table: every id has codes")
        ids = ids.to(torch.int64).reshape(-1).cpu()
        if tuple(codes.shape) != (ids.numel(), self.num_subspaces):
            raise ValueError(f"table {self.name!r}: codes for {ids.numel()} ids must be "
                             f"[{ids.numel()}, {self.num_subspaces}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"table {self.name!r}: codes must be in [0, {self.codebook_size})")
        outside = ids[(ids < self.coded_rows) | (ids >= self.num_embeddings)]
        if outside.numel():
            raise ValueError(f"table {self.name!r}: id {int(outside[0])} is not a new id (new ids "
                             f"are [{self.coded_rows}, {self.num_embeddings})); only new ids are promoted")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError(f"table {self.name!r}: an id is given twice")
        current = self.promoted_ids[self.promoted_ids != EMPTY_SLOT].cpu()
        again = ids[torch.isin(ids, current)]
        if again.numel():
            raise ValueError(f"table {self.name!r}: id {int(again[0])} is already promoted")
        total = current.numel() + ids.numel()
        if total > self.promoted_ids.numel():
            raise ValueError(f"table {self.name!r}: {ids.numel()} ids to promote but only "
                             f"{self.promoted_ids.numel() - current.numel()} of "
                             f"{self.promoted_ids.numel()} promotion slots are free")
        slots = self.codes[self.coded_rows:]
        merged_ids = torch.cat([current, ids])
        merged_codes = torch.cat([slots[: current.numel()].cpu(), codes.to(self.codes.dtype).cpu()])
        order = torch.argsort(merged_ids)
        self.promoted_ids[:total] = merged_ids[order].to(self.promoted_ids.device)
        slots[:total] = merged_codes[order].to(slots.device)

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raises ``ValueError`` naming the table if ``codes`` do not fit it (shape, dtype, values)."""
        want = (self.codes.shape[0], self.num_subspaces)
        if tuple(codes.shape) != want:
            raise ValueError(
                f"table {self.name!r}: codes have shape {tuple(codes.shape)}, expected {want}"
            )
        if codes.dtype != self.codes.dtype:
            raise ValueError(
                f"table {self.name!r}: codes have dtype {codes.dtype}, expected {self.codes.dtype} "
                f"(codebook_size {self.codebook_size})"
            )
        top = int(codes.to(torch.int32).max()) if codes.numel() and codes.device.type != "meta" else 0
        if top >= self.codebook_size:
            raise ValueError(
                f"table {self.name!r}: code {top} >= codebook_size {self.codebook_size}"
            )

    def check_codebooks(self, codebooks: torch.Tensor) -> None:
        """Raises ``ValueError`` naming the table if ``codebooks`` do not fit it (shape, dtype)."""
        if tuple(codebooks.shape) != tuple(self.codebooks.shape):
            raise ValueError(
                f"table {self.name!r}: codebooks have shape {tuple(codebooks.shape)}, "
                f"expected {tuple(self.codebooks.shape)}"
            )
        if codebooks.dtype != torch.float32:
            raise ValueError(
                f"table {self.name!r}: codebooks have dtype {codebooks.dtype}, expected torch.float32"
            )

    def check_fallback(self, fallback: torch.Tensor) -> None:
        """Raises ``ValueError`` naming the table if ``fallback`` does not fit it."""
        want = (self.config.fallback_rows, self.config.embedding_dim)
        if tuple(fallback.shape) != want or fallback.dtype != torch.float32:
            raise ValueError(f"table {self.name!r}: fallback is {fallback.dtype} "
                             f"{tuple(fallback.shape)}, expected torch.float32 {want}")

    def check_promoted_ids(self, promoted: torch.Tensor) -> None:
        """Raises ``ValueError`` naming the table unless ``promoted`` holds
        ``promotion_slots`` int64 values: new ids in increasing order, then unused slots."""
        check_promoted_ids(self.config, promoted)

    def check(self, codes: torch.Tensor, codebooks: torch.Tensor) -> None:
        """Raises ``ValueError`` naming the table if codes or codebooks do not fit it."""
        self.check_codes(codes)
        self.check_codebooks(codebooks)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Each key is checked on its own, so a partial state dict (strict=False) is checked too:
        # nn.Module would cast int64 codes to uint8 silently (wrapping values >= 256).
        checks = {"codes": self.check_codes, "codebooks": self.check_codebooks}
        if self.fallback is not None:
            checks.update(fallback=self.check_fallback, promoted_ids=self.check_promoted_ids)
        for key, check in checks.items():
            value = state_dict.get(prefix + key)
            if isinstance(value, torch.Tensor):
                check(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class FullTable(nn.EmbeddingBag):
    """An uncompressed table: the ``nn.EmbeddingBag`` of TorchRec's EBC (same ``weight``, shape and
    state), initialised by the config's ``init_fn`` from a seed drawn at construction, like
    :class:`ProductQuantizedTable`, so that :meth:`reset_parameters` (after ``to_empty``) gives the
    construction's values.

    Args:
        config: the table's config.
        device: where to allocate.

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4,
        ...     feature_names=["f"])
        >>> table = FullTable(cfg, device=torch.device("meta")).to_empty(device="cpu")
        >>> table.reset_parameters()
        >>> bool(table.weight.abs().max() <= cfg.get_weight_init_max())
        True
    """

    def __init__(self, config: QuantizedEmbeddingBagConfig, device: Optional[torch.device] = None):
        super().__init__(
            num_embeddings=config.num_embeddings,
            embedding_dim=config.embedding_dim,
            mode=pooling_type_to_str(config.pooling),
            include_last_offset=True,
            _weight=torch.empty(config.num_embeddings, config.embedding_dim, device=device),
        )
        self.config = config
        self.init_seed = draw_seed()
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Sets the weight to the values construction gives it."""
        init_weight_(self.weight, self.config, self.init_seed)


@dataclass
class TableMemory:
    """Bytes held by one table, and by the float32 table it replaces (``num_embeddings`` rows).

    ``codes_bytes`` counts every row of ``codes`` (promotion slots included);
    ``fallback_bytes`` the fallback table's floats and ``promoted_ids`` (0 without a fallback).
    """

    rows: int
    dim: int
    compressed: bool
    codes_bytes: int
    codebooks_bytes: int
    weight_bytes: int
    baseline_bytes: int
    fallback_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.codes_bytes + self.codebooks_bytes + self.weight_bytes + self.fallback_bytes


@dataclass
class MemoryReport:
    """Per-table bytes of a QEBC and the ratio against a float32 ``EmbeddingBagCollection``."""

    tables: Dict[str, TableMemory]

    @property
    def total_bytes(self) -> int:
        return sum(t.total_bytes for t in self.tables.values())

    @property
    def baseline_bytes(self) -> int:
        return sum(t.baseline_bytes for t in self.tables.values())

    @property
    def ratio(self) -> float:
        return self.baseline_bytes / max(self.total_bytes, 1)


def _nbytes(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class QuantizedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An ``EmbeddingBagCollection`` whose tables may be product-quantized (MEC).

    ``forward(KeyedJaggedTensor) -> KeyedTensor`` with the keys, order and dimensions of an
    ``EmbeddingBagCollection`` built from the same configs, so it drops into ``DLRM``,
    ``DLRM_DCN``, DeepFM or any model that takes an EBC. Tables whose config has
    ``codebook_size > 0`` hold ``codes`` and ``codebooks``; the others hold ``weight`` exactly as
    in the EBC. On CPU all features are pooled by one compiled operator (``torchrec_mec._C``,
    built by the package install; without it, by one FBGEMM table-batched op whose tables are the
    codebooks' subspaces and the full tables); on CUDA compressed tables use a Triton kernel and
    full tables FBGEMM's TBE (or ``nn.EmbeddingBag``). Lengths, ids and codes are checked before
    any memory is read through them: on CPU a bad one raises ``ValueError`` naming the feature
    and table; on CUDA the checks run on the device, without a host sync. Gradients reach
    ``codebooks`` and ``weight`` through autograd, so any torch optimizer trains them. Codes are
    a frozen buffer. ``torch.compile(fullgraph=True)`` and ``torch.export`` trace the lookup as
    one registered operator.

    A compressed table may serve new ids (first seen after compression) from a hashed fallback
    table that trains like a full table (``coded_rows``, ``fallback_rows`` and
    ``promotion_slots`` of its config), on every path above; :meth:`promote` (through
    ``torchrec_mec.quantize.promote_ids``) later gives the busiest ones codes of their own. See
    docs/new_ids.md.

    Built on the ``meta`` device it allocates nothing (tables of billions of rows build in
    milliseconds); ``to_empty(device=...)`` and :meth:`reset_parameters` then give every table the
    values construction on that device would have given, and a sharded copy built by
    ``DistributedModelParallel`` starts from the same values whatever the plan.

    Args:
        tables: ``QuantizedEmbeddingBagConfig`` (or plain ``EmbeddingBagConfig``, kept full).
        is_weighted: whether the input KJT carries per-id weights.
        device: where to allocate the tables.

    Example::

        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> tables = [
        ...     QuantizedEmbeddingBagConfig(name="big", num_embeddings=1000, embedding_dim=8,
        ...         feature_names=["f1"], num_subspaces=4, codebook_size=16),
        ...     QuantizedEmbeddingBagConfig(name="small", num_embeddings=10, embedding_dim=4,
        ...         feature_names=["f2"]),
        ... ]
        >>> qebc = QuantizedEmbeddingBagCollection(tables)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f1", "f2"], values=torch.tensor([1, 999, 3, 7]),
        ...     lengths=torch.tensor([2, 0, 1, 1]))
        >>> out = qebc(kjt)
        >>> out.keys(), tuple(out.values().shape)
        (['f1', 'f2'], (2, 12))
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self._is_weighted = is_weighted
        self._embedding_bag_configs: List[QuantizedEmbeddingBagConfig] = [
            t if isinstance(t, QuantizedEmbeddingBagConfig) else as_quantized_config(t)
            for t in tables
        ]
        self.embedding_bags = nn.ModuleDict()
        seen_features: Dict[str, str] = {}
        for cfg in self._embedding_bag_configs:
            if cfg.name in self.embedding_bags:
                raise ValueError(f"Duplicate table name {cfg.name}")
            if not cfg.feature_names:
                cfg.feature_names = [cfg.name]
            for f in cfg.feature_names:
                if f in seen_features:
                    raise ValueError(
                        f"feature {f!r} is read by tables {seen_features[f]!r} and {cfg.name!r}"
                    )
                seen_features[f] = cfg.name
            if is_weighted and cfg.pooling == PoolingType.MEAN:
                raise ValueError(
                    f"table {cfg.name!r}: weighted features need SUM pooling (as in nn.EmbeddingBag)"
                )
            if cfg.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {cfg.name!r}: pooling {cfg.pooling} is not supported")
            self.embedding_bags[cfg.name] = (
                ProductQuantizedTable(cfg, device) if cfg.compressed else FullTable(cfg, device)
            )
        self._embedding_names: List[str] = [
            name for names in get_embedding_names_by_table(self._embedding_bag_configs)
            for name in names
        ]
        self._lengths_per_embedding: List[int] = [
            cfg.embedding_dim for cfg in self._embedding_bag_configs for _ in cfg.feature_names
        ]
        self._feature_names: List[str] = [
            f for cfg in self._embedding_bag_configs for f in cfg.feature_names
        ]
        self._feature_configs: List[QuantizedEmbeddingBagConfig] = [
            cfg for cfg in self._embedding_bag_configs for _ in cfg.feature_names
        ]
        self._feature_set = set(self._feature_names)
        # One TBE table per codebook subspace and per full table; one TBE feature slot per
        # (feature, subspace), so the op's pooled output is already the concatenation.
        shapes: List[Tuple[int, int]] = []
        first_table: Dict[str, int] = {}
        for cfg in self._embedding_bag_configs:
            first_table[cfg.name] = len(shapes)
            if cfg.compressed:
                shapes += [(cfg.codebook_size, cfg.subspace_dim)] * cfg.num_subspaces
            else:
                shapes.append((cfg.num_embeddings, cfg.embedding_dim))
        slots = [
            first_table[cfg.name] + m
            for cfg in self._feature_configs
            for m in range(cfg.num_subspaces if cfg.compressed else 1)
        ]
        self._lookup = TableBatchedLookup(shapes, slots) if shapes else None
        full_slots = [first_table[c.name] for c in self._feature_configs if not c.compressed]
        self._full_lookup = TableBatchedLookup(shapes, full_slots) if full_slots else None
        self._buffer = FlatParameterBuffer(self._table_parameters)
        # Fallback tables are not in the TBE: without the compiled operator, the collection
        # takes the per-feature path.
        self._has_fallback = any(cfg.has_fallback for cfg in self._embedding_bag_configs)

    # -- the EmbeddingBagCollectionInterface ------------------------------------------------
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        tensors = self._table_parameters()
        return tensors[0].device if tensors else torch.device("cpu")

    def reset_parameters(self) -> None:
        """Sets every table's codes, codebooks and weight to the values construction gives them
        (after ``to_empty(device=...)`` of a collection built on ``meta``, for example)."""
        for table in self.embedding_bags.values():
            assert isinstance(table, (ProductQuantizedTable, FullTable))
            table.reset_parameters()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        on_cpu = features.values().device.type == "cpu"
        if on_cpu and self._lookup is not None and cpu_operator_available():
            values = self._fused_forward(features)
        else:
            per_feature = self._split(features)
            if on_cpu and self._lookup is not None and not self._has_fallback:
                values = self._tbe_forward(per_feature)
            else:
                values = self._device_forward(per_feature)
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._lengths_per_embedding,
            values=values,
        )

    # -- construction from a trained model -------------------------------------------------
    @classmethod
    def from_embedding_bag_collection(
        cls,
        ebc: EmbeddingBagCollection,
        compressed: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
        device: Optional[torch.device] = None,
    ) -> "QuantizedEmbeddingBagCollection":
        """Builds a QEBC from a trained EBC: its weights for the full tables, and for each table
        named in ``compressed`` the given ``(codes [N, M], codebooks [M, K, D/M])``.

        Example::

            >>> from torchrec.modules.embedding_modules import EmbeddingBagCollection
            >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t", num_embeddings=6,
            ...     embedding_dim=4, feature_names=["f"])])
            >>> codes = torch.zeros(6, 2, dtype=torch.uint8)
            >>> qebc = QuantizedEmbeddingBagCollection.from_embedding_bag_collection(
            ...     ebc, {"t": (codes, torch.zeros(2, 3, 2))})
            >>> qebc.memory_report().tables["t"].codes_bytes
            12
        """
        names = {cfg.name for cfg in ebc.embedding_bag_configs()}
        unknown = sorted(set(compressed) - names)
        if unknown:
            raise ValueError(f"compressed tables {unknown} are not tables of the EBC ({sorted(names)})")
        configs = []
        for cfg in ebc.embedding_bag_configs():
            if cfg.name in compressed:
                codes, books = compressed[cfg.name]
                if books.dim() != 3:
                    raise ValueError(
                        f"table {cfg.name!r}: codebooks must be [M, K, D/M], got {tuple(books.shape)}"
                    )
                configs.append(as_quantized_config(cfg, books.shape[0], books.shape[1]))
            else:
                configs.append(as_quantized_config(cfg))
        qebc = cls(configs, is_weighted=ebc.is_weighted(), device=device)
        with torch.no_grad():
            for cfg in configs:
                if cfg.name in compressed:
                    qebc.load_codes(cfg.name, *compressed[cfg.name])
                else:
                    qebc._table_parameter(cfg.name).copy_(ebc.embedding_bags[cfg.name].weight)
        return qebc

    @torch.no_grad()
    def load_codes(self, table: str, codes: torch.Tensor, codebooks: torch.Tensor) -> None:
        """Loads one compressed table's codes and codebooks (checked against its config). A
        table with a fallback takes the codes of its coded ids, ``[coded_rows, M]`` (stage 2's
        output for them), or its whole ``codes`` buffer (promotion slots included)."""
        module = self.embedding_bags[table] if table in self.embedding_bags else None
        if not isinstance(module, ProductQuantizedTable):
            raise ValueError(f"table {table!r} is not a compressed table of this collection")
        if module.fallback is not None and codes.shape[0] == module.coded_rows:
            codes = torch.cat([codes.to(module.codes.device), module.codes[module.coded_rows:]])
        module.check(codes, codebooks)
        module.codes.copy_(codes)
        module.codebooks.copy_(codebooks)

    # -- memory ----------------------------------------------------------------------------
    def table(self, name: str) -> Union[ProductQuantizedTable, FullTable]:
        """The module that holds table ``name`` (``embedding_bags[name]``, typed)."""
        module = self.embedding_bags[name]
        assert isinstance(module, (ProductQuantizedTable, FullTable))
        return module

    def memory_report(self) -> MemoryReport:
        """Bytes per table (codes, codebooks, full weights, fallback tables) against a float32 EBC.

        Example::

            >>> qebc = QuantizedEmbeddingBagCollection([QuantizedEmbeddingBagConfig(name="t",
            ...     num_embeddings=100_000, embedding_dim=64, feature_names=["f"],
            ...     num_subspaces=8, codebook_size=256)])
            >>> round(qebc.memory_report().ratio, 1)
            29.6
        """
        tables = {}
        for cfg in self._embedding_bag_configs:
            module = self.embedding_bags[cfg.name]
            baseline = cfg.num_embeddings * cfg.embedding_dim * 4
            codes = books = weight = fallback = 0
            if isinstance(module, ProductQuantizedTable):
                codes = _nbytes(module.codes)
                books = _nbytes(module.codebooks)
                if module.fallback is not None:
                    fallback = _nbytes(module.fallback) + _nbytes(module.promoted_ids)
            else:
                assert isinstance(module, FullTable)
                weight = _nbytes(module.weight)
            tables[cfg.name] = TableMemory(
                rows=cfg.num_embeddings,
                dim=cfg.embedding_dim,
                compressed=cfg.compressed,
                codes_bytes=codes,
                codebooks_bytes=books,
                weight_bytes=weight,
                baseline_bytes=baseline,
                fallback_bytes=fallback,
            )
        return MemoryReport(tables)

    # -- new ids ---------------------------------------------------------------------------
    def promote(self, table: str, ids: torch.Tensor, codes: torch.Tensor) -> None:
        """Gives new ids of ``table`` codes of their own (``ProductQuantizedTable.promote``);
        ``torchrec_mec.quantize.promote_ids`` computes the codes from their fallback rows."""
        module = self.embedding_bags[table] if table in self.embedding_bags else None
        if not isinstance(module, ProductQuantizedTable):
            raise ValueError(f"table {table!r} is not a compressed table of this collection")
        module.promote(ids, codes)

    # -- internals -------------------------------------------------------------------------
    def _table_parameter(self, name: str) -> nn.Parameter:
        module = self.embedding_bags[name]
        if isinstance(module, ProductQuantizedTable):
            return module.codebooks
        assert isinstance(module, FullTable)
        return cast(nn.Parameter, module.weight)  # nn.EmbeddingBag types its Parameter as Tensor

    def _table_parameters(self) -> List[nn.Parameter]:
        return [self._table_parameter(cfg.name) for cfg in self._embedding_bag_configs]

    def _feature_slots(self, keys: List[str]) -> List[int]:
        """For each KJT key, the position of its feature in the output (table order)."""
        if keys == self._feature_names:
            return list(range(len(keys)))
        missing = [f for f in self._feature_names if f not in set(keys)]
        if missing:
            raise ValueError(f"KeyedJaggedTensor is missing configured feature(s) {missing}")
        unknown = [k for k in keys if k not in self._feature_set]
        if unknown:
            raise ValueError(
                f"KeyedJaggedTensor carries feature(s) {unknown} that no table reads "
                f"(configured: {self._feature_names})"
            )
        if len(keys) != len(set(keys)):
            raise ValueError(f"KeyedJaggedTensor repeats a feature: {keys}")
        return [self._feature_names.index(k) for k in keys]

    def _ids_and_weights(
        self, features: KeyedJaggedTensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        values = features.values()
        if values.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"feature ids must be int32 or int64, got {values.dtype}")
        weights = features.weights_or_none() if self._is_weighted else None
        if self._is_weighted and weights is None:
            raise ValueError("this collection is weighted but the KeyedJaggedTensor has no weights")
        return values, weights

    @staticmethod
    def _check_lengths(keys: List[str], lengths: torch.Tensor, num_values: int) -> None:
        """On CPU: lengths are not negative and sum to ``num_values``, else ``ValueError``
        naming the feature (the compiled operator makes the same checks on its offsets)."""
        per_bag = lengths.view(len(keys), -1)
        negative = (per_bag < 0).nonzero()
        if negative.numel():
            f, b = negative[0].tolist()
            raise ValueError(
                f"feature {keys[f]!r}: bag {b} has a negative length ({int(per_bag[f, b])})"
            )
        ends = per_bag.sum(1).cumsum(0)
        past = (ends > num_values).nonzero()
        if past.numel():
            f = int(past[0])
            raise ValueError(
                f"feature {keys[f]!r}: its bags end at value {int(ends[f])} but there are only "
                f"{num_values} values (the lengths sum to more than the number of values)"
            )
        if len(keys) and int(ends[-1]) != num_values:
            raise ValueError(
                f"feature {keys[-1]!r}: the bags end at value {int(ends[-1])} but there are "
                f"{num_values} values (the lengths sum to less than the number of values)"
            )

    @staticmethod
    def _check_ids(name: str, cfg: QuantizedEmbeddingBagConfig, ids: torch.Tensor) -> None:
        """Ids in ``[0, num_embeddings)``: exact ``ValueError`` on CPU, a device-side check
        (no host sync) elsewhere."""
        if ids.device.type != "cpu":
            assert_ids_in_range(ids, cfg.num_embeddings, f"feature {name!r} (table {cfg.name!r})")
        elif ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= cfg.num_embeddings:
                raise ValueError(
                    f"feature {name!r}: id {lo if lo < 0 else hi} is out of range for table "
                    f"{cfg.name!r} with {cfg.num_embeddings} rows"
                )

    def _split(
        self, features: KeyedJaggedTensor
    ) -> List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """Per feature in table order: (ids, lengths [B], weights or None), checked.

        On CPU every check is exact and raises ``ValueError`` naming the feature. On other
        devices the checks run on the device (no host sync): the per-key sizes come from the
        KJT's ``length_per_key()``, which TorchRec's input pipelines compute on the host."""
        values, weights = self._ids_and_weights(features)
        keys = features.keys()
        slots = self._feature_slots(keys)
        lengths = features.lengths()
        if values.device.type == "cpu":
            self._check_lengths(keys, lengths, values.numel())
        elif lengths.numel():
            torch._assert_async((lengths >= 0).all(), f"KeyedJaggedTensor {keys}: a negative length")
        sizes = features.length_per_key()
        if sum(sizes) != values.numel():
            raise ValueError(
                f"KeyedJaggedTensor {keys}: lengths per key {sizes} sum to {sum(sizes)}, but it "
                f"holds {values.numel()} values"
            )
        ids = values.split(sizes)
        per_key = lengths.view(len(keys), -1)
        ws = weights.split(sizes) if weights is not None else [None] * len(ids)
        for i, key in enumerate(keys):
            self._check_ids(key, self._feature_configs[slots[i]], ids[i])
        order = sorted(range(len(keys)), key=slots.__getitem__)
        return [(ids[i], per_key[i], ws[i]) for i in order]

    def _fused_forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """All features, in KJT order, in one call of the compiled operator, which checks the
        offsets, ids and codes and raises ``ValueError`` naming the feature or table."""
        values, weights = self._ids_and_weights(features)
        keys = features.keys()
        slots = self._feature_slots(keys)
        table_index = {cfg.name: t for t, cfg in enumerate(self._embedding_bag_configs)}
        configs = [self._feature_configs[slot] for slot in slots]
        modules = [self.embedding_bags[cfg.name] for cfg in self._embedding_bag_configs]
        no_codes = torch.empty(0, dtype=torch.uint8)
        fallbacks, promoted = self._fallback_tensors(modules)
        return fused_pooled_lookup(
            values,
            features.offsets(),
            weights,
            [m.codes if isinstance(m, ProductQuantizedTable) else no_codes for m in modules],
            self._table_parameters(),
            [table_index[cfg.name] for cfg in configs],
            [int(cfg.pooling == PoolingType.MEAN) for cfg in configs],
            slots,
            keys,
            [cfg.name for cfg in self._embedding_bag_configs],
            fallbacks=fallbacks,
            promoted_ids=promoted,
            num_ids=[cfg.num_embeddings for cfg in self._embedding_bag_configs],
        )

    @staticmethod
    def _fallback_tensors(modules: List[nn.Module]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per table, its fallback table and promoted ids, or empty tensors (none)."""
        fallbacks: List[torch.Tensor] = []
        promoted: List[torch.Tensor] = []
        for m in modules:
            if isinstance(m, ProductQuantizedTable) and m.fallback is not None:
                assert m.promoted_ids is not None  # held with the fallback
                fallbacks.append(m.fallback)
                promoted.append(m.promoted_ids)
            else:
                fallbacks.append(torch.empty(0, 0))
                promoted.append(torch.empty(0, dtype=torch.int64))
        return fallbacks, promoted

    def _tbe_forward(
        self,
        per_feature: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
        lookup: Optional[TableBatchedLookup] = None,
    ) -> torch.Tensor:
        """Features in one FBGEMM TBE call: all of them through ``self._lookup`` (the CPU path
        without the compiled operator), or the full-table ones through ``self._full_lookup``."""
        lookup = lookup or self._lookup
        assert lookup is not None
        configs = (self._feature_configs if lookup is self._lookup
                   else [cfg for cfg in self._feature_configs if not cfg.compressed])
        index_parts: List[torch.Tensor] = []
        length_parts: List[torch.Tensor] = []
        weight_parts: List[torch.Tensor] = []
        any_mean = any(cfg.pooling == PoolingType.MEAN for cfg in configs)
        need_weights = self._is_weighted or any_mean
        for cfg, (ids, lengths, w) in zip(configs, per_feature):
            if cfg.pooling == PoolingType.MEAN:
                inv = 1.0 / lengths.clamp(min=1).to(torch.float32)
                w = torch.repeat_interleave(inv, lengths, output_size=ids.numel())
            elif need_weights and w is None:
                w = torch.ones(ids.numel(), dtype=torch.float32, device=ids.device)
            if cfg.compressed:
                m = cfg.num_subspaces
                table = self.embedding_bags[cfg.name]
                assert isinstance(table, ProductQuantizedTable)
                gathered = table.codes[ids].to(torch.int64)
                if gathered.numel() and int(gathered.max()) >= cfg.codebook_size:
                    raise ValueError(f"table {cfg.name!r}: codes hold a value >= codebook_size "
                                     f"{cfg.codebook_size}")
                index_parts.append(gathered.t().reshape(-1))
                length_parts.append(lengths.repeat(m))
                if need_weights:
                    assert w is not None  # set above whenever weights are needed
                    weight_parts.append(w.to(torch.float32).repeat(m))
            else:
                index_parts.append(ids.to(torch.int64))
                length_parts.append(lengths)
                if need_weights:
                    assert w is not None
                    weight_parts.append(w.to(torch.float32))
        indices = torch.cat(index_parts)
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.cat(length_parts).long())
        psw = torch.cat(weight_parts) if need_weights else None
        return lookup(self._buffer, indices, offsets, psw)

    def _device_forward(
        self, per_feature: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]
    ) -> torch.Tensor:
        """CUDA and other devices: compressed features through the Triton kernel (or the
        plain-PyTorch lookup), full tables through one FBGEMM TBE call when fbgemm-gpu has
        kernels for the device, else ``nn.EmbeddingBag`` per feature."""
        full = [i for i, cfg in enumerate(self._feature_configs) if not cfg.compressed]
        outs: List[Optional[torch.Tensor]] = [None] * len(per_feature)
        device = per_feature[0][0].device
        if full and self._full_lookup is not None and tbe_available(device):
            pooled_full = self._tbe_forward([per_feature[i] for i in full], self._full_lookup)
            dims = [self._feature_configs[i].embedding_dim for i in full]
            for i, block in zip(full, pooled_full.split(dims, dim=1)):
                outs[i] = block
        for i, (cfg, (ids, lengths, w)) in enumerate(zip(self._feature_configs, per_feature)):
            if outs[i] is not None:
                continue
            offsets = torch.nn.functional.pad(lengths.long().cumsum(0), (1, 0))
            mode = pooling_type_to_str(cfg.pooling)
            module = self.embedding_bags[cfg.name]
            if isinstance(module, ProductQuantizedTable):
                lookup = (triton_lookup.pq_embedding_bag_triton
                          if ids.is_cuda and triton_lookup.TRITON_AVAILABLE else pq_embedding_bag)
                if module.fallback is not None:
                    assert module.promoted_ids is not None
                    outs[i] = fallback_embedding_bag(
                        module.codes, module.codebooks, module.fallback, module.promoted_ids, ids,
                        offsets, w, mode, pq_lookup=lookup)
                else:
                    outs[i] = lookup(module.codes, module.codebooks, ids, offsets, w, mode)
            else:
                outs[i] = module(ids, offsets, per_sample_weights=w)
        return torch.cat(outs, dim=1)  # type: ignore[arg-type]
