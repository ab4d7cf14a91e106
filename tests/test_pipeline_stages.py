"""The four stages and the report on a small generated data set, checked against references
computed here independently: the models re-scored directly, counts by numpy, bytes by
arithmetic, the QEBC model against the full model whose tables are the decoded codes."""
import dataclasses
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from tests.pipeline_testing import tiny_settings
from torchrec_mec.artifacts import ArtifactError, load_artifact, save_artifact
from torchrec_mec.data import EncodedDataset
from torchrec_mec.pipeline import (
    compress,
    compressed_model,
    evaluate_model,
    finetune,
    load_compressed,
    load_model,
    pretrain,
    read_metrics,
    run,
    stage_dir,
    summary,
)
from torchrec_mec.pipeline.compress import TablesOnDisk
from torchrec_mec.pipeline.outputs import COUNTS_KIND
from torchrec_mec.pipeline.parallel import DistContext
from torchrec_mec.quantize.budget import plan_tables

COMPRESSED = ["t_C1", "t_C2"]  # the tables of >= 300 rows (801 and 401)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    report = run(None, "synthetic", out, tiny_settings(), progress=False)
    yield out, report
    shutil.rmtree(out, ignore_errors=True)


def _mtime(path):
    return os.stat(path).st_mtime_ns


def _auc_mann_whitney(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC as the Mann-Whitney U statistic with average ranks for ties."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_report_has_the_promised_fields(tiny_run):
    out, report = tiny_run
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    for model in ("baseline", "mec"):
        assert 0.0 <= on_disk[model]["auc"] <= 1.0 and on_disk[model]["logloss"] > 0
    mem = on_disk["memory"]
    assert mem["ratio"] == pytest.approx(mem["baseline_bytes"] / mem["mec_bytes"])
    assert sorted(t for t, v in on_disk["tables"].items() if v["compressed"]) == COMPRESSED
    for name, t in on_disk["tables"].items():
        assert {"rows", "compressed", "bytes_before", "bytes_after"} <= set(t)
        assert (t["quantizer"] is not None) == t["compressed"]
    assert on_disk["tables"]["t_C1"]["quantizer"]["num_rows"] == 801
    assert on_disk["settings"]["compress"]["min_rows"] == 300
    assert on_disk["settings"]["model"]["embedding_dim"] == 8
    assert {"torch", "torchrec", "fbgemm_gpu", "torchrec_mec"} <= set(on_disk["versions"])
    names = sorted(os.path.basename(p) for p in on_disk["plots"])
    assert names == ["code_usage_t_C1.png", "code_usage_t_C2.png", "memory.png",
                     "training_curves.png"]
    for path in on_disk["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = summary(report)
    assert "2 of 4 tables compressed" in text and f"{mem['ratio']:.1f}x" in text


def test_few_test_positives_are_warned_with_their_count(tiny_run):
    out, report = tiny_run
    labels = np.load(os.path.join(stage_dir(out, "data"), "test", "labels.npy"))
    positives, n = int(labels.sum()), len(labels)
    assert positives < 100  # the premise: the tiny set has few test positives
    assert report["baseline"]["num_positives"] == positives
    warning = (f"the test split has only {positives} positives (of {n} rows): its AUC moves by "
               "several hundredths with the split alone")
    assert report["warnings"] == [warning]
    assert f"  warning: {warning}" in summary(report)


def test_evaluate_matches_a_direct_evaluation_of_the_saved_models(tiny_run):
    out, _ = tiny_run
    ds = EncodedDataset(stage_dir(out, "data"))
    arrays = ds.arrays("test")
    labels = np.asarray(arrays["labels"])
    metrics = read_metrics(os.path.join(stage_dir(out, "evaluate"), "metrics.mec"))
    for name, stage in (("baseline", "pretrain"), ("mec", "finetune")):
        model, _ = load_model(stage_dir(out, stage))
        batch = next(ds.batches("test", batch_size=ds.num_rows("test")))
        with torch.no_grad():
            logits = model(batch.dense_features, batch.sparse_features).double().numpy()
        p = 1 / (1 + np.exp(-logits))
        logloss = float(np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p))))
        assert metrics[name]["auc"] == pytest.approx(_auc_mann_whitney(logits, labels), abs=1e-6)
        assert metrics[name]["logloss"] == pytest.approx(logloss, abs=1e-5)
        assert metrics[name]["num_samples"] == len(labels)


