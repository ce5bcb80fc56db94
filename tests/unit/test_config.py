from __future__ import annotations

import json

import pytest

from pipelines.cli import main
from pipelines.config import ConfigError, flatten, load_config, split_config_args
from pipelines.preprocess.config import PreprocessConfig
from pipelines.train.config import TrainConfig


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: /data\nepochs: 3\nclip:\n  num_frames: 8\n")
    cfg = load_config(TrainConfig, path, ["epochs=5", "clip.crop_size=64", "ray.address=auto"])
    assert (cfg.dataset, cfg.epochs, cfg.clip.num_frames, cfg.clip.crop_size, cfg.ray.address) == ("/data", 5, 8, 64, "auto")
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.epochs, int)


def test_sections_select_one_stage(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text("train:\n  epochs: 7\npreprocess:\n  short_side: 40\n")
    assert load_config(TrainConfig, path, ["dataset=x"], section="train").epochs == 7
    assert load_config(PreprocessConfig, path, ["source=a", "output=b"], section="preprocess").short_side == 40


@pytest.mark.parametrize("override, key", [("epoch=3", "epoch"), ("clip.frames=8", "clip.frames"), ("optim.lrr=1", "optim.lrr")])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(TrainConfig, None, ["dataset=x", override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: x\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'batchsize'.*Valid keys here: .*batch_size"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("override, key", [("epochs=many", "epochs"), ("clip.horizontal_flip=maybe", "clip.horizontal_flip"),
                                           ("optim.lr=fast", "optim.lr")])
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' has the wrong type"):
        load_config(TrainConfig, None, ["dataset=x", override])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="'dataset' is required"):
        load_config(TrainConfig, None, [])


def test_value_checks_name_the_key():
    with pytest.raises(ValueError, match="'precision'"):
        load_config(TrainConfig, None, ["dataset=x", "precision=fp8"])
    with pytest.raises(ValueError, match="'val_fraction'"):
        load_config(PreprocessConfig, None, ["source=a", "output=b", "val_fraction=1.5"])


def test_flatten_gives_dotted_params():
    flat = flatten(load_config(TrainConfig, None, ["dataset=x"]))
    assert flat["clip.num_frames"] == "16" and flat["optim.lr"] == "0.0016" and flat["dataset"] == "x"


def test_cli_arguments_and_exit_codes(capsys, tmp_path):
    assert split_config_args(["a.yaml", "x=1"]) == ("a.yaml", ["x=1"])
    assert main(["train", "dataset=x", "bogus_key=1"]) == 2
    assert "unknown config key 'bogus_key'" in capsys.readouterr().err
    assert main(["train", "dataset=x", "epochs=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "# effective train config" in out and "epochs: 3" in out


def test_every_subcommand_has_help(capsys):
    for command in ("preprocess", "train", "evaluate", "register", "demo", "demo-data", "stack", "flops"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: mvit " + command in capsys.readouterr().out


def test_a_stage_without_its_section_gets_defaults(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text("train:\n  epochs: 7\n")
    cfg = load_config(PreprocessConfig, path, ["source=a", "output=b"], section="preprocess")
    assert cfg.short_side == PreprocessConfig(source="a", output="b").short_side


def test_passwords_in_uris_are_never_printed_or_logged(capsys):
    from pipelines.config import flatten, print_effective
    from pipelines.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["dataset=s3://b/ds", "mlflow.tracking_uri=postgresql://ml:s3cr3t@db:5432/mlflow"])
    print_effective("train", cfg)
    printed = capsys.readouterr().out
    params = flatten(cfg)
    assert "s3cr3t" not in printed and "s3cr3t" not in json.dumps(params)
    assert params["mlflow.tracking_uri"] == "postgresql://ml:***@db:5432/mlflow"
    assert cfg.mlflow.tracking_uri.endswith("ml:s3cr3t@db:5432/mlflow")  # the config itself keeps it for use


def test_errors_name_the_key_without_internal_placeholders_and_suggest_the_closest_key():
    """`mvit train` with no arguments used to say "None: config key 'dataset' is required"; a misspelt key
    lists the valid ones and names the closest."""
    from pipelines.train.config import TrainConfig

    with pytest.raises(ConfigError) as missing:
        load_config(TrainConfig, None, [])
    assert str(missing.value).startswith("config key 'dataset' is required") and "None" not in str(missing.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'\. Did you mean 'epochs'\?"):
        load_config(TrainConfig, None, ["dataset=x", "epoch=2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'clip\.num_frame'\. Did you mean 'clip\.num_frames'\?"):
        load_config(TrainConfig, None, ["dataset=x", "clip.num_frame=2"])


def test_the_fluent_scope_leaves_the_configured_tracking_server_in_place(monkeypatch, tmp_path):
    # MLflow's scoped setter deletes $MLFLOW_TRACKING_URI on exit when no URI was set in code: a register
    # (fluent log_model) would make every later stage of the process resolve to ./mlflow.db.
    import mlflow

    from pipelines import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with tracking.fluent(f"sqlite:///{tmp_path}/other.db"):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/other.db"
    assert tracking.resolve_uri("") == "http://127.0.0.1:5999"
    assert mlflow.get_tracking_uri() == "http://127.0.0.1:5999"
