"""Checkpoints: our format, OpenAI / OpenCLIP layouts, architecture inference, safe loading."""

import io
import warnings
from pathlib import Path

import pytest
import torch

from clip_model import CLIP, build_model, config_from_state_dict, list_configs, load_config, load_model, save_model
from tests.test_model import random_tokens

torch.set_num_threads(1)


def _inputs(model: CLIP, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = model.visual.image_size
    return torch.randn(n, 3, s, s, generator=g), random_tokens(n, model.vocab_size, seed=seed)


def _outputs(model: CLIP, images, tokens):
    model.eval()
    with torch.no_grad():
        return model(images, tokens)


def _perturb(model: CLIP) -> CLIP:
    """Move every weight and BatchNorm statistic off its init, so a round trip has something to carry."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_save_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = _perturb(build_model(name))
    path = tmp_path / "sub" / "model.pt"
    save_model(path, model)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    loaded = load_model(path)
    assert loaded.config == model.config
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    inputs = _inputs(model)
    for a, b in zip(_outputs(model, *inputs), _outputs(loaded, *inputs)):
        assert torch.equal(a, b)


def test_save_load_through_a_stream_keeps_non_openai_config():
    cfg = load_config("tiny").replace(quick_gelu=True)  # not inferable: comes from the file
    model = build_model(cfg)
    buf = io.BytesIO()
    save_model(buf, model)
    loaded = load_model(buf.getvalue())
    assert loaded.config == cfg
    inputs = _inputs(model)
    torch.testing.assert_close(_outputs(model, *inputs)[0], _outputs(loaded, *inputs)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", list_configs())
def test_config_from_state_dict_reproduces_every_config(name):
    cfg = load_config(name)
    with torch.device("meta"):  # shapes only: no memory, no time
        sd = CLIP(cfg).state_dict()
    assert config_from_state_dict(sd, quick_gelu=cfg.quick_gelu) == cfg


def test_openai_style_state_dict_loads_strict(tmp_path):
    torch.manual_seed(0)
    model = _perturb(build_model(load_config("tiny").replace(quick_gelu=True)))
    sd = dict(model.state_dict())
    # OpenAI's files carry these three non-weight entries, and store weights in fp16
    sd["input_resolution"] = torch.tensor(64)
    sd["context_length"] = torch.tensor(77)
    sd["vocab_size"] = torch.tensor(8192)
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(half, tmp_path / "openai.pt")

    loaded = load_model(tmp_path / "openai.pt")  # inferred; OpenAI models use QuickGELU
    assert loaded.config == model.config
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    inputs = _inputs(model)
    for a, b in zip(_outputs(model, *inputs), _outputs(loaded, *inputs)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    # and the in-memory dict, at full precision, loads identically
    exact = load_model(sd)
    assert all(torch.equal(exact.state_dict()[k], v) for k, v in model.state_dict().items())


def test_openclip_training_checkpoint_with_module_prefix(tmp_path):
    torch.manual_seed(0)
    model = _perturb(build_model("tiny-rn"))
    opt = torch.optim.AdamW(model.parameters())
    ckpt = {"epoch": 3, "name": "run", "optimizer": opt.state_dict(),
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    loaded = load_model(tmp_path / "epoch_3.pt", quick_gelu=False)
    assert loaded.config == model.config
    inputs = _inputs(model)
    assert torch.equal(_outputs(model, *inputs)[0], _outputs(loaded, *inputs)[0])


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": build_model("tiny").state_dict(), "extra": _Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True refuses it"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def test_clear_errors_for_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        load_model(tmp_path / "missing.pt")
    sd = build_model("tiny").state_dict()
    del sd["visual.ln_post.weight"]
    with pytest.raises(ValueError, match=r"(?s)do not match the architecture.*visual\.ln_post\.weight"):
        load_model(sd)
    with pytest.raises(ValueError, match="neither visual.proj"):
        load_model({k: v for k, v in sd.items() if not k.startswith("visual.")})
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        config_from_state_dict({"foo": torch.zeros(1)})


def test_torchscript_archives_are_refused_with_a_hint(tmp_path):
    with warnings.catch_warnings():  # OpenAI's released .pt files are TorchScript archives like this one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    with pytest.warns(UserWarning, match="TorchScript"), \
            pytest.raises(ValueError, match=r"converted with torch\.jit\.load\(f\)\.state_dict\(\)"):
        load_model(tmp_path / "scripted.pt")