def test_pretrain_keeps_the_epoch_with_the_lowest_validation_logloss(tiny_run):
    out, _ = tiny_run
    model, meta = load_model(stage_dir(out, "pretrain"))
    epochs = meta["history"]["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]  # the starting state is validated too...
    best = min(epochs[1:], key=lambda e: e["val_logloss"])  # ...but, untrained, is never kept
    assert meta["history"]["best_epoch"] == best["epoch"]
    val = evaluate_model(model, EncodedDataset(stage_dir(out, "data")), "val", 512,
                         DistContext(0, 1, torch.device("cpu")), progress=False)
    assert val.logloss == pytest.approx(best["val_logloss"], abs=1e-6)


def test_counts_are_the_training_split_id_counts(tiny_run):
    out, _ = tiny_run
    counts, _ = load_artifact(os.path.join(stage_dir(out, "pretrain"), "counts.mec"))
    sparse = np.load(os.path.join(stage_dir(out, "data"), "train", "sparse.npy"))
    for f, name in enumerate(["C1", "C2", "C3", "C4"]):
        expected = np.bincount(sparse[:, f], minlength=counts[f"t_{name}"].numel())
        assert np.array_equal(counts[f"t_{name}"].numpy(), expected)


def test_memory_is_codes_plus_codebooks_plus_full_tables(tiny_run):
    out, report = tiny_run
    rows = {"t_C1": 801, "t_C2": 401, "t_C3": 31, "t_C4": 6}
    dim, m, k = 8, 2, 16
    assert report["memory"]["baseline_bytes"] == sum(rows.values()) * dim * 4
    mec = sum(n * m * 1 + m * k * (dim // m) * 4 for t, n in rows.items() if t in COMPRESSED)
    mec += sum(n * dim * 4 for t, n in rows.items() if t not in COMPRESSED)
    assert report["memory"]["mec_bytes"] == mec
    assert report["tables"]["t_C1"]["bytes_after"] == 801 * 2 + 2 * 16 * 4 * 4


def test_finetune_keeps_codes_frozen_and_trains_codebooks(tiny_run):
    out, _ = tiny_run
    stage2 = load_compressed(stage_dir(out, "compress"))
    assert sorted(stage2) == COMPRESSED
    model, _ = load_model(stage_dir(out, "finetune"))
    state = model.state_dict()
    prefix = "arch.sparse_arch.embedding_bag_collection.embedding_bags."
    for t in COMPRESSED:
        assert state[prefix + t + ".codes"].dtype == torch.uint8
        assert torch.equal(state[prefix + t + ".codes"], stage2[t].codes)
        assert not torch.equal(state[prefix + t + ".codebooks"], stage2[t].codebooks)


def test_compressed_model_equals_full_model_with_decoded_tables(tiny_run):
    """Stage 3's starting point is the pre-trained model with each compressed table replaced by
    concat_m codebooks[m, codes[:, m]]: rebuilt here by hand and compared output to output."""
    out, _ = tiny_run
    qmodel = compressed_model(stage_dir(out, "pretrain"), stage_dir(out, "compress"))
    reference, _ = load_model(stage_dir(out, "pretrain"))
    with torch.no_grad():
        for t, c in load_compressed(stage_dir(out, "compress")).items():
            decoded = torch.cat([c.codebooks[m][c.codes[:, m].long()]
                                 for m in range(c.codes.shape[1])], dim=1)
            reference.embedding_bag_collection.embedding_bags[t].weight.copy_(decoded)
        batch = next(EncodedDataset(stage_dir(out, "data")).batches("val", batch_size=300))
        torch.testing.assert_close(qmodel(batch.dense_features, batch.sparse_features),
                                   reference(batch.dense_features, batch.sparse_features),
                                   atol=1e-5, rtol=1e-5)


def test_rerun_skips_finished_stages_and_redoes_changed_ones(tiny_run, tmp_path):
    out, _ = tiny_run
    files = {s: os.path.join(stage_dir(out, s), f) for s, f in
             (("pretrain", "model.mec"), ("compress", "compressed.mec"),
              ("finetune", "model.mec"), ("evaluate", "metrics.mec"))}
    before = {s: _mtime(p) for s, p in files.items()}
    run(None, "synthetic", out, tiny_settings(), progress=False)
    assert {s: _mtime(p) for s, p in files.items()} == before
    # A changed fine-tuning setting redoes stage 3 and what reads it, not stages 1 and 2.
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    before = {s: _mtime(os.path.join(copy, os.path.relpath(p, out))) for s, p in files.items()}
    run(None, "synthetic", copy, tiny_settings(finetune__dense_lr=3e-4), progress=False)
    after = {s: _mtime(os.path.join(copy, os.path.relpath(p, out))) for s, p in files.items()}
    assert after["pretrain"] == before["pretrain"] and after["compress"] == before["compress"]
    assert after["finetune"] != before["finetune"] and after["evaluate"] != before["evaluate"]


def test_missing_or_corrupted_inputs_are_named(tiny_run, tmp_path):
    out, _ = tiny_run
    settings = tiny_settings()
    with pytest.raises(ArtifactError, match=r"pretrain/tables/: not found"):
        compress(str(tmp_path / "pretrain"), str(tmp_path / "compress"), settings, progress=False)
    broken = str(tmp_path / "broken")
    shutil.copytree(stage_dir(out, "pretrain"), broken)
    path = os.path.join(broken, "counts.mec")
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ArtifactError, match=r"broken/counts\.mec: checksum mismatch"):
        compress(broken, str(tmp_path / "compress"), settings, force=True, progress=False)
    with pytest.raises(ArtifactError, match=r"nowhere/compressed\.mec: file not found"):
        finetune(stage_dir(out, "data"), stage_dir(out, "pretrain"), str(tmp_path / "nowhere"),
                 str(tmp_path / "finetune"), settings, progress=False)
    with pytest.raises(FileNotFoundError, match=r"no_data/manifest\.json"):
        pretrain(str(tmp_path / "no_data"), str(tmp_path / "pretrain"), settings, progress=False)
    checkpoint = tmp_path / "ckpt" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text('{"format": "torchrec_mec-state", "version": 1')
    with pytest.raises(ArtifactError, match=r"ckpt/checkpoint: manifest.json is corrupted .* It "
                                            r"is a training checkpoint: delete it to start the "
                                            r"stage over, or rerun the stage with --force"):
        pretrain(stage_dir(out, "data"), str(checkpoint.parent), settings, progress=False)


def test_target_ratio_plans_every_table_within_the_budget(tiny_run, tmp_path):
    out, _ = tiny_run
    settings = tiny_settings(compress__target_ratio=5.0)
    comp = str(tmp_path / "compress")
    compress(stage_dir(out, "pretrain"), comp, settings, progress=False)
    _, meta = load_artifact(os.path.join(comp, "compressed.mec"))
    plan = meta["plan"]
    assert sorted(plan) == ["t_C1", "t_C2", "t_C3", "t_C4"]
    model = compressed_model(stage_dir(out, "pretrain"), comp)
    report = model.embedding_bag_collection.memory_report()
    # The QEBC the plan builds holds at most float32 / 5, and each table what the plan said.
    assert report.total_bytes <= report.baseline_bytes / 5
    for t, mem in report.tables.items():
        assert mem.total_bytes == plan[t]["bytes"]
        assert mem.compressed == (plan[t]["codebook_size"] > 0)
    for t, c in load_compressed(comp).items():
        assert tuple(c.codebooks.shape[:2]) == (plan[t]["num_subspaces"], plan[t]["codebook_size"])
    # A second call reuses the saved plan and the finished tables.
    before = _mtime(os.path.join(comp, "plan.mec"))
    compress(stage_dir(out, "pretrain"), comp, tiny_settings(compress__target_ratio=5.0),
             progress=False)
    assert _mtime(os.path.join(comp, "plan.mec")) == before
    # ... also for other quantizer training settings (the plan reads only the weighting and
    # the seed), but not for another weighting.
    compress(stage_dir(out, "pretrain"), comp, tiny_settings(
        compress__target_ratio=5.0, compress__quantizer__epochs=1, compress__quantizer__lr=0.1),
        progress=False)
    assert _mtime(os.path.join(comp, "plan.mec")) == before
    compress(stage_dir(out, "pretrain"), comp, tiny_settings(
        compress__target_ratio=5.0, compress__quantizer__weighting="uniform"), progress=False)
    assert _mtime(os.path.join(comp, "plan.mec")) != before


def test_target_ratio_weighs_tables_by_stage_1s_sensitivity(tiny_run, tmp_path, caplog):
    out, _ = tiny_run
    pre = stage_dir(out, "pretrain")
    counts, meta = load_artifact(os.path.join(pre, "counts.mec"))
    sensitivity = meta["sensitivity"]
    assert sorted(sensitivity) == sorted(counts) and all(v > 0 for v in sensitivity.values())
    # Reference: plan_tables on stage 1's tables with those weights, and without.
    tables = TablesOnDisk(os.path.join(pre, "tables"), counts)
    settings = tiny_settings(compress__target_ratio=5.0)
    c = settings.compress
    for rule, weights in (("sensitivity", sensitivity), ("uniform", None)):
        comp = str(tmp_path / rule)
        compress(pre, comp, tiny_settings(compress__target_ratio=5.0,
                                          compress__table_weights=rule), progress=False)
        _, plan_meta = load_artifact(os.path.join(comp, "plan.mec"))
        assert plan_meta["table_weights"] == weights
        expected = plan_tables(tables, c.config, 5.0, codebook_sizes=c.codebook_sizes,
                               progress=False, table_weights=weights)
        assert plan_meta["plan"] == {t: dataclasses.asdict(o) for t, o in expected.items()}
    # A pre-training from before the measurement: every table alike, with a warning.
    old = tmp_path / "old_pretrain"
    shutil.copytree(pre, old)
    del meta["sensitivity"]
    save_artifact(str(old / "counts.mec"), counts, meta, COUNTS_KIND)
    with caplog.at_level(logging.WARNING):
        compress(str(old), str(tmp_path / "old"), settings, progress=False)
    assert "holds no table sensitivity" in caplog.text and str(old / "counts.mec") in caplog.text
    _, plan_meta = load_artifact(str(tmp_path / "old" / "plan.mec"))
    assert plan_meta["table_weights"] is None
