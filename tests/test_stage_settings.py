"""Every stage setting reaches the KFP run form: as a parameter of its own, or through the stage's
`<stage>_settings` object, which start-run checks strictly before any stage works."""

from __future__ import annotations

import json

import pytest

from components.common import config
from components.common.config import ConfigError
from components.filter.config import FilterConfig
from pipelines.arguments import parameter_fields
from pipelines.stage_settings import STAGE_CONFIGS, check_stage_settings, own_parameters, start_checked


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_setting_of_every_stage_is_on_the_run_form(stage):
    cls, own = STAGE_CONFIGS[stage], own_parameters(stage)
    docs = {p.name: p.doc for p in parameter_fields()}
    for path, _tp, default, doc in config.describe(cls):
        if path.rsplit(".", 1)[-1] in own:
            continue  # a parameter of its own
        text = json.dumps({path: default}) if default is not None else f"{path}: null"
        assert config.settings_object(text, cls, f"{stage}_settings", own) == {path: default}
        assert f"{path} (default {default!r}): {doc}" in docs[f"{stage}_settings"]  # described on the form


def test_settings_are_checked_strictly_and_name_the_key():
    own = own_parameters("filter")
    ok = config.settings_object("language_quota: en=0.5\nnear_dup_max_distance: 4", FilterConfig, "filter_settings", own)
    assert ok == {"language_quota": "en=0.5", "near_dup_max_distance": 4}
    assert config.settings_object('{"languages": ["en", "de"]}', FilterConfig, "filter_settings", own)
    assert config.settings_object("  ", FilterConfig, "filter_settings", own) == {}
    for text, says in [("language_qouta: x", r"filter_settings: .*language_qouta"),
                       ("near_dup_max_distance: many", r"filter_settings: .*near_dup_max_distance"),
                       ("preset: none", r"filter_settings: 'preset' is a parameter of its own"),
                       ("[1, 2]", r"filter_settings: a YAML or JSON object of FilterConfig settings expected"),
                       ("{unclosed", r"filter_settings: not a YAML or JSON object")]:
        with pytest.raises(ConfigError, match=says):
            config.settings_object(text, FilterConfig, "filter_settings", own)


def test_a_stage_takes_its_object_and_its_own_parameters():
    cfg = config.stage_config(FilterConfig, {"preset": "none", "filter_settings": '{"language_quota": "en=0.5"}'},
                              "filter")
    assert (cfg.preset, cfg.language_quota) == ("none", ("en=0.5",))
    with pytest.raises(ConfigError, match="filter_settings: 'preset' is a parameter of its own"):
        config.stage_config(FilterConfig, {"preset": "none", "filter_settings": "preset: basic_only"}, "filter")


def test_start_run_refuses_bad_settings_before_any_work(monkeypatch):
    import components.common.context as context

    opened = []
    monkeypatch.setattr(context, "start_task", lambda **kw: opened.append(kw) or "ctx")
    with pytest.raises(ConfigError, match=r"train_settings: .*warmup_stepz"):
        start_checked(data_root="/d", filter_settings="", shard_settings="", train_settings="optim: {warmup_stepz: 3}",
                      evaluate_settings="", export_settings="")
    assert not opened  # the parent run was never opened
    assert start_checked(data_root="/d", filter_settings="language_quota: en=0.5", shard_settings="",
                         train_settings="optim: {warmup_steps: 3}", evaluate_settings="", export_settings="") == "ctx"
    assert opened == [{"data_root": "/d"}]
    check_stage_settings({"export_settings": '{"opset": 18}'})
    with pytest.raises(ConfigError, match="'registered_model_name' is a parameter of its own"):
        check_stage_settings({"export_settings": "registered_model_name: x"})  # as clipflow run / submit check
    with pytest.raises(ConfigError, match="'preset' is a parameter of its own"):  # the stage refuses it
        config.stage_config(FilterConfig, {"preset": "none", "filter_settings": "preset: none"}, "filter")
