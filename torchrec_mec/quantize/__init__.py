"""Stage 2 of MEC: the popularity-weighted, contrastive product quantizer."""
from torchrec_mec.quantize.config import MECConfig
from torchrec_mec.quantize.driver import (
    assign_tables,
    load_quantized_table,
    quantize_tables,
    table_seed,
)
from torchrec_mec.quantize.model import MECQuantizer
from torchrec_mec.quantize.promotion import assign_codes, promote_frequent, promote_ids
from torchrec_mec.quantize.quantize_table import (
    QuantizeResult,
    QuantizeStats,
    popularity_weights,
    quantize_table,
    row_weights,
)

__all__ = [
    "MECConfig",
    "MECQuantizer",
    "QuantizeResult",
    "QuantizeStats",
    "assign_codes",
    "assign_tables",
    "load_quantized_table",
    "popularity_weights",
    "promote_frequent",
    "promote_ids",
    "quantize_table",
    "quantize_tables",
    "row_weights",
    "table_seed",
]
