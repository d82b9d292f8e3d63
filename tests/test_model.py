"""The CLIP model: reference architectures, shapes, pooling, init, towers, checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip_model import CLIP, CLIPConfig, build_model, list_configs, load_config
from clip_model.model import AttentionPool2d, ModifiedResNet, QuickGELU, SelfAttention, VisionTransformer

torch.set_num_threads(1)

# sum(p.numel() for p in model.parameters()) of OpenAI's released models
OPENAI_PARAM_COUNTS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
}


def random_tokens(n: int, vocab: int, context: int = 77, seed: int = 0) -> torch.Tensor:
    """Token rows shaped like the tokenizer's: sot, words, eot (the largest id), then 0 padding."""
    g = torch.Generator().manual_seed(seed)
    sot, eot = vocab - 2, vocab - 1
    tokens = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, context - 2, (1,), generator=g))
        tokens[i, 0] = sot
        tokens[i, 1:length + 1] = torch.randint(1, vocab - 2, (length,), generator=g)
        tokens[i, length + 1] = eot
    return tokens


def test_package_exports_resolve():
    import clip_model

    for name in clip_model.__all__:
        assert getattr(clip_model, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        clip_model.nope


def test_bundled_configs():
    assert set(list_configs()) >= {"tiny", "tiny-rn", "RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14"}
    assert load_config("ViT-B/32") == load_config("ViT-B-32")
    with pytest.raises(ValueError, match="unknown model config 'ViT-Z-99'"):
        load_config("ViT-Z-99")


@pytest.mark.parametrize("name", sorted(OPENAI_PARAM_COUNTS))
def test_parameter_count_equals_openai(name):
    cfg = load_config(name)
    assert cfg.quick_gelu and cfg.text.vocab_size == 49408 and cfg.text.context_length == 77
    with torch.device("meta"):
        model = CLIP(cfg)
    assert sum(p.numel() for p in model.parameters()) == OPENAI_PARAM_COUNTS[name]
    assert isinstance(model.visual, ModifiedResNet if name.startswith("RN") else VisionTransformer)
    assert model.visual.image_size == 224


def test_config_dict_round_trip_and_validation():
    for name in list_configs():
        cfg = load_config(name)
        assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    d = load_config("tiny").to_dict()
    d["vision"]["patch"] = 16
    with pytest.raises(ValueError, match=r"model config vision\.patch: Unexpected keyword argument"):
        CLIPConfig.from_dict(d)
    d = load_config("tiny").to_dict()
    d["vision"]["image_size"] = 60
    with pytest.raises(ValueError, match="multiple of patch_size=16"):
        CLIPConfig.from_dict(d)


def test_forward_shapes_and_normalisation():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    cfg = model.config
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = random_tokens(3, cfg.text.vocab_size)
    with torch.no_grad():
        img, txt, scale = model(images, tokens)
        raw_img, raw_txt = model.encode_image(images), model.encode_text(tokens)
    assert img.shape == txt.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(img, F.normalize(raw_img, dim=-1))
    torch.testing.assert_close(txt, F.normalize(raw_txt, dim=-1))
    assert not torch.allclose(raw_img.norm(dim=-1), torch.ones(3))  # encode_* are unnormalised
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)


def test_text_is_causal_and_pooled_at_end_of_text():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    tokens = random_tokens(4, model.vocab_size, seed=1)
    eot = tokens.argmax(-1)
    after = tokens.clone()  # change everything after the end-of-text token
    before = tokens.clone()  # change one word before it
    for i, e in enumerate(eot.tolist()):
        after[i, e + 1:] = torch.randint(1, model.vocab_size - 2, (77 - e - 1,))
        before[i, e - 1] = (before[i, e - 1] % (model.vocab_size - 3)) + 1
    with torch.no_grad():
        base, same, changed = model.encode_text(tokens), model.encode_text(after), model.encode_text(before)
    torch.testing.assert_close(base, same)  # causal + read at eot: later tokens are invisible
    assert (base - changed).abs().amax(dim=-1).min() > 1e-4
    # shorter inputs than the context length work too (positions are sliced)
    with torch.no_grad():
        short = model.encode_text(tokens[:, : int(eot.max()) + 1])
    torch.testing.assert_close(short, base)


