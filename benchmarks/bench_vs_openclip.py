"""Our training step against OpenCLIP's, in one process, alternating rounds.

    /work/venv-openclip/bin/python benchmarks/bench_vs_openclip.py [--model ViT-B-32] [--batch 16]
        [--device cpu|cuda] [--precision fp32|bf16] [--rounds 3] [--steps 2] [--compile]

open_clip_torch is a benchmark-only extra, never a dependency of the project: run this with a Python
that has it (on CPU here: a separate venv with torch 2.14.1 + torchvision 0.29.1 + open_clip_torch
3.3.0; the project itself comes from the working tree, PYTHONPATH or this file's parent).

Like for like:
- the same model: OpenCLIP's `ViT-B-32-quickgelu` (or, for another of our ViT configs such as `tiny`,
  an OpenCLIP config built from ours), randomly initialised by OpenCLIP, and its weights loaded into
  our CLIP with `clip_model.checkpoint.load_model` (strict); the first step's losses are compared;
- the same batch (random normalised images and token rows, already on the device), precision
  (autocast dtype), loss (CLIP's symmetric InfoNCE; theirs `open_clip.ClipLoss`, ours `ClipLoss`),
  optimiser (AdamW, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on matrices, gradient clipping at 1.0,
  the same lr) and logit-scale clamp;
- theirs is OpenCLIP's training step as `open_clip_train.train.train_one_epoch` runs it (the cosine
  schedule, autocast, `model(images, texts)` -> dict, loss, backward, clip, `optimizer.step()`, clamp)
  with the AdamW `open_clip_train.main` builds (torch's default implementation); ours is
  `components.train.train_step.TrainStep` with `components.train.optim.build_optimizer` (fused AdamW).
- `--compile`: ours compiles each residual block (regional), theirs `torch.compile(model)` (what
  OpenCLIP's `--torchcompile` does).

Rounds alternate which side goes first; each side's median samples/s, the ratio ours / OpenCLIP of
the medians and the median of the rounds' ratios are printed, and on CPU the same ratio by the CPU
seconds this process spent (robust where other processes share the cores) (goals: >= 1.0 on CPU, >= 1.2 on one H100 in bf16 at batch 512).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LR, BETAS, EPS, WD, CLIP_NORM = 5e-4, (0.9, 0.98), 1e-6, 0.2, 1.0


def openclip_model(name: str, device):
    """OpenCLIP's model for one of our ViT config names (ViT-B-32 -> its ViT-B-32-quickgelu)."""
    import open_clip

    from clip_model.config import load_config

    if name in ("ViT-B-32", "ViT-B/32"):
        return open_clip.create_model("ViT-B-32-quickgelu", device=device, output_dict=True)
    cfg = load_config(name)
    if cfg.vision.is_resnet:
        raise SystemExit(f"--model {name}: only ViT configs are compared")
    v, t = cfg.vision, cfg.text
    oc = {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu,
          "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                         "patch_size": v.patch_size, "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio},
          "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                       "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}}
    bench_name = f"bench-{name}"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{bench_name}.json"
        path.write_text(json.dumps(oc))
        open_clip.add_model_config(path)
    return open_clip.create_model(bench_name, device=device, output_dict=True)


class OpenClipStep:
    """OpenCLIP's training step (open_clip_train.train.train_one_epoch, accum_freq 1, no scaler), with
    the cosine schedule of open_clip_train.scheduler."""

    def __init__(self, model, precision: str, device):
        import torch
        from open_clip import ClipLoss
        from open_clip_train.scheduler import cosine_lr

        self.model, self.device = model, device
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": WD}],
            lr=LR, betas=BETAS, eps=EPS)
        self.scheduler, self.steps = cosine_lr(self.optimizer, LR, 0, 10 ** 6), 0
        self.loss = ClipLoss()
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else nullcontext())

    def step(self, batches):
        import torch

        self.scheduler(self.steps)
        self.steps += 1
        images, texts = next(batches)
        self.optimizer.zero_grad()
        with self.autocast:
            out = self.model(images, texts)
            losses = self.loss(**out, output_dict=True)
            total = sum(losses.values())
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return total.detach()


def our_step(model, precision: str, device, compile: bool):
    import torch

    from components.common import config
    from components.train.config import OptimConfig
    from components.train.optim import build_optimizer, build_scheduler
    from components.train.train_step import TrainStep

    ocfg = config.from_dict(OptimConfig, {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD,
                                          "grad_clip": CLIP_NORM, "warmup_steps": 0})
    opt = build_optimizer(model, ocfg)
    return TrainStep(model, opt, build_scheduler(opt, ocfg, 10 ** 6), torch.amp.GradScaler(device.type, enabled=False),
                     precision, device, grad_accum=1, grad_clip=CLIP_NORM, compile=compile)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, batches, steps: int, batch: int, device) -> tuple[float, float]:
    """(samples/s by the wall clock, samples per CPU second of this process)."""
    sync(device)
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = fn(batches)
    sync(device)
    elapsed, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    loss = loss[0] if isinstance(loss, tuple) else loss
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"loss is {float(loss)}")
    return steps * batch / elapsed, steps * batch / cpu_s


