"""Models: one registry by name (``MODELS``: ``convnet1``..``convnet8``, ``resnet18_small``, any
torchvision classifier, untrained) and checkpoints that carry their dataset's metadata.

A checkpoint is ``NAME.pt`` (state dict + metadata, loaded with ``weights_only=True``) with the
same metadata as JSON beside it (``NAME.json``): arch, kwargs, :class:`~delt.data.DatasetInfo`
(with the training split's fingerprint), and the ``sha256`` of ``NAME.pt``, checked at every
load (a checkpoint written before the digest existed still loads).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from delt.data import (
    DataMismatchError,
    DatasetInfo,
    normalization_note,
    same_dataset_name,
    shown_name,
)
from delt.io import (
    FileFormatError,
    IntegrityError,
    atomic_open,
    read_json,
    sha256_file,
    torch_load,
    write_json,
)
from delt.runtime import check_memory, logger

__all__ = [
    "MODELS",
    "Checkpoint",
    "ModelSpec",
    "TeacherMismatchError",
    "Weights",
    "build_model",
    "cached_weights_path",
    "check_compatible",
    "check_model_memory",
    "data_fingerprint",
    "load_checkpoint",
    "load_weights",
    "read_weights",
    "save_checkpoint",
    "read_sidecar",
    "verify_sidecar_digest",
    "torchvision_weights",
]

CHECKPOINT_FORMAT = "delt-checkpoint-v1"


class TeacherMismatchError(DataMismatchError):
    """A checkpoint's classes, order or input shape do not match the dataset it is used with."""


class ConvNet(nn.Module):
    """ConvNet-D: ``depth`` blocks of Conv3x3 → BN → ReLU → AvgPool2, then a linear layer.

    Input (N, channels, resolution, resolution) → logits (N, num_classes). Each block halves the
    spatial size (floor), so the classifier sees ``width * (resolution >> depth)**2`` features.
    """

    def __init__(
        self, num_classes: int, channels: int, resolution: int, depth: int, width: int = 128
    ) -> None:
        super().__init__()
        if resolution >> depth < 1:
            raise ValueError(
                f"convnet{depth} needs images of at least {2**depth} pixels, got {resolution}"
            )
        layers: list[nn.Module] = []
        in_channels = channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * (resolution >> depth) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _convnet_builder(depth: int) -> Callable[..., nn.Module]:
    def build(info: DatasetInfo, width: int = 128) -> nn.Module:
        return ConvNet(info.num_classes, info.channels, info.resolution, depth=depth, width=width)

    return build


