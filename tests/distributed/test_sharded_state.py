"""Training state through torch.distributed.checkpoint across world sizes (gloo ranks): a training
checkpoint written by 2 ranks resumes in 1 process, and one written by 1 process resumes on 2
ranks, each ending in the state of an uninterrupted 1-process run (the reference: plain PyTorch,
unsharded, torch.optim.Adagrad where the ranks use FBGEMM's fused Adagrad); and stage 2 reads a
table only on the rank that quantizes it. (Stage outputs written by 2 ranks and read by 1, and
the reverse, are compared in test_pipeline_multiprocess.)"""
import json
import os

import pytest
import torch

from tests.distributed.multiprocess import run_on_ranks
from tests.pipeline_testing import tiny_settings
from torchrec_mec.artifacts import save_artifact
from torchrec_mec.data import EncodedDataset, SyntheticConfig, prepare_dataset
from torchrec_mec.models import ModelConfig, build_model, table_name
from torchrec_mec.pipeline import compress, load_model
from torchrec_mec.pipeline.compress import TablesOnDisk
from torchrec_mec.pipeline.outputs import (
    COUNTS_FILE,
    COUNTS_KIND,
    EMBEDDING_PREFIX,
    META,
    architecture,
    save_model,
)
from torchrec_mec.pipeline.optimizers import ROWWISE_ADAGRAD
from torchrec_mec.pipeline.parallel import DistContext
from torchrec_mec.pipeline.pretrain import init_tables
from torchrec_mec.pipeline.settings import TrainSettings
from torchrec_mec.pipeline import state_dirs
from torchrec_mec.pipeline.state_dirs import state_shapes
from torchrec_mec.pipeline.training import train_model
from torchrec_mec.quantize.driver import assign_tables

SEED = 3
CONFIG = ModelConfig(embedding_dim=8, dense_hidden_sizes=(16,), over_hidden_sizes=(16,))
SMALL_ITEMS = 37 * 8 * 4
"""37 rows of D = 8: items that do not align with the shards of 2 ranks."""
ROWWISE = (ROWWISE_ADAGRAD, 1e-2)
"""The row-wise runs' optimizer and embedding L2 (the penalty's gradient reaches FBGEMM's fused
row-wise Adagrad through the lookup, and optimizers.RowWiseAdagrad as a sparse gradient)."""


def _train(rank: int, world_size: int, data: str, checkpoint: str, epochs: int, out: str,
           optimizer: str = "adagrad", embedding_l2: float = 0.0) -> None:
    """Stage 1's training (tables initialised shard by shard) for ``epochs`` epochs, resuming
    from ``checkpoint`` whatever world size wrote it; the model saved to ``out``. ``optimizer``,
    ``embedding_l2``: the tables' (``TrainSettings``). States are saved in items of
    ``SMALL_ITEMS`` bytes, so that every table is split into row ranges that the other world
    size reads back across its own shards."""
    chunk_bytes, state_dirs.SAVE_CHUNK_BYTES = state_dirs.SAVE_CHUNK_BYTES, SMALL_ITEMS
    try:
        _train_with(rank, world_size, data, checkpoint, epochs, out, optimizer, embedding_l2)
    finally:
        state_dirs.SAVE_CHUNK_BYTES = chunk_bytes


def _train_with(rank: int, world_size: int, data: str, checkpoint: str, epochs: int, out: str,
                optimizer: str, embedding_l2: float) -> None:
    ctx = DistContext(rank, world_size, torch.device("cpu"))
    dataset = EncodedDataset(data)
    torch.manual_seed(SEED)
    model = build_model(CONFIG, dataset.schema.num_dense, dataset.schema.sparse_names,
                        dataset.num_embeddings, tables_device=META)
    arch = architecture(model)
    bounds = {c.name: (c.get_weight_init_min(), c.get_weight_init_max())
              for c in model.embedding_bag_collection.embedding_bag_configs()}
    settings = TrainSettings(epochs=epochs, batch_size=128, seed=SEED, keep_best=True,
                             embedding_optimizer=optimizer, embedding_l2=embedding_l2)
    result = train_model(model, dataset, settings, ctx=ctx, checkpoint_uri=checkpoint,
                         fingerprint="same work", eval_batch_size=256,
                         restore=lambda runner, _: init_tables(runner, bounds, SEED),
                         progress=False)
    save_model(out, result.model.state_dict(), arch, {"history": result.history.to_dict()}, ctx)


def _one_process(*args) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has: same kernels, same rounding
    try:
        _train(0, 1, *args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = str(root / "data")
    prepare_dataset(None, "synthetic", data, progress=False, split=(0.6, 0.2, 0.2),
                    synthetic=SyntheticConfig(num_rows=2000, table_sizes=(800, 400, 30, 5),
                                              num_dense=3))
    _one_process(data, str(root / "ref_ckpt"), 2, str(root / "ref"))
    counts = {table_name(f): c for f, c in EncodedDataset(data).id_counts("train").items()}
    save_artifact(str(root / "ref" / COUNTS_FILE), counts, {"split": "train"}, COUNTS_KIND)
    return root, data


def _assert_same(ref_dir: str, other_dir: str) -> None:
    ref, ref_meta = load_model(ref_dir)
    other, other_meta = load_model(other_dir)
    a, b = ref_meta["history"], other_meta["history"]
    assert len(a["step_loss"]) == len(b["step_loss"]) and a["best_epoch"] == b["best_epoch"]
    torch.testing.assert_close(torch.tensor(b["step_loss"]), torch.tensor(a["step_loss"]),
                               atol=1e-5, rtol=0)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, atol=1e-4, rtol=1e-4,
                                   msg=key)


