"""Method options from config dataclasses (qexport/options.py, qexport/cli_options.py), plug-in discovery, replay.

- every field of every registered method is a flag of ``calibrate``/``run``, listed by ``--help`` and
  ``qexport methods M`` with its type and default, and parses back to its own default;
- the flags that existed before keep their meaning; ``--opt`` and ``--options FILE.json`` give the same config;
- an option M does not take, a bad value, a bad type: one line naming the option and M, exit 2, nothing written
  (``calibrate`` and ``run``);
- the toy method of tests_support (six options), found only through its ``qexport.calibrators`` entry point,
  runs end to end, appears in ``methods``/``--help``/``run``, and ``--replay`` reruns it to identical integers.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from safetensors.torch import load_file

from conftest import TINY, assert_user_error, tree
from qexport.calibrators import get_calibrator, list_calibrators
from qexport.calibrators.adasg_config import AdaSGConfig
from qexport.errors import QexportError
from qexport.options import (build_config, config_from_record, config_record, option_specs, split_option_args,
                             typed_values)


def _parse(method: str, *args: str):
    """The config ``qexport calibrate --method M ARGS`` builds (the CLI's own parsing functions)."""
    cls = get_calibrator(method).config
    rest, values = split_option_args(list(args), cls, f"--method {method}", {"-o": True})
    assert rest == []
    return build_config(cls, typed_values(cls, values, f"--method {method}"), f"--method {method}")


def _text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------- every field reachable, listed, documented
@pytest.mark.parametrize("info", list_calibrators(), ids=lambda i: i.name)
def test_every_field_is_a_flag_with_help_that_round_trips(info):
    default = info.config()
    for spec in option_specs(info.config):
        assert spec.help.strip(), f"{info.name}.{spec.name} has no metadata['help']"
        if spec.is_bool:
            args = [spec.flag] if spec.default else [spec.off_flag]
        else:
            args = [spec.flag, _text(spec.default)]
        assert _parse(info.name, *args) == default, (info.name, args)


def test_adasg_help_lists_every_field(qx):
    res = qx("calibrate", "--method", "adasg", "--help")
    assert res.code == 0
    for f in dataclasses.fields(AdaSGConfig):
        assert "--" + f.name.replace("_", "-") in res.out, f.name
    assert "Options of --method adasg" in res.out and "[default: 16]" in res.out  # batch_size, adasg's meaning
    assert "synthetic images the generator draws" in res.out


def test_methods_name_lists_options_with_type_default_help(qx):
    res = qx("methods", "gpfq")
    assert res.code == 0
    assert "--c STR|FLOAT  [default: auto]" in res.out
    assert "--per-channel-step/--per-layer-step  [default: True]" in res.out
    assert "--c-grid FLOAT,...  [default: 0.6,0.7" in res.out


def test_batch_size_means_the_chosen_methods_batch(qx):
    """One flag, one meaning per method, shown in that method's help (adasg: generator batch; mse: pass batch)."""
    assert _parse("adasg", "--batch-size", "4").batch_size == 4
    assert _parse("mse", "--batch-size", "4").batch_size == 4
    assert "images per forward pass" in qx("calibrate", "--method", "mse", "--help").out


# ---------------------------------------------------------------- the flags of before keep working
def test_existing_flags_parse_as_before():
    a = _parse("adasg", "--time-budget", "30m", "--schedule", "paper", "--epochs", "3", "--iters-per-epoch", "5",
               "--loss", "gdfq", "--save-synthetic", "7", "--batch-size", "8", "--milestones", "0.3,0.6")
    assert (a.time_budget, a.schedule, a.epochs, a.iters_per_epoch, a.loss, a.save_synthetic, a.batch_size) == \
        ("30m", "paper", 3, 5, "gdfq", 7, 8)
    assert a.milestones == (0.3, 0.6) and a.budget_seconds == 1800
    g = _parse("gpfq", "--c", "auto", "--per-layer-step", "--no-bias-correction", "--patch-prob", "0.5")
    assert (g.c, g.per_channel_step, g.bias_correction, g.patch_prob) == ("auto", False, False, 0.5)
    g = _parse("gpfq", "--c=1.25", "--per-channel-step", "--bias-correction")
    assert g.c == 1.25 and isinstance(g.c, float) and g.per_channel_step and g.bias_correction
    assert _parse("percentile", "--percentile", "99.9").percentile == 99.9


def test_opt_and_options_file_equal_flags(tmp_path, tiny_images, qx):
    common = [TINY, "--method", "percentile", "--data", tiny_images, "--num-samples", 8, "-q"]
    (tmp_path / "o.json").write_text(json.dumps({"percentile": 99.0, "batch-size": 3}))
    runs = {"flags": ["--percentile", "99.5", "--batch-size", "3"],
            "opt": ["--opt", "percentile=99.5", "--opt", "batch_size=3"],
            "file+flag": ["--options", tmp_path / "o.json", "--percentile", "99.5"]}
    configs = []
    for name, extra in runs.items():
        res = qx("calibrate", *common, *extra, "-o", tmp_path / name)
        assert res.code == 0, res.err
        configs.append(json.loads((tmp_path / name / "recipe.json").read_text())["provenance"]["config"])
    assert configs[0] == configs[1] == configs[2]
    assert configs[0]["values"] == {"percentile": 99.5, "batch_size": 3}


# ---------------------------------------------------------------- bad options
BAD = {
    "option of another method": (["--method", "mse", "--c", "auto"], ["--c", "--method mse", "gpfq"]),
    "option of no method": (["--method", "adasg", "--frobnicate", "1"], ["--frobnicate", "--method adasg"]),
    "bad int": (["--method", "adasg", "--epochs", "many"], ["--epochs", "adasg", "many"]),
    "bad float": (["--method", "percentile", "--percentile", "high"], ["--percentile", "percentile", "high"]),
    "bad bool value": (["--method", "gpfq", "--bias-correction=maybe"], ["--bias-correction", "gpfq"]),
    "value out of range": (["--method", "percentile", "--percentile", "30"], ["--percentile", "percentile"]),
    "bad tuple item": (["--method", "gpfq", "--c-grid", "1,x"], ["--c-grid", "gpfq"]),
    "missing value": (["--method", "adasg", "--epochs"], ["--epochs", "adasg", "needs a value"]),
    "--opt unknown key": (["--method", "mse", "--opt", "iters=3"], ["iters", "--method mse"]),
    "--opt without =": (["--method", "mse", "--opt", "iters"], ["--opt", "key=value"]),
    "--opt bad value": (["--method", "adasg", "--opt", "lr_g=fast"], ["--lr-g", "adasg", "fast"]),
    "file: unknown key": (["--method", "mse", "--options", "{root}/unknown.json"], ["percentile", "--method mse"]),
    "file: wrong type": (["--method", "adasg", "--options", "{root}/wrongtype.json"], ["--epochs", "adasg", "1.5"]),
    "file: bool for int": (["--method", "adasg", "--options", "{root}/boolint.json"], ["--epochs", "adasg"]),
    "file: not an object": (["--method", "mse", "--options", "{root}/list.json"], ["--options", "object"]),
    "file: not json": (["--method", "mse", "--options", "{root}/broken.json"], ["--options", "not valid JSON"]),
    "file: missing": (["--method", "mse", "--options", "{root}/nope.json"], ["--options", "nope.json"]),
}


@pytest.fixture(scope="module")
def option_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("option_files")
    (root / "unknown.json").write_text('{"percentile": 99}')
    (root / "wrongtype.json").write_text('{"epochs": 1.5}')
    (root / "boolint.json").write_text('{"epochs": true}')
    (root / "list.json").write_text("[1, 2]")
    (root / "broken.json").write_text("{nope")
    return root


@pytest.mark.parametrize("command", ["calibrate", "run"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_option_one_line_naming_option_and_method(case, command, tmp_path, tiny_images, option_files, qx):
    extra, fragments = BAD[case]
    extra = [a.format(root=option_files) for a in extra]
    if command == "calibrate":
        args = ["calibrate", TINY, "--data", tiny_images, "-o", tmp_path / "out", *extra]
    else:
        args = ["run", TINY, "--data", tiny_images, "--eval-data", tiny_images, "-o", tmp_path / "out", *extra]
    before = tree(tmp_path)
    res = qx(*args)
    assert_user_error(res, *fragments)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- typed, versioned records
def test_config_record_round_trips_tuples_and_versions():
    cfg = AdaSGConfig(milestones=(0.3, 0.6), time_budget="5m", lr_q=None)
    rec = json.loads(json.dumps(config_record(cfg)))
    assert rec["type"] == "qexport.calibrators.adasg_config:AdaSGConfig" and rec["version"] == 1
    back = config_from_record(rec, AdaSGConfig, "test")
    assert back == cfg and isinstance(back.milestones, tuple)
    with pytest.raises(QexportError, match="version 7"):
        config_from_record({**rec, "version": 7}, AdaSGConfig, "test")
    with pytest.raises(QexportError, match="milestones"):
        config_from_record({**rec, "values": {**rec["values"], "milestones": "x"}}, AdaSGConfig, "test")


# ---------------------------------------------------------------- a plug-in method, end to end
def test_toy_plugin_everywhere_and_replay_identical(tmp_path, tiny_images, qx):
    res = qx("methods")
    assert any(ln.split()[0] == "toy" for ln in res.out.splitlines())
    assert get_calibrator("toy").fn.__module__ == "tests_support.toy_method"
    res = qx("calibrate", "--method", "toy", "--help")
    assert res.code == 0 and "--weight-shrink FLOAT" in res.out and "--only-layers" in res.out
    res = qx("run", "--method", "toy", "--help")
    assert res.code == 0 and "--weight-shrink FLOAT" in res.out

    first = tmp_path / "first"
    res = qx("calibrate", TINY, "--method", "toy", "--weight-shrink", "0.8", "--only-layers", "conv2,fc",
             "--opt", "act_mode=mse", "--data", tiny_images, "--num-samples", 12, "--seed", 3, "-o", first, "-q")
    assert res.code == 0, res.err
    rec = json.loads((first / "recipe.json").read_text())["provenance"]["config"]
    assert rec["values"]["only_layers"] == ["conv2", "fc"] and rec["values"]["weight_shrink"] == 0.8

    again = tmp_path / "again"
    res = qx("calibrate", "--replay", first, "-o", again, "-q")
    assert res.code == 0, res.err
    a, b = load_file(str(first / "tensors.safetensors")), load_file(str(again / "tensors.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    ma, mb = (json.loads((p / "recipe.json").read_text()) for p in (first, again))
    assert ma["act_scales"] == mb["act_scales"] and ma["provenance"]["config"] == mb["provenance"]["config"]
    assert mb["provenance"]["invocation"]["seed"] == 3

    res = qx("run", TINY, "--method", "toy", "--weight-shrink", "0.9", "--data", tiny_images, "--num-samples", 12,
             "--eval-data", tiny_images, "-o", tmp_path / "run", "-q")
    assert res.code == 0, res.err
    cfg = json.loads((tmp_path / "run" / "recipe" / "recipe.json").read_text())["provenance"]["config"]
    assert cfg["values"]["weight_shrink"] == 0.9


def test_replay_refuses_other_settings(tmp_path, tiny_recipe, qx):
    res = qx("calibrate", "--replay", tiny_recipe, "--bits", "w4a8", "-o", tmp_path / "x")
    assert_user_error(res, "--replay", "--bits")
    res = qx("calibrate", "--replay", tiny_recipe, "--batch-size", "3", "-o", tmp_path / "x")
    assert_user_error(res, "--replay", "--batch-size")
    res = qx("calibrate", "--replay", tmp_path / "none", "-o", tmp_path / "x")
    assert_user_error(res, "--replay", "none")
    assert not (tmp_path / "x").exists()
