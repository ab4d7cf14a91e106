"""``mec update`` end to end on a small synthetic run with a time drift: the fine-tuned model has
fallback tables for the ids that appear after the training split, ``update`` trains it on the
validation split (the traffic since compression) and promotes the busiest new ids."""
import json
import os

import pytest
import torch

from tests.pipeline_testing import tiny_flags, tiny_settings
from torchrec_mec.artifacts import load_artifact
from torchrec_mec.cli import main
from torchrec_mec.data import EncodedDataset
from torchrec_mec.modules.quantized_embedding_bag_collection import EMPTY_SLOT
from torchrec_mec.pipeline import DataSource, load_model, run_stages
from torchrec_mec.pipeline.update import PROMOTED_FILE, PROMOTED_KIND

DRIFT = {
    # C1 (800 ids) and C2 (400 ids) get 200 and 100 new ids from the validation split on
    "data.synthetic.new_ids": [200, 100, 0, 0], "data.synthetic.new_id_share": 0.3,
    "data.synthetic.new_id_start": 0.8,
    "new_ids.fallback_fraction": 0.02, "new_ids.promotion_fraction": 0.05,
    "update.min_count": 3, "update.batch_size": 128, "update.epochs": 1,
}


@pytest.fixture(scope="module")
def update_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("update_run"))
    settings = tiny_settings(**{k.replace(".", "__"): v for k, v in DRIFT.items()})
    done = run_stages(out, "update", settings, source=DataSource("synthetic"),
                      redo=("prepare", "pretrain", "compress", "finetune"), progress=False)
    assert all(outcome.ran for outcome in done.values()), done
    return out, settings


def test_update_promotes_the_busiest_new_ids_from_their_trained_fallback_rows(update_run):
    out, settings = update_run
    finetuned, _ = load_model(os.path.join(out, "finetune"))
    updated, meta = load_model(os.path.join(out, "update"))
    promoted, info = load_artifact(os.path.join(out, "update", PROMOTED_FILE),
                                   expect_kind=PROMOTED_KIND)
    data = EncodedDataset(os.path.join(out, "data"))
    counts = data.id_counts("val")
    assert set(promoted) == {"t_C1", "t_C2"}  # the compressed tables with new ids
    for table, feature in (("t_C1", "C1"), ("t_C2", "C2")):
        before = finetuned.embedding_bag_collection.embedding_bags[table]
        after = updated.embedding_bag_collection.embedding_bags[table]
        train = data.id_counts("train")[feature]  # the coded ids: up to the last one in training
        assert before.coded_rows == int(train.nonzero()[-1]) + 1 <= {"t_C1": 801, "t_C2": 401}[table]
        assert before.num_promoted == 0 and before.fallback.shape[0] == \
            -(-before.coded_rows * 2 // 100)
        ids = promoted[table]
        slots = before.config.promotion_slots
        new_counts = counts[feature][before.coded_rows:]
        eligible = int((new_counts >= 3).sum())
        assert ids.numel() == min(slots, eligible) > 0
        assert int(counts[feature][ids].min()) >= 3
        # most frequent first: nothing left unpromoted is busier than what was promoted
        rest = new_counts.clone()
        rest[ids - before.coded_rows] = -1
        assert int(rest.max()) <= int(counts[feature][ids].min())
        assert sorted(after.promoted_ids[after.promoted_ids != EMPTY_SLOT].tolist()) == \
            sorted(ids.tolist())
        # each promoted id reads its codes: the nearest codewords of its trained fallback row
        rows = after.fallback.detach()[(ids - after.coded_rows) % after.fallback.shape[0]]
        codes = after.codes[after.coded_rows + torch.searchsorted(after.promoted_ids, ids)]
        books = after.codebooks.detach()
        d = books.shape[2]
        for m in range(books.shape[0]):
            dist = torch.cdist(rows[:, m * d:(m + 1) * d].double(), books[m].double())
            assert torch.equal(codes[:, m].long(), dist.argmin(1)), (table, m)
        decoded = torch.cat([books[m][codes[:, m].long()] for m in range(books.shape[0])], 1)
        torch.testing.assert_close(after.embeddings(ids).detach(), decoded)
        # the fallback rows trained on the validation split's new ids
        assert not torch.equal(after.fallback, before.fallback)
        assert info["tables"][table]["promoted_now"] == ids.numel()
        assert info["tables"][table]["new_id_lookups"] == int(new_counts.sum()) > 0
    assert meta["stage"] == "update" and meta["history"]["step_loss"]
    record = json.loads(open(os.path.join(out, "lineage", "update.json")).read())
    assert record["settings"]["update"]["min_count"] == 3
    assert set(record["outputs"]) == {"update/model.mec", "update/tables/", "update/promoted.mec"}


def test_update_command_skips_when_up_to_date_and_refuses_without_fallbacks(update_run, capsys):
    out, _ = update_run
    flags = tiny_flags() + [f"{k}={json.dumps(v)}" for k, v in DRIFT.items()]
    record = json.loads(open(os.path.join(out, "lineage", "update.json")).read())
    assert main(["update", "--out", out, "--no-progress", "--preset", "sample", *flags]) == 0
    assert json.loads(open(os.path.join(out, "lineage", "update.json")).read()) == record
    # Without new-id settings: refused before anything runs, naming the setting.
    plain = [f for f in flags if not f.startswith("new_ids.")]
    assert main(["update", "--out", out, "--no-progress", "--preset", "sample", *plain]) == 2
    assert "new_ids.fallback_fraction is 0" in capsys.readouterr().err
    assert json.loads(open(os.path.join(out, "lineage", "update.json")).read()) == record
