"""ONNX export: bundle layout, parity with PyTorch, registry entries, and the torch-free CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.common.dataset import load_tokenizer
from components.common.tracking import TrackingConfig
from components.export.config import ExportConfig
from components.inference.onnx_clip import BUNDLE_FILES, OnnxClip, preprocess_image
from components.export.registry import fetch_bundle
from components.export.stage import ParityError, check_parity, export
from components.export.view import markdown
from tests.fixtures_model import trained_tiny  # noqa: F401  (session fixture)



@pytest.fixture(scope="module")
def exported(trained_tiny, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("export")
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment="test-export")
    result = export(trained_tiny.model_uri, trained_tiny.tokenizer_uri, str(tmp / "bundle"),
                    ExportConfig(registered_model_name="clip-test", num_threads=1), tracking,
                    dataset_content_hash=trained_tiny.content_hash, training_run_id="train-run-42")
    return result, tracking, tmp


def test_bundle_layout_opset_and_dynamic_batch(exported):
    import onnx

    result, _, tmp = exported
    bundle = tmp / "bundle"
    assert all((bundle / f).is_file() for f in BUNDLE_FILES)
    pre = json.loads((bundle / "preprocess.json").read_text())
    assert pre["image_size"] == 64 and pre["context_length"] == 77 and pre["resize_mode"] == "shortest"
    assert len(pre["mean"]) == 3 and len(pre["std"]) == 3 and 1.0 <= pre["logit_scale"] <= 100.0
    for name, inp in (("image_encoder", "pixel_values"), ("text_encoder", "input_ids")):
        model = onnx.load(str(bundle / f"{name}.onnx"))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        (graph_input,) = model.graph.input
        assert graph_input.name == inp and graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_parity_with_pytorch(exported):
    result, _, _ = exported
    parity = result["parity"]
    assert parity["passed"]
    for part in ("image", "image_batch1", "text", "image_pipeline", "text_pipeline"):
        assert parity[part]["max_abs"] <= 1e-4 and parity[part]["min_cosine"] >= 0.9999, parity


def test_parity_failure_raises_with_numbers(exported, trained_tiny):  # noqa: F811
    from clip_model.checkpoint import load_model

    _, _, tmp = exported
    model = load_model(trained_tiny.model_uri)
    tokenizer = load_tokenizer(trained_tiny.tokenizer_uri)
    with pytest.raises(ParityError, match=r"max abs diff [0-9.e-]+ > 0"):
        check_parity(model, tokenizer, tmp / "bundle", ExportConfig(parity_max_abs=0.0, parity_num_images=2))
    # a model that is not the exported one fails the cosine check
    model.visual.proj.data.mul_(-1)
    with pytest.raises(ParityError, match=r"image: min cosine -?[0-9.]+ < 0.9999"):
        check_parity(model, tokenizer, tmp / "bundle", ExportConfig(parity_max_abs=None, parity_num_images=2))


def test_one_registered_clip_with_lineage_and_headline(exported, trained_tiny, tmp_path):  # noqa: F811
    import mlflow

    result, tracking, tmp = exported
    mlflow.set_tracking_uri(tracking.tracking_uri)
    client = mlflow.MlflowClient()
    assert [m.name for m in client.search_registered_models()] == ["clip-test"], "one registered model"
    mv = client.get_model_version("clip-test", result["registered_model_version"])
    assert mv.tags["training_run_id"] == "train-run-42"
    assert mv.tags["dataset_content_hash"] == trained_tiny.content_hash
    assert mv.tags["export_run_id"] == result["run_id"] and mv.tags["bundle_uri"] == str(tmp / "bundle")
    assert "image_embedding" in mv.description and trained_tiny.content_hash[:12] in mv.description
    assert f"{result['parity']['image']['max_abs']:.1e}" in mv.description
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["stage"] == "export" and run.data.metrics["parity_text_max_abs"] <= 1e-4
    raw = {f.path for f in client.list_artifacts(result["run_id"], "onnx")}
    assert raw == {f"onnx/{f}" for f in BUNDLE_FILES}, "the raw ONNX files stay as artifacts"
    info = mlflow.models.get_model_info(f"models:/clip-test/{result['registered_model_version']}")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "text"]
    assert info.saved_input_example_info is not None
    # the registry alone is enough to rebuild a working bundle
    rebuilt = fetch_bundle(result["registered_model_name"], result["registered_model_version"], tmp_path / "rebuilt")
    texts = ["a red circle", "two blue squares"]
    assert np.allclose(OnnxClip(rebuilt).encode_texts(texts), OnnxClip(tmp / "bundle").encode_texts(texts), atol=1e-6)


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_pyfunc_embeds_images_texts_or_both(exported, trained_tiny):  # noqa: F811
    import mlflow
    import pandas as pd

    result, tracking, tmp = exported
    mlflow.set_tracking_uri(tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/clip-test/{result['registered_model_version']}")
    bundle = OnnxClip(tmp / "bundle")
    image = Image.open(Path(trained_tiny.eval_dir) / "red" / "0000.png")
    out = model.predict(pd.DataFrame({"image": [_png(image), None, _png(image)],
                                      "text": ["a red circle", "a blue square", None]}))
    assert list(out.columns) == ["image_embedding", "text_embedding"] and len(out) == 3
    ref_image = bundle.encode_images([image])[0]
    assert np.allclose(out["image_embedding"][0], ref_image, atol=1e-5) and out["image_embedding"][1] is None
    assert np.allclose(out["text_embedding"][1], bundle.encode_texts(["a blue square"])[0], atol=1e-5)
    assert out["text_embedding"][2] is None
    assert abs(np.linalg.norm(out["text_embedding"][0]) - 1) < 1e-5, "normalised"
    texts_only = model.predict(pd.DataFrame({"text": ["a red circle"]}))
    assert texts_only["image_embedding"][0] is None
    with pytest.raises(Exception, match="row 0: 'image' is not a readable image"):
        model.predict(pd.DataFrame({"image": [b"not an image"], "text": ["x"]}))


def test_mlflow_models_serve_answers_with_the_bundles_embeddings(exported, trained_tiny, tmp_path):  # noqa: F811
    """`mlflow models serve -m models:/<name>/<version>` (the registered version, this environment) on
    127.0.0.1: an image and a text posted as JSON come back as the bundle's embeddings."""
    import base64
    import signal
    import time

    import requests

    from tests.net_helpers import free_port

    result, tracking, tmp = exported
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri, "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # uvicorn
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                 f"models:/clip-test/{result['registered_model_version']}", "--env-manager", "local",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow models serve did not answer in 120 s:\n{log.read_text()[-3000:]}")
        image_path = Path(trained_tiny.eval_dir) / "green" / "0001.png"
        payload = {"dataframe_records": [{"image": base64.b64encode(image_path.read_bytes()).decode(),
                                          "text": "a photo of a green shape"}]}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert answer.status_code == 200, answer.text
        (row,) = answer.json()["predictions"]
        bundle = OnnxClip(tmp / "bundle")
        assert np.allclose(row["image_embedding"], bundle.encode_images([Image.open(image_path)])[0], atol=1e-5)
        assert np.allclose(row["text_embedding"], bundle.encode_texts(["a photo of a green shape"])[0], atol=1e-5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (120, 70, 4), dtype=np.uint8), mode="RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L")
    return [rgb, rgba, grey, rgb.resize((300, 200)), rgb.convert("P")]


