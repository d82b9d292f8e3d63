"""Fine-tuning from a checkpoint: the recipe, strict loading, tower locking, the checkpoint's tokenizer, and a
run through shard -> train -> evaluate -> export that starts from a tiny model saved in OpenAI's layout."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from components.common import config
from components.train.config import TrainConfig
from tests.fixtures_model import trained_tiny  # noqa: F401  (session fixture)


def save_openai_layout(model, path: Path) -> Path:
    """A plain state dict as OpenAI's files hold them (with their non-weight entries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.update(input_resolution=torch.tensor(model.visual.image_size), context_length=torch.tensor(77),
              vocab_size=torch.tensor(model.vocab_size))
    torch.save(sd, path)
    return path


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fine_tune_config(checkpoint, **kw) -> TrainConfig:
    return config.from_dict(TrainConfig, {"model_config": "tiny", "init_checkpoint": str(checkpoint), **kw})


# --------------------------------------------------------------------------- the recipe and the settings

def test_fine_tuning_follows_openclip_recipe_unless_set():
    scratch = TrainConfig(steps=1000)
    assert scratch.optim.peak_lr == 5e-4 and scratch.optim.warmup_for(1000) == 100
    tuned = fine_tune_config("ckpt.pt", steps=1000)
    assert tuned.optim.peak_lr == tuned.optim.finetune_lr == 1e-5 and tuned.optim.lr == 5e-4
    assert tuned.optim.warmup_for(1000) == 20 and tuned.optim.warmup_for(100_000) == 500  # short warmup
    assert fine_tune_config("c.pt", finetune_lr=3e-5, warmup_steps=7).optim.peak_lr == 3e-5
    assert fine_tune_config("c.pt", warmup_steps=7).optim.warmup_for(1000) == 7
    again = config.from_dict(TrainConfig, config.to_dict(tuned))  # as the RayJob entrypoint receives it
    assert again == tuned and again.optim.peak_lr == 1e-5


@pytest.mark.parametrize("settings,error", [
    ({"lock_image": True}, "lock_image=true would freeze a randomly initialised image tower"),
    ({"init_checkpoint": "c.pt", "lock_text_unlocked_layers": 2}, "lock_text_unlocked_layers=2 needs lock_text"),
    ({"init_checkpoint": "c.pt", "lock_image": True, "lock_image_unlocked_groups": -1}, "must be >= 0"),
    ({"init_checkpoint": "c.pt", "init_checkpoint_sha256": "abc"}, "64 lower-case hex"),
    ({"init_checkpoint_sha256": "0" * 64}, "init_checkpoint is empty"),
    ({"init_checkpoint": "c.pt", "finetune_lr": 0}, "finetune_lr must be > 0"),
])
def test_bad_fine_tuning_settings_are_clear_errors(settings, error):
    with pytest.raises(config.ConfigError, match=error):
        config.from_dict(TrainConfig, settings)


# --------------------------------------------------------------------------- loading

def test_initial_model_starts_equal_to_the_checkpoint_and_refuses_a_mismatch(tmp_path):
    from clip_model.checkpoint import save_model
    from clip_model.config import load_config
    from clip_model.model import CLIP, build_model
    from components.train.initial_model import initial_model

    torch.manual_seed(1)
    source = build_model("tiny")
    ckpt = save_openai_layout(source, tmp_path / "openai.pt")
    torch.manual_seed(2)  # a different random init, overwritten by the checkpoint
    model = initial_model(fine_tune_config(ckpt, init_checkpoint_sha256=sha256(ckpt)))
    expected = source.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())

    with pytest.raises(ValueError, match="sha256 .* expected 0{64}"):
        initial_model(fine_tune_config(ckpt, init_checkpoint_sha256="0" * 64))
    with pytest.raises(ValueError, match=r"openai.pt does not fit model_config 'tiny-rn'"):
        initial_model(fine_tune_config(ckpt, model_config="tiny-rn"))
    # one of our files carries its config: a model that differs where the weights cannot tell is refused
    other = load_config("tiny")
    other.quick_gelu = True
    save_model(tmp_path / "ours" / "model.pt", CLIP(other))
    with pytest.raises(ValueError, match=r"differ in \['quick_gelu'\]"):
        initial_model(fine_tune_config(tmp_path / "ours" / "model.pt"))
    with pytest.raises(FileNotFoundError):
        initial_model(fine_tune_config(tmp_path / "missing.pt"))


# --------------------------------------------------------------------------- locking

