"""Every Config field is checked for its type and range up front, with the `--set` fix in the message."""
import dataclasses
import json

import pytest

from megl.config import Config, ConfigError, resolve
from megl.errors import UserError


@pytest.mark.parametrize("pair,match", [
    ("lr=abc", r"lr = 'abc' must be a finite number >= 0 \(--set lr="),
    ("lr=NaN", r"lr = nan must be a finite number"),
    ("lr_lora=Infinity", r"lr_lora = inf must be a finite number"),
    ("weight_decay=-0.1", r"weight_decay = -0.1 must be a finite number >= 0"),
    ("lora_dropout=1.5", r"lora_dropout = 1.5 must be a finite number in \[0, 1\]"),
    ("deterministic=yes", r"deterministic = 'yes' must be true or false \(--set deterministic=true\)"),
    ("data_root=5", r"data_root = 5 must be a string or null"),
    ("lora_target_modules=q_proj", r"lora_target_modules = 'q_proj' must be a JSON list"),
    ("seed=-1", r"seed = -1 must be an integer >= 0"),
    ("synthetic.bogus=1", r"synthetic.bogus: unknown key; valid keys: .*n_train"),
    ("synthetic.n_train=many", r"synthetic.n_train = 'many' must be an integer"),
    ("synthetic.mask_fraction=2", r"synthetic: .*mask_fraction must be in \[0, 1\]"),
    ("target_layer=layer3", r"target_layer applies to torchvision / timm backbones, not megl's resnet18"),
    ("rationale_prompt=class", r"rationale_prompt = 'class': choose one of label, image"),
    ("sdtg_grid=fine", r"sdtg_grid = 'fine': choose one of classifier, coarser"),
    ("visual_l1=inside", r"visual_l1 = 'inside': choose one of both, outside"),
])
def test_bad_values_are_refused_with_the_fix(pair, match):
    with pytest.raises(ConfigError, match=match):
        resolve(sets=[pair])


def test_an_integer_for_a_float_field_is_a_float():
    config = resolve(sets=["lr=1", "lambda_text=0"])
    assert config.lr == 1.0 and isinstance(config.lr, float) and isinstance(config.lambda_text, float)


def test_fields_added_later_are_checked_too():
    # the checks follow the dataclass annotations: a new float field needs no new code to be validated
    Later = dataclasses.make_dataclass("Later", [("warmup_fraction", float, 0.1), ("clip_norm", "Optional[float]", None)],
                                       bases=(Config,), namespace={"__module__": "megl.config"})
    Later(clip_norm=1.0).validate()
    with pytest.raises(ConfigError, match="warmup_fraction = nan"):
        Later(warmup_fraction=float("nan")).validate()
    with pytest.raises(ConfigError, match="clip_norm = 'x' must be a finite number >= 0 or null"):
        Later(clip_norm="x").validate()


def test_config_files_are_named_in_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": 0.1,')
    with pytest.raises(ConfigError, match=f"{bad}.*not valid JSON.*line 1"):
        resolve(config_file=str(bad))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ConfigError, match=f"{unknown}: unknown config keys \\['bogus'\\]"):
        resolve(config_file=str(unknown))
    with pytest.raises(ConfigError, match="nope.json"):
        resolve(config_file=str(tmp_path / "nope.json"))


def test_a_run_config_with_an_unknown_key_names_the_file(tmp_path):
    from megl.runs import load_config

    (tmp_path / "config.json").write_text(json.dumps({**Config().to_dict(), "bogus": 1}))
    with pytest.raises(UserError, match=f"{tmp_path / 'config.json'}: unknown config keys \\['bogus'\\]"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        load_config(tmp_path)


@pytest.mark.parametrize("pair", ["lr=abc", "lr=NaN", "synthetic.bogus=1"])
def test_train_cli_refuses_before_writing_anything(tmp_path, pair):
    from megl.train import main

    with pytest.raises(SystemExit, match="^megl.train: error: .*--set") as e:
        main(["--out", str(tmp_path / "run"), "--set", pair])
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_train_cli_names_a_bad_config_file(tmp_path):
    from megl.train import main

    bad = tmp_path / "cfg.json"
    bad.write_text("{'lr': 1}")
    with pytest.raises(SystemExit, match=f"^megl.train: error: {bad} is not valid JSON \\(line 1") as e:
        main(["--config", str(bad), "--out", str(tmp_path / "run")])
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_data_errors_inside_train_are_one_line(tmp_path):
    from megl.train import main

    (tmp_path / "ds").mkdir()
    with pytest.raises(SystemExit, match=r"^megl.train: error: .*exp_annotation.json not found") as e:
        main(["--data-root", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--no-progress"])
    assert "Traceback" not in str(e.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")])
def test_a_full_disk_ends_a_cli_with_one_line(error):
    from megl.errors import cli

    @cli("megl.train")
    def main():
        raise error

    with pytest.raises(SystemExit) as e:
        main()
    assert str(e.value.code).startswith("megl.train: error: no space left on the device") and "--resume" in str(e.value.code)

    @cli("megl.train")
    def buggy():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # everything else keeps its traceback
        buggy()
