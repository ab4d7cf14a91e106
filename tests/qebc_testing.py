"""Shared set-up for tests of QuantizedEmbeddingBagCollection (not a reference: see pooling_reference)."""
import torch

from torchrec_mec import QuantizedEmbeddingBagCollection
from torchrec_mec.modules import ProductQuantizedTable


def randomize_(qebc: QuantizedEmbeddingBagCollection, seed: int) -> QuantizedEmbeddingBagCollection:
    """Random codes, codebooks (and fallback rows) and full-table weights, in table order, from one
    seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in qebc.embedding_bags.values():
            if isinstance(module, ProductQuantizedTable):
                codes = torch.randint(0, module.codebook_size, tuple(module.codes.shape), generator=gen)
                module.codes.copy_(codes.to(module.codes.dtype))
                module.codebooks.copy_(torch.randn(module.codebooks.shape, generator=gen))
                if module.fallback is not None:
                    module.fallback.copy_(torch.randn(module.fallback.shape, generator=gen))
            else:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
    return qebc
