"""A plain factorization machine, the reference stage 1's baseline must match.

One embedding (dimension ``dim``) and one linear weight per id, a linear term on the dense
features (the prepared data already holds them as ``log(1 + max(x, 0))``), pairwise
interactions of the embeddings, Adam, early stopping on validation log loss. It trains on the
prepared data set of a run directory (``DIR/data``, the same split the pipeline uses)::

    PYTHONPATH=. .venv/bin/python benchmarks/fm_reference.py runs/planted --seeds 0 1 2

prints val/test AUC and log loss per seed and their mean +- std. Other benchmarks call
:func:`train_fm` (or :func:`fm_over_seeds`) on an ``EncodedDataset``.
"""
import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC

from torchrec_mec.data import EncodedDataset
from torchrec_mec.pipeline.settings import TrainSettings


class FactorizationMachine(nn.Module):
    """``logit = b + w . dense + sum_f w_f[id_f] + sum_{f<g} <v_f[id_f], v_g[id_g]>``.

    All features' ids share one table (row offsets per feature); both tables give sparse
    gradients, so a step costs the rows the batch touched.

    Args:
        num_embeddings (Sequence[int]): rows per sparse feature.
        num_dense (int): dense features.
        dim (int): embedding dimension.

    Example::

        >>> fm = FactorizationMachine([5, 3], num_dense=2, dim=4)
        >>> fm(torch.zeros(7, 2), torch.zeros(7, 2, dtype=torch.long)).shape
        torch.Size([7])
    """

    def __init__(self, num_embeddings: Sequence[int], num_dense: int, dim: int) -> None:
        super().__init__()
        sizes = torch.tensor([0, *num_embeddings], dtype=torch.long)
        self.register_buffer("offsets", torch.cumsum(sizes, 0)[:-1], persistent=False)
        rows = int(sizes.sum())
        self.embedding = nn.Embedding(rows, dim, sparse=True)
        self.linear = nn.Embedding(rows, 1, sparse=True)
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.zeros_(self.linear.weight)
        self.dense = nn.Linear(max(num_dense, 1), 1)
        self.num_dense = num_dense

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = ids + self.offsets
        v = self.embedding(rows)  # [B, F, D]
        pairs = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        if self.num_dense == 0:
            dense = torch.ones(len(ids), 1)
        return self.dense(dense).squeeze(1) + self.linear(rows).sum((1, 2)) + pairs


@dataclass
class FMResult:
    """Scores of one trained FM: validation and test AUC and log loss, and where it stopped.

    Example::

        >>> FMResult(0.7, 0.5, 0.69, 0.51, 1.5, 2.0, 12.0).test_auc
        0.69
    """

    val_auc: float
    val_logloss: float
    test_auc: float
    test_logloss: float
    best_epoch: float
    epochs_run: float
    seconds: float


def _tensors(dataset: EncodedDataset, split: str) -> Dict[str, torch.Tensor]:
    a = dataset.arrays(split)
    return {"dense": torch.from_numpy(np.array(a["dense"], dtype=np.float32)),
            "ids": torch.from_numpy(np.array(a["sparse"], dtype=np.int64)),
            "labels": torch.from_numpy(np.array(a["labels"], dtype=np.float32))}


@torch.no_grad()
def _score(model: nn.Module, data: Dict[str, torch.Tensor]) -> Dict[str, float]:
    logits = torch.cat([model(data["dense"][i:i + 65536], data["ids"][i:i + 65536])
                        for i in range(0, len(data["labels"]), 65536)])
    auc = BinaryAUROC()
    auc.update(logits, data["labels"].long())
    loss = nn.functional.binary_cross_entropy_with_logits(logits, data["labels"])
    return {"auc": float(auc.compute()), "logloss": float(loss)}


