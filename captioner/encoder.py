"""The frozen CNN that turns pictures into grids of feature vectors, and its input transform.

A classifier's last convolutional map is kept (its average pool and classifier are dropped), so
a ResNet at 448 px gives a 14x14 grid of 2048-channel vectors: the regions that attention
decoders look at. The encoder is never trained here, so it is built in eval mode without grads.

torchvision is imported only inside the functions that build its models and transforms: importing
it takes seconds, which every `captioner` command and every torchrun rank would otherwise pay.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

from captioner.errors import CaptionerError
from captioner.precision import Precision

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS_SEED = 0

# name -> (torchvision.models builder, its weights enum, prefix of the classifier-head keys in its
# state dict), by attribute name so that torchvision is imported only when one is built.
_TORCHVISION = {
    "resnet152": ("resnet152", "ResNet152_Weights", "fc."),
    "resnet101": ("resnet101", "ResNet101_Weights", "fc."),
    "resnet50": ("resnet50", "ResNet50_Weights", "fc."),
    "resnet18": ("resnet18", "ResNet18_Weights", "fc."),
    "mobilenet_v2": ("mobilenet_v2", "MobileNet_V2_Weights", "classifier."),
}
ENCODER_NAMES = (*_TORCHVISION, "tiny")


class RandomWeightsWarning(UserWarning):
    """An encoder runs with random weights: its features, and any captions, are meaningless."""


@dataclass(frozen=True)
class EncoderConfig:
    """Which CNN, which weights ("imagenet", a torchvision weights name such as "IMAGENET1K_V1",
    "none" or a state-dict path) and the input size."""

    name: str = "resnet152"
    weights: str = "imagenet"
    image_size: int = 448

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        return cls(str(data["name"]), str(data["weights"]), int(data["image_size"]))


class FrozenEncoder(nn.Module):
    """``forward(images (B, 3, S, S) normalized) -> (B, H*W, C)`` float32 region features.

    It computes in the precision `to_device` gives it (captioner.precision: bf16 autocast and
    channels-last on CUDA and on CPUs with bf16 matrix units, float32 channels-last on other
    CPUs); the features are returned as float32 either way.
    """

    def __init__(self, config: EncoderConfig, backbone: nn.Module, weights_id: str):
        super().__init__()
        self.config = config
        self.backbone = backbone.eval().requires_grad_(False)
        self.weights_id = weights_id
        self.weights_checksum = _state_checksum(self.backbone)
        channels, height, width = _output_shape(config.name, config.image_size)
        self.channels = channels
        self.grid = (height, width)
        self.precision = Precision("float32", "cpu", "until to_device gives another")
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # frozen: batch-norm statistics never move

    def to_device(self, device: torch.device | str, precision: Precision) -> FrozenEncoder:
        """The encoder on `device`, computing in `precision` (resolved for that device)."""
        self.precision = precision
        memory_format = torch.channels_last if precision.channels_last else torch.preserve_format
        return self.to(device=torch.device(device), memory_format=memory_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.precision.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast():
            maps = self.backbone(images)
        return maps.float().flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


def build_encoder(config: EncoderConfig) -> FrozenEncoder:
    """The frozen encoder for `config` on the CPU; CaptionerError for unknown names or weights.

    ``weights="none"`` gives a seeded random init, scaled so that the maps are finite and varied
    in float16 too, and a RandomWeightsWarning (except for "tiny", which has no trained weights
    and exists for tests and the offline demo).
    """
    if config.name not in ENCODER_NAMES:
        raise CaptionerError(f"unknown encoder {config.name!r}; choose one of {ENCODER_NAMES}")
    if config.image_size < 32:
        raise CaptionerError(f"image size {config.image_size} is too small (at least 32 px)")
    if config.weights == "none":
        if config.name != "tiny":
            warnings.warn(
                f"encoder {config.name} runs with RANDOM weights (--weights none): the features "
                "carry no ImageNet knowledge and captions trained on them will be meaningless",
                RandomWeightsWarning,
                stacklevel=2,
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = _architecture(config.name)
            if config.name in _TORCHVISION:
                _keep_random_features_in_range(model)
        return FrozenEncoder(
            config, _backbone(config.name, model), f"random-seed-{RANDOM_WEIGHTS_SEED}"
        )
    pretrained = pretrained_weights(config.name, config.weights)
    if pretrained is not None:
        return _imagenet_encoder(config, pretrained)
    return _local_weights_encoder(config, Path(config.weights))


def pretrained_weights(name: str, weights: str) -> WeightsEnum | None:
    """The torchvision weights `weights` names for encoder `name`: "imagenet" is the enum's
    DEFAULT (which a torchvision release may move to newer weights), a member's own name
    ("IMAGENET1K_V1", as a checkpoint records it) that member; None for anything else."""
    if name == "tiny" or weights in ("none", ""):
        if weights == "imagenet":
            raise CaptionerError("encoder 'tiny' has no ImageNet weights; use weights 'none'")
        return None
    _, weights_enum = _torchvision_classifier(name)
    if weights == "imagenet":
        return weights_enum.DEFAULT
    return weights_enum.__members__.get(weights)


def image_transform(config: EncoderConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to SxS (the whole picture, no crop: captions describe all of it), then normalize."""
    from torchvision import transforms

    size = config.image_size
    return transforms.Compose(
        [
            transforms.Resize((size, size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _imagenet_encoder(config: EncoderConfig, weights: WeightsEnum) -> FrozenEncoder:
    builder, _ = _torchvision_classifier(config.name)
    try:
        model = builder(weights=weights)
    except (OSError, RuntimeError) as error:
        raise CaptionerError(
            f"cannot get the ImageNet weights of {config.name} ({error}); without internet, pass "
            "--weights PATH to a local state dict (torchvision keeps the downloaded file in "
            "~/.cache/torch/hub/checkpoints) or --weights none"
        ) from None
    return FrozenEncoder(config, _backbone(config.name, model), str(weights))


def _local_weights_encoder(config: EncoderConfig, path: Path) -> FrozenEncoder:
    """Weights from a state dict file: the full classifier's (as torchvision saves it) or one
    without its head. Loaded with ``weights_only=True``, so a file cannot run code."""
    if not path.is_file():
        raise CaptionerError(
            f"{path}: weights file not found (--weights takes imagenet, none or a path)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a state dict
        raise CaptionerError(f"{path}: not a PyTorch state dict ({error})") from None
    if not isinstance(state, dict):
        raise CaptionerError(f"{path}: holds a {type(state).__name__}, not a state dict")
    model = _architecture(config.name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = _TORCHVISION[config.name][2] if config.name in _TORCHVISION else None
    missing = [key for key in missing if not (head and key.startswith(head))]
    if missing or unexpected:
        raise CaptionerError(
            f"{path}: does not fit encoder {config.name} "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return FrozenEncoder(config, _backbone(config.name, model), f"file:{path.name}:{digest}")


def _architecture(name: str) -> nn.Module:
    if name == "tiny":
        return _tiny_cnn()
    builder, _ = _torchvision_classifier(name)
    return builder(weights=None)


def _keep_random_features_in_range(model: nn.Module) -> None:
    """Make a randomly initialised classifier give finite, varied maps that float16 can store.

    torchvision's random init is meant for training, not for use as it is: each residual block
    of a ResNet adds its branch's variance to the signal, so a random ResNet-152's last maps reach
    1e7 and overflow float16 (ResNet-101's reach 2e4, a few percent of them overflowing at 448 px);
    and MobileNetV2's depthwise convolutions are scaled by their fan-out, which counts the
    channels although each filter sees one, so its maps shrink to 1e-8 and round to zero in
    float16. As in torchvision's ``zero_init_residual``, the last normalisation of every residual
    branch starts at zero, so each block passes its input on and the maps keep the stem's scale;
    depthwise convolutions get He init over what each filter sees (its fan-in).
    """
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for module in model.modules():
        if isinstance(module, Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)
        elif isinstance(module, InvertedResidual) and module.use_res_connect:
            nn.init.zeros_(module.conv[-1].weight)
        elif isinstance(module, nn.Conv2d) and module.groups > 1:
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


def _torchvision_classifier(name: str) -> tuple[Callable[..., nn.Module], type[WeightsEnum]]:
    """torchvision's builder of the classifier `name` and the enum of its pretrained weights."""
    from torchvision import models

    builder, weights_enum, _ = _TORCHVISION[name]
    return getattr(models, builder), getattr(models, weights_enum)


def _backbone(name: str, model: nn.Module) -> nn.Module:
    """The convolutional trunk of a classifier: everything before global pooling."""
    if name.startswith("resnet"):
        return nn.Sequential(*list(model.children())[:-2])  # drop avgpool and fc
    if name == "mobilenet_v2":
        return model.features
    return model


TINY_WIDTHS = (3, 16, 32, 64, 128, 128)


def _tiny_cnn() -> nn.Module:
    """The offline encoder of the tests and the demo: five VGG-style blocks (3x3 convolution, ReLU,
    2x2 max pool), total stride 32 like a ResNet (64 px -> 2x2, 96 px -> 3x3).

    It only ever runs with random weights, so it is built to keep what the picture holds: He
    initialization keeps the signal's scale through the layers, stride-1 convolutions see every
    pixel, and max pooling carries the strongest response (an object's edge, its colour) down to
    the grid where PyTorch's default init and strided convolutions wash it out. Zero padding at
    every layer leaves each cell a trace of where it lies, which attention can use.
    """
    layers: list[nn.Module] = []
    for c_in, c_out in zip(TINY_WIDTHS, TINY_WIDTHS[1:], strict=False):
        conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


def _output_shape(name: str, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the trunk's output, found by a shape-only pass on the meta device."""
    with torch.device("meta"):
        trunk = _backbone(name, _architecture(name)).eval()  # (batch norm on a 1x1 map)
        shape = trunk(torch.empty(1, 3, image_size, image_size)).shape
    return int(shape[1]), int(shape[2]), int(shape[3])


def _state_checksum(module: nn.Module) -> str:
    """sha256 over parameter and buffer names and bytes: identifies the exact weights used."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
