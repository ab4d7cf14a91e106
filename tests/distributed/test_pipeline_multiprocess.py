"""Stages 1-3 on 2 gloo ranks (torch.multiprocessing) equal the 1-process run for the same global
batch: same losses, validation and test metrics (1e-5) and the same trained parameters; with the
embedding L2 penalty and validations within epochs on (sharded tables with FBGEMM's fused
optimizer get the penalty's gradient through the lookup, as unsharded ones do)."""
import os
import shutil

import pytest
import torch

from tests.distributed.multiprocess import run_on_ranks
from torchrec_mec.artifacts import load_artifact
from torchrec_mec.data import SyntheticConfig, prepare_dataset
from torchrec_mec.pipeline import (
    compress,
    evaluate,
    finetune,
    load_compressed,
    load_model,
    load_settings,
    pretrain,
    read_metrics,
)

OVERRIDES = {
    "model.embedding_dim": 8, "model.dense_hidden_sizes": [16], "model.over_hidden_sizes": [16],
    "pretrain.epochs": 2, "pretrain.batch_size": 128, "pretrain.checkpoint_every": 7,
    "pretrain.embedding_l2": 1e-2, "pretrain.validate_every": 10, "pretrain.patience": 0,
    # Distillation: on 2 ranks the teacher is sharded, in the 1-process reference it is whole.
    "finetune.epochs": 1, "finetune.batch_size": 128, "finetune.embedding_l2": 1e-2,
    "finetune.distill_weight": 0.5,
    "compress.min_rows": 300,
    "compress.quantizer": {"num_subspaces": 2, "codebook_size": 16, "epochs": 2,
                           "samples_per_epoch": 1024, "batch_size": 512, "eval_rows": 0,
                           "early_stopping_patience": 0, "kmeans_points_per_centroid": 16},
    "evaluate.batch_size": 256,
}


def _settings():
    return load_settings("sample", overrides=OVERRIDES)


def _stage1_2_on_ranks(rank: int, world_size: int, run_dir: str, ref_dir: str) -> None:
    torch.manual_seed(1234 + rank)  # the stages must not depend on the global RNG state
    settings = _settings()
    pretrain(os.path.join(ref_dir, "data"), os.path.join(run_dir, "pretrain"), settings,
             progress=False)
    # Stage 2 (and 3 below) start from the reference run's outputs, to compare on equal inputs.
    compress(os.path.join(ref_dir, "pretrain"), os.path.join(run_dir, "compress"), settings,
             progress=False)