def _train_steps(model, steps: int = 3) -> None:
    from clip_model.loss import ClipLoss
    from components.train.optim import build_optimizer

    optimizer = build_optimizer(model, config.from_dict(TrainConfig, {"lr": 1e-2}).optim)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        tokens = torch.randint(1, 100, (8, 12), generator=g)
        tokens[:, -1] = model.vocab_size - 1  # the end token, the largest id
        images = torch.randn(8, 3, model.visual.image_size, model.visual.image_size, generator=g)
        loss = ClipLoss()(*model(images, tokens))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _tensors(model, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_locked_vit_towers_stay_bit_identical_and_unlocked_groups_train(tmp_path):
    from clip_model.model import build_model
    from components.train.initial_model import image_groups, initial_model, text_groups

    ckpt = save_openai_layout(build_model("tiny"), tmp_path / "tiny.pt")
    model = initial_model(fine_tune_config(ckpt, lock_image=True, lock_text=True, lock_text_unlocked_layers=1))
    assert len(image_groups(model)) == len(text_groups(model)) == 4  # stem, block 1, block 2 + LayerNorm, proj
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_projection", "logit_scale"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable

    partly = initial_model(fine_tune_config(ckpt, lock_image=True, lock_image_unlocked_groups=2))
    assert {n for n, p in partly.visual.named_parameters() if p.requires_grad} == \
        {"proj", "ln_post.weight", "ln_post.bias"} | {n for n, _ in partly.visual.named_parameters()
                                                      if n.startswith("transformer.resblocks.1.")}
    with pytest.raises(ValueError, match="lock_image_unlocked_groups=4 leaves all 4 groups"):
        initial_model(fine_tune_config(ckpt, lock_image=True, lock_image_unlocked_groups=4))


def test_locked_resnet_keeps_its_batchnorm_statistics(tmp_path):
    from clip_model.model import build_model
    from components.train.initial_model import image_groups, initial_model

    ckpt = save_openai_layout(build_model("tiny-rn"), tmp_path / "rn.pt")
    model = initial_model(fine_tune_config(ckpt, model_config="tiny-rn", lock_image=True, lock_image_unlocked_groups=1))
    assert len(image_groups(model)) == 6  # stem, layer1..layer4, attention pool
    visual = _tensors(model, "visual.")
    _train_steps(model)
    after = model.state_dict()
    frozen = [k for k in visual if not k.startswith("visual.attnpool.")]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(visual[k], after[k]) for k in frozen), "a locked ResNet changed (weights or BN stats)"
    assert not torch.equal(visual["visual.attnpool.c_proj.weight"], after["visual.attnpool.c_proj.weight"])


# --------------------------------------------------------------------------- the checkpoint's tokenizer

def test_tokenizer_setting_resolves_presets_files_and_checkpoints(tmp_path, trained_tiny):  # noqa: F811
    from clip_model.model import build_model
    from components.common.dataset import tokenizer_source
    from components.train.initial_model import check_dataset_tokenizer

    bare = save_openai_layout(build_model("tiny"), tmp_path / "bare" / "weights.pt")
    ours = tmp_path / "ours" / "model.pt"
    ours.parent.mkdir()
    shutil.copyfile(trained_tiny.model_uri, ours)
    shutil.copyfile(trained_tiny.tokenizer_uri, ours.parent / "tokenizer.json")
    assert tokenizer_source("openai") == "openai"
    assert tokenizer_source(trained_tiny.tokenizer_uri) == trained_tiny.tokenizer_uri
    assert tokenizer_source(str(ours)) == str(ours.parent / "tokenizer.json")  # the tokenizer beside it
    assert tokenizer_source(str(bare)) == "openai"  # OpenAI / OpenCLIP weights
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        tokenizer_source(str(tmp_path / "nothing.pt"))
    manifest = json.loads(Path(trained_tiny.manifest_uri).read_text())
    check_dataset_tokenizer(fine_tune_config(ours), manifest["tokenizer"])  # the same tokenizer: fine
    with pytest.raises(ValueError, match="shard with tokenizer="):
        check_dataset_tokenizer(fine_tune_config(bare), manifest["tokenizer"])


# --------------------------------------------------------------------------- through the pipeline's stages

def _artifact(path: Path, payload: dict | None = None) -> SimpleNamespace:
    if payload is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
    return SimpleNamespace(path=str(path), metadata={})


