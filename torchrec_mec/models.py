"""CTR models built by name around an ``EmbeddingBagCollection`` or its quantized twin.

The architectures are TorchRec's own (``DLRM``, ``DLRM_DCN``, ``SimpleDeepFMNN``); this module
only derives their tables and layer sizes from a data set's schema, so that the same
``ModelConfig`` builds the uncompressed model of stage 1 and the compressed one of stage 3,
differing only in the embedding collection: that is what "model-agnostic" means in MEC.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec.modules import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig

MODEL_NAMES: Tuple[str, ...] = ("dlrm", "dlrm_dcn", "deepfm")
"""Architectures ``build_model`` knows, by name."""


@dataclass(frozen=True)
class ModelConfig:
    """Which CTR architecture to build, and its sizes.

    Args:
        name (str): ``"dlrm"``, ``"dlrm_dcn"`` or ``"deepfm"`` (TorchRec's ``DLRM``,
            ``DLRM_DCN``, ``SimpleDeepFMNN``).
        embedding_dim (int): D, the dimension of every table (DLRM needs one D for all).
        dense_hidden_sizes (Tuple[int, ...]): hidden layers of DLRM's dense arch; the builder
            appends ``embedding_dim`` as its output layer. DeepFM uses the first entry as its
            dense arch's hidden size.
        over_hidden_sizes (Tuple[int, ...]): hidden layers of DLRM's over arch; the builder
            appends the output layer of size 1.
        dcn_num_layers (int): cross layers of ``DLRM_DCN``.
        dcn_low_rank_dim (int): low-rank dimension of ``DLRM_DCN``'s cross layers.
        deepfm_dimension (int): output size of DeepFM's deep interaction.

    Example::

        >>> cfg = ModelConfig(name="dlrm_dcn", embedding_dim=8, dense_hidden_sizes=(16,),
        ...                   over_hidden_sizes=(16,), dcn_num_layers=2, dcn_low_rank_dim=4)
        >>> cfg.name, cfg.embedding_dim
        ('dlrm_dcn', 8)
    """

    name: str = "dlrm"
    embedding_dim: int = 40
    dense_hidden_sizes: Tuple[int, ...] = (512, 256)
    over_hidden_sizes: Tuple[int, ...] = (512, 256)
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 64
    deepfm_dimension: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_hidden_sizes", tuple(self.dense_hidden_sizes))
        object.__setattr__(self, "over_hidden_sizes", tuple(self.over_hidden_sizes))
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model name must be one of {MODEL_NAMES}, got {self.name!r}")
        sizes = (self.embedding_dim, *self.dense_hidden_sizes, *self.over_hidden_sizes,
                 self.dcn_num_layers, self.dcn_low_rank_dim, self.deepfm_dimension)
        if min(sizes) < 1:
            raise ValueError(f"model sizes must be >= 1, got {self}")
        if self.name == "deepfm" and not self.dense_hidden_sizes:
            raise ValueError("deepfm needs one dense hidden size (dense_hidden_sizes)")


def table_name(feature: str) -> str:
    """The embedding table of a sparse feature (one table per feature).

    >>> table_name("C3")
    't_C3'
    """
    return f"t_{feature}"


def embedding_tables(
    sparse_names: Sequence[str], num_embeddings: Mapping[str, int], embedding_dim: int
) -> List[EmbeddingBagConfig]:
    """One TorchRec ``EmbeddingBagConfig`` per sparse feature, in schema order.

    Args:
        sparse_names (Sequence[str]): the data set's sparse features (its KJT keys).
        num_embeddings (Mapping[str, int]): rows of each feature's table.
        embedding_dim (int): D.

    Example::

        >>> tables = embedding_tables(["C1", "C2"], {"C1": 5, "C2": 9}, 4)
        >>> [(t.name, t.num_embeddings) for t in tables]
        [('t_C1', 5), ('t_C2', 9)]
    """
    missing = [f for f in sparse_names if f not in num_embeddings]
    if missing:
        raise ValueError(f"no table size for sparse feature(s) {missing}")
    return [
        EmbeddingBagConfig(name=table_name(f), num_embeddings=int(num_embeddings[f]),
                           embedding_dim=embedding_dim, feature_names=[f])
        for f in sparse_names
    ]


class CTRModel(nn.Module):
    """A TorchRec CTR architecture that returns one logit per sample.

    ``forward(dense [B, num_dense], sparse KeyedJaggedTensor) -> logits [B]``. The wrapped
    architecture sits in ``arch`` unchanged, so its state dict keys are TorchRec's with an
    ``arch.`` prefix, and ``DistributedModelParallel`` finds and shards its embedding collection.

    Args:
        arch: ``DLRM``, ``DLRM_DCN`` or ``SimpleDeepFMNN`` (with logit output).
        config (ModelConfig): what it was built from (kept for saving).
        num_dense (int): dense features the data has; 0 is served by one constant input.

    Example::

        >>> model = build_model(ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,),
        ...     over_hidden_sizes=(8,)), num_dense=2, sparse_names=["C1"],
        ...     num_embeddings={"C1": 10})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(keys=["C1"], values=torch.tensor([1, 7]),
        ...                                           lengths=torch.tensor([1, 1]))
        >>> model(torch.randn(2, 2), kjt).shape
        torch.Size([2])
    """

    def __init__(self, arch: Union[DLRM, SimpleDeepFMNN], config: ModelConfig,
                 num_dense: int) -> None:
        super().__init__()
        self.arch = arch
        self.config = config
        self.num_dense = num_dense

    @property
    def embedding_bag_collection(self) -> EmbeddingBagCollectionInterface:
        """The (unsharded) embedding collection: an EBC, or a QEBC after compression."""
        return self.arch.sparse_arch.embedding_bag_collection

    def forward(self, dense_features: torch.Tensor,
                sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        if self.num_dense == 0:
            # Data without dense features (Avazu): DLRM's dense arch still needs an input, and
            # a constant 1 gives it a learned bias vector instead of a zero-width layer.
            dense_features = torch.ones(
                sparse_features.stride(), 1, device=dense_features.device
            )
        return self.arch(dense_features, sparse_features).squeeze(-1)


def hook_sparse_arch(model: nn.Module, hook: Callable[..., Any], needed_by: str
                     ) -> List[RemovableHandle]:
    """Registers ``hook`` as a forward hook on every ``sparse_arch`` of ``model`` (a
    ``CTRModel``, plain or wrapped by ``DistributedModelParallel``): the pooled embeddings,
    ``[B, F, D]`` (DLRM, DLRM-DCN) or a ``KeyedTensor`` (DeepFM).

    Raises:
        ValueError: ``model`` has no ``sparse_arch`` (names ``needed_by``).
    """
    handles = [m.register_forward_hook(hook) for name, m in model.named_modules()
               if name.split(".")[-1] == "sparse_arch"]
    if not handles:
        raise ValueError(f"{needed_by} needs a model with a sparse_arch; "
                         f"{type(model).__name__} has none")
    return handles

def build_model(
    config: ModelConfig,
    num_dense: int,
    sparse_names: Sequence[str],
    num_embeddings: Mapping[str, int],
    compressed: Optional[Mapping[str, Tuple[int, int]]] = None,
    device: Optional[torch.device] = None,
    new_ids: Optional[Mapping[str, Mapping[str, int]]] = None,
    tables_device: Optional[torch.device] = None,
) -> CTRModel:
    """Builds the named CTR model for a data set: one table per sparse feature.

    Args:
        config (ModelConfig): architecture and sizes.
        num_dense (int): number of dense features.
        sparse_names (Sequence[str]): sparse features (KJT keys), in schema order.
        num_embeddings (Mapping[str, int]): table rows per sparse feature.
        compressed (Optional[Mapping[str, Tuple[int, int]]]): ``None`` builds the model with a
            TorchRec ``EmbeddingBagCollection`` (stage 1). A mapping (even empty) builds it with
            a ``QuantizedEmbeddingBagCollection`` in which each named table (``t_<feature>``)
            is product-quantized with ``(num_subspaces, codebook_size)`` and the others stay
            full (stage 3).
        device (Optional[torch.device]): where to allocate (CPU by default).
        new_ids (Optional[Mapping[str, Mapping[str, int]]]): per compressed table, its new-id
            settings (``coded_rows``, ``fallback_rows``, ``promotion_slots`` of
            ``QuantizedEmbeddingBagConfig``): a fallback table for the ids it has no codes for.
        tables_device (Optional[torch.device]): where the embedding collection goes, if not
            with the rest: ``meta`` allocates (and initialises) no table, for
            ``DistributedModelParallel`` to shard and a checkpoint to fill (the dense parts,
            on ``device``, then draw other random numbers: the tables draw none).

    Returns:
        CTRModel: logits [B] from (dense [B, num_dense], KJT).

    Example::

        >>> cfg = ModelConfig(name="deepfm", embedding_dim=8, dense_hidden_sizes=(16,))
        >>> m = build_model(cfg, 3, ["C1", "C2"], {"C1": 1000, "C2": 7},
        ...                 compressed={"t_C1": (4, 16)})
        >>> type(m.embedding_bag_collection).__name__
        'QuantizedEmbeddingBagCollection'
        >>> m.embedding_bag_collection.memory_report().tables["t_C1"].compressed
        True
    """
    tables = embedding_tables(sparse_names, num_embeddings, config.embedding_dim)
    ebc: EmbeddingBagCollectionInterface
    table_device = device if tables_device is None else tables_device
    if compressed is None:
        ebc = EmbeddingBagCollection(tables, device=table_device)
    else:
        unknown = sorted(set(compressed) - {t.name for t in tables})
        if unknown:
            raise ValueError(f"compressed tables {unknown} are not tables of this model")
        not_compressed = sorted(set(new_ids or {}) - set(compressed))
        if not_compressed:
            raise ValueError(f"new-id settings for tables {not_compressed}, which are not "
                             "compressed tables of this model")
        qtables = [
            QuantizedEmbeddingBagConfig(
                name=t.name, num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim,
                feature_names=list(t.feature_names),
                num_subspaces=compressed[t.name][0] if t.name in compressed else 1,
                codebook_size=compressed[t.name][1] if t.name in compressed else 0,
                **(new_ids or {}).get(t.name, {}),
            )
            for t in tables
        ]
        ebc = QuantizedEmbeddingBagCollection(qtables, device=table_device)
    dense_in = max(num_dense, 1)
    arch: Union[DLRM, SimpleDeepFMNN]  # DLRM_DCN is a DLRM
    if config.name == "deepfm":
        arch = SimpleDeepFMNN(num_dense_features=dense_in, embedding_bag_collection=ebc,
                              hidden_layer_size=config.dense_hidden_sizes[0],
                              deep_fm_dimension=config.deepfm_dimension)
        # TorchRec's DeepFM ends in a sigmoid; every model here returns logits so that one
        # numerically stable loss (BCE with logits) serves all three.
        arch.over_arch.model[-1] = nn.Identity()
    else:
        common: Dict[str, object] = dict(
            embedding_bag_collection=ebc, dense_in_features=dense_in,
            dense_arch_layer_sizes=[*config.dense_hidden_sizes, config.embedding_dim],
            over_arch_layer_sizes=[*config.over_hidden_sizes, 1], dense_device=device,
        )
        if config.name == "dlrm":
            arch = DLRM(**common)
        else:
            arch = DLRM_DCN(**common,
                            dcn_num_layers=config.dcn_num_layers,
                            dcn_low_rank_dim=config.dcn_low_rank_dim)
    model = CTRModel(arch, config, num_dense)
    return model.to(device or torch.device("cpu")) if tables_device is None else model