def compare(model: str = "ViT-B-32", batch: int = 16, steps: int = 2, warmup: int = 1, rounds: int = 3,
            device: str = "cpu", precision: str | None = None, threads: int | None = None,
            compile: bool = False) -> dict:
    """Both training steps side by side; prints each round and returns the medians and ratios."""
    import open_clip
    import torch

    from clip_model.checkpoint import load_model
    from clip_model.config import load_config

    dev = torch.device(device)
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    if threads:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    theirs = openclip_model(model, dev).train()
    weights = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    ours = load_model(weights, quick_gelu=load_config(model).quick_gelu).to(dev).train()

    s, ctx, vocab = ours.visual.image_size, ours.context_length, ours.vocab_size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, s, s, generator=g).to(dev)
    tokens = torch.randint(1, vocab - 2, (batch, ctx), generator=g)
    tokens[:, 0], tokens[:, 20], tokens[:, 21:] = vocab - 2, vocab - 1, 0  # start, end (the largest id), padding
    tokens = tokens.to(dev)

    def forever():
        while True:
            yield images, tokens

    with torch.no_grad():  # like for like: the same weights give the same features
        a, b, _ = ours(images[:4], tokens[:4])
        out = theirs(images[:4], tokens[:4])
    same = max((a - out["image_features"]).abs().max().item(), (b - out["text_features"]).abs().max().item())
    mine = our_step(ours, precision, dev, compile)
    other = OpenClipStep(torch.compile(theirs) if compile else theirs, precision, dev)
    first_ours, first_theirs = mine.step(forever())[0].item(), other.step(forever()).item()
    print(f"{model} on {dev} ({torch.get_num_threads()} threads), {precision}, batch {batch}"
          f"{', compiled' if compile else ''}, torch {torch.__version__}, open_clip {open_clip.__version__}")
    print(f"same weights: features differ by at most {same:.2e}; first-step loss ours {first_ours:.5f}, "
          f"OpenCLIP {first_theirs:.5f}", flush=True)
    for _ in range(warmup - 1):
        mine.step(forever())
        other.step(forever())

    rates: dict[str, list[float]] = {"ours": [], "openclip": []}
    cpu_rates: dict[str, list[float]] = {"ours": [], "openclip": []}
    sides = {"ours": lambda it: mine.step(it), "openclip": lambda it: other.step(it)}
    for r in range(rounds):
        order = ["ours", "openclip"] if r % 2 == 0 else ["openclip", "ours"]
        for side in order:
            wall, cpu = timed(sides[side], forever(), steps, batch, dev)
            rates[side].append(wall)
            cpu_rates[side].append(cpu)
        print(f"  round {r + 1}: ours {rates['ours'][-1]:.2f} samples/s, OpenCLIP {rates['openclip'][-1]:.2f} samples/s",
              flush=True)
    ours_rate, theirs_rate = statistics.median(rates["ours"]), statistics.median(rates["openclip"])
    paired = statistics.median(a / b for a, b in zip(rates["ours"], rates["openclip"]))
    goal = "1.2 on GPU" if dev.type == "cuda" else "1.0 on CPU"
    print(f"median samples/s: ours {ours_rate:.2f}, OpenCLIP {theirs_rate:.2f}; ratio ours / OpenCLIP = "
          f"{ours_rate / theirs_rate:.2f} (median of the rounds' ratios {paired:.2f}; goal >= {goal})", flush=True)
    out = {"ours": ours_rate, "openclip": theirs_rate, "ratio": ours_rate / theirs_rate, "paired_ratio": paired,
           "feature_diff": same, "first_loss": (first_ours, first_theirs)}
    if dev.type == "cpu":  # a shared CPU makes the wall clock noisy; CPU seconds of this process are not
        cpu_ratio = statistics.median(cpu_rates["ours"]) / statistics.median(cpu_rates["openclip"])
        print(f"by CPU time: ours {statistics.median(cpu_rates['ours']):.2f}, OpenCLIP "
              f"{statistics.median(cpu_rates['openclip']):.2f} samples per CPU second; ratio {cpu_ratio:.2f}", flush=True)
        out["cpu_time_ratio"] = cpu_ratio
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32", help="ViT-B-32 (OpenCLIP's ViT-B-32-quickgelu) or another ViT config")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    compare(args.model, args.batch, args.steps, args.warmup, args.rounds, args.device, args.precision,
            args.threads, args.compile)


if __name__ == "__main__":
    main()
