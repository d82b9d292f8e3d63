"""The one config loader every stage uses, and the `clipflow` command built on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.common import config
from components.common.context import RunConfig
from components.evaluate.config import EvalConfig
from components.export.config import ExportConfig
from components.filter.config import FilterConfig
from components.shard.config import ShardConfig
from components.train.config import OptimConfig, TrainConfig
from pipelines.cli import COMMANDS, main
from pipelines.parameters import CONFIGS, TaskResources

ALL = [RunConfig, FilterConfig, ShardConfig, TrainConfig, EvalConfig, ExportConfig, TaskResources]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_round_trip_and_every_setting_is_documented(cls):
    cfg = config.from_dict(cls, {})
    assert config.from_dict(cls, json.loads(json.dumps(config.to_dict(cfg)))) == cfg
    rows = config.describe(cls)
    assert rows and all(doc for _path, _tp, _default, doc in rows), [r[0] for r in rows if not r[3]]


def test_unknown_key_names_it_and_lists_the_known_ones():
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(ShardConfig, {"samples_per_shrad": 10})
    assert "ShardConfig: unknown setting 'samples_per_shrad'" in str(err.value)
    assert "samples_per_shard" in str(err.value) and "vocab_size" in str(err.value)
    with pytest.raises(config.ConfigError, match="unknown setting 'optim.lrr'"):
        config.from_dict(TrainConfig, {"optim.lrr": 1.0})


def test_strings_are_coerced_to_the_fields_types():
    cfg = config.from_dict(TrainConfig, {"steps": "300", "batch_size": "8.0", "torch_compile": "true",
                                         "optim.betas": "0.9,0.95", "lr": "1e-4", "storage_path": "none",
                                         "warmup_steps": "null", "grad_clip": "0.5"})
    assert (cfg.steps, cfg.batch_size, cfg.torch_compile) == (300, 8, True)
    assert cfg.optim == OptimConfig(lr=1e-4, betas=(0.9, 0.95), grad_clip=0.5)
    assert cfg.storage_path is None and cfg.optim.warmup_steps is None
    shard = config.from_dict(ShardConfig, {"image_max_side": "none", "samples_per_shard": 5})
    assert shard.image_max_side is None
    filt = config.from_dict(FilterConfig, {"languages": '["en", "de"]', "concept_queries": "dog, cat",
                                           "caption_column": "alt"})
    assert filt.languages == ("en", "de") and filt.concept_queries == ("dog", "cat")
    assert filt.source.caption_column == "alt", "a nested field by its own (unique) name"
    for bad, message in (({"steps": "3.5"}, "TrainConfig.steps: '3.5' is not an int"),
                         ({"torch_compile": "maybe"}, "TrainConfig.torch_compile: 'maybe' is not a bool"),
                         ({"optim.betas": "0.9"}, r"OptimConfig.betas: expected 2 values"),
                         ({"steps": True}, "TrainConfig.steps: True is not an int")):
        with pytest.raises(config.ConfigError, match=message):
            config.from_dict(TrainConfig, bad)


def test_nested_settings_by_path_dict_or_leaf_and_the_class_checks():
    a = config.from_dict(TrainConfig, {"optim.lr": 1e-3})
    b = config.from_dict(TrainConfig, {"optim": {"lr": 1e-3}})
    c = config.from_dict(TrainConfig, {"lr": 1e-3})
    assert a == b == c and a.optim.lr == 1e-3 and a.optim.eps == 1e-6
    assert config.from_dict(TrainConfig, {"optim": {"lr": 1e-3}, "eps": 1e-8}).optim == OptimConfig(lr=1e-3, eps=1e-8)
    with pytest.raises(config.ConfigError, match="TrainConfig.precision='fp8'"):
        config.from_dict(TrainConfig, {"precision": "fp8"})  # __post_init__'s own check, as a ConfigError


def test_presets_start_the_rules_and_explicit_settings_win():
    none = config.from_dict(FilterConfig, {"preset": "none"})
    assert (none.min_side, none.languages, none.near_dedup, none.preset) == (1, (), False, "none")
    mixed = config.from_dict(FilterConfig, {"preset": "basic-only", "min_side": 64})
    assert (mixed.min_side, mixed.privacy, mixed.preset) == (64, "off", "basic_only")
    assert config.from_dict(FilterConfig, config.to_dict(mixed)) == mixed
    with pytest.raises(config.ConfigError, match="unknown preset 'strictest'; known: datacomp_basic"):
        config.from_dict(FilterConfig, {"preset": "strictest"})


def test_warmup_and_process_policy_live_in_the_config():
    assert OptimConfig().warmup_for(300) == 30 and OptimConfig().warmup_for(5) == 1
    assert OptimConfig().warmup_for(100_000) == 2000 and OptimConfig(warmup_steps=7).warmup_for(300) == 7
    assert TrainConfig(num_workers=4, gpus_per_worker=8).processes == 32
    assert TrainConfig(num_workers=3).processes == 3 and not TrainConfig().use_gpu
    assert TrainConfig(num_workers=2, batch_size=8, grad_accum=4).global_batch == 64


def test_field_docs_read_the_comment_beside_each_field():
    docs = config.field_docs(FilterConfig)
    assert docs["min_side"] == "shorter side >= min_side pixels"
    assert docs["source_uri"].endswith('("synthetic" = generate the bundled corpus)'), "continued comment lines"
    assert config.field_doc(TrainConfig, "optim.lr") == \
        "peak learning rate from scratch (a run from init_checkpoint uses finetune_lr)"


def test_every_command_has_help_generated_from_its_config(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    for command, cls in (("filter", FilterConfig), ("shard", ShardConfig), ("train", TrainConfig),
                         ("evaluate", EvalConfig), ("export", ExportConfig)):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for path, _tp, default, doc in config.describe(cls):
            if path == "source_uri" and command == "filter":
                continue  # the positional SRC
            flag = "--" + path.rsplit(".", 1)[-1].replace("_", "-")
            assert flag in text and " ".join(doc.split())[:40] in text, (command, path)
        assert "--set KEY=VALUE" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps" in text and "optimizer steps (default: 300)" in text, "run shows the local defaults"


def test_cli_errors_are_one_clear_line(capsys):
    assert main(["shard", "in", "out", "--set", "samples_per_shard=lots"]) == 2
    assert capsys.readouterr().err.strip() == "clipflow shard: ShardConfig.samples_per_shard: 'lots' is not an int"
    assert main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_script_is_installed():
    proc = subprocess.run([str(Path(sys.executable).parent / "clipflow"), "compile", "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stdout + proc.stderr


def test_parameters_map_to_exactly_one_config():
    assert set(CONFIGS.values()) == set(ALL)
