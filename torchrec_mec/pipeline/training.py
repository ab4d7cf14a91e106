"""The training loop shared by stage 1 (pre-training) and stage 3 (fine-tuning on codes).

One loop, any world size: under torchrun the model is wrapped in ``DistributedModelParallel``
(``parallel.shard_model``) and each rank reads its slice of every global batch. The loss a rank
back-propagates is its *sum* of per-sample cross-entropies times ``world_size / global_batch``:
DDP averages dense gradients over ranks and TorchRec divides sharded-table gradients by the world
size (``comm_ops.GRADIENT_DIVISION``), so every parameter receives the gradient of the mean loss
over the global batch, exactly as one process with the whole batch, uneven last batches included.

A checkpoint is a state directory (``state_dirs``: torch.distributed.checkpoint, checksummed,
renamed into place when complete) of the model and optimizer state, each rank writing the shards
it holds, with the position (epoch, step) and the history in its manifest. Optimizer state is
keyed by parameter name and state (``optimizer_entries``: FBGEMM's fused ``momentum1`` is
Adagrad's ``sum``), so a checkpoint resumes under any number of processes, one included. A rerun
with the same fingerprint resumes from the last one and ends in the state an uninterrupted run
reaches. With ``keep_best`` the best epoch's model state is another state directory
(``<checkpoint>.best``), loaded back at the end: no rank ever holds a whole copy of the model.
"""
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from torchrec_mec.artifacts import ArtifactError
from torchrec_mec.data import CTRDataset
from torchrec_mec.models import CTRModel, hook_sparse_arch
from torchrec_mec.pipeline.evaluate import evaluate_model
from torchrec_mec.pipeline.optimizers import ROWWISE_ADAGRAD, RowWiseAdagrad
from torchrec_mec.pipeline.parallel import (
    EMBEDDING_ADAGRAD_EPS,
    DistContext,
    barrier,
    load_full_state,
    materialize,
    run_on_main,
    shard_model,
)
from torchrec_mec.pipeline.settings import TrainSettings
from torchrec_mec.pipeline.state_dirs import load_state, read_manifest, remove_state, save_state

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "mec_train_checkpoint"
BEST_KIND = "mec_best_model_state"
Restore = Callable[[nn.Module, DistContext], None]
"""Fills a (possibly sharded) model's state in place: the stage's starting point."""


