"""Stage 3's distillation from the pre-trained model: the targets, and one training step."""
import copy

import pytest
import torch
from torch import nn

from tests.pipeline_testing import tiny_settings
from torchrec_mec.data import EncodedDataset
from torchrec_mec.models import build_model
from torchrec_mec.pipeline import FinetuneSettings, SettingsError, prepare
from torchrec_mec.pipeline.parallel import DistContext
from torchrec_mec.pipeline.training import (
    EmbeddingPenalty,
    build_optimizer,
    distillation_targets,
    _train_step,
)


def test_targets_give_the_weighted_sum_of_both_cross_entropies():
    """BCE against the mixed targets equals (1 - w) BCE(labels) + w BCE(teacher's
    probabilities), written out by hand in float64."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(64, generator=g, dtype=torch.float64) * 3
    labels = (torch.rand(64, generator=g) < 0.3).double()
    for w in (0.0, 0.3, 1.0):
        got = nn.functional.binary_cross_entropy_with_logits(
            logits, distillation_targets(labels, teacher, w))
        p, q = 1 / (1 + torch.exp(-logits)), 1 / (1 + torch.exp(-teacher))

        def bce(t):
            return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()

        torch.testing.assert_close(got, (1 - w) * bce(labels) + w * bce(q))


def test_weight_out_of_range_is_refused():
    with pytest.raises(SettingsError, match="distill_weight"):
        tiny_settings(finetune__distill_weight=1.5)
    assert FinetuneSettings(distill_weight=1.0).distill_weight == 1.0


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distill"))
    settings = tiny_settings()
    prepare(None, "synthetic", out, settings, progress=False)
    return EncodedDataset(out), settings


def _model(dataset, settings):
    torch.manual_seed(0)
    return build_model(settings.model, dataset.schema.num_dense, dataset.schema.sparse_names,
                       dataset.num_embeddings)


def test_a_model_distilled_from_itself_alone_does_not_move(tiny_data):
    """With weight 1 and the model's own copy as teacher, the targets are the model's
    probabilities: the cross-entropy's gradient is zero and the step changes nothing. With
    weight 0 (labels) the same step does change the model: the teacher is what held it."""
    dataset, settings = tiny_data
    ctx = DistContext(0, 1, torch.device("cpu"))
    batch = next(dataset.batches("train", 128))
    for weight, moves in ((1.0, False), (0.0, True)):
        model = _model(dataset, settings)
        teacher = copy.deepcopy(model).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer, _ = build_optimizer(model, settings.finetune)
        _train_step(model, optimizer, batch, ctx, EmbeddingPenalty(model, 0.0), teacher, weight)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert bool(changed) == moves, (weight, changed)
