"""Our eager CLIP against open_clip's (an independent implementation of the same architecture).

Both load one random state_dict in the official OpenAI key layout; equal features prove that our
module wiring, key names and hyper-parameter inference match what the official checkpoints expect.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from open_clip.model import build_model_from_openai_state_dict, convert_weights_to_lp

from clip.model import CLIP, CLIPLoadError, build_model, convert_weights, infer_hyperparameters

# Small but complete: ResNet with a 2-block stage (a block with and one without a shortcut conv),
# ViT and text towers with 2 heads (the official rule gives one head per 64 channels).
TINY_RESNET: dict[str, Any] = dict(
    embed_dim=64, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16, vision_patch_size=None,
    context_length=16, vocab_size=100, transformer_width=64, transformer_heads=1, transformer_layers=2)
TINY_VIT: dict[str, Any] = dict(
    embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
    context_length=16, vocab_size=100, transformer_width=128, transformer_heads=2, transformer_layers=2)
TOWERS = pytest.mark.parametrize("hp", [TINY_RESNET, TINY_VIT], ids=["resnet", "vit"])

# Keys spelled out in the official checkpoints (facts, independent of both implementations).
OFFICIAL_RESNET_KEYS = {
    "visual.conv1.weight", "visual.bn3.running_var", "visual.layer1.0.downsample.0.weight",
    "visual.layer1.0.downsample.1.num_batches_tracked", "visual.layer2.1.conv3.weight",
    "visual.attnpool.positional_embedding", "visual.attnpool.q_proj.weight", "visual.attnpool.c_proj.bias",
}
OFFICIAL_VIT_KEYS = {
    "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight", "visual.proj",
    "visual.transformer.resblocks.1.attn.in_proj_weight", "visual.transformer.resblocks.0.mlp.c_fc.bias",
    "visual.ln_post.bias",
}
OFFICIAL_TEXT_KEYS = {
    "token_embedding.weight", "positional_embedding", "text_projection", "logit_scale", "ln_final.weight",
    "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.1.ln_2.bias",
    "transformer.resblocks.1.mlp.c_proj.weight",
}


def make_openai_state_dict(hp: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
                           ) -> dict[str, torch.Tensor]:
    """Random weights in the official key layout for the CLIP hyper-parameters ``hp``.

    Our constructor's random init, with every vector (norm weights, biases, BatchNorm statistics)
    moved off its trivial value (1, 0, zero mean, unit variance), so a mis-wired norm or bias changes
    the outputs instead of hiding behind an identity.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state_dict = {}
        for key, value in CLIP(**hp).state_dict().items():
            if value.is_floating_point() and value.dim() <= 1:
                noise = 0.2 * torch.randn_like(value)
                value = value + (noise.abs() if key.endswith("running_var") else noise)
            state_dict[key] = value.to(dtype) if value.is_floating_point() else value.clone()
    return state_dict


