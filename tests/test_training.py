"""The training loop's early stopping and embedding L2 penalty, against hand-built validation
curves, reference runs that stop by construction, and hand-computed gradients."""
import itertools
import os
from typing import Iterator, List

import pytest
import torch

from torchrec_mec.data import EncodedDataset, SyntheticConfig, prepare_dataset
from torchrec_mec.models import ModelConfig, build_model
from torchrec_mec.pipeline import training
from torchrec_mec.pipeline.evaluate import Metrics
from torchrec_mec.pipeline.parallel import DistContext
from torchrec_mec.pipeline.settings import TrainSettings

CTX = DistContext(0, 1, torch.device("cpu"))
MODEL = ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,), over_hidden_sizes=(8,))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> EncodedDataset:
    out = str(tmp_path_factory.mktemp("train_data"))
    prepare_dataset(None, "synthetic", out, progress=False,
                    synthetic=SyntheticConfig(num_rows=600, table_sizes=(100, 20, 5),
                                              num_dense=2))
    return EncodedDataset(out)


def _model(dataset: EncodedDataset, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(MODEL, dataset.schema.num_dense, dataset.schema.sparse_names,
                       dataset.num_embeddings)


@pytest.fixture
def scripted_validation(monkeypatch) -> List[float]:
    """Replaces validation by a scripted curve of log losses (one per call, in order; 1.0 once
    it runs out), so that where training must stop is known by hand; the script returns the
    list of calls."""
    curve: Iterator[float] = iter([])
    steps: List[float] = []

    def fake(model, dataset, split, batch_size, ctx, **_):
        steps.append(len(steps))
        return Metrics(auc=0.5, logloss=next(curve, 1.0), num_samples=1, num_positives=1)

    def script(values: List[float]) -> List[float]:
        nonlocal curve
        curve = iter(values)
        return steps

    monkeypatch.setattr(training, "evaluate_model", fake)
    return script  # type: ignore[return-value]


def _train(dataset, tmp_path, name, **settings):
    s = TrainSettings(batch_size=100, **settings)
    return training.train_model(_model(dataset), dataset, s, ctx=CTX,
                                checkpoint_uri=os.path.join(str(tmp_path), name, "ck.mec"),
                                fingerprint="f", eval_batch_size=500, progress=False,
                                start_competes=False)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("patience, stop_epoch, best_epoch", [(1, 3, 2), (3, 6, 6)])
def test_early_stopping_stops_after_patience_validations_without_improvement(
        dataset, tmp_path, scripted_validation, patience, stop_epoch, best_epoch):
    # start, epochs 1..6: best at 2 until 5 beats it
    curve = [0.9, 0.7, 0.6, 0.65, 0.61, 0.5, 0.4]
    calls = scripted_validation(curve)
    result = _train(dataset, tmp_path, f"p{patience}", epochs=6, patience=patience)
    h = result.history
    assert [e["epoch"] for e in h.epochs] == list(range(stop_epoch + 1))
    assert len(calls) == stop_epoch + 1
    assert h.best_epoch == best_epoch
    assert len(h.step_loss) == stop_epoch * dataset.num_batches("train", 100)
    # The state kept is the one an uninterrupted run without validation ends with at that epoch.
    reference = _train(dataset, tmp_path, f"ref{patience}", epochs=best_epoch, keep_best=False)
    _assert_same_state(result.model.state_dict(), reference.model.state_dict())


def test_validation_within_epochs_stops_at_the_best_step(dataset, tmp_path,
                                                         scripted_validation):
    assert dataset.num_batches("train", 100) == 5
    # start, after 2 and 4 steps, end of epoch 1, after 2 steps of epoch 2: best after 4 steps
    scripted_validation([0.9, 0.7, 0.6, 0.62, 0.61])
    result = _train(dataset, tmp_path, "mid", epochs=3, patience=2, validate_every=2)
    h = result.history
    assert [e["epoch"] for e in h.epochs] == [0, 0.4, 0.8, 1, 1.4]
    assert [e["step"] for e in h.epochs] == [0, 2, 4, 5, 7]
    assert h.best_epoch == 0.8 and len(h.step_loss) == 7
    # The reference: a run without validation over the same first 4 batches only.
    reference = _train(_FirstBatches(dataset, 4), tmp_path, "mid_ref", epochs=1,
                       keep_best=False)
    assert h.step_loss[:4] == reference.history.step_loss
    _assert_same_state(result.model.state_dict(), reference.model.state_dict())


class _FirstBatches:
    """The data set with its training split cut to the first ``n`` batches of the shuffle."""

    def __init__(self, dataset: EncodedDataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def num_batches(self, split, *args, **kwargs):
        return self.n

    def batches(self, split, *args, **kwargs):
        return itertools.islice(self.dataset.batches(split, *args, **kwargs), self.n)


def test_resumed_run_stops_like_the_uninterrupted_one(dataset, tmp_path, scripted_validation):
    curve = [0.9, 0.7, 0.6, 0.65, 0.61, 0.5]
    scripted_validation(curve)
    whole = _train(dataset, tmp_path, "whole", epochs=6, patience=2)
    # Killed after epoch 3: the checkpoint holds epochs 0..3 validated; resuming replays the rest.
    scripted_validation(curve[:4])
    s = TrainSettings(batch_size=100, epochs=3, patience=2)
    uri = os.path.join(str(tmp_path), "killed", "ck.mec")
    training.train_model(_model(dataset), dataset, s, ctx=CTX, checkpoint_uri=uri,
                         fingerprint="f", eval_batch_size=500, progress=False,
                         start_competes=False)
    scripted_validation(curve[4:])
    resumed = training.train_model(_model(dataset), dataset, TrainSettings(
        batch_size=100, epochs=6, patience=2), ctx=CTX, checkpoint_uri=uri, fingerprint="f",
        eval_batch_size=500, progress=False, start_competes=False)
    assert resumed.history.to_dict() == whole.history.to_dict()
    _assert_same_state(resumed.model.state_dict(), whole.model.state_dict())


def test_embedding_penalty_is_the_squared_norm_of_the_looked_up_rows(dataset):
    model = _model(dataset)
    batch = next(iter(dataset.batches("train", 16, shuffle=False)))
    weight = 0.3
    penalty = training.EmbeddingPenalty(model, weight)
    model.train()
    model(batch.dense_features, batch.sparse_features)
    tables = model.embedding_bag_collection.embedding_bags
    ids = batch.sparse_features.to_dict()
    expected = sum(tables[f"t_{f}"].weight[ids[f].values()].double().pow(2).sum()
                   for f in dataset.schema.sparse_names)
    assert penalty.take().item() == pytest.approx(weight * expected.item(), rel=1e-6)
    assert penalty.take() is None  # taken once
    model.eval()
    model(batch.dense_features, batch.sparse_features)
    assert penalty.take() is None  # validation is not penalised
    penalty.remove()


class _NoStep:
    def zero_grad(self):
        pass

    def step(self):
        pass


def test_embedding_l2_adds_its_gradient_to_the_looked_up_rows_only(dataset):
    batch = next(iter(dataset.batches("train", 32, shuffle=False)))
    grads = []
    for weight in (0.0, 0.25):
        model = _model(dataset)
        model.train()
        penalty = training.EmbeddingPenalty(model, weight)
        loss = training._train_step(model, _NoStep(), batch, CTX, penalty)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        penalty.remove()
    assert loss > 0
    tables = _model(dataset).embedding_bag_collection.embedding_bags
    ids = batch.sparse_features.to_dict()
    for name, g0 in grads[0].items():
        if "embedding_bags" not in name:
            torch.testing.assert_close(grads[1][name], g0, msg=name)  # dense parts untouched
            continue
        table = name.split("embedding_bags.")[1].split(".")[0]
        rows = ids[table[len("t_"):]].values()
        # d/dW of weight / B * sum_b ||W[id_b]||^2 = 2 weight / B * count(id) * W[id]
        expected = torch.zeros_like(g0)
        expected.index_add_(0, rows, 2 * 0.25 / len(batch.labels) * tables[table].weight[rows]
                            .detach())
        torch.testing.assert_close(grads[1][name] - g0, expected, atol=1e-7, rtol=1e-5,
                                   msg=name)


def test_embedding_l2_without_a_sparse_arch_is_refused():
    with pytest.raises(ValueError, match="sparse_arch"):
        training.EmbeddingPenalty(torch.nn.Linear(2, 2), 0.1)
