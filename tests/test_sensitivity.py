"""Stage 1's table sensitivity (forward passes with a perturbed pooled embedding) against an
independent reference: the Gauss-Newton diagonal ``E[p (1 - p) ||d logit / d e_t||^2]`` from
autograd's per-sample gradients."""
import copy
import tempfile

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_mec.data import SyntheticConfig, prepare_dataset
from torchrec_mec.models import ModelConfig, build_model, table_name
from torchrec_mec.pipeline.parallel import DistContext
from torchrec_mec.pipeline.sensitivity import table_sensitivity

ONE = DistContext(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def dataset():
    return prepare_dataset(None, "synthetic", tempfile.mkdtemp(), progress=False,
                           synthetic=SyntheticConfig(num_rows=5000, table_sizes=(300, 40, 6),
                                                     num_dense=3))


def _model(name, ds, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name, embedding_dim=8, dense_hidden_sizes=(16,),
                                    over_hidden_sizes=(16,)), ds.schema.num_dense,
                        ds.schema.sparse_names, ds.num_embeddings)
    with torch.no_grad():  # rows of different scale per table, so the tables differ
        for i, t in enumerate(model.embedding_bag_collection.embedding_bags.values()):
            t.weight.normal_(0.0, 0.3 * (i + 1))
    return model


def _gauss_newton(model, ds, rows):
    """Per table, mean over the first ``rows`` training rows (the same shuffle) of
    p (1 - p) ||d logit / d pooled||^2, by autograd."""
    held = []

    def leaf(module, inputs, output):
        if isinstance(output, KeyedTensor):
            v = output.values().detach().requires_grad_()
            held.append((list(output.keys()), output.length_per_key(), v))
            return KeyedTensor(keys=output.keys(), length_per_key=output.length_per_key(),
                               values=v)
        v = output.detach().requires_grad_()
        held.append((list(module.sparse_feature_names), None, v))
        return v

    handle = model.arch.sparse_arch.register_forward_hook(leaf)
    model.eval()
    sums, count = {}, 0
    try:
        for _, batch in zip(range(-(-rows // 1024)), ds.batches("train", 1024, shuffle=True,
                                                                 seed=0)):
            held.clear()
            logits = model(batch.dense_features, batch.sparse_features)
            names, lengths, v = held[0]
            (grad,) = torch.autograd.grad(logits.sum(), v)  # sample s's logit reads row s only
            p = torch.sigmoid(logits.detach()).double()
            parts = (grad.split(lengths, dim=1) if lengths is not None
                     else grad.unbind(1))
            for name, g in zip(names, parts):
                t = table_name(name)
                sums[t] = sums.get(t, 0.0) + float((p * (1 - p) * g.double().pow(2).sum(1)).sum())
            count += logits.shape[0]
    finally:
        handle.remove()
    return {t: s / count for t, s in sums.items()}


@pytest.mark.parametrize("arch", ["dlrm", "dlrm_dcn", "deepfm"])
def test_sensitivity_matches_autograds_gauss_newton_diagonal(dataset, arch):
    model = _model(arch, dataset)
    got = table_sensitivity(model, dataset, ONE, rows=4096, batch_size=1024)
    want = _gauss_newton(model, dataset, 4096)
    assert sorted(got) == sorted(want) == ["t_C1", "t_C2", "t_C3"]
    for t in want:
        # One noise draw per sample: the estimate's relative error is about sqrt(2 / 4096).
        assert got[t] == pytest.approx(want[t], rel=0.1), t
    # The tables are told apart: their sensitivities differ by more than twice the tolerance.
    values = sorted(want.values())
    assert values[-1] > 1.25 * values[0]


def test_sensitivity_leaves_the_model_as_it_was(dataset):
    model = _model("dlrm", dataset)
    model.train()
    before = copy.deepcopy(model.state_dict())
    first = table_sensitivity(model, dataset, ONE, rows=1024, batch_size=512, seed=3)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.arch.sparse_arch._forward_hooks  # the hook is gone
    assert table_sensitivity(model, dataset, ONE, rows=1024, batch_size=512, seed=3) == first


def test_sensitivity_needs_a_sparse_arch(dataset):
    with pytest.raises(ValueError, match="sparse_arch"):
        table_sensitivity(torch.nn.Linear(2, 1), dataset, ONE)