def test_bad_input_shapes_are_rejected():
    model = build_model("tiny")
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 64, 64\], got \[2, 3, 32, 32\]"):
        model.encode_image(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected tokens \[B, <= 77\]"):
        model.encode_text(torch.zeros(2, 80, dtype=torch.long))


def test_openai_state_dict_layout():
    keys = set(build_model("tiny").state_dict())
    for k in ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
              "visual.ln_pre.weight", "visual.transformer.resblocks.1.attn.in_proj_weight",
              "visual.transformer.resblocks.1.attn.in_proj_bias", "visual.transformer.resblocks.1.attn.out_proj.weight",
              "visual.transformer.resblocks.0.ln_1.bias", "visual.transformer.resblocks.0.mlp.c_fc.weight",
              "visual.transformer.resblocks.0.mlp.c_proj.bias", "visual.transformer.resblocks.0.ln_2.weight",
              "visual.ln_post.weight", "visual.proj", "token_embedding.weight", "positional_embedding",
              "transformer.resblocks.1.attn.in_proj_weight", "ln_final.weight", "text_projection", "logit_scale"]:
        assert k in keys, k
    assert not any("attn_mask" in k for k in keys)
    rn_keys = set(build_model("tiny-rn").state_dict())
    for k in ["visual.conv1.weight", "visual.conv3.weight", "visual.bn1.running_mean", "visual.bn3.weight",
              "visual.layer1.0.conv3.weight", "visual.layer1.0.bn3.bias", "visual.layer2.0.downsample.0.weight",
              "visual.layer4.0.downsample.1.running_var", "visual.attnpool.positional_embedding",
              "visual.attnpool.q_proj.weight", "visual.attnpool.k_proj.bias", "visual.attnpool.v_proj.weight",
              "visual.attnpool.c_proj.weight"]:
        assert k in rn_keys, k


def test_attention_computes_what_openai_weights_expect():
    """OpenAI's CLIP runs these weights through nn.MultiheadAttention (blocks) and
    F.multi_head_attention_forward with separate q/k/v weights (the ResNet attention pool)."""
    torch.manual_seed(0)
    attn = SelfAttention(64, 4)
    torch.nn.init.normal_(attn.in_proj_weight, std=0.1)
    torch.nn.init.normal_(attn.in_proj_bias, std=0.1)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    mha.load_state_dict(attn.state_dict())  # same names, same shapes
    x = torch.randn(2, 10, 64)
    causal_mask = torch.full((10, 10), float("-inf")).triu(1)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0])
        torch.testing.assert_close(attn(x, causal=True), mha(x, x, x, need_weights=False, attn_mask=causal_mask)[0])

    pool = AttentionPool2d(spatial_dim=3, embed_dim=64, heads=4, output_dim=32)
    fmap = torch.randn(2, 64, 3, 3)
    seq = fmap.flatten(2).permute(2, 0, 1)  # [HW, B, C]
    seq = torch.cat([seq.mean(dim=0, keepdim=True), seq], dim=0) + pool.positional_embedding[:, None, :]
    with torch.no_grad():
        ref, _ = F.multi_head_attention_forward(
            query=seq[:1], key=seq, value=seq, embed_dim_to_check=64, num_heads=4,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            need_weights=False)
        torch.testing.assert_close(pool(fmap), ref[0])


