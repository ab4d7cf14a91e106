"""The planted data written as a Criteo TSV reads back, through the Criteo reader and
``prepare_dataset``, to the generator's rows; the recorded ceiling is the AUC of its true
probabilities (checked with a Mann-Whitney count here)."""
import json

import numpy as np
import pytest

from torchrec_mec.data import SyntheticConfig, prepare_dataset
from torchrec_mec.data.criteo import read_criteo_tsv
from torchrec_mec.data.planted_tsv import main, write_planted_criteo
from torchrec_mec.data.prepare import assign_splits
from torchrec_mec.data.schema import BadRowReport, concat_chunks
from torchrec_mec.data.synthetic import SyntheticClickModel

CONFIG = SyntheticConfig(num_rows=3000, table_sizes=(400, 50, 7) + (3,) * 23,
                         dense_missing_rate=0.2)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("planted") / "planted.tsv")
    meta = write_planted_criteo(CONFIG, path, seed=5, split_seed=2, chunk_rows=700,
                                progress=False)
    return path, meta


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def test_tsv_reads_back_to_the_generator_rows(planted):
    path, _ = planted
    report = BadRowReport("fail")
    rows = concat_chunks(list(read_criteo_tsv(path, report)))
    model = SyntheticClickModel(CONFIG, seed=5)
    dense, ids = model.features(0, CONFIG.num_rows)
    labels = model.labels(0, model.probabilities(dense, ids))
    assert rows is not None and len(rows) == CONFIG.num_rows
    np.testing.assert_array_equal(rows.lines, np.arange(1, CONFIG.num_rows + 1))
    np.testing.assert_array_equal(rows.labels, labels)
    np.testing.assert_array_equal(rows.dense, dense)  # log1p of the counts; missing -> 0
    assert (rows.dense == 0).mean() > 0.15  # the missing fields are there (empty)
    for f in range(CONFIG.num_sparse):
        values = rows.sparse[f]
        # one value per id and one id per value: the same partition of the rows
        pairs = set(zip(values.tolist(), ids[:, f].tolist()))
        assert len(pairs) == len(set(values.tolist())) == len(np.unique(ids[:, f])), f
        assert all(len(v) == 8 and int(v, 16) >= 0 for v in values[:50].tolist())


def test_prepared_file_and_ceiling_match_the_planted_probabilities(planted, tmp_path):
    path, meta = planted
    assert json.load(open(path + ".planted.json")) == meta
    model = SyntheticClickModel(CONFIG, seed=5)
    dense, ids = model.features(0, CONFIG.num_rows)
    p = model.probabilities(dense, ids)
    labels = model.labels(0, p)
    which = assign_splits(np.arange(1, CONFIG.num_rows + 1), 2, (0.8, 0.1, 0.1))
    ds = prepare_dataset(path, "criteo", str(tmp_path / "data"), seed=2, min_count=1,
                         progress=False)
    for k, split in enumerate(("train", "val", "test")):
        np.testing.assert_array_equal(ds.arrays(split)["labels"], labels[which == k])
        assert meta["ceiling_auc"][split] == pytest.approx(
            _auc(p[which == k], labels[which == k]), abs=1e-5)
    assert meta["ceiling_auc"]["all"] == pytest.approx(_auc(p, labels), abs=1e-5)
    # min_count 1: every id seen in training has its own row (+ OOV row 0)
    assert ds.num_embeddings["C1"] == len(np.unique(ids[which == 0, 0])) + 1


def test_non_criteo_layout_is_refused_naming_the_sizes(tmp_path):
    with pytest.raises(ValueError, match="13 dense and 26 sparse.*has 13 .* and 3"):
        write_planted_criteo(SyntheticConfig(num_rows=10, table_sizes=(5, 5, 5)),
                             str(tmp_path / "x.tsv"), progress=False)
    assert not (tmp_path / "x.tsv").exists()


def test_command_line_reads_the_data_section_of_a_settings_file(tmp_path, capsys):
    config = tmp_path / "planted.yaml"
    config.write_text("data:\n  seed: 3\n  synthetic:\n    table_sizes: [20, 10" + ", 3" * 24
                      + "]\npretrain: {epochs: 2}\n")
    main(["--rows", "200", "--out", str(tmp_path / "p.tsv"), "--config", str(config)])
    meta = json.loads((tmp_path / "p.tsv.planted.json").read_text())
    assert meta["seed"] == meta["split_seed"] == 3 and meta["config"]["num_rows"] == 200
    assert meta["config"]["table_sizes"][:2] == [20, 10]
    assert json.loads(capsys.readouterr().out) == meta["ceiling_auc"]
    assert sum(1 for _ in open(tmp_path / "p.tsv")) == 200
