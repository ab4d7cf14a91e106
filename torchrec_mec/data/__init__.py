"""The data layer: raw CTR files or a synthetic generator in, TorchRec batches out.

Typical use::

    from torchrec_mec.data import prepare_dataset, SyntheticConfig
    ds = prepare_dataset("train.txt", "criteo", "runs/criteo_data")   # or "avazu", "synthetic"
    for batch in ds.batches("train", batch_size=2048, shuffle=True, seed=epoch,
                            rank=rank, world_size=world_size):
        ...  # batch: torchrec.datasets.utils.Batch

See docs/data.md.
"""
from torchrec_mec.data.avazu import AVAZU_COLUMNS, AVAZU_SCHEMA, read_avazu_csv
from torchrec_mec.data.binary_criteo import BinaryCriteoDataset
from torchrec_mec.data.criteo import CRITEO_SCHEMA, criteo_dense_transform, read_criteo_tsv
from torchrec_mec.data.dataset import CTRDataset, batch_row_ranges, make_batch
from torchrec_mec.data.encoded import EncodedDataset
from torchrec_mec.data.prepare import DEFAULT_MIN_COUNT, assign_splits, prepare_dataset
from torchrec_mec.data.schema import (
    SPLITS,
    BadRow,
    BadRowReport,
    CorruptDatasetError,
    DataFormatError,
    DataSchema,
    RawChunk,
)
from torchrec_mec.data.synthetic import (
    DEFAULT_TABLE_SIZES,
    SyntheticClickModel,
    SyntheticConfig,
    zipf_ranks,
)
from torchrec_mec.data.vocab import OOV_ID, Vocabulary

__all__ = [
    "AVAZU_COLUMNS",
    "AVAZU_SCHEMA",
    "BadRow",
    "BadRowReport",
    "BinaryCriteoDataset",
    "CRITEO_SCHEMA",
    "CTRDataset",
    "CorruptDatasetError",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_TABLE_SIZES",
    "DataFormatError",
    "DataSchema",
    "EncodedDataset",
    "OOV_ID",
    "RawChunk",
    "SPLITS",
    "SyntheticClickModel",
    "SyntheticConfig",
    "Vocabulary",
    "assign_splits",
    "batch_row_ranges",
    "criteo_dense_transform",
    "make_batch",
    "prepare_dataset",
    "read_avazu_csv",
    "read_criteo_tsv",
    "zipf_ranks",
]