def test_checkpoint_of_two_ranks_resumes_in_one_process(data_and_reference):
    root, data = data_and_reference
    checkpoint = str(root / "ckpt_2_to_1")
    run_on_ranks(_train, data, checkpoint, 1, str(root / "half_2"), world_size=2)
    _one_process(data, checkpoint, 2, str(root / "resumed_1"))
    _assert_same(str(root / "ref"), str(root / "resumed_1"))


def test_checkpoint_of_one_process_resumes_on_two_ranks(data_and_reference):
    root, data = data_and_reference
    checkpoint = str(root / "ckpt_1_to_2")
    _one_process(data, checkpoint, 1, str(root / "half_1"))
    with open(os.path.join(checkpoint, "manifest.json")) as f:
        assert json.load(f)["meta"]["world_size"] == 1
    run_on_ranks(_train, data, checkpoint, 2, str(root / "resumed_2"), world_size=2)
    _assert_same(str(root / "ref"), str(root / "resumed_2"))


def _assert_one_sum_per_row(checkpoint: str, data: str) -> None:
    """The checkpoint holds each table's row-wise Adagrad state whole: [rows], unsharded name."""
    rows = EncodedDataset(data).num_embeddings
    sums = {k: shape for k, (shape, _) in state_shapes(checkpoint).items()
            if k.startswith("optim.") and k.endswith(".sum") and "embedding_bags." in k}
    assert sums == {f"optim.{EMBEDDING_PREFIX}embedding_bags.{table_name(f)}.weight.sum": (n,)
                    for f, n in rows.items()}


@pytest.fixture(scope="module")
def rowwise_reference(data_and_reference):
    """The uninterrupted 1-process run of 2 epochs with optimizers.RowWiseAdagrad and an
    embedding L2 (``ROWWISE``)."""
    root, data = data_and_reference
    ref = str(root / "ref_rowwise")
    _one_process(data, str(root / "ref_rowwise_ckpt"), 2, ref, *ROWWISE)
    return ref


def test_rowwise_adagrad_checkpoint_of_two_ranks_resumes_in_one_process(data_and_reference,
                                                                        rowwise_reference):
    """FBGEMM's EXACT_ROWWISE_ADAGRAD on 2 ranks for an epoch, then optimizers.RowWiseAdagrad
    in 1 process from that checkpoint, ends where 1 process alone does: the same update, and
    its state (one value per row, under the unsharded name) reshards 2 -> 1."""
    root, data = data_and_reference
    ref, checkpoint = rowwise_reference, str(root / "ckpt_rowwise_2_to_1")
    run_on_ranks(_train, data, checkpoint, 1, str(root / "half_rowwise_2"), *ROWWISE,
                 world_size=2)
    _assert_one_sum_per_row(checkpoint, data)
    _one_process(data, checkpoint, 2, str(root / "resumed_rowwise_1"), *ROWWISE)
    _assert_same(ref, str(root / "resumed_rowwise_1"))
    adagrad, rowwise = load_model(str(root / "ref"))[0], load_model(ref)[0]
    table = f"{EMBEDDING_PREFIX}embedding_bags.t_C1.weight"
    assert not torch.allclose(adagrad.state_dict()[table], rowwise.state_dict()[table],
                              atol=1e-4)  # the setting changes the update


def test_rowwise_adagrad_checkpoint_of_one_process_resumes_on_two_ranks(data_and_reference,
                                                                        rowwise_reference):
    """optimizers.RowWiseAdagrad in 1 process for an epoch, then FBGEMM's EXACT_ROWWISE_ADAGRAD
    on 2 ranks from that checkpoint, ends where 1 process alone does: the per-row state saved
    whole ([rows]) reshards 1 -> 2 into each rank's rows."""
    root, data = data_and_reference
    checkpoint = str(root / "ckpt_rowwise_1_to_2")
    _one_process(data, checkpoint, 1, str(root / "half_rowwise_1"), *ROWWISE)
    with open(os.path.join(checkpoint, "manifest.json")) as f:
        assert json.load(f)["meta"]["world_size"] == 1
    _assert_one_sum_per_row(checkpoint, data)
    run_on_ranks(_train, data, checkpoint, 2, str(root / "resumed_rowwise_2"), *ROWWISE,
                 world_size=2)
    _assert_same(rowwise_reference, str(root / "resumed_rowwise_2"))


def _compress_and_record(rank: int, world_size: int, pretrain_dir: str, out: str) -> None:
    read = []
    original = TablesOnDisk.__getitem__

    def recording(self, table):
        read.append(table)
        return original(self, table)

    TablesOnDisk.__getitem__ = recording  # this rank's process only
    try:
        compress(pretrain_dir, os.path.join(out, "compress"), tiny_settings(), progress=False)
    finally:
        TablesOnDisk.__getitem__ = original
    with open(os.path.join(out, f"read_{rank}.json"), "w") as f:
        json.dump(read, f)


def test_compress_reads_each_table_only_on_the_rank_that_quantizes_it(data_and_reference):
    root, _ = data_and_reference
    out = str(root / "compress_2")
    os.makedirs(out)
    run_on_ranks(_compress_and_record, str(root / "ref"), out, world_size=2)
    read = [json.load(open(os.path.join(out, f"read_{r}.json"))) for r in range(2)]
    # tiny_settings compresses tables of >= 300 rows: t_C1 (801) and t_C2 (401), one per rank.
    owner = assign_tables({"t_C1": 801, "t_C2": 401}, 2)
    for rank in range(2):
        assert read[rank] == [t for t, r in owner.items() if r == rank], rank
