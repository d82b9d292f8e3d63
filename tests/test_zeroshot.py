"""Zero-shot classifier, top-k accuracy, retrieval metrics, templates and class names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_model import templates
from clip_model.tokenizer import ClipTokenizer
from clip_model.zeroshot import accuracy, fill_template, retrieval_metrics, zeroshot_classifier, zeroshot_logits

torch.set_num_threads(1)

CLASSES = ["dog", "cat", "kettle", "bicycle", "mountain", "violin"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "a drawing of a {}.", "itap of my {}."]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    corpus = [fill_template(t, c) for t in templates.IMAGENET_TEMPLATES for c in CLASSES] * 3
    return ClipTokenizer.train(corpus, vocab_size=600, min_frequency=1)


class BagOfTokens(nn.Module):
    """A fake text encoder: the sum of fixed random vectors of the (non-special) tokens."""

    def __init__(self, tokenizer: ClipTokenizer, dim: int = 128):
        super().__init__()
        self.tokenizer = tokenizer
        self.embedding = nn.Embedding(tokenizer.vocab_size, dim)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(tokenizer.vocab_size, dim, generator=torch.Generator().manual_seed(0)))
        self.calls: list[int] = []

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls.append(tokens.shape[0])
        keep = (tokens != 0) & (tokens < self.tokenizer.sot_token_id)
        return (self.embedding(tokens) * keep.unsqueeze(-1)).sum(dim=1)


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings(tokenizer):
    model = BagOfTokens(tokenizer).train()
    weights = zeroshot_classifier(model, tokenizer, CLASSES, TEMPLATES, batch_size=5)
    assert weights.shape == (128, len(CLASSES))
    assert torch.allclose(weights.norm(dim=0), torch.ones(len(CLASSES)), atol=1e-6)
    assert model.training, "the model's training mode is restored"
    assert max(model.calls) <= 5 and sum(model.calls) == len(CLASSES) * len(TEMPLATES)
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            prompts = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            expected = F.normalize(F.normalize(prompts, dim=-1).mean(0), dim=0)
            assert torch.allclose(weights[:, c], expected, atol=1e-6)
    # one big batch gives the same weights
    assert torch.allclose(zeroshot_classifier(model, tokenizer, CLASSES, TEMPLATES, batch_size=1000), weights, atol=1e-6)


def test_zeroshot_picks_the_class_whose_name_the_image_matches(tokenizer):
    model = BagOfTokens(tokenizer)
    weights = zeroshot_classifier(model, tokenizer, CLASSES, templates.IMAGENET_TEMPLATES)
    # "Images" whose features are the embedding of a caption naming one class, in a new phrasing.
    targets = torch.tensor([4, 0, 2, 5, 1, 3, 0, 2])
    with torch.no_grad():
        image_features = model.encode_text(tokenizer([f"a photo of the {CLASSES[t]}" for t in targets]))
    logits = zeroshot_logits(image_features, weights)
    assert logits.shape == (len(targets), len(CLASSES))
    assert torch.equal(logits.argmax(dim=1), targets)
    top1, top5 = accuracy(logits, targets)
    assert top1 == 1.0 and top5 == 1.0


def test_zeroshot_with_the_tiny_clip(tokenizer):
    from clip_model.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny")
    assert tokenizer.vocab_size <= model.token_embedding.num_embeddings
    weights = zeroshot_classifier(model, tokenizer, CLASSES, TEMPLATES)
    assert weights.shape == (model.config.embed_dim, len(CLASSES))
    assert torch.allclose(weights.norm(dim=0), torch.ones(len(CLASSES)), atol=1e-5)
    images = torch.randn(3, 3, model.visual.image_size, model.visual.image_size)
    with torch.no_grad():
        logits = zeroshot_logits(model.encode_image(images), weights)
    assert logits.shape == (3, len(CLASSES)) and torch.isfinite(logits).all()


def test_bad_templates_and_empty_inputs(tokenizer):
    model = BagOfTokens(tokenizer)
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot_classifier(model, tokenizer, CLASSES, ["no placeholder here"])
    with pytest.raises(ValueError, match="no class names"):
        zeroshot_classifier(model, tokenizer, [], TEMPLATES)
    assert fill_template(lambda c: f"itap of {c}", "dog") == "itap of dog"


def test_accuracy_top_k_and_fewer_classes_than_k():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],   # target 1: top-1
                           [0.5, 0.1, 0.9, 0.2, 0.3, 0.4],   # target 0: 2nd
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.0]])  # target 5: last
    targets = torch.tensor([1, 0, 5])
    assert accuracy(logits, targets, topk=(1, 2, 5)) == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    three_classes = torch.tensor([[0.1, 0.5, 0.2], [0.9, 0.0, 0.1]])
    assert accuracy(three_classes, torch.tensor([2, 2]), topk=(1, 5)) == [0.0, 1.0]
    with pytest.raises(ValueError, match="logits"):
        accuracy(logits, torch.tensor([1, 0]))


def test_retrieval_identity_is_perfect():
    features = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    metrics = retrieval_metrics(features, features * 3.0)  # scale does not matter
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert metrics[f"{direction}_R@{k}"] == 1.0
        assert metrics[f"{direction}_mean_rank"] == 1.0 and metrics[f"{direction}_median_rank"] == 1.0


def _arc(angles: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    points = torch.zeros(len(angles), rotation.shape[0], dtype=torch.float64)
    points[:, 0], points[:, 1] = torch.cos(angles), torch.sin(angles)
    return points @ rotation


def test_retrieval_known_ranks():
    # 20 images on a quarter circle at angles i*d; text i at (i + 5.3)*d. Text j is closer to image i
    # than text i exactly when i-10 <= j <= i-1, so image i ranks its text 1 + min(i, 10); by
    # symmetry text j ranks its image 1 + min(19 - j, 10). Ranks: 1..10 once each, then 11 ten times.
    n, step = 20, (math.pi / 2) / 25
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    index = torch.arange(n, dtype=torch.float64)
    images, texts = _arc(index * step, rotation), _arc((index + 5.3) * step, rotation)
    metrics = retrieval_metrics(images, texts)
    for direction in ("image_to_text", "text_to_image"):
        assert metrics[f"{direction}_R@1"] == pytest.approx(1 / 20)
        assert metrics[f"{direction}_R@5"] == pytest.approx(5 / 20)
        assert metrics[f"{direction}_R@10"] == pytest.approx(10 / 20)
        assert metrics[f"{direction}_mean_rank"] == pytest.approx((55 + 110) / 20)
        assert metrics[f"{direction}_median_rank"] == pytest.approx(10.5)


def test_retrieval_matches_a_brute_force_reference():
    gen = torch.Generator().manual_seed(2)
    images, texts = torch.randn(300, 12, generator=gen), torch.randn(300, 12, generator=gen)
    texts[:100] = images[:100] + 0.3 * texts[:100]  # some real matches
    metrics = retrieval_metrics(images, texts)
    scores = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    for name, s in (("image_to_text", scores), ("text_to_image", scores.T)):
        order = s.argsort(dim=1, descending=True)
        ranks = (order == torch.arange(300).unsqueeze(1)).nonzero()[:, 1].double() + 1
        for k in (1, 5, 10):
            assert metrics[f"{name}_R@{k}"] == pytest.approx((ranks <= k).double().mean().item())
        assert metrics[f"{name}_mean_rank"] == pytest.approx(ranks.mean().item())
        middle = ranks.sort().values[149:151]  # an even count: the mean of the two middle ranks
        assert metrics[f"{name}_median_rank"] == pytest.approx(middle.mean().item())
    with pytest.raises(ValueError, match="paired"):
        retrieval_metrics(images, texts[:10])


def test_template_sets_and_class_names():
    assert len(templates.IMAGENET_TEMPLATES) == 80 and len(set(templates.IMAGENET_TEMPLATES)) == 80
    assert len(templates.CIFAR_TEMPLATES) == 18 and len(set(templates.CIFAR_TEMPLATES)) == 18
    assert len(templates.SIMPLE_TEMPLATES) >= 3
    for template in (*templates.IMAGENET_TEMPLATES, *templates.CIFAR_TEMPLATES, *templates.SIMPLE_TEMPLATES):
        assert template.count("{}") == 1
    assert templates.get_templates("imagenet") == list(templates.IMAGENET_TEMPLATES)
    assert templates.get_templates("CIFAR") == list(templates.CIFAR_TEMPLATES)
    assert templates.get_templates("cifar-100") == list(templates.CIFAR_TEMPLATES)
    assert templates.get_templates("simple") == list(templates.SIMPLE_TEMPLATES)
    with pytest.raises(ValueError, match="unknown template set"):
        templates.get_templates("mnist")

    names = templates.IMAGENET_CLASSNAMES
    assert len(names) == 1000 and len(set(names)) == 1000
    assert all(name == name.strip() and name for name in names)
    assert (names[0], names[1], names[207], names[999]) == ("tench", "goldfish", "Golden Retriever", "toilet paper")
    assert (names[657], names[744], names[836], names[837]) == ("missile", "projectile", "sunglass", "sunglasses")
    assert len(templates.CIFAR10_CLASSNAMES) == 10 and templates.CIFAR10_CLASSNAMES[0] == "airplane"
    assert len(set(templates.CIFAR100_CLASSNAMES)) == 100 and templates.CIFAR100_CLASSNAMES[-1] == "worm"
    assert templates.get_classnames("cifar100") == list(templates.CIFAR100_CLASSNAMES)
