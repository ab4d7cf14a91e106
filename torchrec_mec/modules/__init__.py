from torchrec_mec.modules.initialization import (
    draw_seed,
    init_codebooks_,
    init_codes_,
    init_fallback_,
    init_weight_,
)
from torchrec_mec.modules.quantized_embedding_bag_collection import (
    EMPTY_SLOT,
    FullTable,
    MemoryReport,
    ProductQuantizedTable,
    QuantizedEmbeddingBagCollection,
    TableMemory,
)
from torchrec_mec.modules.quantized_embedding_configs import (
    CodebookLargerThanTableWarning,
    QuantizedEmbeddingBagConfig,
    as_quantized_config,
    code_dtype,
)

__all__ = [
    "EMPTY_SLOT",
    "CodebookLargerThanTableWarning",
    "FullTable",
    "MemoryReport",
    "ProductQuantizedTable",
    "QuantizedEmbeddingBagCollection",
    "QuantizedEmbeddingBagConfig",
    "TableMemory",
    "as_quantized_config",
    "code_dtype",
    "draw_seed",
    "init_codebooks_",
    "init_codes_",
    "init_fallback_",
    "init_weight_",
]
