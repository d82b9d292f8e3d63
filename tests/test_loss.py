"""ClipLoss: value at init, symmetry, gradients, and 2-process (gloo) equivalence with one process."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_model.loss import ClipLoss

torch.set_num_threads(1)

FEATURES_IN, EMBED_DIM, BATCH = 12, 8, 16


def test_loss_at_init_is_log_batch():
    # Random unit vectors in high dimension are nearly orthogonal: with logit scale 1 all logits are
    # ~0, so both cross-entropies are ~ln(B).
    gen = torch.Generator().manual_seed(0)
    for batch in (8, 64):
        images = F.normalize(torch.randn(batch, 512, generator=gen), dim=-1)
        texts = F.normalize(torch.randn(batch, 512, generator=gen), dim=-1)
        loss = ClipLoss()(images, texts, torch.tensor(1.0))
        assert loss.item() == pytest.approx(math.log(batch), abs=0.05)


def test_perfect_alignment_gives_low_loss():
    images = F.normalize(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert ClipLoss()(images, images, torch.tensor(100.0)).item() < 1e-3


def test_symmetric_in_images_and_texts():
    gen = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(10, 16, generator=gen), dim=-1)
    texts = F.normalize(torch.randn(10, 16, generator=gen), dim=-1)
    loss_fn = ClipLoss()
    scale = torch.tensor(14.3)
    assert loss_fn(images, texts, scale).item() == pytest.approx(loss_fn(texts, images, scale).item(), rel=1e-6)
    # and equal to the explicit mean of both cross-entropies
    logits = scale * images @ texts.T
    labels = torch.arange(10)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert loss_fn(images, texts, scale).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_reaches_logit_scale_and_features():
    gen = torch.Generator().manual_seed(3)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    images = torch.randn(6, 16, generator=gen, requires_grad=True)
    texts = torch.randn(6, 16, generator=gen, requires_grad=True)
    loss = ClipLoss()(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), logit_scale.exp())
    loss.backward()
    assert logit_scale.grad is not None and logit_scale.grad.abs().item() > 0
    assert images.grad is not None and images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0


def test_labels_are_cached_per_device_and_batch_size():
    loss_fn = ClipLoss()
    a = loss_fn.labels(torch.device("cpu"), 4)
    assert a is loss_fn.labels(torch.device("cpu"), 4)
    assert torch.equal(loss_fn.labels(torch.device("cpu"), 4, offset=4), torch.arange(4, 8))
    assert loss_fn.labels(torch.device("cpu"), 5) is not a
    uncached = ClipLoss(cache_labels=False)
    assert uncached.labels(torch.device("cpu"), 4) is not uncached.labels(torch.device("cpu"), 4)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same B and D"):
        ClipLoss()(torch.zeros(4, 8), torch.zeros(5, 8), torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# Distributed equivalence: 2 processes with half a batch each == 1 process with the whole batch
# ---------------------------------------------------------------------------------------------
class TinyTowers(nn.Module):
    """Two small towers and a logit scale: enough to check where gradients go."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(FEATURES_IN, 16), nn.Tanh(), nn.Linear(16, EMBED_DIM))
        self.text = nn.Sequential(nn.Linear(FEATURES_IN, 16), nn.Tanh(), nn.Linear(16, EMBED_DIM))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_image, x_text):
        return (F.normalize(self.image(x_image), dim=-1), F.normalize(self.text(x_text), dim=-1),
                self.logit_scale.exp())


def make_model_and_batch() -> tuple[TinyTowers, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1234)
    model = TinyTowers().double()
    gen = torch.Generator().manual_seed(99)
    x_image = torch.randn(BATCH, FEATURES_IN, generator=gen, dtype=torch.float64)
    x_text = x_image @ torch.randn(FEATURES_IN, FEATURES_IN, generator=gen, dtype=torch.float64) \
        + 0.5 * torch.randn(BATCH, FEATURES_IN, generator=gen, dtype=torch.float64)
    return model, x_image, x_text


def loss_and_grads(model: TinyTowers, x_image, x_text, loss_fn: ClipLoss):
    model.zero_grad()
    loss = loss_fn(*model(x_image, x_text))
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, settings: list[tuple[bool, bool]]):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, x_image, x_text = make_model_and_batch()
        rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        results = {}
        for local_loss, gather_with_grad in settings:
            loss, grads = loss_and_grads(model, x_image[rows], x_text[rows],
                                         ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad))
            # What DDP does: average the gradients over ranks. Report the mean loss over ranks too.
            for grad in grads.values():
                dist.all_reduce(grad)
                grad /= world_size
            dist.all_reduce(loss)
            results[(local_loss, gather_with_grad)] = (loss / world_size, grads)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_two_ranks(tmp_path, settings):
    import torch.multiprocessing as mp

    # spawn, not fork: a child forked from a process whose OpenMP threads have run can hang in its
    # first parallel region (seen after the training tests); spawning costs a torch import per child
    mp.start_processes(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), settings),
                       nprocs=2, join=True, start_method="spawn")
    return torch.load(tmp_path / "results.pt", weights_only=False)