def _stage3_4_on_ranks(rank: int, world_size: int, run_dir: str, ref_dir: str) -> None:
    torch.manual_seed(1234 + rank)
    settings = _settings()
    data = os.path.join(ref_dir, "data")
    finetune(data, os.path.join(ref_dir, "pretrain"), os.path.join(ref_dir, "compress"),
             os.path.join(run_dir, "finetune"), settings, progress=False)
    evaluate(data, os.path.join(run_dir, "pretrain"), os.path.join(run_dir, "finetune"),
             os.path.join(run_dir, "evaluate"), settings, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run (one torch thread, as each rank has: same kernels, same rounding)."""
    root = tmp_path_factory.mktemp("mp")
    ref = str(root / "one")
    settings = _settings()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Large validation and test splits: one pair of predictions swapping order moves the
        # AUC by 1 / (positives x negatives), which must stay well below the 1e-5 compared.
        prepare_dataset(None, "synthetic", os.path.join(ref, "data"), progress=False,
                        split=(0.5, 0.25, 0.25),
                        synthetic=SyntheticConfig(num_rows=6000, table_sizes=(800, 400, 30, 5),
                                                  num_dense=3))
        pretrain(os.path.join(ref, "data"), os.path.join(ref, "pretrain"), settings,
                 progress=False)
        compress(os.path.join(ref, "pretrain"), os.path.join(ref, "compress"), settings,
                 progress=False)
        finetune(os.path.join(ref, "data"), os.path.join(ref, "pretrain"),
                 os.path.join(ref, "compress"), os.path.join(ref, "finetune"), settings,
                 progress=False)
        evaluate(os.path.join(ref, "data"), os.path.join(ref, "pretrain"),
                 os.path.join(ref, "finetune"), os.path.join(ref, "evaluate"), settings,
                 progress=False)
    finally:
        torch.set_num_threads(threads)
    yield ref, str(root / "two")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stage1_2(reference):
    ref, two = reference
    run_on_ranks(_stage1_2_on_ranks, two, ref, world_size=2)
    return ref, two


@pytest.fixture(scope="module")
def stage3_4(stage1_2):
    ref, two = stage1_2
    run_on_ranks(_stage3_4_on_ranks, two, ref, world_size=2)
    return ref, two


def _assert_same_history(a, b):
    assert len(a["step_loss"]) == len(b["step_loss"])
    assert torch.allclose(torch.tensor(a["step_loss"]), torch.tensor(b["step_loss"]), atol=1e-5)
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert ea["step"] == eb["step"]
        assert ea["val_auc"] == pytest.approx(eb["val_auc"], abs=1e-5)
        assert ea["val_logloss"] == pytest.approx(eb["val_logloss"], abs=1e-5)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sa[k], sb[k], atol=1e-4, rtol=1e-4, msg=k)
        else:
            assert torch.equal(sa[k], sb[k]), k


def _assert_same_model(ref, two, stage):
    model_one, meta_one = load_model(os.path.join(ref, stage))
    model_two, meta_two = load_model(os.path.join(two, stage))
    _assert_same_history(meta_one["history"], meta_two["history"])
    _assert_same_state(model_one, model_two)


def test_two_ranks_pretrain_like_one(stage1_2):
    """Stage 1: DMP with TorchRec's EBC sharder, 2 x 64 rows per step vs 1 x 128; and the table
    sensitivity it records (the same noise per sample under any number of ranks)."""
    _assert_same_model(*stage1_2, "pretrain")
    ref, two = stage1_2
    _, one_meta = load_artifact(os.path.join(ref, "pretrain", "counts.mec"))
    _, two_meta = load_artifact(os.path.join(two, "pretrain", "counts.mec"))
    assert sorted(two_meta["sensitivity"]) == sorted(one_meta["sensitivity"])
    for t, v in one_meta["sensitivity"].items():
        assert two_meta["sensitivity"][t] == pytest.approx(v, rel=1e-4), t


def test_two_ranks_finetune_like_one(stage3_4):
    """Stage 3: DMP with the QEBC sharder on the same codes and codebooks."""
    _assert_same_model(*stage3_4, "finetune")


def test_two_ranks_same_test_metrics(stage3_4):
    ref, two = stage3_4
    one = read_metrics(os.path.join(ref, "evaluate", "metrics.mec"))
    other = read_metrics(os.path.join(two, "evaluate", "metrics.mec"))
    for model in ("baseline", "mec"):
        assert other[model]["auc"] == pytest.approx(one[model]["auc"], abs=1e-5)
        assert other[model]["logloss"] == pytest.approx(one[model]["logloss"], abs=1e-5)
        assert other[model]["num_samples"] == one[model]["num_samples"]
    assert other["memory"] == one["memory"]


def test_two_ranks_compress_like_one(stage1_2):
    """Stage 2 spreads tables over the ranks; each table's codes match the 1-process run."""
    ref, two = stage1_2
    one, other = load_compressed(os.path.join(ref, "compress")), \
        load_compressed(os.path.join(two, "compress"))
    assert sorted(one) == sorted(other) == ["t_C1", "t_C2"]
    for t in one:
        assert torch.equal(one[t].codes, other[t].codes)
        torch.testing.assert_close(one[t].codebooks, other[t].codebooks)
    _, meta = load_artifact(os.path.join(two, "compress", "compressed.mec"))
    assert meta["full_tables"] == ["t_C3", "t_C4"]