def train_fm(dataset: EncodedDataset, *, seed: int = 0, dim: int = 16, batch_size: int = 0,
             lr: float = 3e-3, epochs: int = 10, patience: int = 2,
             validations_per_epoch: int = 4) -> FMResult:
    """Trains an FM on ``dataset``'s training split with Adam (``SparseAdam`` for the tables),
    validating ``validations_per_epoch`` times an epoch and stopping after ``patience``
    validations without a lower validation log loss; scores the best state. ``batch_size`` 0
    takes stage 1's rule (``TrainSettings.global_batch_size``: ~500 steps an epoch). The
    defaults were the best of lr 1e-3, 3e-3 and 1e-2 on a 600k-row planted file.

    Example::

        >>> import tempfile
        >>> from torchrec_mec.data import SyntheticConfig, prepare_dataset
        >>> ds = prepare_dataset(None, "synthetic", tempfile.mkdtemp() + "/d", progress=False,
        ...                      synthetic=SyntheticConfig(num_rows=2000, table_sizes=(50, 5)))
        >>> r = train_fm(ds, epochs=1)
        >>> 0 < r.test_auc < 1
        True
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    names = dataset.schema.sparse_names
    model = FactorizationMachine([dataset.num_embeddings[f] for f in names],
                                 dataset.schema.num_dense, dim)
    sparse = [model.embedding.weight, model.linear.weight]
    optimizers = [torch.optim.SparseAdam(sparse, lr=lr),
                  torch.optim.Adam(model.dense.parameters(), lr=lr)]
    train, val = _tensors(dataset, "train"), _tensors(dataset, "val")
    n = len(train["labels"])
    batch_size = TrainSettings(batch_size=batch_size).global_batch_size(n)
    steps = (n + batch_size - 1) // batch_size
    marks = {round(steps * k / validations_per_epoch) for k in range(1, validations_per_epoch + 1)}
    best = {"logloss": float("inf")}
    best_state, best_epoch, bad, epoch_done = None, 0.0, 0, 0.0
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for step in range(steps):
            rows = order[step * batch_size:(step + 1) * batch_size]
            logits = model(train["dense"][rows], train["ids"][rows])
            loss = nn.functional.binary_cross_entropy_with_logits(logits, train["labels"][rows])
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            if step + 1 in marks:
                epoch_done = epoch + (step + 1) / steps
                scores = _score(model, val)
                if scores["logloss"] < best["logloss"]:
                    best, best_epoch, bad = scores, epoch_done, 0
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                if bad >= patience:
                    break
        if bad >= patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    test = _score(model, _tensors(dataset, "test"))
    return FMResult(best["auc"], best["logloss"], test["auc"], test["logloss"], best_epoch,
                    epoch_done, time.perf_counter() - start)


def mean_std(values: Sequence[float]) -> str:
    """``"mean +- std"`` (sample std; 0 for one value).

    >>> mean_std([0.7, 0.72, 0.74])
    '0.7200 +- 0.0200'
    """
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} +- {std:.4f}"


def fm_over_seeds(dataset: EncodedDataset, seeds: Sequence[int], **kwargs: float
                  ) -> List[FMResult]:
    """:func:`train_fm` once per seed (same split; the seed sets initialisation and shuffle)."""
    return [train_fm(dataset, seed=s, **kwargs) for s in seeds]  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory (its data/ is read) or a prepared data "
                        "set directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=0, help="0: stage 1's rule")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=2)
    args = parser.parse_args()
    data_dir = os.path.join(args.run_dir, "data")
    dataset = EncodedDataset(data_dir if os.path.isdir(data_dir) else args.run_dir)
    results = fm_over_seeds(dataset, args.seeds, dim=args.dim, batch_size=args.batch_size,
                            lr=args.lr, epochs=args.epochs, patience=args.patience)
    for seed, r in zip(args.seeds, results):
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in asdict(r).items()))
    for key in ("val_auc", "val_logloss", "test_auc", "test_logloss"):
        print(f"FM {key}: {mean_std([getattr(r, key) for r in results])}")
    if dataset.is_synthetic:
        print(f"planted ceiling (true probabilities) test AUC: {dataset.bayes_auc('test'):.4f}")


if __name__ == "__main__":
    main()