def test_numpy_preprocessing_matches_clip_model_transforms(exported):
    from clip_model.transforms import image_transform

    _, _, tmp = exported
    cfg = json.loads((tmp / "bundle" / "preprocess.json").read_text())
    transform = image_transform(cfg["image_size"], train=False)
    for im in _odd_images():
        ours = preprocess_image(im, cfg)
        ref = transform(im).numpy()
        assert ours.shape == ref.shape == (3, 64, 64) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() < 1e-5, im.mode


# Started before anything else in the serving process (sitecustomize): importing any of these fails.
HEAVY = ("torch", "boto3", "botocore", "scipy", "ray", "mlflow")
BLOCKER = f"""import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is blocked: clipflow zeroshot must not import it")
sys.meta_path.insert(0, _Block())
"""


def run_zeroshot(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`clipflow zeroshot ARGS` (the console script users run) in a process where heavy imports fail."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return subprocess.run([str(Path(sys.executable).parent / "clipflow"), "zeroshot", *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH"))))})


def test_cli_without_torch_matches_pytorch_zero_shot(exported, trained_tiny, tmp_path):  # noqa: F811
    import torch

    from clip_model.checkpoint import load_model
    from clip_model.transforms import image_transform
    from clip_model.zeroshot import zeroshot_classifier, zeroshot_logits
    from components.synthetic.vocab import SYNTHETIC_TEMPLATES

    _, _, tmp = exported
    classes = ["red", "green", "blue", "yellow", "purple", "orange"]
    paths = [str(Path(trained_tiny.eval_dir) / c / f"{i:04d}.png") for c in classes for i in range(2)]
    proc = run_zeroshot(["--bundle", str(tmp / "bundle"), "--classes", ",".join(classes), "--templates", "synthetic",
                         "--json", *paths], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    onnx_pred = [r["index"] for r in out["results"]]
    onnx_prob = np.array([r["top"][0]["prob"] for r in out["results"]])

    model = load_model(trained_tiny.model_uri)
    tokenizer = load_tokenizer(trained_tiny.tokenizer_uri)
    transform = image_transform(model.visual.image_size, train=False)
    with torch.no_grad():
        weights = zeroshot_classifier(model, tokenizer, classes, SYNTHETIC_TEMPLATES)
        feats = model.encode_image(torch.stack([transform(Image.open(p)) for p in paths]))
        probs = (model.logit_scale.exp() / 100 * zeroshot_logits(feats, weights)).softmax(dim=1).numpy()
    assert onnx_pred == probs.argmax(axis=1).tolist()
    assert np.allclose(onnx_prob, probs.max(axis=1), atol=1e-4)
    assert sum(p == i // 2 for i, p in enumerate(onnx_pred)) >= 6  # and the tiny model is mostly right

    # plain-text output and a clear error for a missing bundle
    proc = run_zeroshot(["--bundle", str(tmp_path), "--classes", "a,b", paths[0]], tmp_path)
    assert proc.returncode != 0 and "missing ['image_encoder.onnx'" in proc.stderr


def test_the_import_blocker_blocks(tmp_path):
    """The serving test above proves something only if a heavy import really fails in its process."""
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    for module in HEAVY:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(site)})
        assert proc.returncode != 0 and "is blocked: clipflow zeroshot must not import it" in proc.stderr, module


