"""Config: YAML keys and flags are the same names; unknown keys are errors naming them; precedence."""

import pytest

from fastdpo.config import Config, build_config
from fastdpo.errors import UserError


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.3\nloss: ipo\nbatch_size: 16\n")
    cfg = build_config(["--config", str(path), "--beta", "0.2"])
    assert (cfg.beta, cfg.loss, cfg.batch_size, cfg.max_length) == (0.2, "ipo", 16, 1024)


def test_bare_boolean_switch_and_explicit_value():
    assert build_config(["--overwrite"]).overwrite is True
    assert build_config(["--shuffle", "false"]).shuffle is False
    assert build_config(["--shuffle=false", "--overwrite"]).overwrite is True


def test_unknown_yaml_key_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("betaa: 0.3\n")
    with pytest.raises(UserError, match=r"c.yaml: unknown config key betaa \(did you mean beta\?\)") as err:
        build_config(["--config", str(path)])
    assert err.value.exit_code == 2


def test_unknown_flag_and_bad_values_exit_2():
    for argv, message in ((["--lr", "1"], "unknown flag --lr"), (["--batch_size", "1.5"], "--batch_size: expected int"),
                          (["--reference", "none"], "--reference: 'none' works only"),
                          (["--precision", "fp8"], "--precision: must be one of")):
        with pytest.raises(UserError, match=message) as err:
            build_config(argv)
        assert err.value.exit_code == 2


def test_ref_model_implies_reference_model():
    assert build_config(["--ref_model", "some/dir"]).reference == "model"


def test_saved_yaml_round_trips(tmp_path):
    cfg = build_config(["--beta", "0.25", "--eval_data", "x.jsonl"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert build_config(["--config", str(path)]) == cfg


def test_every_field_has_help():
    import dataclasses

    for f in dataclasses.fields(Config):
        assert f.metadata.get("help"), f.name


def test_resume_wins_over_a_saved_overwrite():
    assert build_config(["--resume", "--overwrite"]).overwrite is False


def test_reference_free_losses_default_to_no_reference():
    assert build_config(["--loss", "simpo"]).reference == "none"
    assert build_config(["--loss", "simpo", "--ref_model", "x"]).reference == "model"


def test_gradient_checkpointing_auto_is_on_for_lora_only_and_saved_resolved(tmp_path):
    assert build_config([]).gradient_checkpointing == "false"
    assert build_config(["--lora_r", "8"]).gradient_checkpointing == "true"
    assert build_config(["--lora_r", "8", "--gradient_checkpointing", "off"]).gradient_checkpointing == "false"
    assert build_config(["--gradient_checkpointing", "--beta", "0.2"]).gradient_checkpointing == "true"
    path = tmp_path / "c.yaml"
    path.write_text("gradient_checkpointing: true\n")  # a YAML boolean
    assert build_config(["--config", str(path)]).gradient_checkpointing == "true"
    path.write_text(build_config(["--lora_r", "8"]).to_yaml())
    assert "gradient_checkpointing: 'true'" in path.read_text()
    with pytest.raises(UserError, match="--gradient_checkpointing: expected true, false or auto, got 'maybe'"):
        build_config(["--gradient_checkpointing", "maybe"])
