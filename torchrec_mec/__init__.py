"""torchrec-mec: MEC embedding compression for TorchRec."""
# First: names the install command when TorchRec or FBGEMM is missing.
from torchrec_mec import _install_check  # noqa: F401
from torchrec_mec.distributed import (
    QuantizedEmbeddingBagCollectionSharder,
    ShardedQuantizedEmbeddingBagCollection,
)
from torchrec_mec.modules import (
    MemoryReport,
    ProductQuantizedTable,
    QuantizedEmbeddingBagCollection,
    QuantizedEmbeddingBagConfig,
    TableMemory,
    as_quantized_config,
    code_dtype,
)
from torchrec_mec.quantize import (
    MECConfig,
    QuantizeResult,
    QuantizeStats,
    quantize_table,
    quantize_tables,
)

__all__ = [
    "QuantizedEmbeddingBagCollectionSharder",
    "ShardedQuantizedEmbeddingBagCollection",
    "MemoryReport",
    "ProductQuantizedTable",
    "QuantizedEmbeddingBagCollection",
    "QuantizedEmbeddingBagConfig",
    "TableMemory",
    "as_quantized_config",
    "code_dtype",
    "MECConfig",
    "QuantizeResult",
    "QuantizeStats",
    "quantize_table",
    "quantize_tables",
]

__version__ = "0.1.0"