def test_resnet_tower_to_s3_without_registering(trained_tiny, tmp_path, bucket):  # noqa: F811
    """The modified-ResNet tower (BatchNorm) exports with parity; the bundle can live on S3."""
    import torch

    from clip_model.checkpoint import save_model
    from clip_model.model import build_model
    from components.common import storage

    torch.manual_seed(0)
    model = build_model("tiny-rn").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so train-mode BN would differ from eval
        for m in model.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    save_model(tmp_path / "rn.pt", model)
    tokenizer_uri = f"s3://{bucket}/tok/tokenizer.json"
    storage.upload_file(trained_tiny.tokenizer_uri, tokenizer_uri)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test-export-rn")
    result = export(str(tmp_path / "rn.pt"), tokenizer_uri, f"s3://{bucket}/bundle",
                    ExportConfig(register=False, parity_num_images=3, num_threads=1), tracking)
    assert result["parity"]["passed"] and result["registered_model_version"] is None
    assert all(storage.exists(f"s3://{bucket}/bundle/{f}") for f in BUNDLE_FILES)
    storage.download_dir(f"s3://{bucket}/bundle", str(tmp_path / "local"))
    clip = OnnxClip(tmp_path / "local")
    img = Image.new("RGB", (80, 64), (200, 30, 30))
    from clip_model.transforms import image_transform

    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(image_transform(64, False)(img)[None]), dim=-1)
    assert np.abs(clip.encode_images([img]) - ref.numpy()).max() < 1e-4


