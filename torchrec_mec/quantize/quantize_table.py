"""quantize_table: one embedding table and its id counts in, packed codes and codebooks out."""
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from iopath.common.file_io import g_pathmgr
from tqdm import tqdm

from torchrec_mec.artifacts import load_artifact, save_artifact
from torchrec_mec.modules.quantized_embedding_configs import code_dtype
from torchrec_mec.quantize.config import MECConfig
from torchrec_mec.quantize.kmeans import (
    nearest_codewords,
    search_chunk_rows,
    weighted_rows,
    weighted_sample,
)
from torchrec_mec.quantize.losses import (
    commitment_loss,
    contrastive_loss,
    reconstruction_loss,
    mean_soft_assignment,
    semi_synthetic_negatives,
    usage_kl,
    usage_regularizer,
)
from torchrec_mec.quantize.model import MECQuantizer, QuantizerOutput

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "mec_quantizer_checkpoint"
POPULAR_FRACTION = 0.01  # stats: "popular" ids are the top 1% by count
RARE_FRACTION = 0.5  # stats: "rare" ids are the bottom 50% by count
_MIN_IMPROVEMENT = 1e-3  # relative held-out improvement that resets early-stopping patience
_EVAL_SEED_OFFSET = 0x5EED  # held-out negatives: one fixed draw, so epochs compare fairly


@dataclass
class QuantizeStats:
    """What :func:`quantize_table` measured. Errors are per-element MSE in embedding space.

    Args:
        num_rows (int): N.
        dim (int): D.
        num_subspaces (int): M.
        codebook_size (int): K.
        mse (float): mean over all rows of ``||e_i - q_i||^2 / D``.
        weighted_mse (float): the same, weighted by ``config.weighting`` (the training
            objective).
        traffic_mse (float): the same, weighted by the id counts: the error per lookup, what
            the model sees on traffic like the training data's (rows never seen weigh 0).
        mse_popular (float): over the top 1% of ids by count.
        mse_rare (float): over the bottom 50% of ids by count.
        relative_mse (float): ``mse`` divided by the table's per-element variance (1.0 is no
            better than predicting the mean row).
        perplexity (List[float]): per codebook, exp of the entropy of code usage over all rows
            (K is uniform use, 1 is a single codeword).
        dead_codewords (List[int]): per codebook, codewords no row uses.
        epochs_run (int): training epochs done (the rest were cut by early stopping).
        best_epoch (int): the epoch whose state was kept (0: the k-means initialisation).
        eval_loss (List[float]): the early-stopping metric (``config.early_stopping_metric``)
            after initialisation and after each epoch.
        resumed_from_epoch (int): epoch of the checkpoint this run resumed from (0: none).
        seconds (float): wall time of training and encoding, summed over resumed runs.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> cfg = MECConfig(num_subspaces=2, codebook_size=4, epochs=1, samples_per_epoch=256,
        ...                 batch_size=128)
        >>> stats = quantize_table(torch.randn(400, 4, generator=g), torch.ones(400), cfg,
        ...                        progress=False).stats
        >>> len(stats.perplexity), stats.relative_mse < 1.0, "mse_popular" in stats.to_dict()
        (2, True, True)
    """

    num_rows: int
    dim: int
    num_subspaces: int
    codebook_size: int
    mse: float
    weighted_mse: float
    traffic_mse: float
    mse_popular: float
    mse_rare: float
    relative_mse: float
    perplexity: List[float]
    dead_codewords: List[int]
    epochs_run: int
    best_epoch: int
    eval_loss: List[float]
    resumed_from_epoch: int
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class QuantizeResult(NamedTuple):
    """Output of :func:`quantize_table`; loads as one table's state of a
    ``QuantizedEmbeddingBagCollection``.

    Args:
        codes (Tensor): [N, M] in ``code_dtype(K)`` (uint8 for K <= 256, else uint16).
        codebooks (Tensor): [M, K, D / M] float32; row i is ``concat_m codebooks[m, codes[i, m]]``.
        stats (QuantizeStats): errors, code usage, epochs, time.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> cfg = MECConfig(num_subspaces=2, codebook_size=4, epochs=1, samples_per_epoch=256,
        ...                 batch_size=128)
        >>> codes, codebooks, stats = quantize_table(torch.randn(400, 4, generator=g),
        ...                                          torch.ones(400), cfg, progress=False)
        >>> rows = codebooks[torch.arange(2), codes.long()].flatten(1)  # the decoded table
        >>> tuple(rows.shape)
        (400, 4)
    """

    codes: torch.Tensor
    codebooks: torch.Tensor
    stats: QuantizeStats