def open_clip_model(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """open_clip's model for an OpenAI state_dict, in full fp32 (its builder rounds weights to fp16)."""
    model = build_model_from_openai_state_dict(dict(state_dict), cast_dtype=torch.float32).float()
    model.load_state_dict(state_dict)
    return model.eval()


def example_inputs(hp: dict[str, Any], batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and token rows whose end-of-text (largest id) sits at different positions."""
    generator = torch.Generator().manual_seed(1)
    size = hp["image_resolution"]
    images = torch.randn(batch, 3, size, size, generator=generator)
    text = torch.randint(1, hp["vocab_size"] - 1, (batch, hp["context_length"]), generator=generator)
    for row in range(batch):
        end = 2 + 3 * row
        text[row, end] = hp["vocab_size"] - 1
        text[row, end + 1:] = 0
    return images, text


@TOWERS
def test_infers_every_hyperparameter(hp: dict[str, Any]) -> None:
    assert infer_hyperparameters(make_openai_state_dict(hp)) == hp


@TOWERS
def test_key_layout_is_the_official_one(hp: dict[str, Any]) -> None:
    ours = make_openai_state_dict(hp)
    oracle = open_clip_model(ours).state_dict()
    assert set(ours) == set(oracle)
    assert all(ours[key].shape == oracle[key].shape for key in ours)
    vision_keys = OFFICIAL_RESNET_KEYS if isinstance(hp["vision_layers"], tuple) else OFFICIAL_VIT_KEYS
    assert vision_keys | OFFICIAL_TEXT_KEYS <= set(ours)


@TOWERS
def test_features_match_open_clip(hp: dict[str, Any]) -> None:
    state_dict = make_openai_state_dict(hp)
    ours, oracle = build_model(state_dict), open_clip_model(state_dict)
    images, text = example_inputs(hp)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), oracle.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(text), oracle.encode_text(text), rtol=1e-5, atol=1e-5)
        logits_per_image, logits_per_text = ours(images, text)
        image_features, text_features, scale = oracle(images, text)
    expected = scale * image_features @ text_features.t()
    torch.testing.assert_close(logits_per_image, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits_per_text, expected.t(), rtol=1e-5, atol=1e-4)
    assert logits_per_image.shape == (images.shape[0], text.shape[0])


def test_modules_take_openais_sequence_first_layout() -> None:
    """Scripts written for OpenAI's modules feed ``visual.transformer`` and each text block (L, N, width) by
    hand (for patch tokens or intermediate layers); done so, they must get what encode_* computes."""
    model = build_model(make_openai_state_dict(TINY_VIT))
    images, text = example_inputs(TINY_VIT)
    visual = model.visual
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # (N, patches, width)
        x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.transformer(visual.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        torch.testing.assert_close(visual.ln_post(x[:, 0]) @ visual.proj, model.encode_image(images))
        x = (model.token_embedding(text) + model.positional_embedding).permute(1, 0, 2)
        for block in model.transformer.resblocks:  # each block carries its causal mask
            x = block(x)
        x = model.ln_final(x.permute(1, 0, 2))[torch.arange(len(text)), text.argmax(-1)]
        torch.testing.assert_close(x @ model.text_projection, model.encode_text(text))


def test_text_features_are_causal_and_read_at_end_of_text() -> None:
    model = build_model(make_openai_state_dict(TINY_VIT))
    _, text = example_inputs(TINY_VIT)
    changed = text.clone()
    changed[:, -1] = 7  # after every end-of-text token: must not matter
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(changed), model.encode_text(text))
        changed[0, 0] = 8  # before the end-of-text token of row 0: must matter for row 0 only
        features, reference = model.encode_text(changed), model.encode_text(text)
    assert not torch.allclose(features[0], reference[0])
    torch.testing.assert_close(features[1:], reference[1:])


def test_build_model_gives_fp32_eval_model_from_fp16_official_file() -> None:
    state_dict = make_openai_state_dict(TINY_RESNET, dtype=torch.float16)
    state_dict.update(input_resolution=torch.tensor(64), context_length=torch.tensor(16),
                      vocab_size=torch.tensor(100))  # scalars stored in OpenAI's archives
    model = build_model(state_dict)
    assert not model.training and model.dtype == torch.float32
    assert model.visual.input_resolution == 64 and model.visual.output_dim == 64
    assert model.context_length == 16 and model.vocab_size == 100
    torch.testing.assert_close(model.text_projection.detach(), state_dict["text_projection"].float())
    assert math.isclose(model.logit_scale.item(), state_dict["logit_scale"].item(), rel_tol=1e-6)


@pytest.mark.parametrize("tamper, named_key", [
    (lambda sd: sd.pop("transformer.resblocks.1.ln_2.bias"), "transformer.resblocks.1.ln_2.bias"),
    (lambda sd: sd.update({"visual.extra.weight": torch.zeros(1)}), "visual.extra.weight"),
    (lambda sd: sd.pop("ln_final.weight"), "ln_final.weight"),
    (lambda sd: sd.update({"visual.ln_pre.weight": torch.ones(3)}), "visual.ln_pre.weight"),
], ids=["missing", "unexpected", "missing-shape-source", "wrong-shape"])
def test_build_model_names_bad_keys(tamper: Any, named_key: str) -> None:
    state_dict = make_openai_state_dict(TINY_VIT)
    tamper(state_dict)
    with pytest.raises(CLIPLoadError, match=named_key.replace(".", r"\.")):
        build_model(state_dict)


def test_build_model_rejects_other_state_dicts() -> None:
    with pytest.raises(CLIPLoadError, match=r"not an OpenAI CLIP state_dict.*weight"):
        build_model(torch.nn.Linear(3, 4).state_dict())


def test_constructor_rejects_impossible_towers() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        CLIP(**{**TINY_VIT, "vision_width": 96})
    with pytest.raises(ValueError, match="4 stage depths"):
        CLIP(**{**TINY_RESNET, "vision_layers": (1, 1, 1)})
    with pytest.raises(ValueError, match="heads=1"):  # 128 channels imply 2 heads: 1 would not reload as 1
        CLIP(**{**TINY_VIT, "transformer_heads": 1})
    with pytest.raises(ValueError, match="width=48"):
        CLIP(**{**TINY_VIT, "transformer_width": 48, "transformer_heads": 0})


def test_encode_text_requires_context_length_tokens() -> None:
    model = build_model(make_openai_state_dict(TINY_VIT))
    with pytest.raises(ValueError, match="context_length=16"):
        model.encode_text(torch.zeros(1, 77, dtype=torch.long))


@TOWERS
def test_half_precision_follows_fp32(hp: dict[str, Any]) -> None:
    model = build_model(make_openai_state_dict(hp))
    images, text = example_inputs(hp)
    with torch.no_grad():
        reference = model(images, text)[0]
        try:
            logits = model.half()(images, text)[0]  # fp32 inputs are cast to the model dtype
        except RuntimeError as err:  # some CPU builds lack fp16 kernels
            pytest.skip(f"fp16 is not supported on this CPU: {err}")
    assert model.dtype == torch.float16 and logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), reference, rtol=2e-2, atol=0.5)


@TOWERS
def test_mixed_precision_is_clips_own(hp: dict[str, Any]) -> None:
    """convert_weights rounds exactly the tensors that open_clip's (OpenAI's) conversion rounds, keeps norms,
    BatchNorm statistics and embeddings fp32, and then computes what the oracle computes."""
    state_dict = make_openai_state_dict(hp)
    ours, oracle = build_model(state_dict), open_clip_model(state_dict)
    images, text = example_inputs(hp)
    with torch.no_grad():
        reference = ours(images, text)[0]
        assert convert_weights(ours) is ours
        convert_weights_to_lp(oracle)
        ours_dtypes = {key: value.dtype for key, value in ours.state_dict().items()}
        assert ours_dtypes == {key: value.dtype for key, value in oracle.state_dict().items()}
        assert ours_dtypes["visual.conv1.weight"] == torch.float16 and ours_dtypes["ln_final.weight"] == torch.float32
        assert ours_dtypes["positional_embedding"] == ours_dtypes["logit_scale"] == torch.float32
        try:
            image_features = ours.encode_image(images)
            logits = ours(images, text)[0]
        except RuntimeError as err:  # some CPU builds lack fp16 kernels
            pytest.skip(f"fp16 is not supported on this CPU: {err}")
        expected = oracle.encode_image(images.half())  # open_clip leaves the input cast to the caller
    assert image_features.dtype == torch.float16
    torch.testing.assert_close(image_features.float(), expected.float(), rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(logits.float(), reference, rtol=2e-2, atol=0.5)
