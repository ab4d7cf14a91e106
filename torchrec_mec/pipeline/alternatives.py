"""The numerics of the alternatives ``mec compare`` sets against MEC at equal memory.

Pure functions, no process groups: how a smaller embedding dimension or fewer hashed rows fit
a byte budget, the hashing of ids, and TorchRec's row-wise int8 / int4 quantization of a table
(FBGEMM's ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``, the op
``torchrec.quant.embedding_modules.quantize_state_dict`` uses). Bytes count as
``QuantizedEmbeddingBagCollection.memory_report()`` does for full tables: float32, ``rows x dim
x 4``.
"""
import math
from typing import Dict, Mapping, Union

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch

FLOAT_BYTES = 4
ROWWISE_BITS = (8, 4)
"""Bit widths of TorchRec's row-wise quantization compared (``DataType.INT8``, ``INT4``)."""
SCALE_BIAS_BYTES = 4
"""Each row-wise quantized row carries a float16 scale and a float16 bias."""
ROW_ALIGNMENT = 16
"""TorchRec's inference lookup (``IntNBitTableBatchedEmbeddingBagsCodegen``) pads every row to
this many bytes in memory (``torchrec.quant.embedding_modules.DEFAULT_ROW_ALIGNMENT``)."""


class UnreachableError(ValueError):
    """A byte budget that an alternative cannot meet; says the smallest memory it reaches.

    Example::

        >>> try:
        ...     small_dim({"C1": 1000}, budget_bytes=100)
        ... except UnreachableError as e:
        ...     print(e)
        a smaller dimension cannot fit 100 B: D' = 1 takes 4000 B (1000 rows x 1 x 4 B)
    """


def small_dim(num_rows: Mapping[str, int], budget_bytes: float) -> int:
    """The largest embedding dimension D' whose float32 tables fit ``budget_bytes``: every
    table keeps its rows and all share D' (DLRM's interaction needs one D for all tables).

    Raises:
        UnreachableError: not even D' = 1 fits.

    Example::

        >>> small_dim({"C1": 1000, "C2": 24}, budget_bytes=1024 * 16 * 4 / 10)
        1
        >>> small_dim({"C1": 1000, "C2": 24}, budget_bytes=1024 * 64 * 4 / 10)
        6
    """
    rows = sum(num_rows.values())
    dim = int(budget_bytes // (rows * FLOAT_BYTES))
    if dim < 1:
        raise UnreachableError(f"a smaller dimension cannot fit {budget_bytes:.0f} B: D' = 1 "
                               f"takes {rows * FLOAT_BYTES} B ({rows} rows x 1 x 4 B)")
    return dim


def hashed_rows(num_rows: Mapping[str, int], dim: int, budget_bytes: float,
                keep_rows: int) -> Dict[str, int]:
    """Rows per table for the hashing trick at dimension ``dim`` within ``budget_bytes``.

    Tables of at most ``keep_rows`` rows stay whole; every larger table keeps ``keep_rows``
    rows plus the same share ``s`` of its rows beyond them (``keep_rows + floor(s x (rows -
    keep_rows))``), ``s`` as large as the budget allows: larger tables get more rows, in
    proportion to their size. When even ``keep_rows`` rows per table do not fit, every table
    gets the same cap (the largest that fits; small tables under it stay whole).

    Raises:
        UnreachableError: the budget holds fewer rows than there are tables (one row each).

    Example::

        >>> hashed_rows({"C1": 10_000, "C2": 1_000, "C3": 10}, dim=1, budget_bytes=4 * 2_000,
        ...             keep_rows=100)
        {'C1': 1740, 'C2': 249, 'C3': 10}
        >>> hashed_rows({"C1": 10_000, "C2": 1_000, "C3": 10}, dim=1, budget_bytes=4 * 100,
        ...             keep_rows=100)
        {'C1': 45, 'C2': 45, 'C3': 10}
    """
    budget_rows = int(budget_bytes // (dim * FLOAT_BYTES))
    if budget_rows < len(num_rows):
        raise UnreachableError(
            f"hashing cannot fit {budget_bytes:.0f} B: one row of {dim} floats per table "
            f"takes {len(num_rows) * dim * FLOAT_BYTES} B ({len(num_rows)} tables)")
    if sum(num_rows.values()) <= budget_rows:
        return dict(num_rows)
    floor = min(keep_rows, _cap(num_rows, budget_rows))
    base = {f: min(n, floor) for f, n in num_rows.items()}
    extra = sum(n - base[f] for f, n in num_rows.items())
    share = (budget_rows - sum(base.values())) / extra if extra else 0.0
    return {f: base[f] + math.floor(share * (n - base[f])) for f, n in num_rows.items()}


def _cap(num_rows: Mapping[str, int], budget_rows: int) -> int:
    """The largest ``c`` with ``sum(min(rows, c)) <= budget_rows`` (at least 1)."""
    low, high = 1, max(num_rows.values())
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(n, mid) for n in num_rows.values()) <= budget_rows:
            low = mid
        else:
            high = mid - 1
    return low


def hash_ids(ids: torch.Tensor, num_rows: Union[int, torch.Tensor]) -> torch.Tensor:
    """The hashing trick's row of each id: ``id mod num_rows`` (``num_rows`` one for all, or
    one per id). Ids are numbered by first appearance, so the modulus spreads them evenly.

    Example::

        >>> hash_ids(torch.tensor([0, 5, 7, 12]), 5).tolist()
        [0, 0, 2, 2]
    """
    return torch.remainder(ids, num_rows)


def rowwise_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """TorchRec's row-wise quantization of a float table: per row, ``bits``-bit integers
    ``round((w - min) / scale)`` with ``scale = (max - min) / (2^bits - 1)``, then the float16
    scale and bias (the row's min), fused in one uint8 row of ``dim x bits / 8 + 4`` bytes.

    Example::

        >>> q = rowwise_quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 8)
        >>> q.shape, q[0, :4].tolist()
        (torch.Size([1, 8]), [0, 85, 170, 255])
    """
    if bits not in ROWWISE_BITS:
        raise ValueError(f"row-wise quantization supports {ROWWISE_BITS} bits, got {bits}")
    return torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
        weight.detach().float().contiguous(), bits)


def rowwise_dequantize(fused: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 table a :func:`rowwise_quantize` result stands for (``q x scale + bias``).

    Example::

        >>> w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        >>> rowwise_dequantize(rowwise_quantize(w, 8), 8).round(decimals=3).tolist()
        [[0.0, 1.0, 2.0, 3.0]]
    """
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloatOrHalf(fused, bits, 0)


def rowwise_bytes(num_rows: int, dim: int, bits: int, alignment: int = 1) -> int:
    """Bytes of a row-wise quantized table: ``dim x bits / 8`` bytes of integers and the scale
    and bias per row, each row rounded up to ``alignment`` bytes (``ROW_ALIGNMENT``: as
    TorchRec's inference lookup lays it out in memory).

    Example::

        >>> rowwise_bytes(1000, 64, 8), rowwise_bytes(1000, 64, 4)
        (68000, 36000)
        >>> rowwise_bytes(1000, 64, 4, alignment=ROW_ALIGNMENT)
        48000
    """
    row = math.ceil(dim * bits / 8) + SCALE_BIAS_BYTES
    return num_rows * math.ceil(row / alignment) * alignment
