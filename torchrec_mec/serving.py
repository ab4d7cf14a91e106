"""Packaging a trained CTR model for serving with AOTInductor.

:func:`package_for_serving` exports a model (``torch.export``) behind :class:`ServingModule`, whose
inputs are plain tensors (dense features, ids, lengths) instead of a ``KeyedJaggedTensor``, and
compiles it into one AOTInductor package (``.pt2``). Batch size and number of ids are dynamic.

The serving process needs torch and the compiled lookup operator, nothing else: the package
calls ``torchrec_mec::pooled_lookup_forward`` (with its checks of offsets, ids and codes), whose
library ``torchrec_mec/_C*.so`` loads with ``torch.ops.load_library`` without importing
torchrec_mec, torchrec or fbgemm. docs/serving.md shows the loading side.
"""
from pathlib import Path
from typing import List, Union

import torch
from torch import nn
from torch.export import Dim
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class ServingModule(nn.Module):
    """A CTR model called with plain tensors: ``forward(dense [B, num_dense], values [n],
    lengths [F * B]) -> logits [B]``, where ``lengths`` holds the bag lengths of feature
    ``keys[0]`` for every sample, then of ``keys[1]``, ... (a KJT's layout). Features carry no
    per-id weights.

    Args:
        model (nn.Module): takes ``(dense, KeyedJaggedTensor)`` (e.g. ``CTRModel``).
        keys (List[str]): the sparse feature names, in the order of ``lengths``.

    Example::

        >>> from torchrec_mec.models import ModelConfig, build_model
        >>> model = build_model(ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,),
        ...     over_hidden_sizes=(8,)), num_dense=2, sparse_names=["C1"],
        ...     num_embeddings={"C1": 10}, compressed={"t_C1": (2, 4)})
        >>> serving = ServingModule(model, ["C1"])
        >>> serving(torch.randn(2, 2), torch.tensor([1, 7, 3]), torch.tensor([1, 2])).shape
        torch.Size([2])
    """

    def __init__(self, model: nn.Module, keys: List[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = list(keys)

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        # Offsets given in aten ops: TorchRec would compute them with an FBGEMM op, which the
        # serving process would then have to load.
        offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        features = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths,
                                     offsets=offsets)
        return self.model(dense, features)


def package_for_serving(
    model: nn.Module,
    keys: List[str],
    dense: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    path: Union[str, Path],
) -> str:
    """Exports ``model`` (in eval mode, without gradients) and writes an AOTInductor package.

    Args:
        model (nn.Module): takes ``(dense, KeyedJaggedTensor)``; its embedding collection may be
            a ``QuantizedEmbeddingBagCollection``.
        keys (List[str]): the sparse feature names.
        dense, values, lengths (torch.Tensor): an example batch (see :class:`ServingModule`);
            its batch size must be at least 2 (export specialises sizes 0 and 1).
        path (str or Path): where to write the ``.pt2`` package (its name must end in .pt2).

    Returns:
        str: the package path, for ``torch._inductor.aoti_load_package``.

    Example (compiles C++: about a minute)::

        >>> from torchrec_mec.models import ModelConfig, build_model
        >>> model = build_model(ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,),
        ...     over_hidden_sizes=(8,)), num_dense=2, sparse_names=["C1"],
        ...     num_embeddings={"C1": 10}, compressed={"t_C1": (2, 4)})
        >>> package_for_serving(model, ["C1"], torch.randn(2, 2), torch.tensor([1, 7, 3]),
        ...     torch.tensor([1, 2]), "/tmp/ctr.pt2")  # doctest: +SKIP
        '/tmp/ctr.pt2'
    """
    if dense.shape[0] < 2:
        raise ValueError(f"the example batch must hold at least 2 samples, got {dense.shape[0]}")
    serving = ServingModule(model, keys).eval()
    batch, num_values = Dim("batch"), Dim("num_values")
    dynamic_shapes = {"dense": {0: batch}, "values": {0: num_values},
                      "lengths": {0: len(keys) * batch}}
    with torch.no_grad():
        program = torch.export.export(serving, (dense, values, lengths),
                                      dynamic_shapes=dynamic_shapes)
    return torch._inductor.aoti_compile_and_package(program, package_path=str(path))
