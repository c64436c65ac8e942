"""Our eager implementation of OpenAI's CLIP (ModifiedResNet or ViT image tower, causal text transformer).

Parameter and buffer names and shapes are exactly those of the official checkpoints, so an OpenAI
state_dict loads with ``strict=True``; :func:`build_model` reads every hyper-parameter back from the
key names and tensor shapes, as the official checkpoints carry no config.

The transformers take (L, N, width) tensors, as OpenAI's do, so code that calls ``visual.transformer``,
``transformer`` or their ``resblocks`` directly (for patch tokens or intermediate layers) works unchanged.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIP", "CLIPLoadError", "build_model", "convert_weights", "infer_hyperparameters"]

# Head width used by OpenAI for every attention layer: heads = width // 64.
HEAD_WIDTH = 64
# Scalars that the official TorchScript archives store next to the weights; they are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


class CLIPLoadError(RuntimeError):
    """Every user-facing failure to load CLIP weights; the message says what is wrong and how to fix it."""


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in fp32, because fp16 variance is inaccurate; the result keeps the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that the OpenAI checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Bottleneck(nn.Module):
    """ResNet bottleneck whose convolutions all have stride 1; downsampling is an average pool
    (anti-aliasing, as in the CLIP paper) after the 3x3 conv and in front of the shortcut conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            # Named "0"/"1" so that the keys are the official downsample.0.* / downsample.1.*.
            self.downsample = nn.Sequential(OrderedDict([
                ("pool", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.avgpool(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class AttentionPool2d(nn.Module):
    """Replaces global average pooling: the mean feature, as a single query, attends over all positions."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, C) -> (N, heads, L, C // heads)."""
        n, length, channels = x.shape
        return x.reshape(n, length, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (N, H*W, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        query = self._split_heads(self.q_proj(tokens[:, :1]))
        key = self._split_heads(self.k_proj(tokens))
        value = self._split_heads(self.v_proj(tokens))
        pooled = F.scaled_dot_product_attention(query, key, value)  # (N, heads, 1, C // heads)
        return self.c_proj(pooled.transpose(1, 2).flatten(1))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a 3-conv stem with average pooling, anti-aliased bottlenecks, attention pooling."""

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, input_resolution: int = 224,
                 width: int = 64) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        stem = width // 2
        self.conv1 = nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.conv2 = nn.Conv2d(stem, stem, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem)
        self.conv3 = nn.Conv2d(stem, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.layer1 = self._stage(width, width, layers[0], stride=1)
        self.layer2 = self._stage(width * 4, width * 2, layers[1], stride=2)
        self.layer3 = self._stage(width * 8, width * 4, layers[2], stride=2)
        self.layer4 = self._stage(width * 16, width * 8, layers[3], stride=2)
        # The stem and stages 2-4 downsample 32x in total; layer4 has width * 32 channels.
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        first = Bottleneck(inplanes, planes, stride)
        rest = [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
        return nn.Sequential(first, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a QuickGELU MLP.

    Each block holds its attention mask, as OpenAI's do, so ``block(x)`` alone is the block's whole computation.
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)  # (L, N, width), OpenAI's layout
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        # A plain attribute, as in OpenAI's blocks: checkpoints and archives have no mask entry (it is rebuilt
        # from the context length), and it follows the input's device when used.
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        mask = None if self.attn_mask is None else self.attn_mask.to(x.device)  # boolean: valid under any dtype
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on (L, N, width) tensors, optionally with a fixed mask."""

    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*(ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP's ViT: patchify conv, class token, pre- and post-LayerNorm, linear projection of the class token."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (N, grid**2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """OpenAI's CLIP with the official constructor signature.

    ``vision_layers`` a sequence of 4 block counts selects the ModifiedResNet image tower, an int the
    ViT (then ``vision_patch_size`` is used). Attention heads follow the official rule of one head per
    64 channels: the ViT and the ResNet attention pool (``vision_width * 32`` channels) derive theirs, and
    ``transformer_heads`` must equal ``transformer_width // 64`` (the only count a checkpoint can reload with).
    """

    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int | Sequence[int],
                 vision_width: int, vision_patch_size: int | None, context_length: int, vocab_size: int,
                 transformer_width: int, transformer_heads: int, transformer_layers: int) -> None:
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        if isinstance(vision_layers, Sequence):
            if len(vision_layers) != 4:
                raise ValueError(f"a ResNet image tower needs 4 stage depths, got vision_layers={vision_layers}")
            self.visual: nn.Module = ModifiedResNet(
                vision_layers, output_dim=embed_dim, heads=vision_width * 32 // HEAD_WIDTH,
                input_resolution=image_resolution, width=vision_width)
        else:
            if vision_width % HEAD_WIDTH or vision_patch_size is None:
                raise ValueError(f"a ViT image tower needs a patch size and a width that is a multiple of "
                                 f"{HEAD_WIDTH} (one head per {HEAD_WIDTH} channels), got "
                                 f"width={vision_width}, patch size={vision_patch_size}")
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            vision_width // HEAD_WIDTH, embed_dim)
        if transformer_width % HEAD_WIDTH or transformer_heads != transformer_width // HEAD_WIDTH:
            # The checkpoint format stores no head count, so build_model can only infer width // 64: any other
            # count would reload into a different model without a word.
            raise ValueError(f"the text transformer needs a width that is a multiple of {HEAD_WIDTH} and width // "
                             f"{HEAD_WIDTH} heads, got width={transformer_width}, heads={transformer_heads}")
        causal = torch.ones(context_length, context_length, dtype=torch.bool).triu(1)  # True = masked
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, attn_mask=causal)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation scheme, so a model trained from scratch starts as theirs did
        (checkpoint loading overwrites all of it)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
            for block in self.visual.modules():
                if isinstance(block, Bottleneck):
                    nn.init.zeros_(block.bn3.weight)  # each residual branch starts as the identity
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (fp16 after :func:`convert_weights` or ``model.half()``); inputs are cast to it."""
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) preprocessed images -> (N, embed_dim) unnormalised features."""
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(N, context_length) token ids -> (N, embed_dim) features taken at the end-of-text token,
        which has the largest id in the vocabulary and is found by argmax."""
        if text.shape[-1] != self.context_length:
            raise ValueError(f"text must have {self.context_length} tokens per row (tokenize with "
                             f"context_length={self.context_length}), got shape {tuple(text.shape)}")
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        eot = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return eot @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: (logits_per_image (N_img, N_txt), logits_per_text (N_txt, N_img))."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    """Number of distinct block indices N among keys of the form ``<prefix>N.<rest>``."""
    return len({key[len(prefix):].split(".", 1)[0] for key in keys if key.startswith(prefix)})


def _describe_keys(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    if not keys:
        return "(none)"
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def infer_hyperparameters(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`CLIP` constructor arguments of an OpenAI-format state_dict, from key names and shapes.

    Text heads follow OpenAI's rule ``transformer_width // 64`` (the official checkpoints store no
    head count; open_clip's ``build_model_from_openai_state_dict`` uses the same rule).
    """
    keys = list(state_dict)
    try:
        if "visual.proj" in state_dict:
            conv1 = state_dict["visual.conv1.weight"]
            grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_layers: int | tuple[int, ...] = _count_blocks(keys, "visual.transformer.resblocks.")
            vision_width, vision_patch_size = conv1.shape[0], conv1.shape[-1]
            image_resolution = vision_patch_size * grid
        else:
            vision_layers = tuple(_count_blocks(keys, f"visual.layer{stage}.") for stage in (1, 2, 3, 4))
            vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
            positions = state_dict["visual.attnpool.positional_embedding"].shape[0]
            grid = round((positions - 1) ** 0.5)
            if grid ** 2 + 1 != positions:
                raise CLIPLoadError(f"visual.attnpool.positional_embedding has {positions} rows, which is not "
                                    "a square grid plus one class position")
            vision_patch_size = None
            image_resolution = grid * 32
        transformer_width = state_dict["ln_final.weight"].shape[0]
        return dict(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=image_resolution,
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=vision_patch_size,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=transformer_width,
            transformer_heads=transformer_width // HEAD_WIDTH,
            transformer_layers=_count_blocks(keys, "transformer.resblocks."),
        )
    except KeyError as err:
        raise CLIPLoadError(f"this is not an OpenAI CLIP state_dict: key {err} is missing "
                            f"(it has {_describe_keys(keys)})") from None
    except (AttributeError, IndexError, TypeError):
        raise CLIPLoadError("this is not an OpenAI CLIP state_dict: its values are not tensors of the "
                            f"expected shapes (keys: {_describe_keys(keys)})") from None


# Matrix-shaped parameters that are not owned by a Conv/Linear module.
_MATRIX_PARAMETERS = frozenset({"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                "bias_k", "bias_v", "text_projection", "proj"})


def convert_weights(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """CLIP's own mixed precision, in place: the matrices (convolutions, linear and attention projections)
    in ``dtype``, everything else (LayerNorm and BatchNorm affine parameters and statistics, embeddings,
    the logit scale) kept in fp32. This is how OpenAI runs CLIP on GPU; ``model.half()`` would also round
    BatchNorm's running variance and the positional embeddings. Works on a whole CLIP or one tower.
    """
    for module in model.modules():
        matrices = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))
        for name, param in module.named_parameters(recurse=False):
            if matrices or name in _MATRIX_PARAMETERS:
                param.data = param.data.to(dtype)
    return model


def build_model(state_dict: Mapping[str, torch.Tensor]) -> CLIP:
    """An fp32 :class:`CLIP` in eval mode holding exactly the weights of an OpenAI-format state_dict.

    Ignored: the scalars ``input_resolution``, ``context_length`` and ``vocab_size`` of the official
    archives, and a stored causal mask ``attn_mask`` (re-implementations that keep it as a buffer save it; it
    is rebuilt from the context length). Any other missing or unknown key raises :class:`CLIPLoadError`.
    fp16 weights are cast to fp32.
    """
    weights = {key: value for key, value in state_dict.items() if key not in _NON_PARAMETER_KEYS}
    hyperparameters = infer_hyperparameters(weights)
    try:
        model = CLIP(**hyperparameters)
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except (RuntimeError, ValueError) as err:
        first_lines = " ".join(str(err).strip().splitlines()[:3])
        raise CLIPLoadError(f"this state_dict does not fit a CLIP with the hyper-parameters read from it "
                            f"({hyperparameters}): {first_lines}") from None
    if missing or unexpected:
        raise CLIPLoadError(f"this is not an OpenAI CLIP state_dict: missing keys {_describe_keys(missing)}; "
                            f"unexpected keys {_describe_keys(unexpected)}")
    return model.eval()