def test_init_follows_clip():
    torch.manual_seed(0)
    model = build_model("tiny")
    w, layers = model.config.text.width, model.config.text.layers
    block = model.transformer.resblocks[0]
    assert block.attn.in_proj_weight.std().item() == pytest.approx(w ** -0.5, rel=0.05)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(w ** -0.5 * (2 * layers) ** -0.5, rel=0.05)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx((2 * w) ** -0.5, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(w ** -0.5 * (2 * layers) ** -0.5, rel=0.05)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.text_projection.std().item() == pytest.approx(w ** -0.5, rel=0.05)
    vw = model.config.vision.width
    assert model.visual.proj.std().item() == pytest.approx(vw ** -0.5, rel=0.05)
    assert model.visual.class_embedding.std().item() == pytest.approx(vw ** -0.5, rel=0.3)
    rn = build_model("tiny-rn").visual
    assert all(block.bn3.weight.abs().sum() == 0 for stage in (rn.layer1, rn.layer4) for block in stage)
    assert rn.attnpool.q_proj.weight.std().item() == pytest.approx(rn.attnpool.c_proj.in_features ** -0.5, rel=0.05)


def test_quick_gelu_option():
    plain, quick = load_config("tiny"), load_config("tiny").replace(quick_gelu=True)
    assert not any(isinstance(m, QuickGELU) for m in CLIP(plain).modules())
    assert sum(isinstance(m, QuickGELU) for m in CLIP(quick).modules()) == 4  # 2 vision + 2 text blocks


def test_resnet_tower_forward_and_backward():
    torch.manual_seed(0)
    model = build_model("tiny-rn")
    images = torch.randn(4, 3, 64, 64)
    tokens = random_tokens(4, model.vocab_size)
    img, txt, scale = model(images, tokens)
    assert img.shape == txt.shape == (4, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    (scale * img @ txt.T).logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if n.startswith("visual.") and p.grad is None]
    assert not no_grad
    model.eval()
    with torch.no_grad():  # BatchNorm uses running stats in eval: batch composition does not matter
        torch.testing.assert_close(model.encode_image(images)[:2], model.encode_image(images[:2]))


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_grad_checkpointing_same_output_and_grads(name):
    torch.manual_seed(0)
    model = build_model(name).train()  # checkpointing is a training-mode feature
    images, tokens = torch.randn(2, 3, 64, 64), random_tokens(2, model.vocab_size)

    def run():
        model.zero_grad(set_to_none=True)
        img, txt, scale = model(images, tokens)
        (scale * img @ txt.T).logsumexp(-1).sum().backward()
        return img.detach(), txt.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls, block = [], model.transformer.resblocks[0]
    block_forward = block.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return block_forward(*args, **kwargs)

    block.forward = counting_forward
    ref = run()
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    assert model.config.grad_checkpointing and model.transformer.grad_checkpointing
    got = run()
    assert len(calls) == 3  # checkpointed: the block ran again during backward
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    assert got[2].keys() == ref[2].keys()
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-4, atol=1e-6, msg=n)
    assert CLIP(load_config(name).replace(grad_checkpointing=True)).transformer.grad_checkpointing
    model.eval()  # evaluation and export never recompute
    with torch.no_grad():
        model(images, tokens)
    model(images, tokens)[0].sum().backward()
    assert len(calls) == 5


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_bfloat16_autocast_matches_float32(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    images, tokens = torch.randn(2, 3, 64, 64), random_tokens(2, model.vocab_size)
    with torch.no_grad():
        ref = model(images, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(images, tokens)
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=2e-2)


def test_tiny_model_learns_a_batch():
    """A few AdamW steps of the contrastive loss on 8 fixed pairs drive the loss down."""
    torch.manual_seed(0)
    model = build_model("tiny")
    images, tokens = torch.randn(8, 3, 64, 64), random_tokens(8, model.vocab_size, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = torch.arange(8)
    losses = []
    for _ in range(15):
        img, txt, scale = model(images, tokens)
        logits = scale * img @ txt.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5  # about ln(8) at init
    assert losses[-1] < 0.5 * losses[0], losses