def test_cli_reads_a_bundle_from_s3(exported, trained_tiny, bucket, tmp_path):  # noqa: F811
    """`clipflow zeroshot --bundle s3://...` (what the closing summary prints for an s3:// data root)."""
    from components.common import storage

    _, _, tmp = exported
    storage.upload_dir(str(tmp / "bundle"), f"s3://{bucket}/run/export")
    image = str(Path(trained_tiny.eval_dir) / "blue" / "0000.png")
    args = ["--classes", "red,green,blue", "--templates", "synthetic", "--json", image]
    local = run_zeroshot(["--bundle", str(tmp / "bundle"), *args], tmp_path)
    remote = subprocess.run([str(Path(sys.executable).parent / "clipflow"), "zeroshot", "--bundle",
                             f"s3://{bucket}/run/export", *args], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert json.loads(remote.stdout)["results"] == json.loads(local.stdout)["results"]
    missing = subprocess.run([str(Path(sys.executable).parent / "clipflow"), "zeroshot", "--bundle",
                              f"s3://{bucket}/nothing-here", *args], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and f"ONNX bundle s3://{bucket}/nothing-here: missing image_encoder.onnx" in missing.stderr


# --------------------------------------------------------------------------- promotion by alias

def _pipeline_run(model_uri: str, tokenizer_uri: str, uri: str, out: Path) -> dict:
    """One pipeline run's evaluate and export stages under a parent run: a real evaluation (the synthetic
    suite, small) and a real export registered as `clip-gate`."""
    import mlflow

    from components.evaluate.config import EvalConfig
    from components.evaluate.stage import evaluate

    TrackingConfig(uri, "test-promotion").apply()
    with mlflow.start_run(run_name="pipeline", tags={"stage": "pipeline"}) as parent:
        pass
    tracking = TrackingConfig(uri, "test-promotion", parent.info.run_id)
    report = evaluate(model_uri, None, str(out / "eval"), EvalConfig(eval_suite="synthetic", synthetic_per_class=4,
                                                                       linear_probe=False, num_threads=1), tracking)
    result = export(model_uri, tokenizer_uri, str(out / "bundle"),
                    ExportConfig(registered_model_name="clip-gate", num_threads=1, parity_num_images=2,
                                 promotion_min_delta=0.0), tracking, training_run_id="")
    return {"figure": report["metrics"]["mean/zeroshot_top1"], **result}


def test_promotion_takes_champion_only_when_at_least_as_good(trained_tiny, tmp_path):  # noqa: F811
    """Worse (an untrained CLIP, seed 0), better (the trained one), worse again: the first version takes
    `champion`, the better one takes it over, the worse one after it stays `candidate`."""
    import shutil

    import mlflow
    import pandas as pd
    import torch

    from clip_model.checkpoint import save_model
    from clip_model.model import build_model

    torch.manual_seed(0)
    untrained = tmp_path / "untrained"
    save_model(untrained / "model.pt", build_model("tiny"))
    shutil.copyfile(trained_tiny.tokenizer_uri, untrained / "tokenizer.json")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = [_pipeline_run(str(m), trained_tiny.tokenizer_uri, uri, tmp_path / f"run{i}")
            for i, m in enumerate((untrained / "model.pt", trained_tiny.model_uri, untrained / "model.pt"))]
    worse, better, worse_again = runs
    assert better["figure"] > worse["figure"], "the seeded order: trained beats untrained"
    assert worse_again["figure"] == worse["figure"], "the same model on the same suite scores the same"
    assert [r["registered_model_version"] for r in runs] == ["1", "2", "3"]
    assert [r["promotion"]["alias"] for r in runs] == ["champion", "champion", "candidate"]
    assert "no champion to compare with" in worse["promotion"]["reason"]
    assert (better["promotion"]["champion_version"], better["promotion"]["champion_value"]) == ("1", worse["figure"])
    assert worse_again["promotion"]["value"] == worse["figure"] and worse_again["promotion"]["champion_version"] == "2"

    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("clip-gate", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("clip-gate", "candidate").version) == "3"
    for result in (better, worse_again):  # the decision and both figures, in the description and the report
        description = client.get_model_version("clip-gate", result["registered_model_version"]).description
        figures = f"{result['figure']:.4f} vs {result['promotion']['champion_value']:.4f} of champion v"
        assert figures in description and result["promotion"]["reason"] in description
        report = markdown(result)
        assert "## Promotion" in report and f"{result['figure']:.4f}" in report
        assert f"{result['promotion']['champion_value']:.4f}" in report
    assert "worse than the champion" in worse_again["promotion"]["reason"]
    assert "models:/clip-gate@champion" in markdown(better) and "models:/clip-gate@candidate" in markdown(worse_again)

    # the alias serves: the pyfunc (what `mlflow models serve -m models:/clip-gate@champion` loads) and the CLI
    texts = ["a red circle", "two blue squares"]
    served = mlflow.pyfunc.load_model("models:/clip-gate@champion").predict(pd.DataFrame({"text": texts}))
    expected = OnnxClip(tmp_path / "run1" / "bundle").encode_texts(texts)
    assert np.allclose(np.stack(served["text_embedding"].to_list()), expected, atol=1e-5)
    image = str(Path(trained_tiny.eval_dir) / "red" / "0000.png")
    answers = []
    for where in (["--model", "models:/clip-gate@champion"], ["--bundle", str(tmp_path / "run1" / "bundle")]):
        proc = subprocess.run([str(Path(sys.executable).parent / "clipflow"), "zeroshot", *where, "--classes",
                               "red,green,blue", "--json", image], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers.append(json.loads(proc.stdout)["results"])
    assert answers[0] == answers[1], "the champion alias gives the better run's bundle"
    proc = subprocess.run([str(Path(sys.executable).parent / "clipflow"), "zeroshot", "--model",
                           "models:/clip-gate@nobody", "--classes", "a,b", image], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode != 0 and "models:/clip-gate@nobody" in proc.stderr
