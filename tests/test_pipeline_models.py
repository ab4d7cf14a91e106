"""``build_model``: TorchRec's architectures, unchanged, around an EBC or a QEBC."""
import pytest
import torch
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection
from torchrec_mec.models import MODEL_NAMES, ModelConfig, build_model, embedding_tables

SPARSE = ["C1", "C2", "C3"]
ROWS = {"C1": 500, "C2": 40, "C3": 7}
CONFIG = dict(embedding_dim=8, dense_hidden_sizes=(16,), over_hidden_sizes=(12,),
              dcn_num_layers=2, dcn_low_rank_dim=4, deepfm_dimension=6)


def _batch(batch_size=5, num_dense=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, ROWS[f], (batch_size,), generator=g) for f in SPARSE])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=SPARSE, values=values,
                                              lengths=torch.ones(len(values), dtype=torch.int64))
    return torch.randn(batch_size, num_dense, generator=g), kjt


def _torchrec_reference(name, num_dense):
    """The architecture built directly with TorchRec's classes and the sizes build_model
    derives (embedding_dim appended to the dense arch, 1 to the over arch)."""
    ebc = EmbeddingBagCollection(embedding_tables(SPARSE, ROWS, 8))
    if name == "deepfm":
        return SimpleDeepFMNN(num_dense, ebc, hidden_layer_size=16, deep_fm_dimension=6)
    kwargs = dict(embedding_bag_collection=ebc, dense_in_features=num_dense,
                  dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[12, 1])
    if name == "dlrm":
        return DLRM(**kwargs)
    return DLRM_DCN(**kwargs, dcn_num_layers=2, dcn_low_rank_dim=4)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_outputs_as_torchrec_architecture(name):
    model = build_model(ModelConfig(name=name, **CONFIG), 4, SPARSE, ROWS)
    reference = _torchrec_reference(name, 4)
    reference.load_state_dict({k[len("arch."):]: v for k, v in model.state_dict().items()})
    dense, kjt = _batch()
    with torch.no_grad():
        logits, expected = model(dense, kjt), reference(dense, kjt).squeeze(-1)
    if name == "deepfm":  # TorchRec's DeepFM ends in a sigmoid; ours returns the logit
        logits = torch.sigmoid(logits)
    assert logits.shape == (5,)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compressed_variant_swaps_only_the_embedding_collection(name):
    cfg = ModelConfig(name=name, **CONFIG)
    model = build_model(cfg, 4, SPARSE, ROWS, compressed={"t_C1": (4, 16)})
    ebc = model.embedding_bag_collection
    assert isinstance(ebc, QuantizedEmbeddingBagCollection)
    report = ebc.memory_report()
    assert [report.tables[t].compressed for t in ("t_C1", "t_C2", "t_C3")] == [True, False, False]
    dense_keys = {k for k in build_model(cfg, 4, SPARSE, ROWS).state_dict()
                  if ".embedding_bag_collection." not in k}
    assert dense_keys <= set(model.state_dict())
    dense, kjt = _batch()
    loss = model(dense, kjt).sum()
    loss.backward()
    assert ebc.embedding_bags["t_C1"].codebooks.grad is not None


def test_data_without_dense_features_gets_a_constant_input():
    model = build_model(ModelConfig(**CONFIG), 0, SPARSE, ROWS)
    _, kjt = _batch()
    out = model(torch.empty(5, 0), kjt)
    assert out.shape == (5,) and torch.isfinite(out).all()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="model name must be one of"):
        ModelConfig(name="wide_and_deep")
    with pytest.raises(ValueError, match="no table size"):
        build_model(ModelConfig(**CONFIG), 4, SPARSE, {"C1": 5})
    with pytest.raises(ValueError, match="not tables of this model"):
        build_model(ModelConfig(**CONFIG), 4, SPARSE, ROWS, compressed={"t_C9": (2, 4)})
