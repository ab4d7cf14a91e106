"""Settings: the published defaults, presets, config files and overrides; errors name the key."""
import dataclasses

import pytest

from torchrec_mec.pipeline import PRESETS, Settings, SettingsError, load_settings
from torchrec_mec.pipeline.settings import FinetuneSettings, settings_from_dict
from torchrec_mec.quantize import MECConfig


def test_published_defaults():
    s = load_settings()
    assert s == Settings()
    assert s.model.embedding_dim == 40
    assert s.compress.min_rows == 100_000
    # M = 4, K = 256, and the quantizer's own defaults for the rest (docs/quantizer.md).
    assert s.compress.quantizer == MECConfig(num_subspaces=4, codebook_size=256)


def test_stage1_defaults_choose_the_batch_and_stop_early():
    s = load_settings()
    assert (s.pretrain.batch_size, s.pretrain.epochs, s.pretrain.patience) == (0, 10, 1)
    assert s.finetune == FinetuneSettings()  # fine-tuning keeps the class defaults
    # a preset or file changes what it names and keeps stage 1's other defaults
    s = load_settings("sample", overrides={"pretrain.embedding_l2": "1e-5"})
    assert (s.pretrain.batch_size, s.pretrain.patience, s.pretrain.embedding_l2) == (256, 1, 1e-5)
    assert s.pretrain.global_batch_size(10**9) == 256
    assert s.pretrain.embedding_optimizer == "adagrad"
    assert load_settings(overrides={"pretrain.embedding_optimizer": "rowwise_adagrad"}
                         ).pretrain.embedding_optimizer == "rowwise_adagrad"
    with pytest.raises(SettingsError, match="patience and validate_every >= 0"):
        load_settings(overrides={"pretrain.patience": -1})


def test_sample_preset_compresses_small_tables():
    s = load_settings("sample")
    assert s.compress.min_rows <= 500 and s.compress.quantizer.codebook_size <= s.compress.min_rows
    # The default synthetic tables (26, up to 2M ids) would not be "sample"-sized.
    assert max(s.data.synthetic.table_sizes) <= 20_000
    assert len(s.data.synthetic.interaction_pairs) == 2
    assert all(g < len(s.data.synthetic.table_sizes) for _, g in s.data.synthetic.interaction_pairs)


def test_recorded_settings_rebuild_the_same_settings():
    for preset in PRESETS:
        s = load_settings(preset)
        assert settings_from_dict(dataclasses.asdict(s)) == s


def test_overrides_are_typed():
    s = load_settings(overrides={"model.dense_hidden_sizes": "[64, 32]",
                                 "pretrain.embedding_lr": "1e-2", "data.max_rows": "none"})
    assert s.model.dense_hidden_sizes == (64, 32)
    assert s.pretrain.embedding_lr == 0.01
    assert s.data.max_rows is None


@pytest.mark.parametrize("overrides, message", [
    ({"model.widht": 3}, "unknown setting 'model.widht'"),
    ({"pretrain.epochs": "two"}, "'pretrain.epochs' must be a number"),
    ({"pretrain.epochs": 0}, "epochs >= 1"),
    ({"compress.min_rows": 100}, r"min_rows \(100\) must be >= the codebook size \(256\)"),
    ({"data.split": "[0.5, 0.5]"}, "'data.split' must have 3 entries"),
    ({"model": 1}, "'model' is a section"),
    ({"pretrain.embedding_optimizer": "adam"}, "embedding_optimizer must be one of"),
    ({"finetune.embedding_optimizer": "rowwise_adagrad"},
     "finetune.embedding_optimizer: only adagrad"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(overrides=overrides)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(SettingsError, match="nope.yaml: not found"):
        load_settings(config_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: {epoch: 2}\n")
    with pytest.raises(SettingsError, match=rf"{bad}: unknown setting 'finetune.epoch'"):
        load_settings(config_file=str(bad))
    with pytest.raises(SettingsError, match="unknown preset"):
        load_settings("huge")


def test_m_must_divide_d_when_the_settings_are_read():
    """Issue 11: found only after pre-training, which takes hours with published settings."""
    with pytest.raises(SettingsError, match=r"num_subspaces \(M = 3\) must divide "
                                            r"model.embedding_dim \(D = 40\)"):
        load_settings(overrides={"compress.quantizer.num_subspaces": 3})


def test_split_fractions_are_checked_when_the_settings_are_read():
    with pytest.raises(SettingsError, match=r"settings data \(from override data.split\): split "
                                            r"must be 3 fractions .* summing to 1"):
        load_settings(overrides={"data.split": "[0.5, 0.6, 0.1]"})
    with pytest.raises(SettingsError, match="bad_rows must be 'report' or 'fail'"):
        load_settings(overrides={"data.bad_rows": "skip"})


def test_wrong_types_in_a_config_file_name_the_file(tmp_path):
    config = tmp_path / "mec.yaml"
    config.write_text("pretrain: {epochs: many}\n")
    with pytest.raises(SettingsError) as e:
        load_settings(config_file=str(config))
    assert str(e.value) == (f"config file {config}: setting 'pretrain.epochs' must be a number, "
                            "got 'many'")
    config.write_text("pretrain: {epochs: 0}\n")
    with pytest.raises(SettingsError, match=rf"settings pretrain \(from config file {config}\): "
                                            "need epochs >= 1"):
        load_settings(config_file=str(config))


def test_duplicate_keys_in_a_config_file_are_errors(tmp_path):
    """Issue 11: YAML kept the last of two equal keys silently."""
    config = tmp_path / "mec.yaml"
    config.write_text("pretrain:\n  epochs: 2\n  batch_size: 64\n  epochs: 3\n")
    with pytest.raises(SettingsError) as e:
        load_settings(config_file=str(config))
    assert str(e.value) == (f"config file {config}: line 4: key 'epochs' is given twice (first "
                            "at line 2); each setting may appear once")
    config.write_text("model: {name: dlrm}\nmodel: {embedding_dim: 8}\n")
    with pytest.raises(SettingsError, match="line 2: key 'model' is given twice"):
        load_settings(config_file=str(config))
    as_json = tmp_path / "mec.json"
    as_json.write_text('{"finetune": {"epochs": 2, "epochs": 3}}')
    with pytest.raises(SettingsError, match=rf"config file {as_json}: key 'epochs' is given twice"):
        load_settings(config_file=str(as_json))
