"""Settings: the published defaults, presets, config files and overrides; errors name the key."""
import dataclasses

import pytest

from torchrec_mec.pipeline import PRESETS, Settings, SettingsError, load_settings
from torchrec_mec.pipeline.settings import settings_from_dict
from torchrec_mec.quantize import MECConfig


def test_published_defaults():
    s = load_settings()
    assert s == Settings()
    assert s.model.embedding_dim == 40
    assert s.compress.min_rows == 100_000
    # M = 4, K = 256, and the quantizer's own defaults for the rest (docs/quantizer.md).
    assert s.compress.quantizer == MECConfig(num_subspaces=4, codebook_size=256)


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