@pytest.fixture(scope="module")
def fine_tuned(trained_tiny, tmp_path_factory):  # noqa: F811
    """The trained tiny model saved in OpenAI's layout (its tokenizer.json beside it), then the shard and
    train steps as the pipeline runs them (image tower locked, default fine-tuning recipe), evaluate and
    export."""
    from clip_model.checkpoint import load_model
    from components.common.context import RunConfig, start_run
    from components.evaluate.config import EvalConfig
    from components.evaluate.stage import evaluate
    from components.export.config import ExportConfig
    from components.export.stage import export
    from components.shard.task import run as shard_step
    from components.train.task import run as train_step

    tmp = tmp_path_factory.mktemp("finetune")
    ckpt = save_openai_layout(load_model(trained_tiny.model_uri), tmp / "checkpoint" / "openai-tiny.pt")
    shutil.copyfile(trained_tiny.tokenizer_uri, ckpt.parent / "tokenizer.json")
    ctx = start_run(RunConfig(data_root=str(tmp / "data"), mlflow_tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                              mlflow_experiment="test-finetune"), "finetune-1")
    dataset = _artifact(tmp / "kfp" / "dataset.json")
    shard_step(ctx.to_json(), _artifact(tmp / "kfp" / "filtered.json", {"uri": str(trained_tiny.root / "filtered")}),
               dataset, samples_per_shard=256, vocab_size=4096, val_fraction=0.1, tokenizer="",
               init_checkpoint=str(ckpt))  # as the pipeline passes it: the checkpoint alone picks the tokenizer
    model = _artifact(tmp / "kfp" / "model.json")
    trained = train_step(ctx.to_json(), dataset, model, model_config="tiny", steps=4, batch_size=16, num_workers=1,
                         gpus_per_worker=0, launcher="local", init_checkpoint=str(ckpt), lock_image=True,
                         loader_workers=0, checkpoint_every=4, log_every=1, system_metrics=False)
    manifest_uri = json.loads(Path(dataset.path).read_text())["uri"]
    report = evaluate(trained["model_uri"], manifest_uri, str(tmp / "eval"),
                      EvalConfig(eval_suite=trained_tiny.eval_dir, templates="synthetic", num_threads=2),
                      ctx.tracking)
    exported = export(trained["model_uri"], trained["tokenizer"], str(tmp / "bundle"),
                      ExportConfig(register=False, num_threads=1), ctx.tracking)
    return SimpleNamespace(ckpt=ckpt, ctx=ctx, manifest_uri=manifest_uri, trained=trained, report=report,
                           exported=exported, tmp=tmp)


def test_fine_tuning_starts_from_the_checkpoint_and_keeps_the_locked_tower(fine_tuned):
    from clip_model.checkpoint import load_model, read_weights

    start, _ = read_weights(str(fine_tuned.ckpt))
    end = load_model(fine_tuned.trained["model_uri"]).state_dict()
    assert end.keys() == start.keys()
    image = [k for k in start if k.startswith("visual.")]
    text = [k for k in start if not k.startswith("visual.") and k != "logit_scale"]
    assert all(torch.equal(end[k], start[k]) for k in image), "the locked image tower changed"
    moved = max((end[k] - start[k]).abs().max().item() for k in text)
    # 4 AdamW steps at lr <= 1e-5 move a weight by at most ~4e-5: training started from the checkpoint
    assert 0 < moved < 1e-3, moved


def test_fine_tuning_run_records_the_checkpoint_and_uses_the_recipe(fine_tuned):
    import mlflow

    client = mlflow.MlflowClient(fine_tuned.ctx.tracking_uri)
    digest = sha256(fine_tuned.ckpt)
    parent = client.get_run(fine_tuned.ctx.parent_run_id).data.tags
    assert parent["lineage.init_checkpoint"] == str(fine_tuned.ckpt)
    assert parent["lineage.init_checkpoint_sha256"] == digest
    assert parent["lineage.tokenizer"] == str(fine_tuned.ckpt)
    assert parent["lineage.tokenizer_sha256"] == sha256(fine_tuned.ckpt.parent / "tokenizer.json")
    run = client.get_run(fine_tuned.trained["run_id"]).data
    assert run.params["init_checkpoint_sha256"] == digest and run.params["lock_image"] == "True"
    lrs = [m.value for m in client.get_metric_history(fine_tuned.trained["run_id"], "train/lr")]
    assert max(lrs) == pytest.approx(1e-5)  # finetune_lr, not the from-scratch 5e-4
    # the dataset carries the checkpoint's tokenizer; the model folder carries it too
    manifest = json.loads(Path(fine_tuned.manifest_uri).read_text())
    beside = (fine_tuned.ckpt.parent / "tokenizer.json").read_bytes()
    assert Path(manifest["tokenizer"]).read_bytes() == beside
    assert (Path(fine_tuned.trained["model_uri"]).parent / "tokenizer.json").read_bytes() == beside


def test_fine_tuned_model_classifies_zero_shot_in_torch_and_onnx(fine_tuned, trained_tiny):  # noqa: F811
    from PIL import Image

    from components.inference.onnx_clip import OnnxClip
    from components.synthetic.vocab import SYNTHETIC_CLASSNAMES, SYNTHETIC_TEMPLATES

    (dataset,) = [d for d in fine_tuned.report["datasets"] if d != "validation"]
    zs = fine_tuned.report["datasets"][dataset]["zeroshot"]
    assert fine_tuned.report["metrics"][f"{dataset}/zeroshot_top1"] >= 2.5 * zs["chance"], fine_tuned.report["metrics"]
    assert fine_tuned.exported["parity"]["passed"]
    onnx = OnnxClip(fine_tuned.exported["bundle_uri"])
    files = [(i, f) for i, name in enumerate(SYNTHETIC_CLASSNAMES)
             for f in sorted((Path(trained_tiny.eval_dir) / name).glob("*.png"))[:4]]
    predicted, _ = onnx.classify([Image.open(f) for _, f in files], list(SYNTHETIC_CLASSNAMES),
                                 list(SYNTHETIC_TEMPLATES))
    accuracy = sum(int(p) == i for p, (i, _) in zip(predicted, files)) / len(files)
    assert accuracy >= 2.5 / len(SYNTHETIC_CLASSNAMES), accuracy
