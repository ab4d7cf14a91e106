"""Processes, devices and DistributedModelParallel for the pipeline's stages.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) the stages share one process
group: gloo on CPU, NCCL when CUDA is available. Model state is saved and loaded shard by shard
through torch.distributed.checkpoint (``state_dirs``), never gathered whole; ``load_full_state``
copies full tensors a rank already holds (a small model built whole) into its shards.
"""
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_mec.pipeline.optimizers import ROWWISE_ADAGRAD

T = TypeVar("T")
EMBEDDING_ADAGRAD_EPS = 1e-8
"""Adagrad's eps for embeddings, the same in FBGEMM's fused kernel and ``torch.optim.Adagrad``."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and the device it computes on.

    Example::

        >>> ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
        >>> ctx.is_main, ctx.distributed
        (True, False)
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistContext:
    """The process group of this job, initialised once from torchrun's environment.

    Without ``WORLD_SIZE`` (or with 1) this is a single process and no group is made. The device
    is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), device)
    return DistContext(0, 1, device)


def barrier(ctx: DistContext) -> None:
    """Waits for every rank (no-op in one process)."""
    if ctx.distributed:
        dist.barrier()


def run_on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """Calls ``fn`` on rank 0 and gives every rank its result (a collective: every rank calls).

    An exception on rank 0 is raised on every rank (as a ``RuntimeError`` naming its type where
    it cannot cross the process boundary), so the ranks never disagree on whether to go on.

    Example::

        >>> run_on_main(lambda: 42, DistContext(rank=0, world_size=1, device=torch.device("cpu")))
        42
    """
    result: Optional[T] = None
    error: Optional[BaseException] = None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (handed to every rank, then raised)
            if not ctx.distributed:
                raise
            error = e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}")
    if ctx.distributed:
        box: List[Any] = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return cast(T, result)


def shard_model(model: nn.Module, ctx: DistContext, embedding_lr: Optional[float],
                embedding_optimizer: str = "adagrad") -> nn.Module:
    """Wraps ``model`` in ``DistributedModelParallel`` with this package's sharders.

    The one place that chooses sharders: TorchRec's ``EmbeddingBagCollectionSharder`` and, for
    the compressed collection, ``QuantizedEmbeddingBagCollectionSharder``, both with Adagrad
    fused into the backward pass (FBGEMM's ``EXACT_ADAGRAD``; ``torch.optim.Adagrad`` for
    codebooks), the same update as the unsharded path's ``torch.optim.Adagrad``; with
    ``embedding_optimizer="rowwise_adagrad"``, FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, the unsharded
    path's ``optimizers.RowWiseAdagrad``. ``embedding_lr`` None: no training (evaluation). DMP re-initialises
    sharded tables, so the caller loads the model's state afterwards (``load_full_state``,
    ``state_dirs.load_state``). Tables
    with a fallback for new ids are planned table-wise or data-parallel (``new_id_constraints``).
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from torchrec_mec.modules import QuantizedEmbeddingBagCollection

    fused: Dict[str, Any] = (
        {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0} if embedding_lr is None
        else {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD
              if embedding_optimizer == ROWWISE_ADAGRAD else EmbOptimType.EXACT_ADAGRAD,
              "learning_rate": embedding_lr, "eps": EMBEDDING_ADAGRAD_EPS})
    sharders: List[Any] = [EmbeddingBagCollectionSharder(fused_params=fused)]
    if any(isinstance(m, QuantizedEmbeddingBagCollection) for m in model.modules()):
        try:
            from torchrec_mec.distributed import (
                QuantizedEmbeddingBagCollectionSharder,
                new_id_constraints,
            )
        except ImportError as e:
            raise RuntimeError(
                "training a compressed model on several processes needs "
                "torchrec_mec.distributed.QuantizedEmbeddingBagCollectionSharder, which this "
                f"installation lacks ({e}); run the stage in one process"
            ) from e
        sharders.insert(0, QuantizedEmbeddingBagCollectionSharder(fused_params=fused))
        constraints = {k: v for m in model.modules()
                       if isinstance(m, QuantizedEmbeddingBagCollection)
                       for k, v in new_id_constraints(m).items()}
        if constraints:  # tables with a fallback for new ids: table-wise or data-parallel
            from torchrec.distributed.comm import get_local_size
            from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

            planner = EmbeddingShardingPlanner(
                topology=Topology(local_world_size=get_local_size(ctx.world_size), world_size=ctx.world_size,
                                  compute_device=ctx.device.type),
                constraints=constraints)
            plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
            return DistributedModelParallel(model, device=ctx.device, sharders=sharders, plan=plan)
    return DistributedModelParallel(model, device=ctx.device, sharders=sharders)


def load_full_state(state: Mapping[str, Any], full: Mapping[str, torch.Tensor],
                    source: str) -> None:
    """Copies full tensors into a (possibly sharded) state dict in place, key by key.

    Most state dict tensors alias the parameters, buffers and optimizer states they come from,
    but not all (a sharded QEBC copies the parts of a table that a rank holds as several column
    shards): pass the filled ``state`` to the module's or optimizer's ``load_state_dict``. Every
    key of ``state`` must be in ``full`` with the same shape.

    Raises:
        KeyError: a key of ``state`` missing from ``full`` (the message names ``source``).
        ValueError: a shape mismatch, naming key and ``source``.
    """
    for key, value in _flatten(state).items():
        if key not in full:
            raise KeyError(f"{source}: has no entry {key!r}")
        src = full[key]
        size = _size(value)
        if tuple(src.shape) != size:
            raise ValueError(f"{source}: entry {key!r} has shape {tuple(src.shape)}, "
                             f"expected {size}")
        with torch.no_grad():
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    shard.tensor.copy_(src[_slices(shard)])
            else:
                value.copy_(src)


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocates, uninitialised, every tensor of ``module`` still on ``meta`` (on ``device``),
    module by module; the rest is left as it is. The caller fills them (a stage's ``restore``).

    Example::

        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
        >>> materialize(m, torch.device("cpu"))
        >>> m[1].weight.device.type, m[0].weight.device.type
        ('cpu', 'cpu')
    """
    for sub in module.modules():
        own = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            sub.to_empty(device=device, recurse=False)


def _picklable(error: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:  # noqa: BLE001  (any failure means: send a plain copy)
        return False


def _size(value: Any) -> Tuple[int, ...]:
    if isinstance(value, ShardedTensor):
        with warnings.catch_warnings():  # "deprecating ShardedTensor": TorchRec 1.8 still uses it
            warnings.simplefilter("ignore", FutureWarning)
            return tuple(value.size())
    return tuple(value.shape)


def _slices(shard: Any) -> tuple:
    return tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets,
                                                 shard.tensor.shape))


def _flatten(state: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (torch.Tensor, ShardedTensor)):
            out[f"{prefix}{key}"] = value
    return out
