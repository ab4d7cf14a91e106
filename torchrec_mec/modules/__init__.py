from torchrec_mec.modules.quantized_embedding_bag_collection import (
    MemoryReport,
    ProductQuantizedTable,
    QuantizedEmbeddingBagCollection,
    TableMemory,
)
from torchrec_mec.modules.quantized_embedding_configs import (
    QuantizedEmbeddingBagConfig,
    as_quantized_config,
    code_dtype,
)

__all__ = [
    "MemoryReport",
    "ProductQuantizedTable",
    "QuantizedEmbeddingBagCollection",
    "QuantizedEmbeddingBagConfig",
    "TableMemory",
    "as_quantized_config",
    "code_dtype",
]