def popularity_weights(counts: torch.Tensor) -> torch.Tensor:
    """MEC's published row weights: ``max(1, floor(log2 count))``, float32 [N].

    Example::

        >>> popularity_weights(torch.tensor([0, 1, 2, 3, 4, 1000])).tolist()
        [1.0, 1.0, 1.0, 1.0, 2.0, 9.0]
    """
    return torch.log2(counts.double().clamp_min(1)).floor().clamp_min(1).float()


def row_weights(counts: torch.Tensor, weighting: str) -> torch.Tensor:
    """Stage 2's weight of every row, float32 [N], for a ``MECConfig.weighting``:
    ``"traffic"`` the count itself (rows never seen in training weigh 0), ``"published"``
    :func:`popularity_weights`, ``"uniform"`` 1.

    Example::

        >>> counts = torch.tensor([0, 1, 4, 1000])
        >>> row_weights(counts, "traffic").tolist(), row_weights(counts, "published").tolist()
        ([0.0, 1.0, 4.0, 1000.0], [1.0, 1.0, 2.0, 9.0])
    """
    if weighting == "traffic":
        return counts.float()
    if weighting == "published":
        return popularity_weights(counts)
    if weighting == "uniform":
        return torch.ones(counts.shape[0])
    raise ValueError(f"unknown weighting {weighting!r}")


