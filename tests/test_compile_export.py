"""torch.compile(fullgraph=True) forward + backward and torch.export of the three CTR models with
a QuantizedEmbeddingBagCollection match eager (within 1e-5), and keep the lookup's named errors."""
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec.models import MODEL_NAMES, ModelConfig, build_model
from torchrec_mec.ops.fast_lookup import cpu_operator_available

from tests.qebc_testing import randomize_

pytestmark = pytest.mark.skipif(
    not cpu_operator_available(),
    reason="torchrec_mec._C is not built (pip install --no-build-isolation -e .)")

FEATURES = {"C1": 1000, "C2": 7, "C3": 300}
COMPRESSED = {"t_C1": (4, 16), "t_C3": (2, 300)}  # uint8 and uint16 codes; t_C2 stays full


def build(name: str):
    torch.manual_seed(0)
    config = ModelConfig(name=name, embedding_dim=8, dense_hidden_sizes=(16,),
                         over_hidden_sizes=(16,), dcn_num_layers=2, dcn_low_rank_dim=4,
                         deepfm_dimension=8)
    model = build_model(config, num_dense=3, sparse_names=list(FEATURES),
                        num_embeddings=FEATURES, compressed=COMPRESSED)
    randomize_(model.embedding_bag_collection, seed=1)
    return model


def batch(seed: int, batch_size: int = 6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURES) * batch_size,), generator=gen)
    lengths[::5] = 0  # empty bags
    values = torch.cat([torch.randint(0, rows, (int(n),), generator=gen) for rows, n in zip(
        FEATURES.values(), lengths.view(len(FEATURES), -1).sum(1))])
    kjt = KeyedJaggedTensor(keys=list(FEATURES), values=values, lengths=lengths)
    return torch.randn(batch_size, 3, generator=gen), kjt


def forward_backward(model, dense, kjt, call=None):
    """Logits of ``call`` (the model by default) and the gradients it leaves on the model."""
    model.zero_grad(set_to_none=True)
    logits = (model if call is None else call)(dense, kjt)
    logits.pow(2).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compiled_fullgraph_forward_and_backward_match_eager(name):
    model = build(name)
    dense, kjt = batch(seed=2)
    eager_out, eager_grads = forward_backward(model, dense, kjt)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = forward_backward(model, dense, kjt, compiled)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    assert eager_grads.keys() == grads.keys()
    for param, grad in eager_grads.items():
        torch.testing.assert_close(grads[param], grad, atol=1e-5, rtol=1e-5, msg=param)
    assert grads["arch.sparse_arch.embedding_bag_collection.embedding_bags.t_C1.codebooks"].abs().sum() > 0

    # The compiled graph keeps the operator's checks: same shapes, one id past its table.
    bad_values = kjt.values().clone()
    c2_start = int(kjt.lengths().view(3, -1)[0].sum())
    assert int(kjt.lengths().view(3, -1)[1].sum()) > 0
    bad_values[c2_start] = 7
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=bad_values, lengths=kjt.lengths())
    with pytest.raises(ValueError, match="feature 'C2': id 7 is out of range for table 't_C2' "
                                         "with 7 rows"):
        compiled(dense, bad)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_matches_eager(name):
    model = build(name)
    dense, kjt = batch(seed=3)
    program = torch.export.export(model, (dense, kjt))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "torchrec_mec.pooled_lookup_forward.default" in targets, targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(dense, kjt), model(dense, kjt),
                                   atol=1e-5, rtol=1e-5)
