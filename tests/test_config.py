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


# --- the config's contract: pure validation, typed choices, errors naming the key ---------------------------------


def test_validation_changes_no_value_and_resolve_fills_in_the_derived_ones():
    cfg = Config(loss="simpo", resume=True, overwrite=True, lora_r=4)
    assert (cfg.reference, cfg.overwrite, cfg.gradient_checkpointing) == ("auto", True, "auto")
    resolved = cfg.resolve()
    assert (resolved.reference, resolved.overwrite, resolved.gradient_checkpointing) == ("none", False, "true")
    assert (cfg.reference, cfg.overwrite) == ("auto", True)  # resolve() returned a copy
    assert resolved.resolve() == resolved


def test_config_parsing_validation_and_help_load_no_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "from fastdpo.config import Config, build_config\n"
            "build_config(['--beta', '0.2', '--loss', 'ipo']).validate()\n"
            "try:\n    Config(beta=-1)\nexcept Exception as e:\n    print(type(e).__name__)\n"
            "from fastdpo.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "ConfigError" and out.splitlines()[-1] == "False"
    assert "--gradient_checkpointing" in out and "(default: auto)" in out


@pytest.mark.parametrize("argv, message", [
    (["--weight_decay", "-1"], "--weight_decay: must be >= 0, got -1.0"),
    (["--max_grad_norm", "-1"], "--max_grad_norm: must be >= 0"),
    (["--ref_sync_steps", "-2"], "--ref_sync_steps: must be >= 0"),
    (["--ref_sync_alpha", "0"], "--ref_sync_alpha: must be in (0, 1]"),
    (["--rpo_alpha", "-0.5"], "--rpo_alpha: must be >= 0"),
    (["--lr_scheduler", "cosin"], "--lr_scheduler: must be one of constant, linear, cosine, got 'cosin' "
                                  "(did you mean 'cosine'?)"),
    (["--simpo_gamma", "1.0"], "--simpo_gamma: --loss sigmoid does not use it (it is a parameter of simpo)"),
    (["--loss", "ipo", "--label_smoothing", "0.1"], "--label_smoothing: --loss ipo does not use it"),
    (["--reference", "copy", "--ref_model", "r"], "--reference: 'copy' does not use --ref_model r"),
])
def test_every_error_names_the_key_that_is_wrong(argv, message):
    with pytest.raises(UserError) as err:
        build_config(argv)
    assert str(err.value).startswith(message), str(err.value)
    assert err.value.exit_code == 2


def test_a_bad_yaml_value_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: -1\n")
    with pytest.raises(UserError, match=r"c.yaml: beta: must be > 0, got -1.0"):
        build_config(["--config", str(path)])
    path.write_text("batch_size: many\n")
    with pytest.raises(UserError, match=r"c.yaml: batch_size: expected int, got 'many'"):
        build_config(["--config", str(path)])


def test_one_parser_serves_every_command():
    from fastdpo.cli import EvalOutputs
    from fastdpo.config import eval_keys, parse_command

    cfg, outputs = parse_command(["--beta", "0.3", "--json", "--per_pair_out=x.jsonl"], eval_keys(), EvalOutputs)
    assert cfg.beta == 0.3 and outputs == EvalOutputs(json=True, per_pair_out="x.jsonl")
    with pytest.raises(UserError, match="unknown flag --learning_rate"):  # a training option, not an eval one
        parse_command(["--learning_rate", "1e-5"], eval_keys(), EvalOutputs)
    with pytest.raises(UserError, match="unknown flag --json"):  # eval's own options belong to eval alone
        parse_command(["--json"])


def test_the_loss_table_drives_the_config_and_eval_keys(monkeypatch):
    """Adding a loss is one function and one row: the config accepts it and its parameter, eval offers it."""
    from fastdpo.config import eval_keys
    from fastdpo.losses import LOSSES, Loss, PARAMETERS

    def shifted(pc, pr, rc, rr, *, beta, simpo_gamma=0.5):
        return -(beta * ((pc - rc) - (pr - rr)) - simpo_gamma)

    monkeypatch.setitem(LOSSES, "shifted", Loss(shifted, ("simpo_gamma",)))
    assert build_config(["--loss", "shifted", "--simpo_gamma", "2"]).loss_params() == {"simpo_gamma": 2.0,
                                                                                        "rpo_alpha": 0.0}
    assert set(PARAMETERS) <= set(eval_keys())
    for name, row in LOSSES.items():
        for param in row.params:
            assert param in Config.__dataclass_fields__, (name, param)