def quantize_table(
    weight: torch.Tensor,
    counts: torch.Tensor,
    config: MECConfig,
    *,
    name: str = "table",
    checkpoint_uri: Optional[str] = None,
    progress: bool = True,
) -> QuantizeResult:
    """Product-quantizes one trained embedding table with MEC.

    Steps: weighted k-means (k-means++ and Lloyd) on the rows, weighted by
    ``config.weighting``, initialises the codebooks; each epoch trains the encoder
    (straight-through estimator, commitment term) and the codebooks on ``samples_per_epoch``
    rows drawn by weight, with the code-usage regularizer and the contrastive term; dead
    codewords are re-seeded; the loss on a fixed weighted draw of rows decides early stopping
    and which epoch's state is kept; finally every row is encoded chunk by chunk. With
    ``epochs=0`` the k-means initialisation is the result.

    Args:
        weight (Tensor): [N, D] float table (the pretrained embeddings).
        counts (Tensor): [N] occurrence count of each id in the training data (>= 0).
        config (MECConfig): M, K, loss weights, schedule and seed.
        name (str): table name, used in errors, logs and progress bars.
        checkpoint_uri (Optional[str]): iopath URI of a per-epoch checkpoint. If it exists and
            matches this table and config, training resumes from it; it is rewritten after every
            epoch. The caller removes it when done (the driver does).
        progress (bool): show tqdm progress bars.

    Returns:
        QuantizeResult: packed codes [N, M], codebooks [M, K, D/M] in embedding space, stats.

    Raises:
        ValueError: bad input; the message names the table.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> table, counts = torch.randn(2000, 16, generator=g), torch.randint(0, 100, (2000,))
        >>> cfg = MECConfig(num_subspaces=4, codebook_size=16, epochs=2, samples_per_epoch=1024,
        ...                 batch_size=512)
        >>> res = quantize_table(table, counts, cfg, name="demo", progress=False)
        >>> res.codes.dtype, tuple(res.codes.shape), tuple(res.codebooks.shape)
        (torch.uint8, (2000, 4), (4, 16, 4))
    """
    _validate(weight, counts, config, name)
    started = time.perf_counter()
    n, dim = weight.shape
    weight = weight.detach()
    generator = torch.Generator().manual_seed(config.seed)
    pop = row_weights(counts, config.weighting)
    if not float(pop.sum()) > 0:
        logger.warning("table %r: no row was seen in training; weighing every row 1", name)
        pop = torch.ones(n)
    evaluating = config.epochs > 0 and config.early_stopping_patience > 0 and config.eval_rows > 0
    eval_rows, eval_weights = _eval_sample(pop, config.eval_rows if evaluating else 0, generator)
    model = MECQuantizer(
        dim, config.num_subspaces, config.codebook_size, config.encoder, generator=generator
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    evaluate = _eval_error if config.early_stopping_metric == "error" else _eval_loss
    fingerprint = table_fingerprint(weight, counts, config)

    state = _load_checkpoint(checkpoint_uri, fingerprint, model, optimizer, generator, name)
    resumed_from = state.epoch if state is not None else 0
    if state is None:
        rows, row_w = weighted_rows(
            pop, config.kmeans_points_per_centroid * config.codebook_size, generator)
        model.init_from_sample(weight[rows], config.kmeans_iters, generator, config.kmeans_init,
                               weights=row_w)
        del rows, row_w
        state = _TrainState(best_state=_copy_state(model), done=config.epochs == 0)
        if eval_rows.numel():
            state.history.append(evaluate(model, weight, eval_rows, eval_weights, config))
            state.best_loss = state.history[0]
    else:
        logger.info("table %r: resuming from the checkpoint of epoch %d", name, state.epoch)

    bar = tqdm(total=config.epochs, initial=state.epoch, desc=f"MEC {name}", unit="epoch",
               disable=not progress, leave=False)
    while not state.done:
        state.epoch += 1
        train_loss = _train_epoch(model, optimizer, weight, pop, config, generator)
        if eval_rows.numel():
            loss = evaluate(model, weight, eval_rows, eval_weights, config)
            state.history.append(loss)
            if loss < state.best_loss * (1 - _MIN_IMPROVEMENT):
                state.best_loss, state.best_epoch, state.bad_epochs = loss, state.epoch, 0
                state.best_state = _copy_state(model)
            else:
                state.bad_epochs += 1
            bar.set_postfix(train=f"{train_loss:.4f}", eval=f"{loss:.4f}")
        else:
            state.best_epoch, state.best_state = state.epoch, _copy_state(model)
            bar.set_postfix(train=f"{train_loss:.4f}")
        state.done = state.epoch >= config.epochs or (
            eval_rows.numel() > 0 and state.bad_epochs >= config.early_stopping_patience
        )
        state.seconds += time.perf_counter() - started
        started = time.perf_counter()
        if checkpoint_uri is not None:
            _save_checkpoint(checkpoint_uri, fingerprint, model, optimizer, generator, state, name)
        bar.update(1)
    bar.close()

    model.load_state_dict(state.best_state)
    unseen = counts == 0
    forced = None
    if config.unseen_rows == "zero" and bool(unseen.any()) and not bool(unseen.all()):
        forced = (unseen, _zero_codeword(model, weight, pop, ~unseen))
    codes, row_error = _encode_all(model, weight, config, name, progress, forced)
    stats = _statistics(weight, counts, pop, codes, row_error, config, state, resumed_from)
    stats.seconds = state.seconds + time.perf_counter() - started
    return QuantizeResult(codes=codes, codebooks=model.export_codebooks(), stats=stats)


def table_fingerprint(weight: torch.Tensor, counts: torch.Tensor, config: MECConfig) -> str:
    """A cheap digest of (config, shape, a strided sample of rows and counts): tells a matching
    checkpoint or finished artifact from a stale one."""
    n = weight.shape[0]
    idx = torch.linspace(0, n - 1, min(n, 4096)).long()
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(str(tuple(weight.shape)).encode())
    h.update(weight[idx].float().contiguous().numpy().tobytes())
    h.update(counts[idx].double().contiguous().numpy().tobytes())
    h.update(str(float(counts.double().sum())).encode())
    return h.hexdigest()


@dataclass
class _TrainState:
    best_state: Dict[str, torch.Tensor]
    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    done: bool = False
    history: List[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _validate(weight: torch.Tensor, counts: torch.Tensor, config: MECConfig, name: str) -> None:
    def fail(what: str) -> None:
        raise ValueError(f"table {name!r}: {what}")

    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = (f"{weight.dtype} {list(weight.shape)}" if isinstance(weight, torch.Tensor)
               else type(weight))
        fail(f"weight must be a 2-D float tensor [N, D], got {got}")
    n, dim = weight.shape
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.numel() != n:
        got = str(list(counts.shape)) if isinstance(counts, torch.Tensor) else str(type(counts))
        fail(f"counts must be a 1-D tensor of length N={n}, got {got}")
    if counts.is_complex() or counts.dtype == torch.bool:
        fail(f"counts must be integer or float, got {counts.dtype}")
    non_finite = counts.is_floating_point() and not bool(counts.isfinite().all())
    if non_finite or bool((counts < 0).any()):
        fail("counts must be finite and >= 0")
    if dim % config.num_subspaces:
        fail(f"dim {dim} is not divisible by num_subspaces {config.num_subspaces}")
    if config.codebook_size > n:
        fail(f"codebook_size {config.codebook_size} exceeds the number of rows {n}")
    for start in range(0, n, 1 << 20):  # chunked: no N x D boolean temporary
        if not bool(weight[start : start + (1 << 20)].isfinite().all()):
            fail("weight has NaN or infinite values")


def _eval_sample(
    weights: torch.Tensor, size: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The early-stopping rows: ``size`` draws by weight (with replacement), each distinct row
    weighted by how often it was drawn, so their weighted loss estimates the table's weighted
    objective. Drawn from all rows, training rows included: the quantizer is fitted to this
    fixed set of rows, there are no unseen rows to generalise to."""
    if size == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    drawn, times = torch.unique(weighted_sample(weights, size, generator), return_counts=True)
    return drawn, times.float()


def _mec_loss(
    model: MECQuantizer,
    x: torch.Tensor,
    config: MECConfig,
    generator: torch.Generator,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, QuantizerOutput]:
    """Loss of a batch of standardised rows without the usage term, and the quantizer's output.
    The usage term is a function of a set of rows (part of the training batch, the whole
    evaluation set), so the callers add it."""
    out = model(x)
    # Straight-through: value q; gradient to z (encoder) and to q (codebooks), which live in
    # x's space, so the reconstruction term trains them directly (no separate codebook term).
    q_st = out.q + (out.z - out.z.detach())
    loss = reconstruction_loss(x, q_st, weights)
    if model.encoder is not None and config.commitment_weight:
        loss = loss + config.commitment_weight * commitment_loss(out.z, out.q, weights)
    if config.contrastive_weight:
        neg = semi_synthetic_negatives(
            out.codes, config.codebook_size, config.num_negatives, generator
        )
        loss = loss + config.contrastive_weight * contrastive_loss(
            out.z, out.q, model.lookup(neg), config.contrastive_temperature, weights
        )
    return loss, out


def _train_epoch(
    model: MECQuantizer,
    optimizer: torch.optim.Optimizer,
    weight: torch.Tensor,
    train_weights: torch.Tensor,
    config: MECConfig,
    generator: torch.Generator,
) -> float:
    """One epoch over ``samples_per_epoch`` rows drawn by weight; returns the mean loss."""
    m, k = config.num_subspaces, config.codebook_size
    rows = weighted_sample(train_weights, config.samples_per_epoch, generator)
    usage = torch.zeros(m * k, dtype=torch.long)
    offsets = torch.arange(m) * k
    total, steps = 0.0, 0
    for start in range(0, rows.numel(), config.batch_size):
        x = model.standardize(weight[rows[start : start + config.batch_size]])
        loss, out = _mec_loss(model, x, config, generator)
        if config.reg_weight:
            tau = _temperature(model, config)
            logits = model.assignment_logits(out.z[: config.usage_rows], tau)
            loss = loss + config.reg_weight * usage_regularizer(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage += torch.bincount((out.codes + offsets).flatten(), minlength=m * k)
        total, steps = total + float(loss.detach()), steps + 1
    if config.reseed_dead:
        _reseed_dead(model, optimizer, usage.view(m, k), out.z.detach(), generator)
    return total / steps


def _temperature(model: MECQuantizer, config: MECConfig) -> torch.Tensor:
    return model.distortion * config.usage_temperature


@torch.no_grad()
def _reseed_dead(
    model: MECQuantizer,
    optimizer: torch.optim.Optimizer,
    usage: torch.Tensor,
    z: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """Moves codewords no row chose this epoch onto sub-vectors of the last batch, drawn in
    proportion to their quantization error, and clears their Adam moments."""
    m_all = model.num_subspaces
    zs = z.view(-1, m_all, model.sub_dim)
    codes = nearest_codewords(z, model.codebooks)
    err = (zs - model.codebooks[torch.arange(m_all), codes]).pow(2).sum(-1)  # [B, M]
    adam = optimizer.state.get(model.codebooks, {})
    for m in range(m_all):
        dead = (usage[m] == 0).nonzero().squeeze(1)
        if dead.numel() == 0:
            continue
        w = err[:, m]
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        replace = dead.numel() > int((w > 0).sum())
        pick = torch.multinomial(w, dead.numel(), replacement=replace, generator=generator)
        model.codebooks[m, dead] = zs[pick, m]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in adam:
                adam[key][m, dead] = 0


@torch.no_grad()
def _eval_error(
    model: MECQuantizer,
    weight: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    config: MECConfig,
) -> float:
    """Weighted mean squared error per element of the evaluation rows, encoded and decoded as
    the exported table would be (embedding space)."""
    total = 0.0
    for start in range(0, rows.numel(), config.batch_size):
        x = weight[rows[start : start + config.batch_size]]
        err = _row_error(model, x, model.compute_codes(x))
        total += float(err @ weights[start : start + config.batch_size])
    return total / float(weights.sum())


@torch.no_grad()
def _eval_loss(
    model: MECQuantizer,
    weight: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    config: MECConfig,
) -> float:
    """The training objective on the evaluation rows, weighted, with one fixed draw of
    negatives; the usage term is the KL of the whole evaluation set's mean soft assignment."""
    generator = torch.Generator().manual_seed(config.seed + _EVAL_SEED_OFFSET)
    weighted_loss = 0.0
    usage = torch.zeros(config.num_subspaces, config.codebook_size)
    for start in range(0, rows.numel(), config.batch_size):
        w = weights[start : start + config.batch_size]
        x = model.standardize(weight[rows[start : start + config.batch_size]])
        loss, out = _mec_loss(model, x, config, generator, w)
        if config.reg_weight:
            logits = model.assignment_logits(out.z, _temperature(model, config))
            usage += mean_soft_assignment(logits, w) * w.sum()
        weighted_loss += float(loss) * float(w.sum())
    total = weighted_loss / float(weights.sum())
    if config.reg_weight:
        total += config.reg_weight * float(usage_kl(usage / weights.sum()))
    return total


@torch.no_grad()
def _zero_codeword(
    model: MECQuantizer, weight: torch.Tensor, pop: torch.Tensor, seen: torch.Tensor
) -> torch.Tensor:
    """Moves, in every codebook, the codeword of least traffic (``pop`` summed over the
    ``seen`` rows whose nearest it is) to the point that decodes to zero; returns their
    indices [M]. Only the seen rows are encoded, a chunk at a time."""
    m_all = model.num_subspaces
    chunk = search_chunk_rows(m_all, model.codebook_size)
    traffic = torch.zeros(m_all, model.codebook_size, dtype=torch.float64)
    for rows in seen.nonzero().squeeze(1).split(chunk):
        codes = model.compute_codes(weight[rows], chunk_rows=chunk)
        traffic.scatter_add_(1, codes.t(), pop[rows].double().expand(m_all, -1))
    zero = traffic.argmin(1)  # per codebook, the first of the least used
    for m in range(m_all):
        sub = slice(m * model.sub_dim, (m + 1) * model.sub_dim)
        model.codebooks[m, zero[m]] = -model.mean[sub] / model.scale
    return zero


def _row_error(model: MECQuantizer, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[B] each row's squared error per element, decoded from ``codes`` [B, M]."""
    return (rows.float() - model.decode(codes)).pow(2).mean(1)


@torch.no_grad()
def _encode_all(
    model: MECQuantizer,
    weight: torch.Tensor,
    config: MECConfig,
    name: str,
    progress: bool,
    forced: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed codes [N, M] of every row and each row's squared error per element [N]. With
    ``forced`` = (rows [N] bool, codes [M]), the rows set take those codes, not their nearest."""
    n = weight.shape[0]
    chunk = search_chunk_rows(config.num_subspaces, config.codebook_size)
    codes = torch.empty(n, config.num_subspaces, dtype=code_dtype(config.codebook_size))
    row_error = torch.empty(n)
    with tqdm(total=n, desc=f"encode {name}", unit="row", unit_scale=True,
              disable=not progress, leave=False) as bar:
        for start in range(0, n, chunk):
            rows = weight[start : start + chunk]
            c = model.compute_codes(rows, chunk_rows=chunk)
            if forced is not None:
                c = torch.where(forced[0][start : start + chunk, None], forced[1], c)
            codes[start : start + chunk] = c.to(codes.dtype)
            row_error[start : start + chunk] = _row_error(model, rows, c)
            bar.update(rows.shape[0])
    return codes, row_error


def _statistics(
    weight: torch.Tensor,
    counts: torch.Tensor,
    pop: torch.Tensor,
    codes: torch.Tensor,
    row_error: torch.Tensor,
    config: MECConfig,
    state: _TrainState,
    resumed_from: int,
) -> QuantizeStats:
    n, dim = weight.shape
    order = torch.argsort(counts, stable=True)  # ascending count, ties by row index
    popular = order[n - max(1, math.ceil(POPULAR_FRACTION * n)) :]
    rare = order[: max(1, int(RARE_FRACTION * n))]
    perplexity, dead = [], []
    for m in range(config.num_subspaces):
        use = torch.bincount(codes[:, m].long(), minlength=config.codebook_size).double()
        p = use[use > 0] / n
        perplexity.append(float(torch.exp(-(p * p.log()).sum())))
        dead.append(int((use == 0).sum()))
    variance = float(weight.float().var(dim=0, unbiased=False).mean())
    mse = float(row_error.double().mean())
    return QuantizeStats(
        num_rows=n,
        dim=dim,
        num_subspaces=config.num_subspaces,
        codebook_size=config.codebook_size,
        mse=mse,
        weighted_mse=float((row_error.double() * pop).sum() / pop.double().sum()),
        traffic_mse=(float((row_error.double() * counts.double()).sum() / counts.double().sum())
                     if float(counts.double().sum()) > 0 else mse),
        mse_popular=float(row_error[popular].double().mean()),
        mse_rare=float(row_error[rare].double().mean()),
        relative_mse=mse / variance if variance > 0 else 0.0,
        perplexity=perplexity,
        dead_codewords=dead,
        epochs_run=state.epoch,
        best_epoch=state.best_epoch,
        eval_loss=list(state.history),
        resumed_from_epoch=resumed_from,
        seconds=0.0,
    )


def _copy_state(model: MECQuantizer) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(
    uri: str,
    fingerprint: str,
    model: MECQuantizer,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: _TrainState,
    name: str,
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in state.best_state.items()})
    for i, param_state in optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{i}.{k}": v for k, v in param_state.items()})
    tensors["generator"] = generator.get_state()
    meta = {
        "table": name,
        "fingerprint": fingerprint,
        **{k: v for k, v in dataclasses.asdict(state).items() if k != "best_state"},
    }
    save_artifact(uri, tensors, meta, CHECKPOINT_KIND)


def _load_checkpoint(
    uri: Optional[str],
    fingerprint: str,
    model: MECQuantizer,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    name: str,
) -> Optional[_TrainState]:
    """Restores model, optimizer and generator from ``uri``; None if there is no matching one.

    A corrupted checkpoint raises ``ArtifactError`` (never silently restarted over)."""
    if uri is None or not g_pathmgr.exists(uri):
        return None
    tensors, meta = load_artifact(uri, expect_kind=CHECKPOINT_KIND)
    if meta["fingerprint"] != fingerprint:
        logger.warning("table %r: checkpoint %s is for other data or config; starting over",
                       name, uri)
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optim_state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, field = key.split(".", 2)
            optim_state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict(
        {"state": optim_state, "param_groups": optimizer.state_dict()["param_groups"]}
    )
    generator.set_state(tensors["generator"])
    fields = {f.name for f in dataclasses.fields(_TrainState)} - {"best_state"}
    return _TrainState(
        best_state={k[5:]: v for k, v in tensors.items() if k.startswith("best.")},
        **{k: meta[k] for k in fields},
    )