@dataclass
class TrainHistory:
    """What training measured, for the report's curves.

    Args:
        step_loss (List[float]): mean training loss over each global batch, step by step.
        epochs (List[Dict[str, Any]]): per validation: ``epoch`` (epochs done: 0 is the
            starting state, 1 the end of the first epoch, 0.25 a quarter into it with
            ``validate_every``), ``step`` (steps done), ``train_loss`` (mean over the epoch's
            steps so far; None for epoch 0), ``val_auc``, ``val_logloss``.
        best_epoch (Optional[float]): the ``epoch`` of the validation whose state was kept
            (``keep_best``); None when the last state is returned.
        batch_size (Optional[int]): the global batch size trained with (``batch_size: 0``
            chooses it from the training rows).

    Example::

        >>> h = TrainHistory(step_loss=[0.7, 0.6], best_epoch=1)
        >>> h.to_dict()["best_epoch"]
        1
    """

    step_loss: List[float] = field(default_factory=list)
    epochs: List[Dict[str, Any]] = field(default_factory=list)
    best_epoch: Optional[float] = None
    batch_size: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the stage, the step and the
    learning rates.

    Example::

        >>> issubclass(TrainingDivergedError, ArithmeticError)
        True
    """


@dataclass
class TrainResult:
    """Output of :func:`train_model`.

    Args:
        model (nn.Module): the trained model as it trained (a ``DistributedModelParallel``
            under torchrun, each rank holding its shards): the best epoch's state with
            ``keep_best``, else the last. Save it with ``outputs.save_model``.
        history (TrainHistory): losses and validation metrics.

    Example::

        >>> TrainResult(model=nn.Linear(1, 1), history=TrainHistory()).history.step_loss
        []
    """

    model: nn.Module
    history: TrainHistory


def build_optimizer(module: nn.Module, settings: TrainSettings) -> Tuple[KeyedOptimizer,
                                                                          List[KeyedOptimizer]]:
    """Adam for dense parameters, Adagrad for embedding tables and codebooks (row-wise with
    ``settings.embedding_optimizer="rowwise_adagrad"``).

    Parameters of sharded tables are updated inside the backward pass by FBGEMM (the fused
    optimizer ``DistributedModelParallel`` exposes); the rest get ordinary optimizers.

    Returns:
        (optimizer, own): the combined optimizer to step, and the non-fused parts (whose lazily
        created state ``init_state`` must materialise before a checkpoint loads into it).
    """
    named = dict(in_backward_optimizer_filter(module.named_parameters()))
    named = {k: p for k, p in named.items() if p.requires_grad}
    embedding = {k: p for k, p in named.items() if "sparse_arch." in k}
    dense = {k: p for k, p in named.items() if k not in embedding}
    own: List[KeyedOptimizer] = []
    if dense:
        own.append(KeyedOptimizerWrapper(
            dense, lambda ps: torch.optim.Adam(ps, lr=settings.dense_lr)))
    if embedding and settings.embedding_optimizer == ROWWISE_ADAGRAD:
        own.append(KeyedOptimizerWrapper(
            embedding, lambda ps: RowWiseAdagrad(ps, lr=settings.embedding_lr,
                                                 eps=EMBEDDING_ADAGRAD_EPS)))
    elif embedding:
        own.append(KeyedOptimizerWrapper(
            embedding, lambda ps: torch.optim.Adagrad(ps, lr=settings.embedding_lr,
                                                      eps=EMBEDDING_ADAGRAD_EPS)))
    parts: List[KeyedOptimizer] = list(own)
    fused = getattr(module, "fused_optimizer", None)
    if fused is not None:
        parts.append(fused)
    return CombinedOptimizer(parts), own


def train_model(
    model: CTRModel,
    dataset: CTRDataset,
    settings: TrainSettings,
    *,
    ctx: DistContext,
    checkpoint_uri: str,
    fingerprint: str,
    eval_batch_size: int,
    restore: Optional[Restore] = None,
    desc: str = "train",
    progress: bool = True,
    start_competes: bool = True,
    split: str = "train",
    validate: bool = True,
    teacher: Optional[nn.Module] = None,
    distill_weight: float = 0.0,
) -> TrainResult:
    """Trains ``model`` on the training split (or ``split``), validating after each epoch
    (and every ``settings.validation_interval(steps_per_epoch)`` steps within one).

    With ``settings.keep_best`` the starting state is validated too, the state with the lowest
    validation log loss is returned, and training stops early once ``settings.patience``
    validations in a row have not lowered it (on small data a second epoch, or fine-tuning at
    all, can overfit). ``settings.embedding_l2`` adds an L2 penalty on the looked-up embeddings
    (:class:`EmbeddingPenalty`). A NaN or infinite training loss stops training with
    :class:`TrainingDivergedError`.

    Args:
        model (CTRModel): the unsharded model (the same on every rank): with its initial state,
            or with tables on ``meta`` that ``restore`` fills after sharding.
        dataset (CTRDataset): the prepared data set.
        settings (TrainSettings): epochs, global batch size, learning rates, seed, checkpointing.
        ctx (DistContext): rank and world size (``parallel.init_distributed``).
        checkpoint_uri (str): the checkpoint's state directory; resumed from if it exists with
            the same ``fingerprint`` (whatever world size wrote it), rewritten at every epoch end
            (and every ``settings.checkpoint_every`` steps).
        fingerprint (str): identifies the inputs and settings; a checkpoint with another one is
            stale and ignored.
        eval_batch_size (int): global batch size of the per-epoch validation.
        restore (Optional[Restore]): loads the starting state into the model once it is sharded
            (``model`` itself in one process, its ``meta`` tensors materialised first); ``None``
            when ``model`` holds it (then copied into the shards).
        desc (str): progress bar label; the stage's name in messages.
        progress (bool): show a tqdm bar (on rank 0).
        start_competes (bool): whether ``keep_best`` may keep the starting state (epoch 0).
            False for a model trained from its random initialisation: that state is validated
            for the curves but is no result to keep.
        split (str): the split to train on (``mec update`` trains on the traffic since
            compression).
        validate (bool): validate on ``val`` after each epoch (False when training on it).
        teacher (Optional[nn.Module]): a model (unsharded, the same inputs) whose predicted
            probabilities are mixed into the targets with ``distill_weight``
            (:func:`distillation_targets`); stage 3's teacher is the pre-trained model.
        distill_weight (float): the teacher's share of the targets, in [0, 1].

    Returns:
        TrainResult: the trained (possibly sharded) model and the history.

    Raises:
        ArtifactError: the checkpoint is corrupted (names the file and the way out).
        ValueError: the batch size does not divide by the world size.
        TrainingDivergedError: the loss became NaN or infinite (names step and learning rates).
    """
    batch_size = settings.global_batch_size(dataset.num_rows(split), ctx.world_size)
    if batch_size % ctx.world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the world size "
                         f"{ctx.world_size}")
    local_batch = batch_size // ctx.world_size
    runner: nn.Module = model
    if ctx.distributed:
        initial = None if restore is not None else model.state_dict()
        runner = shard_model(model, ctx, settings.embedding_lr, settings.embedding_optimizer)
        if initial is not None:
            state = runner.state_dict()
            load_full_state(state, initial, "the initial model")
            runner.load_state_dict(state)  # parts of a state dict may be copies, not views
            del initial
    else:
        materialize(model, ctx.device)
        _sparse_table_gradients(model)
    if restore is not None:
        restore(runner, ctx)
    runner.to(ctx.device)
    if teacher is not None:
        teacher.to(ctx.device).eval()
    optimizer, own = build_optimizer(runner, settings)

    history = TrainHistory(batch_size=batch_size)
    best = best_state_uri(checkpoint_uri)
    epoch, skip = 0, 0
    resumed = _resume(checkpoint_uri, fingerprint, ctx, runner, optimizer, own)
    if resumed is not None:
        epoch, skip, history = resumed
        logger.info("%s: resuming from %s (epoch %d, step %d)", desc, checkpoint_uri,
                    epoch + 1, skip)
    validate = validate and dataset.num_rows("val") > 0
    keep_best = settings.keep_best and validate
    if keep_best and not history.epochs:
        _validate(runner, dataset, eval_batch_size, ctx, history, 0, None, desc,
                  start_competes, best, fingerprint)
    steps_per_epoch = dataset.num_batches(split, local_batch, world_size=ctx.world_size)
    every = settings.validation_interval(steps_per_epoch) if validate else 0
    patience = settings.patience if keep_best else 0
    stopped = _patience_spent(history, patience)
    penalty = EmbeddingPenalty(runner, settings.embedding_l2)
    bar = tqdm(total=settings.epochs * steps_per_epoch, initial=epoch * steps_per_epoch + skip,
               desc=desc, unit="step", disable=not (progress and ctx.is_main), dynamic_ncols=True)
    while epoch < settings.epochs and not stopped:
        runner.train()
        batches = dataset.batches(split, local_batch, shuffle=True, seed=settings.seed + epoch,
                                  rank=ctx.rank, world_size=ctx.world_size)
        done = skip
        for step, batch in enumerate(batches):
            if step < skip:
                continue
            loss = _train_step(runner, optimizer, batch, ctx, penalty, teacher, distill_weight)
            if not math.isfinite(loss):
                raise TrainingDivergedError(
                    f"{desc}: the training loss is {loss} at step {len(history.step_loss) + 1} "
                    f"(epoch {epoch + 1}, batch {step + 1}) with dense_lr={settings.dense_lr:g} "
                    f"and embedding_lr={settings.embedding_lr:g}: training diverged; lower the "
                    f"learning rates ({desc}.dense_lr, {desc}.embedding_lr)")
            history.step_loss.append(loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}")
            done = step + 1
            if done >= steps_per_epoch:
                break
            if every and done % every == 0:
                _validate(runner, dataset, eval_batch_size, ctx, history,
                          round(epoch + done / steps_per_epoch, 4),
                          _mean(history.step_loss[-done:]), desc, keep_best, best, fingerprint)
                runner.train()
                stopped = _patience_spent(history, patience)
            if stopped or (settings.checkpoint_every and done % settings.checkpoint_every == 0):
                _save(checkpoint_uri, fingerprint, ctx, runner, optimizer, epoch, done, history)
            if stopped:
                break
        if stopped:
            break
        skip = 0
        epoch += 1
        if validate:
            _validate(runner, dataset, eval_batch_size, ctx, history, epoch,
                      _mean(history.step_loss[-done:]), desc, keep_best, best, fingerprint)
            stopped = _patience_spent(history, patience)
            if ctx.is_main:
                e = history.epochs[-1]
                logger.info("%s: epoch %d/%d train loss %.4f, val AUC %s, val logloss %.4f",
                            desc, epoch, settings.epochs, e["train_loss"],
                            "undefined" if e["val_auc"] is None else f"{e['val_auc']:.4f}",
                            e["val_logloss"])
        _save(checkpoint_uri, fingerprint, ctx, runner, optimizer, epoch, 0, history)
    bar.close()
    penalty.remove()
    if keep_best:
        if ctx.is_main:
            logger.info("%s: keeping epoch %s (lowest validation log loss)%s", desc,
                        history.best_epoch, " after early stopping" if stopped else "")
        if history.best_epoch != history.epochs[-1]["epoch"]:
            state = runner.state_dict()
            meta = load_state(best, state, ctx, BEST_KIND)
            if meta != {"fingerprint": fingerprint, "epoch": history.best_epoch}:
                raise ArtifactError(f"state {best}: holds epoch {meta.get('epoch')} of other "
                                    f"work, not epoch {history.best_epoch}; rerun {desc} with "
                                    "--force")
            runner.load_state_dict(state)
    return TrainResult(model=runner, history=history)


def _mean(values: List[float]) -> float:
    return sum(values) / len(values)


def _patience_spent(history: TrainHistory, patience: int) -> bool:
    """Whether the last ``patience`` validations all came after the best one (early stopping;
    never with ``patience`` 0). Derived from the history alone, so a resumed run decides alike.

    >>> h = TrainHistory(epochs=[{"epoch": e} for e in (0, 1, 2, 3)], best_epoch=1)
    >>> _patience_spent(h, 2), _patience_spent(h, 3)
    (True, False)
    """
    if not patience or history.best_epoch is None:
        return False
    marks = [e["epoch"] for e in history.epochs]
    return len(marks) - 1 - marks.index(history.best_epoch) >= patience


def _validate(runner: nn.Module, dataset: CTRDataset, batch_size: int, ctx: DistContext,
              history: TrainHistory, epoch: float, train_loss: Optional[float], desc: str,
              keep_best: bool, best: str, fingerprint: str) -> None:
    """Scores the validation split and records it. With ``keep_best``, saves the model's state
    to the state directory ``best`` if this mark (an epoch, or a fraction of one for validations
    within an epoch) has the lowest validation log loss so far; all ranks decide alike, since the
    metrics are synchronised."""
    val = evaluate_model(runner, dataset, "val", batch_size, ctx, progress=False,
                         desc=f"{desc} validation")
    previous = {e["epoch"]: e["val_logloss"] for e in history.epochs}
    history.epochs.append({"epoch": epoch, "step": len(history.step_loss),
                           "train_loss": train_loss, "val_auc": val.auc,
                           "val_logloss": val.logloss})
    if keep_best and (history.best_epoch is None or val.logloss < previous[history.best_epoch]):
        history.best_epoch = epoch
        save_state(best, runner.state_dict(), ctx, BEST_KIND,
                   {"fingerprint": fingerprint, "epoch": epoch})


def _sparse_table_gradients(model: nn.Module) -> None:
    """Makes the tables of TorchRec EmbeddingBagCollections produce sparse gradients.

    In one process the tables train with ``torch.optim.Adagrad``; with dense gradients every step
    would allocate, zero and update every row of every table (a GiB per step for the 4M-row
    synthetic set), with sparse ones only the rows the batch touched, which is what FBGEMM's
    fused kernel does under DMP. The update is the same: Adagrad leaves rows without gradient
    unchanged either way.
    """
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for bag in module.embedding_bags.values():
                bag.sparse = True


class EmbeddingPenalty:
    """An L2 penalty on the embedding rows a training batch looks up, ``weight`` times the
    squared norm of each sample's pooled embeddings (every feature's), summed over the batch
    (the training loop divides it by the global batch like the loss).

    It reads the output of the model's ``sparse_arch`` (a forward hook), so it works the same
    whether the tables are plain ``EmbeddingBagCollection``s, sharded ones with FBGEMM's fused
    optimizer (the gradient reaches the rows through the lookup's backward), or the codebooks
    and full tables of a ``QuantizedEmbeddingBagCollection``. With one id per feature per sample
    (Criteo, Avazu, the synthetic data) the pooled embedding is the looked-up row, so this is
    the L2 on looked-up rows of CTR libraries. No hook with ``weight`` 0; nothing in eval mode.

    Example::

        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from torchrec_mec.models import ModelConfig, build_model
        >>> m = build_model(ModelConfig(embedding_dim=2, dense_hidden_sizes=(4,),
        ...                             over_hidden_sizes=(4,)), 1, ["C1"], {"C1": 3})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(keys=["C1"], values=torch.tensor([2]),
        ...                                           lengths=torch.tensor([1]))
        >>> penalty = EmbeddingPenalty(m, weight=0.5)
        >>> _ = m(torch.zeros(1, 1), kjt)
        >>> row = m.embedding_bag_collection.embedding_bags["t_C1"].weight[2]
        >>> torch.allclose(penalty.take(), 0.5 * row.pow(2).sum())
        True
        >>> penalty.remove()
    """

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.weight = weight
        self._terms: List[torch.Tensor] = []
        self._handles = hook_sparse_arch(model, self._hook, "embedding_l2") if weight else []

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if module.training:
            values = output if isinstance(output, torch.Tensor) else output.values()
            self._terms.append(values.pow(2).sum())

    def take(self) -> Optional[torch.Tensor]:
        """The penalty of the forward passes since the last call (None if none or weight 0)."""
        terms, self._terms = self._terms, []
        return self.weight * torch.stack(terms).sum() if terms else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def distillation_targets(labels: torch.Tensor, teacher_logits: torch.Tensor,
                         weight: float) -> torch.Tensor:
    """The targets ``(1 - weight) * labels + weight * sigmoid(teacher_logits)``. The binary
    cross-entropy is linear in its target, so training on them minimises
    ``(1 - weight) * BCE(labels) + weight * BCE(teacher's probabilities)``: knowledge
    distillation from the teacher's soft labels.

    Example::

        >>> distillation_targets(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), 0.25)
        tensor([0.8750, 0.1250])
    """
    return torch.lerp(labels, torch.sigmoid(teacher_logits.to(labels.dtype)), weight)


def _train_step(runner: nn.Module, optimizer: KeyedOptimizer, batch: Any, ctx: DistContext,
                penalty: EmbeddingPenalty, teacher: Optional[nn.Module] = None,
                distill_weight: float = 0.0) -> float:
    """One optimizer step on this rank's slice of a global batch; returns the global mean loss
    (the cross-entropy, against the distillation targets when there is a teacher; the
    embedding penalty is added to what is back-propagated only)."""
    batch = batch.to(ctx.device)
    logits = runner(batch.dense_features, batch.sparse_features)
    targets = batch.labels
    if teacher is not None and distill_weight > 0:
        with torch.no_grad():
            targets = distillation_targets(
                targets, teacher(batch.dense_features, batch.sparse_features), distill_weight)
    per_sample = nn.functional.binary_cross_entropy_with_logits(logits, targets,
                                                                reduction="none")
    total = torch.stack([per_sample.sum().detach(),
                         torch.tensor(float(per_sample.numel()), device=ctx.device)])
    if ctx.distributed:
        dist.all_reduce(total)
    loss_sum, global_batch = float(total[0]), float(total[1])
    objective = per_sample.sum()
    l2 = penalty.take()
    if l2 is not None:
        objective = objective + l2
    loss = objective * (ctx.world_size / global_batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss_sum / global_batch


def best_state_uri(checkpoint_uri: str) -> str:
    """The state directory of the best epoch's model for the checkpoint ``checkpoint_uri``.

    >>> best_state_uri("runs/x/pretrain/checkpoint")
    'runs/x/pretrain/checkpoint.best'
    """
    return f"{checkpoint_uri.rstrip('/')}.best"


def optimizer_entries(state: Mapping[str, Any]) -> Dict[str, Any]:
    """An optimizer's ``state_dict()["state"]`` flattened to ``optim.<parameter>.<state>``, the
    same names whatever the sharding: FBGEMM's fused ``<table>.momentum1`` is Adagrad's ``sum``,
    and Adagrad's step count (which its update does not use) is left out. The values are the
    state dict's own tensors, so loading into them fills the state dict.

    >>> e = optimizer_entries({"w": {"t.momentum1": torch.zeros(2)},
    ...                        "v": {"sum": torch.zeros(2), "step": torch.tensor(3.0)},
    ...                        "b": {"exp_avg": torch.zeros(1), "step": torch.tensor(3.0)}})
    >>> sorted(e)
    ['optim.b.exp_avg', 'optim.b.step', 'optim.v.sum', 'optim.w.sum']
    """
    out: Dict[str, Any] = {}
    for param, entries in state.items():
        names = {k: "sum" if k.rsplit(".", 1)[-1] == "momentum1" else k.rsplit(".", 1)[-1]
                 for k in entries}
        adagrad = "sum" in names.values()
        for key, name in names.items():
            if not (adagrad and name == "step"):
                out[f"optim.{param}.{name}"] = entries[key]
    return out


def remove_checkpoint(uri: str) -> None:
    """Removes the checkpoint ``uri`` and the best epoch's state that belongs to it."""
    remove_state(uri)
    remove_state(best_state_uri(uri))


def drop_checkpoint(uri: str, ctx: DistContext) -> None:
    """Removes the checkpoint ``uri`` on rank 0, between barriers, so that no rank resumes from it
    (``--force``)."""
    barrier(ctx)
    if ctx.is_main:
        remove_checkpoint(uri)
    barrier(ctx)


def _training_state(runner: nn.Module, optimizer: KeyedOptimizer
                    ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(entries to save or load, the model's state dict, the optimizer's) of one checkpoint."""
    model_state = runner.state_dict()
    optimizer_state = optimizer.state_dict()
    entries = {f"model.{k}": v for k, v in model_state.items()}
    entries.update(optimizer_entries(optimizer_state["state"]))
    return entries, model_state, optimizer_state


def _save(uri: str, fingerprint: str, ctx: DistContext, runner: nn.Module,
          optimizer: KeyedOptimizer, epoch: int, step: int, history: TrainHistory) -> None:
    """Writes the checkpoint: every rank its shards of the model and optimizer state, the
    position and history in the manifest; the previous checkpoint stays until the new one is
    complete."""
    entries, _, _ = _training_state(runner, optimizer)
    meta = {"fingerprint": fingerprint, "world_size": ctx.world_size, "epoch": epoch,
            "step": step, "global_step": len(history.step_loss), "history": history.to_dict()}
    save_state(uri, entries, ctx, CHECKPOINT_KIND, meta)


def _resume(uri: str, fingerprint: str, ctx: DistContext, runner: nn.Module,
            optimizer: KeyedOptimizer, own: List[KeyedOptimizer]
            ) -> Optional[Tuple[int, int, TrainHistory]]:
    """Loads the checkpoint at ``uri`` into ``runner`` and ``optimizer`` if it matches (any world
    size may have written it); returns the position and the history."""
    def manifest() -> Optional[Dict[str, Any]]:
        if not os.path.isdir(uri):
            return None
        try:
            return read_manifest(uri, CHECKPOINT_KIND)["meta"]
        except ArtifactError as e:
            raise ArtifactError(f"{e}. It is a training checkpoint: delete it to start the "
                                "stage over, or rerun the stage with --force") from None

    meta = run_on_main(manifest, ctx)
    if meta is None:
        return None
    if meta["fingerprint"] != fingerprint:
        if ctx.is_main:
            logger.warning("%s was written for other inputs or settings; starting over", uri)
        return None
    for part in own:
        part.init_state()  # Adam's state is lazy: make it so the checkpoint can fill it
    entries, model_state, optimizer_state = _training_state(runner, optimizer)
    try:
        load_state(uri, entries, ctx, CHECKPOINT_KIND)
    except ArtifactError as e:
        raise ArtifactError(f"{e}. It is a training checkpoint: delete it to start the stage "
                            "over, or rerun the stage with --force") from None
    runner.load_state_dict(model_state)  # parts of a state dict may be copies, not views
    optimizer.load_state_dict(optimizer_state)
    return meta["epoch"], meta["step"], TrainHistory(**meta["history"])
