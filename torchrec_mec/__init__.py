"""torchrec-mec: MEC embedding compression for TorchRec."""
from torchrec_mec.modules import (
    MemoryReport,
    ProductQuantizedTable,
    QuantizedEmbeddingBagCollection,
    QuantizedEmbeddingBagConfig,
    TableMemory,
    as_quantized_config,
    code_dtype,
)

__version__ = "0.1.0"
