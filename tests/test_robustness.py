"""The robustness report, the few-shot crossing and multi-caption retrieval, checked against numbers computed by
hand. A stand-in encoder whose image feature is the image's colour makes every prediction known in advance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clip_model.image_ops import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from clip_model.zeroshot import retrieval_metrics
from components.evaluate.config import EvalConfig
from components.evaluate.plan import plan_suite
from components.evaluate.stage import evaluate_planned
from components.evaluate.suite import load_suite
from components.evaluate.tables import robustness_table
from components.evaluate.tasks import caption_retrieval, shots_matching_zero_shot

CLASSES = ["red", "green", "blue"]


class ColourCLIP(torch.nn.Module):
    """Image feature = the image's mean colour in [-0.5, 0.5]^3; the text feature of a prompt = the unit axis
    of the class it names (red = x, green = y, blue = z). So zero-shot picks an image's strongest channel.
    Counts its image-encoder calls."""

    context_length = 8
    vocab_size = 3

    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.image_size = 8
        self.image_batches: list[int] = []

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.image_batches.append(int(pixels.shape[0]))
        mean, std = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
        return (pixels.mean(dim=(2, 3)) * std + mean) - 0.5

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.eye(3)[tokens[:, 0]]


def colour_tokenizer(texts: list[str], context_length: int | None = None) -> torch.Tensor:
    return torch.tensor([[next(i for i, c in enumerate(CLASSES) if c in t)] for t in texts])


def _folder(root, images: dict[str, list[tuple[int, int, int]]]) -> None:
    for label, colours in images.items():
        (root / label).mkdir(parents=True)
        for i, rgb in enumerate(colours):
            Image.new("RGB", (8, 8), rgb).save(root / label / f"{i}.png")
    (root / "classnames.txt").write_text("\n".join(images) + "\n")


# The reference: tight clusters; its "blue" images are cyan-blue, so the probe learns a blue region that
# takes in strong green. Zero-shot reads the strongest channel.
REFERENCE = {"red": [(230, 20, 20), (240, 30, 10), (220, 10, 30), (250, 25, 25)],
             "green": [(20, 230, 20), (30, 240, 10), (10, 220, 30), (25, 250, 25)],
             "blue": [(20, 160, 240), (30, 170, 230), (10, 150, 250), (25, 165, 245)]}
# The shifted set, image by image:            zero-shot (strongest channel)   probe (nearest reference cluster)
SHIFTED = {"red": [(255, 0, 0),              # red    right                       red    right
                   (120, 10, 10)],           # red    right                       red    right
           "green": [(0, 255, 0),            # green  right                       green  right
                     (30, 200, 190),         # green  right (200 > 190)           blue   wrong (cyan-blue cluster)
                     (35, 205, 185)],        # green  right                       blue   wrong
           "blue": [(30, 215, 205)]}         # green  wrong (215 > 205)           blue   right
# A shift with only two of the classes (like ImageNet-R's 200 of 1000): answers are among red and green only.
SUBSET = {"red": [(250, 10, 10)],            # red    right                       red    right
          "green": [(30, 200, 190)]}         # green  right                       green  right (blue is not allowed)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    _folder(root / "ref", REFERENCE)
    _folder(root / "shifted", SHIFTED)
    _folder(root / "subset", SUBSET)
    doc = {"defaults": {"templates": ["a photo of a {}."]},
           "datasets": [{"name": "ref", "uri": "ref"},
                        {"name": "ref-shifted", "uri": "shifted", "shift_of": "ref", "tasks": ["zeroshot"]},
                        {"name": "ref-subset", "uri": "subset", "shift_of": "ref", "tasks": ["zeroshot"]}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(doc))
    cfg = EvalConfig(eval_batch_size=5, probe_shots=(1,), probe_c_grid=(1.0,))
    planned = plan_suite(load_suite(str(root / "suite.yaml")), cfg, {}, {})
    model = ColourCLIP()
    return evaluate_planned(model, colour_tokenizer, planned, cfg), model


def test_robustness_numbers_match_the_hand_computed_ones(outcome):
    out, _ = outcome
    entry = out.robustness["ref"]
    rows = {r["dataset"]: r for r in entry["rows"]}
    assert entry["reference"] == entry["probe_fitted_on"] == "ref" and list(rows) == ["ref", "ref-shifted", "ref-subset"]
    # reference: its probe test split (2 of the 4 images per class); both methods get all 6 right
    assert rows["ref"]["n"] == 6 and rows["ref"]["zeroshot_top1"] == 1.0 and rows["ref"]["linear_probe_top1"] == 1.0
    # shifted: zero-shot 5/6 right, the probe 4/6 (see SHIFTED)
    assert rows["ref-shifted"]["n"] == 6
    assert rows["ref-shifted"]["zeroshot_top1"] == pytest.approx(5 / 6)
    assert rows["ref-shifted"]["linear_probe_top1"] == pytest.approx(4 / 6)
    assert rows["ref-shifted"]["zeroshot_drop"] == pytest.approx(1 / 6)
    assert rows["ref-shifted"]["linear_probe_drop"] == pytest.approx(2 / 6)
    # subset of classes: both 2/2, no drop
    assert (rows["ref-subset"]["zeroshot_top1"], rows["ref-subset"]["linear_probe_top1"]) == (1.0, 1.0)
    assert rows["ref-subset"]["zeroshot_drop"] == rows["ref-subset"]["linear_probe_drop"] == 0.0
    assert entry["mean"] == pytest.approx({"zeroshot_top1": (5 / 6 + 1) / 2, "zeroshot_drop": (1 / 6) / 2,
                                           "linear_probe_top1": (4 / 6 + 1) / 2, "linear_probe_drop": (2 / 6) / 2})
    header, table = robustness_table(entry)
    assert header[2:4] == ["zero-shot", "linear probe"]
    assert table[1] == ["ref-shifted", "6", "0.833", "0.667", "0.167", "0.333"]
    assert table[-1][0] == "mean over 2 shifted sets"
    # the shifted sets' own zero-shot results are the same numbers
    assert out.datasets["ref-shifted"]["zeroshot"]["top1"] == pytest.approx(5 / 6)


def test_each_image_is_encoded_once(outcome):
    out, model = outcome
    sizes = [len(v) for d in (REFERENCE, SHIFTED, SUBSET) for v in d.values()]
    per_set = [12, 6, 2]
    assert sum(sizes) == sum(per_set) == sum(model.image_batches)
    # batches of 5 per dataset, never shared across datasets: 12 -> 5 5 2, 6 -> 5 1, 2 -> 2
    assert model.image_batches == [5, 5, 2, 5, 1, 2]
    assert [out.datasets[n]["n"] for n in ("ref", "ref-shifted", "ref-subset")] == per_set


def test_shots_matching_zero_shot_by_hand():
    settings = {"1shot": {"top1": 0.5, "shots": 1, "n_train": 10}, "2shot": {"top1": 0.6, "shots": 2, "n_train": 20},
                "4shot": {"top1": 0.8, "shots": 4, "n_train": 40}, "full": {"top1": 0.9, "shots": None, "n_train": 80}}
    # 0.7 is halfway from 0.6 (2 shots) to 0.8 (4 shots): 2 ** (1 + 0.5) shots
    assert shots_matching_zero_shot(settings, 0.7, 10) == {"shots": pytest.approx(2 ** 1.5), "relation": "matches"}
    assert shots_matching_zero_shot(settings, 0.85, 10) == {"shots": pytest.approx(2 ** 2.5), "relation": "matches"}
    assert shots_matching_zero_shot(settings, 0.4, 10) == {"shots": 1.0, "relation": "below"}
    assert shots_matching_zero_shot(settings, 0.95, 10) == {"shots": None, "relation": "above"}


def test_caption_retrieval_by_hand_and_against_paired_metrics():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # captions 0 -> image 0; 1 and 2 -> image 1; caption 1 sits closer to image 0 than to its own
    texts = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    m = caption_retrieval(images, texts, np.array([0, 1, 1]))
    assert m["text_to_image_R@1"] == pytest.approx(2 / 3) and m["text_to_image_mean_rank"] == pytest.approx(4 / 3)
    assert m["text_to_image_median_rank"] == 1.0
    assert m["image_to_text_R@1"] == 1.0  # image 1's best caption (2) is ranked first
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(40, 8, generator=g), dim=-1)
    paired = caption_retrieval(img, txt, np.arange(40))
    expected = retrieval_metrics(img, txt)
    assert paired == pytest.approx(expected)
    assert not math.isclose(paired["text_to_image_R@1"], 1.0)
