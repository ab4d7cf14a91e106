"""MECConfig: what stage 2 (the quantizer) does to one table."""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict

from torchrec_mec.modules.quantized_embedding_configs import MAX_CODEBOOK_SIZE

ENCODERS = ("mlp", "linear", "none")
WEIGHTINGS = ("traffic", "published", "uniform")
METHODS = ("mec", "kmeans_pq")
EARLY_STOPPING_METRICS = ("error", "loss")
UNSEEN_ROWS = ("zero", "nearest")


@dataclass(frozen=True)
class MECConfig:
    """Settings of the MEC product quantizer (stage 2).

    Every part of the method can be switched off on its own, so that its effect can be measured:
    ``encoder="none"``, ``weighting="uniform"``, ``reg_weight=0``,
    ``contrastive_weight=0``, ``reseed_dead=False``, ``kmeans_init=False``,
    ``early_stopping_patience=0``, ``epochs=0``. All of them off is plain k-means product
    quantization in the same codes and codebooks format: :meth:`kmeans_pq`.

    Args:
        num_subspaces (int): M, codes per row; the table's dim must be divisible by it.
        codebook_size (int): K, codewords per codebook, in [2, 65536]. Codes are stored in one
            byte for K <= 256, two bytes above.
        epochs (int): most training epochs; early stopping may end sooner. 0: the k-means
            initialisation is the result (no gradient training).
        samples_per_epoch (int): rows drawn (popularity-weighted, with replacement) per epoch.
            Training cost does not grow with the table; encoding all rows at the end does.
        batch_size (int): rows per optimizer step (the method's published 8,000 to 12,000).
        lr (float): Adam learning rate, in units of the table's standardised scale (the
            published 1e-4 was for unscaled rows and far more steps; see docs/quantizer.md).
        seed (int): seeds every random draw (one ``torch.Generator``).
        weighting (str): the weight of row i in the k-means initialisation, the training samples
            and the early-stopping loss, from its training count ``n_i``: ``"traffic"`` (``n_i``:
            each row counts as often as it is looked up, rows never seen in training count 0),
            ``"published"`` (MEC's ``max(1, floor(log2 n_i))``) or ``"uniform"`` (1). See
            docs/quantizer.md for the measured choice.
        encoder (str): ``"mlp"`` (residual one-hidden-layer MLP), ``"linear"`` (residual linear
            map) or ``"none"`` (z = e, plain PQ with trained codebooks). Both encoders start at
            the identity, so training starts from the k-means product quantizer.
        commitment_weight (float): beta of the commitment term ``||z - sg(q)||^2``. With no
            decoder, the straight-through reconstruction gradient on z is ``2 (q - e)`` and the
            commitment gradient ``2 beta (z - q)``: at beta = 1 they sum to ``2 (z - e)``, which
            holds the encoder at the identity unless the usage or contrastive terms pay for a
            move; VQ-VAE's 0.25 lets the encoder drift and the held-out loss rise.
        reg_weight (float): weight of the code-usage regularizer (KL of each codebook's mean
            soft assignment from uniform). The reconstruction term is in units of the table's
            variance, so the published 1e-4 does not carry over; 0.1 was measured to raise
            perplexity at little reconstruction cost (docs/quantizer.md).
        usage_temperature (float): temperature of the soft assignments, in units of each
            subspace's mean squared quantization error after initialisation.
        usage_rows (int): rows of each (randomly drawn) batch the usage regularizer is
            estimated on; its [M, rows, K] soft assignments dominate a step's cost.
        contrastive_weight (float): weight of the InfoNCE term with semi-synthetic negatives.
        num_negatives (int): semi-synthetic negatives per row (one random code replaced each).
        contrastive_temperature (float): InfoNCE temperature on cosine similarities.
        reseed_dead (bool): after each epoch, move codewords that no sampled row used onto
            badly quantized sampled rows.
        kmeans_init (bool): initialise codebooks by k-means++ and Lloyd iterations on a
            popularity-weighted sample; off takes sampled sub-vectors as codewords.
        kmeans_iters (int): Lloyd iterations after k-means++ seeding.
        kmeans_points_per_centroid (int): k-means sample size is this times K (capped at N*4).
        early_stopping_patience (int): stop after this many epochs without improvement of the
            evaluation metric and keep the best state (the k-means initialisation included);
            0 trains all epochs.
        early_stopping_metric (str): what early stopping measures on the evaluation rows:
            ``"error"`` (their weighted squared reconstruction error through the codes, as the
            table is exported: the gradient training keeps a state only where it lowers the
            error the model will see) or ``"loss"`` (the training objective, with the encoder,
            usage and contrastive terms). docs/quantizer.md has the measured choice.
        unseen_rows (str): the codes of rows never seen in training (count 0), in a table that
            has seen rows too: ``"zero"`` (in every codebook the codeword of least traffic is
            moved to zero and they take it, so they decode to the zero row: what a full table
            keeps for them, its small random initialisation, is near zero; rows whose nearest
            codeword it is take it too) or ``"nearest"`` (their nearest codeword, as every other
            row's). docs/quantizer.md has the measured choice.
        eval_rows (int): size of the fixed, weighted draw of rows the early-stopping loss is
            measured on (0: no early stopping).

    Example::

        >>> cfg = MECConfig(num_subspaces=8, codebook_size=256, reg_weight=0.0)
        >>> cfg.codebook_size, cfg.weighting
        (256, 'traffic')
        >>> pq = cfg.kmeans_pq()  # the same M, K and k-means settings, MEC's terms off
        >>> pq.weighting, pq.epochs, pq.contrastive_weight
        ('uniform', 0, 0.0)
    """

    num_subspaces: int = 4
    codebook_size: int = 256
    epochs: int = 100
    samples_per_epoch: int = 262_144
    batch_size: int = 8192
    lr: float = 1e-2
    seed: int = 0
    weighting: str = "traffic"
    encoder: str = "mlp"
    commitment_weight: float = 1.0
    reg_weight: float = 0.1
    usage_temperature: float = 1.0
    usage_rows: int = 2048
    contrastive_weight: float = 2e-3
    num_negatives: int = 4
    contrastive_temperature: float = 0.1
    reseed_dead: bool = True
    kmeans_init: bool = True
    kmeans_iters: int = 20
    kmeans_points_per_centroid: int = 128
    early_stopping_patience: int = 5
    early_stopping_metric: str = "error"
    unseen_rows: str = "zero"
    eval_rows: int = 16_384

    def __post_init__(self) -> None:
        positive = ("num_subspaces", "samples_per_epoch", "batch_size", "num_negatives",
                    "usage_rows")
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"MECConfig.{field} must be >= 1, got {getattr(self, field)}")
        nonneg = ("epochs", "kmeans_iters", "early_stopping_patience", "eval_rows")
        for field in nonneg:
            if getattr(self, field) < 0:
                raise ValueError(f"MECConfig.{field} must be >= 0, got {getattr(self, field)}")
        weights = ("commitment_weight", "reg_weight", "contrastive_weight")
        for field in weights:
            if getattr(self, field) < 0:
                raise ValueError(f"MECConfig.{field} must be >= 0, got {getattr(self, field)}")
        positive_float = ("lr", "usage_temperature", "contrastive_temperature")
        for field in positive_float:
            if not getattr(self, field) > 0:
                raise ValueError(f"MECConfig.{field} must be > 0, got {getattr(self, field)}")
        if not 2 <= self.codebook_size <= MAX_CODEBOOK_SIZE:
            raise ValueError(
                f"MECConfig.codebook_size must be in [2, {MAX_CODEBOOK_SIZE}], "
                f"got {self.codebook_size}"
            )
        if self.encoder not in ENCODERS:
            raise ValueError(f"MECConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"MECConfig.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}"
            )
        if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
            raise ValueError(f"MECConfig.early_stopping_metric must be one of "
                             f"{EARLY_STOPPING_METRICS}, got {self.early_stopping_metric!r}")
        if self.unseen_rows not in UNSEEN_ROWS:
            raise ValueError(f"MECConfig.unseen_rows must be one of {UNSEEN_ROWS}, "
                             f"got {self.unseen_rows!r}")
        if self.kmeans_points_per_centroid < 1:
            raise ValueError("MECConfig.kmeans_points_per_centroid must be >= 1")
        if self.epochs == 0 and not self.kmeans_init:
            raise ValueError("MECConfig: epochs=0 keeps the initialisation, which then must be "
                             "k-means (kmeans_init=True)")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def kmeans_pq(self) -> "MECConfig":
        """Plain k-means product quantization with this config's M, K, seed and k-means
        settings: every row weighs 1, no encoder, no usage or contrastive term, no gradient
        training, every row encoded to its nearest codeword. The codes and codebooks have the
        same format as MEC's; this is the ``kmeans_pq`` method of comparisons
        (``for_method("kmeans_pq")``)."""
        return dataclasses.replace(
            self, weighting="uniform", encoder="none", reg_weight=0.0, contrastive_weight=0.0,
            reseed_dead=False, kmeans_init=True, epochs=0, early_stopping_patience=0,
            unseen_rows="nearest")

    def for_method(self, method: str) -> "MECConfig":
        """The config of a named quantization method: ``"mec"`` (this config) or
        ``"kmeans_pq"`` (:meth:`kmeans_pq`).

        Example::

            >>> MECConfig(num_subspaces=2).for_method("kmeans_pq").num_subspaces
            2
        """
        if method not in METHODS:
            raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
        return self if method == "mec" else self.kmeans_pq()