def test_two_process_loss_and_gradients_equal_single_process(tmp_path):
    settings = [(True, True), (False, True), (True, False)]
    distributed = _spawn_two_ranks(tmp_path, settings)

    model, x_image, x_text = make_model_and_batch()
    single_loss, single_grads = loss_and_grads(model, x_image, x_text, ClipLoss())
    assert single_loss.item() > 0.1  # a real, non-trivial loss

    for local_loss, gather_with_grad in settings:
        loss, grads = distributed[(local_loss, gather_with_grad)]
        what = f"local_loss={local_loss}, gather_with_grad={gather_with_grad}"
        # The loss value is exact whatever the gather mode.
        assert loss.item() == pytest.approx(single_loss.item(), abs=1e-10), what
        if not gather_with_grad:
            # Gathered copies carry no gradient: gradients are only an approximation...
            assert any(not torch.allclose(grads[n], single_grads[n], atol=1e-6) for n in grads), what
            continue
        # ...with a differentiable gather they are exactly the single-process gradients.
        assert grads.keys() == single_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, single_grads[name], atol=1e-9, rtol=1e-7, msg=f"{what}: {name}")


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches of B contrast against all k*B samples, like one batch of k*B
# ---------------------------------------------------------------------------------------------
MICRO, ACCUM = 3, 4  # micro-batch size and micro-batches per step, per process


def _clip_and_batch(rows: int):
    """The tiny CLIP in float64 and `rows` image/token pairs (deterministic)."""
    from clip_model.model import build_model

    torch.manual_seed(7)
    model = build_model("tiny").double()
    gen = torch.Generator().manual_seed(8)
    images = torch.randn(rows, 3, 64, 64, generator=gen, dtype=torch.float64)
    tokens = torch.randint(1, 8000, (rows, 20), generator=gen)
    tokens[:, 11], tokens[:, 12:] = 8191, 0  # end of text (the largest id), then padding
    return model, images, tokens


def _accumulated_loss_and_grads(model, images, tokens, accum: int):
    """Loss and gradients of TrainStep's forward/backward over `accum` equal micro-batches."""
    from components.train.train_step import TrainStep

    model.zero_grad(set_to_none=True)
    step = TrainStep(model, None, None, torch.amp.GradScaler("cpu", enabled=False), "fp32", torch.device("cpu"),
                     grad_accum=accum)
    micro = list(zip(images.chunk(accum), tokens.chunk(accum)))
    loss = step.backward(micro)
    raw = model.module if hasattr(model, "module") else model
    return loss, {name: p.grad.detach().clone() for name, p in raw.named_parameters()}


def _accum_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, images, tokens = _clip_and_batch(world_size * ACCUM * MICRO)
        rows = slice(rank * ACCUM * MICRO, (rank + 1) * ACCUM * MICRO)  # rank r holds rows r*kB:(r+1)*kB
        # DDP: no gradient sync in the first k-1 backward passes, the mean over ranks in the last one
        ddp = DistributedDataParallel(model)
        loss, grads = _accumulated_loss_and_grads(ddp, images[rows], tokens[rows], ACCUM)
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / world_size, "grads": grads}, os.path.join(out_dir, "accum.pt"))
    finally:
        dist.destroy_process_group()


def test_accumulated_micro_batches_equal_one_large_batch():
    model, images, tokens = _clip_and_batch(ACCUM * MICRO)
    big_loss, big_grads = _accumulated_loss_and_grads(model, images, tokens, 1)
    assert big_loss.item() > 1.0  # ln(12) ~ 2.5 at init: a real loss over 12 negatives
    loss, grads = _accumulated_loss_and_grads(model, images, tokens, ACCUM)
    assert abs(loss.item() - big_loss.item()) <= 1e-6
    assert grads.keys() == big_grads.keys()
    for name, grad in grads.items():
        assert (grad - big_grads[name]).abs().max().item() <= 1e-6, name
    # each micro-batch on its own (what plain accumulation did) is a different objective: only B negatives
    alone = sum(_accumulated_loss_and_grads(model, i, t, 1)[0] for i, t in zip(images.chunk(ACCUM), tokens.chunk(ACCUM)))
    assert abs(alone.item() / ACCUM - big_loss.item()) > 0.1


def test_accumulation_across_two_processes_equals_one_large_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_accum_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")  # not fork: see _spawn_two_ranks
    distributed = torch.load(tmp_path / "accum.pt", weights_only=False)

    model, images, tokens = _clip_and_batch(2 * ACCUM * MICRO)
    big_loss, big_grads = _accumulated_loss_and_grads(model, images, tokens, 1)
    assert abs(distributed["loss"].item() - big_loss.item()) <= 1e-6
    assert distributed["grads"].keys() == big_grads.keys()
    for name, grad in distributed["grads"].items():
        assert (grad - big_grads[name]).abs().max().item() <= 1e-6, name