def _resnet18_small(info: DatasetInfo) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=info.num_classes)
    # CIFAR/Tiny variant (DELT's and SRe2L's small-image teachers): a 3x3 stride-1 stem and no
    # max-pool keep the small images' resolution for the residual stages.
    model.conv1 = nn.Conv2d(info.channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    def build(info: DatasetInfo) -> nn.Module:
        import torchvision

        if info.channels != 3:
            raise ValueError(
                f"--arch {name}: torchvision models take 3-channel images, {info.name} has "
                f"{info.channels}; use convnetD or resnet18_small"
            )
        return torchvision.models.get_model(name, weights=None, num_classes=info.num_classes)

    return build


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: ``build(info, **kwargs)``; ``kwargs`` lists what it accepts."""

    name: str
    description: str
    build: Callable[..., nn.Module]
    kwargs: tuple[str, ...] = field(default=())


def _registry() -> dict[str, ModelSpec]:
    specs = [
        ModelSpec(
            f"convnet{depth}",
            f"ConvNet-{depth}: {depth} x (Conv3x3-BN-ReLU-AvgPool2), width --width",
            _convnet_builder(depth),
            ("width",),
        )
        for depth in range(1, 9)
    ]
    specs.append(
        ModelSpec("resnet18_small", "ResNet-18, 3x3 stride-1 stem, no max-pool", _resnet18_small)
    )
    return {spec.name: spec for spec in specs}


MODELS: dict[str, ModelSpec] = _registry()


def model_spec(arch: str) -> ModelSpec:
    """The registry entry of ``arch`` (a ``MODELS`` key or a torchvision classifier name)."""
    import torchvision

    if arch in MODELS:
        return MODELS[arch]
    if arch in torchvision.models.list_models(module=torchvision.models):
        return ModelSpec(arch, f"torchvision {arch}", _torchvision_builder(arch))
    raise ValueError(
        f"--arch {arch!r}: unknown architecture; known: {', '.join(MODELS)}, or a torchvision "
        "classification model name (torchvision.models.list_models())"
    )


def build_model(
    arch: str, info: DatasetInfo, arch_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """An untrained ``arch`` for ``info``'s classes, channels and resolution."""
    spec = model_spec(arch)
    arch_kwargs = dict(arch_kwargs or {})
    unknown = sorted(set(arch_kwargs) - set(spec.kwargs))
    if unknown:
        raise ValueError(
            f"--arch {arch} does not take {', '.join('--' + k for k in unknown)} "
            f"(it takes: {', '.join('--' + k for k in spec.kwargs) or 'nothing'})"
        )
    return spec.build(info, **arch_kwargs)


def check_model_memory(
    arch: str,
    info: DatasetInfo,
    arch_kwargs: dict[str, Any] | None,
    batch_size: int,
    device: torch.device | str,
    training: bool,
    what: str,
) -> None:
    """Refuses, before anything is allocated, a model and batch that cannot fit in memory.

    The model is built on the meta device (no memory). The estimate is a floor: the float32
    weights (with their gradients and two optimizer moments when ``training``), one
    ``(batch_size, C, H, W)`` float32 batch and the output of the first layer for it (twice
    when ``training``: kept for the backward pass, and its gradient). A forward pass on meta
    tensors would measure every layer, but its first use imports seconds' worth of modules.

    Args:
        what: the flags that set the sizes, for the message (``"--batch-size 256"``).

    Raises:
        ResourceError: the estimate exceeds the memory available on ``device``.
        ValueError: ``arch`` cannot be built for ``info`` (as :func:`build_model`).
    """
    with torch.device("meta"):
        model = build_model(arch, info, arch_kwargs)
    weights = sum(p.numel() for p in model.parameters()) * 4
    pixels = info.resolution * info.resolution
    batch = batch_size * info.channels * pixels * 4
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    activation = 0
    if isinstance(first, nn.Conv2d):
        rows = -(-info.resolution // first.stride[0])
        cols = -(-info.resolution // first.stride[1])
        activation = batch_size * first.out_channels * rows * cols * 4
    elif isinstance(first, nn.Linear):
        activation = batch_size * first.out_features * 4
    needed = (4 * weights + batch + 2 * activation) if training else (weights + batch + activation)
    shape = f"{info.channels}x{info.resolution}x{info.resolution}"
    check_memory(
        f"{what}: {arch} ({weights // 4:,} weights) on batches of {batch_size:,} images of "
        f"{shape}{' (training)' if training else ''}",
        needed,
        device,
    )


# --------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class Checkpoint:
    """A model loaded from a checkpoint, with its metadata.

    Attributes:
        model: the network, in eval mode.
        meta: the metadata dict saved with it (arch, arch_kwargs, dataset, test_accuracy, ...).
        info: ``meta["dataset"]`` as a :class:`DatasetInfo`.
        path: the file it came from.
    """

    model: nn.Module
    meta: dict[str, Any]
    info: DatasetInfo
    path: Path


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Writes ``path`` (weights + metadata) and ``path.with_suffix('.json')`` (metadata); atomic.

    ``meta`` must hold ``arch``, ``arch_kwargs`` and ``dataset`` (a ``DatasetInfo.to_dict()``) and
    only plain values (str, int, float, bool, None, lists, dicts) so that ``weights_only`` loading
    accepts it.
    """
    missing = [key for key in ("arch", "arch_kwargs", "dataset") if key not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    with atomic_open(path, "wb") as handle:
        torch.save({"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta}, handle)
    write_json(path.with_suffix(".json"), {**meta, "sha256": sha256_file(path)})


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module; its state dict keys get an "_orig_mod." prefix.
    return getattr(model, "_orig_mod", model)


def data_fingerprint(meta: dict[str, Any]) -> str | None:
    """The training split's fingerprint recorded in a checkpoint's (or a selection's) metadata,
    or None for one written before fingerprints existed."""
    dataset = meta.get("dataset") if isinstance(meta, dict) else None
    return dataset.get("fingerprint") if isinstance(dataset, dict) else None


def check_compatible(
    meta: dict[str, Any],
    info: DatasetInfo,
    what: str = "teacher",
    fingerprint: str | None = None,
) -> None:
    """Refuses a model made on other data than ``info`` describes: another dataset name or
    parameters, classes, class order, input shape or normalization, or (when both are known) a
    training split with another fingerprint (:meth:`delt.data.ImageDataset.fingerprint`).

    Raises:
        TeacherMismatchError: naming the first difference.
    """
    saved = DatasetInfo.from_dict(meta["dataset"])
    if saved.num_classes != info.num_classes:
        raise TeacherMismatchError(
            f"the {what} was trained on {saved.num_classes} classes ({saved.name}), but "
            f"{info.name} has {info.num_classes}"
        )
    if saved.class_names != info.class_names:
        first = next(
            i
            for i, (a, b) in enumerate(zip(saved.class_names, info.class_names, strict=True))
            if a != b
        )
        raise TeacherMismatchError(
            f"the {what}'s class order differs from {info.name}'s: class {first} is "
            f"{shown_name(saved.class_names[first])} for the {what} but "
            f"{shown_name(info.class_names[first])} for the data"
            f"{normalization_note(saved.class_names[first : first + 1], info.class_names)} (pass "
            "the teacher's order with --class-order, or retrain the teacher)"
        )
    if (saved.channels, saved.resolution) != (info.channels, info.resolution):
        raise TeacherMismatchError(
            f"the {what} takes {saved.channels}x{saved.resolution}x{saved.resolution} images, "
            f"{info.name} has {info.channels}x{info.resolution}x{info.resolution}"
        )
    if (saved.mean, saved.std) != (info.mean, info.std):
        raise TeacherMismatchError(
            f"the {what} was trained with normalization mean={saved.mean} std={saved.std}, "
            f"{info.name} uses mean={info.mean} std={info.std}"
        )
    if not same_dataset_name(saved.name, info.name):
        raise TeacherMismatchError(
            f"the {what} was made on {saved.name}, but the data is {info.name}"
        )
    saved_fingerprint = data_fingerprint(meta)
    if saved_fingerprint and fingerprint and saved_fingerprint != fingerprint:
        raise TeacherMismatchError(
            f"the {what} was made on other {info.name} data than this: the training split's "
            f"fingerprint is {saved_fingerprint[:19]} for the {what}, {fingerprint[:19]} for the "
            "data (same name and shape, other images or labels)"
        )


def load_checkpoint(path: str | Path, info: DatasetInfo | None = None) -> Checkpoint:
    """Loads a local checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path: the ``.pt`` file.
        info: when given, the dataset the model will be used with; a mismatch is refused.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: unreadable, or not a delt checkpoint (one line naming the file).
        IntegrityError: its SHA-256 is not the one its ``.json`` recorded at save.
        TeacherMismatchError: see :func:`check_compatible`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--teacher {path}: no such file (train one with `delt teacher --out DIR`, which "
            "writes DIR/teacher.pt)"
        )
    verify_sidecar_digest(path)
    what = f"delt checkpoint ({CHECKPOINT_FORMAT}, as `delt teacher` writes)"
    payload = torch_load(path, what)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path}: not a {what}")
    try:
        meta = payload["meta"]
        saved_info = DatasetInfo.from_dict(meta["dataset"])
        arch, arch_kwargs = meta["arch"], meta["arch_kwargs"]
    except (KeyError, TypeError, ValueError) as error:
        raise FileFormatError(
            f"{path}: not a {what}: its metadata is incomplete ({type(error).__name__}: {error})"
        ) from None
    if info is not None:
        check_compatible(meta, info)
    model = build_model(arch, saved_info, arch_kwargs)
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileFormatError(
            f"{path}: not a {what}: its weights do not fit the {arch} it names ({first})"
        ) from None
    model.eval()
    return Checkpoint(model=model, meta=meta, info=saved_info, path=path)


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The ``.json`` sidecar of the checkpoint ``path`` (what :func:`save_checkpoint` writes: a
    JSON object of its metadata, ``arch``, ``arch_kwargs``, ``dataset``, and its ``sha256``), or
    None where there is none. One without ``sha256`` is accepted: written before digests
    existed. Anything else is refused, so that a damaged sidecar never turns the digest check
    off or passes for a checkpoint's record.

    Raises:
        FileFormatError: not JSON, not an object, no metadata, or a ``sha256`` that is not a
            SHA-256 hex digest; naming the sidecar.
    """
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    what = f"sidecar of {path.name} (its metadata and SHA-256, as `delt teacher` writes)"
    document = read_json(sidecar, what)
    fix = f"restore it from where {path.name} came from, or save the checkpoint again"
    if not isinstance(document, dict):
        raise FileFormatError(f"{sidecar}: not a {what}: a JSON {type(document).__name__}; {fix}")
    lacking = [key for key in ("arch", "arch_kwargs", "dataset") if key not in document]
    if lacking:
        raise FileFormatError(f"{sidecar}: not a {what}: it lacks {', '.join(lacking)}; {fix}")
    recorded = document.get("sha256")
    if recorded is not None and not (
        isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded) is not None
    ):
        raise FileFormatError(
            f"{sidecar}: not a {what}: its sha256 {recorded!r} is not a SHA-256 hex digest; {fix}"
        )
    return document


def verify_sidecar_digest(path: Path) -> None:
    """Checks ``path`` against the ``sha256`` its ``.json`` sidecar recorded at save
    (:func:`read_sidecar`): no sidecar, or one of before digests, is nothing to check.

    Raises:
        FileFormatError: the sidecar is damaged (:func:`read_sidecar`).
        IntegrityError: the digests differ.
    """
    sidecar = path.with_suffix(".json")
    recorded = (read_sidecar(path) or {}).get("sha256")
    if recorded is not None and recorded != sha256_file(path):
        raise IntegrityError(
            f"{path}: its SHA-256 differs from the one {sidecar.name} recorded when it was "
            "saved; the file is corrupt or was changed (restore it or train it again)"
        )


# --------------------------------------------------------------------------------------------
# Weights from elsewhere: plain state-dict files and torchvision's cached weights


@dataclass(frozen=True)
class Weights:
    """A state dict read from a file, with where it came from.

    Attributes:
        state_dict: parameter and buffer tensors by key (``module.`` prefixes stripped).
        path: the file read.
        sha256: its SHA-256.
        source: ``"file"`` or ``"torchvision:<Enum>.<NAME>"``.
        categories: torchvision weights: the class names they were trained with, else None.
    """

    state_dict: dict[str, torch.Tensor]
    path: Path
    sha256: str
    source: str
    categories: tuple[str, ...] | None = None


# The prefixes DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") give the keys.
_WRAPPER_PREFIXES = re.compile(r"^(?:module\.)*(?:_orig_mod\.)*")


def _state_dict_of(payload: Any, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded file: a plain state dict, or one under ``state_dict``/``model``."""
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload:
        raise ValueError(
            f"{where}: not a state dict (expected a dict of tensors, or one under a "
            "'state_dict' or 'model' key)"
        )
    tensors = {key: value for key, value in payload.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{where}: holds no tensors")
    return {_WRAPPER_PREFIXES.sub("", key, count=1): value for key, value in tensors.items()}


def torchvision_weights(arch: str, name: str) -> Any:
    """The torchvision weights enum member ``name`` of ``arch`` (``IMAGENET1K_V1``,
    ``ResNet18_Weights.IMAGENET1K_V1``, ``DEFAULT``), or None when ``name`` is not one."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    member = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    try:
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    except KeyError:
        return None


def cached_weights_path(weights: Any) -> Path:
    """Where torch.hub keeps the file of torchvision ``weights``: ``$TORCH_HOME/hub/checkpoints``
    (``torch.hub.get_dir()``) and the URL's file name; nothing is downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def read_weights(arch: str, spec: str) -> Weights:
    """Reads ``--weights``: a local state-dict file, or a torchvision weights name of ``arch``
    resolved from the local torch hub cache only.

    Raises:
        FileNotFoundError: no such file; or the torchvision weights are not in the cache (the
            message gives the expected path and how to put the file there).
        ValueError: the file holds no state dict.
    """
    path = Path(spec)
    if path.is_file():
        state = _state_dict_of(torch_load(path), f"--weights {spec}")
        return Weights(state, path, sha256_file(path), "file")
    weights = torchvision_weights(arch, spec)
    if weights is None:
        raise FileNotFoundError(
            f"--weights {spec}: no such file, and not a torchvision weights name of {arch} "
            "(e.g. IMAGENET1K_V1, DEFAULT)"
        )
    cached = cached_weights_path(weights)
    if not cached.is_file():
        raise FileNotFoundError(
            f"--weights {spec}: torchvision's {type(weights).__name__}.{weights.name} is not in "
            f"the local cache: expected {cached} (delt never downloads; fetch {weights.url} "
            "into that folder, or set TORCH_HOME to where it is, or pass the file's path)"
        )
    digest = sha256_file(cached)
    # torchvision file names carry the first hex digits of the file's SHA-256.
    stem_hash = cached.stem.rsplit("-", 1)[-1]
    if len(stem_hash) >= 8 and not digest.startswith(stem_hash):
        logger.warning(
            "--weights %s: %s's SHA-256 %s does not start with the %s its name promises; it is "
            "not the file torchvision publishes", spec, cached, digest[:12], stem_hash,
        )  # fmt: skip
    state = _state_dict_of(torch_load(cached), f"--weights {spec} ({cached})")
    source = f"torchvision:{type(weights).__name__}.{weights.name}"
    categories = weights.meta.get("categories")
    return Weights(state, cached, digest, source, tuple(categories) if categories else None)


def load_weights(model: nn.Module, weights: Weights, info: DatasetInfo, what: str) -> None:
    """Loads ``weights`` into ``model`` (built for ``info``), strictly.

    Raises:
        TeacherMismatchError: the weights classify another number of classes than ``info``.
        ValueError: missing or unexpected keys, or other shape differences (listed).
    """
    expected = model.state_dict()
    given = weights.state_dict
    if weights.categories is not None and len(weights.categories) != info.num_classes:
        raise TeacherMismatchError(
            f"{what}: the weights classify {len(weights.categories)} classes, --dataset "
            f"{info.name} has {info.num_classes}"
        )
    reshaped = [key for key in expected if key in given and given[key].shape != expected[key].shape]
    for key in reshaped:
        if (
            expected[key].dim() >= 1
            and expected[key].shape[0] == info.num_classes
            and given[key].shape[1:] == expected[key].shape[1:]
        ):
            raise TeacherMismatchError(
                f"{what}: the weights classify {given[key].shape[0]} classes ({key} is "
                f"{tuple(given[key].shape)}), --dataset {info.name} has {info.num_classes}"
            )
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    if missing or unexpected or reshaped:
        shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in reshaped]
        kinds = {"missing keys": missing, "unexpected keys": unexpected, "other shapes": shapes}
        parts = [f"{kind} {_listed(items)}" for kind, items in kinds.items() if items]
        raise ValueError(f"{what}: the weights do not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(given, strict=True)


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"
