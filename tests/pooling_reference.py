"""An independent float64 reference for pooled (product-quantized or full) lookups.

Written with explicit loops over bags and ids, sharing no code with the library's lookup paths.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def decoded_table64(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Row i = concat_m codebooks[m, codes[i, m]], in float64 (keeps autograd to codebooks)."""
    m_count = codebooks.shape[0]
    rows = []
    for i in range(codes.shape[0]):
        rows.append(torch.cat([codebooks[m, int(codes[i, m])] for m in range(m_count)]))
    return torch.stack(rows)


def pooled_reference(
    tables: Dict[str, torch.Tensor],
    configs: Sequence[EmbeddingBagConfig],
    kjt: KeyedJaggedTensor,
    weighted: bool,
) -> torch.Tensor:
    """``tables`` maps table name to its (decoded) float64 [N, D] table; returns [B, sum D]."""
    jt = kjt.to_dict()
    blocks: List[torch.Tensor] = []
    for cfg in configs:
        table = tables[cfg.name]
        for f in cfg.feature_names:
            values, lengths = jt[f].values(), jt[f].lengths()
            weights: Optional[torch.Tensor] = jt[f].weights() if weighted else None
            out, pos = [], 0
            for n in lengths.tolist():
                acc = torch.zeros(cfg.embedding_dim, dtype=torch.float64)
                for j in range(pos, pos + n):
                    w = float(weights[j]) if weights is not None else 1.0
                    acc = acc + w * table[int(values[j])]
                if cfg.pooling == PoolingType.MEAN and n > 0:
                    acc = acc / n
                out.append(acc)
                pos += n
            blocks.append(torch.stack(out))
    return torch.cat(blocks, dim=1)
