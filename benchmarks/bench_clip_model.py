"""Training-step speed and memory of the CLIP model, with ratios against baselines run here.

    python benchmarks/bench_clip_model.py --config ViT-B-32 --batch 256      # on a GPU
    python benchmarks/bench_clip_model.py --config tiny --batch 32 --steps 3 # on a CPU

Compared in the same run, same model and batch:
  * causal text attention through ``is_causal=True`` (ours; lets fused flash kernels run) versus an
    explicit additive mask (OpenAI's way): text-tower forward+backward time;
  * a full training step in float32 versus bfloat16 autocast (CUDA only);
  * gradient checkpointing off versus on: step time and peak memory (CUDA only for memory).
Nothing is asserted; numbers are printed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clip_model import build_model
from clip_model import model as model_mod


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fake_batch(model, batch, device):
    s = model.visual.image_size
    images = torch.randn(batch, 3, s, s, device=device)
    tokens = torch.randint(1, model.vocab_size - 1, (batch, model.context_length), device=device)
    lengths = torch.randint(5, model.context_length, (batch,), device=device)
    pos = torch.arange(model.context_length, device=device)
    tokens = torch.where(pos[None] < lengths[:, None], tokens, 0)
    tokens[torch.arange(batch, device=device), lengths] = model.vocab_size - 1  # eot: the largest id
    return images, tokens


def timed(fn, device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def train_step_fn(model, opt, images, tokens, dtype):
    labels = torch.arange(images.shape[0], device=images.device)

    def step():
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            img, txt, scale = model(images, tokens)
            logits = scale * img @ txt.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def explicit_mask_attention(self, x, causal=False):
    """The baseline: OpenAI's additive -inf mask instead of is_causal."""
    B, L, C = x.shape
    q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
    mask = torch.full((L, L), float("-inf"), device=x.device, dtype=q.dtype).triu_(1) if causal else None
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.out_proj(x.transpose(1, 2).reshape(B, L, C))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    fast = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
          f"torch={torch.__version__} config={args.config} batch={args.batch} steps={args.steps}")

    if device.type == "cuda":  # same weights, same inputs: the GPU computes what the CPU does
        for name in ("tiny", "tiny-rn"):
            cpu_model = build_model(name).eval()
            x, t = fake_batch(cpu_model, 4, torch.device("cpu"))
            with torch.no_grad():
                ref = cpu_model(x, t)
                got = cpu_model.to(device)(x.to(device), t.to(device))
            diff = max((a.cpu() - b).abs().max().item() for a, b in zip(got, ref))
            print(f"{name}: cuda vs cpu max abs diff of forward outputs {diff:.2e}")

    torch.manual_seed(0)
    model = build_model(args.config).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images, tokens = fake_batch(model, args.batch, device)

    # 1. causal attention: is_causal (ours) vs explicit mask (baseline), text tower fwd+bwd
    def text_fwd_bwd():
        with torch.autocast(device.type, dtype=fast, enabled=fast != torch.float32):
            model.encode_text(tokens).float().pow(2).mean().backward()
    ours = timed(text_fwd_bwd, device, args.steps)
    original = model_mod.SelfAttention.forward
    model_mod.SelfAttention.forward = explicit_mask_attention
    try:
        base = timed(text_fwd_bwd, device, args.steps)
    finally:
        model_mod.SelfAttention.forward = original
    print(f"text fwd+bwd ({fast}): explicit mask {base * 1e3:.1f} ms, is_causal {ours * 1e3:.1f} ms, "
          f"speedup x{base / ours:.2f}")

    # 2. full training step: float32 vs bf16 autocast; 3. grad checkpointing off vs on
    results = {}
    runs = [("fp32", torch.float32, False), ("bf16", fast, False), ("bf16+ckpt", fast, True)]
    if device.type == "cpu":
        runs = [("fp32", torch.float32, False), ("fp32+ckpt", torch.float32, True)]
    for label, dtype, ckpt in runs:
        model.set_grad_checkpointing(ckpt)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = timed(train_step_fn(model, opt, images, tokens, dtype), device, args.steps)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[label] = (t, mem)
        print(f"train step {label:10s}: {t * 1e3:8.1f} ms  {args.batch / t:8.0f} pairs/s  peak {mem:.2f} GiB")
    model.set_grad_checkpointing(False)
    if "bf16" in results:
        print(f"bf16 autocast vs fp32: speedup x{results['fp32'][0] / results['bf16'][0]:.2f}")
    if device.type == "cuda":
        t0, m0 = results["bf16"]
        t1, m1 = results["bf16+ckpt"]
        print(f"grad checkpointing: time x{t1 / t0:.2f}, peak memory x{m1 / m0:.2f}")


if __name__ == "__main__":
    main()
