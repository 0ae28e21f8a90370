"""``delt diversity``: DELT's intra-class diversity (Shen et al., CVPR 2025; docs/evaluation.md).

Per class, the mean cosine similarity of each image's penultimate feature (the input of the
model's last linear layer) to the class centroid of the raw features; the set's score is the mean
± population std over classes. **Lower is more diverse**; one image per class scores 1.0.
Writes ``DIR/diversity.json``, reused while the model and the set are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from delt.config import ConfigError, check_int_fields, option
from delt.distilled_set import check_distilled_set, load_distilled
from delt.io import check_output, read_json, sha256_file, write_json
from delt.lock import results_lock
from delt.models import TeacherMismatchError, check_compatible, load_checkpoint
from delt.runtime import logger, resolve_device, versions

__all__ = [
    "DiversityConfig",
    "DiversityResult",
    "centroid_cosine",
    "final_linear",
    "measure_diversity",
    "penultimate_features",
]

DIVERSITY_FORMAT = "delt-diversity-v1"


@dataclass
class DiversityConfig:
    """Configuration of ``delt diversity`` (one field per flag)."""

    distilled: str = option(help="folder of a distilled set (distilled.pt + manifest.json)")
    model: str = option(
        "teacher", help="feature model: 'teacher' (the set's, from its manifest) or a checkpoint"
    )
    out: str | None = option(None, help="results file (default: DISTILLED/diversity.json)")
    batch_size: int = option(500, help="images per forward pass")
    device: str = option("auto", help="auto, cpu, cuda, ...")

    def __post_init__(self) -> None:
        check_int_fields(self, ("batch_size",))
        if not self.model:
            raise ConfigError("--model must be 'teacher' or a checkpoint path")


@dataclass
class DiversityResult:
    """Mean and std over classes of the per-class centroid cosine; ``per_class`` has NaN for
    classes without images."""

    path: Path
    mean: float
    std: float
    per_class: list[float]
    reused: bool


def final_linear(model: nn.Module) -> nn.Linear:
    """The classifier layer whose input are the penultimate features: the last ``nn.Linear``
    registered in the model (``classifier`` of ConvNet, ``fc`` of ResNet, ``classifier[-1]`` /
    ``heads.head`` / ``head`` of torchvision's other families).

    Raises:
        ValueError: the model has no ``nn.Linear`` (e.g. SqueezeNet's convolutional classifier).
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear classifier: its penultimate features are "
            "not defined for this metric"
        )
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """The inputs of ``model``'s final linear layer for ``images``.

    Args:
        model: a classifier; it is put in eval mode.
        images: (N, C, H, W) float, normalized as the model expects, on the model's device.
        batch_size: images per forward pass.

    Returns:
        (N, D) float32 features (on the CPU).
    """
    model.eval()
    captured: list[Tensor] = []
    handle = final_linear(model).register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].detach())
    )
    parts = []
    try:
        for start in range(0, images.shape[0], batch_size):
            captured.clear()
            model(images[start : start + batch_size])
            if len(captured) != 1:
                raise RuntimeError(
                    f"the final linear layer ran {len(captured)} times in one forward pass; "
                    "cannot tell which input holds the penultimate features"
                )
            parts.append(captured[0].flatten(1).float().cpu())
    finally:
        handle.remove()
    return torch.cat(parts)


def centroid_cosine(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per class, the mean cosine similarity of each feature to the class centroid.

    Args:
        features: (N, D) float.
        labels: (N,) int64 in ``0 .. num_classes - 1``.
        num_classes: K.

    Returns:
        (K,) float64; NaN for a class without images, 1.0 for a class with one image.
    """
    features = features.to(torch.float64)
    values = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for c in range(num_classes):
        members = features[labels == c]
        if members.shape[0] == 0:
            continue
        centroid = members.mean(0, keepdim=True)
        values[c] = nn.functional.cosine_similarity(members, centroid, dim=1).mean()
    return values


def measure_diversity(config: DiversityConfig) -> DiversityResult:
    """Runs ``delt diversity``; writes and returns the per-class and mean scores.

    Raises:
        ValueError: the ``--distilled`` set is empty or has labels outside its dataset's classes
            (:func:`delt.distilled_set.check_distilled_set`, as ``delt eval``).
        TeacherMismatchError: its images do not fit its dataset, or the ``--model`` checkpoint
            was trained on another dataset.
        FileNotFoundError: no ``--model`` checkpoint.
    """
    out = Path(config.out) if config.out else Path(config.distilled) / "diversity.json"
    with results_lock(out):
        return _measure_diversity(config, out)


def _measure_diversity(config: DiversityConfig, out: Path) -> DiversityResult:
    folder = Path(config.distilled)
    images, labels, manifest = load_distilled(folder)
    info = manifest.dataset
    # delt eval's check: a label outside the dataset's classes would be silently dropped below.
    check_distilled_set(images, labels, info, folder)
    model_path = manifest.teacher["path"] if config.model == "teacher" else config.model
    if not Path(model_path).is_file():
        raise FileNotFoundError(
            f"--model {config.model}: no such checkpoint ({model_path})"
            + (" named by the manifest; pass --model PATH" if config.model == "teacher" else "")
        )
    identity = {
        "model_sha256": sha256_file(Path(model_path)),
        "distilled_sha256": sha256_file(folder / "distilled.pt"),
    }
    if out.is_file():
        saved = read_json(out)
        if saved.get("format") == DIVERSITY_FORMAT and saved.get("identity") == identity:
            logger.info("diversity: reusing %s", out)
            return DiversityResult(
                out, saved["mean"], saved["std"], saved["per_class"], reused=True
            )
    check_output(out, "--out" if config.out else "--distilled", folder=False)
    checkpoint = load_checkpoint(model_path)
    try:
        check_compatible(checkpoint.meta, info, what="model")
    except TeacherMismatchError as error:
        raise TeacherMismatchError(f"--model {config.model}: {error}") from None
    device = resolve_device(config.device)
    model = checkpoint.model.to(device)
    features = penultimate_features(model, images.to(device), config.batch_size)
    per_class = centroid_cosine(features, labels, info.num_classes)
    present = per_class[~torch.isnan(per_class)].numpy()
    if present.size == 0 or not np.isfinite(present).all():
        raise ValueError(
            f"--distilled {folder}: the diversity is not a finite number over "
            f"{present.size} classes (the model's features of its images are not finite)"
        )
    mean, std = float(np.mean(present)), float(np.std(present))
    document = {
        "format": DIVERSITY_FORMAT,
        "identity": identity,
        "distilled": str(folder),
        "method": manifest.method,
        "dataset": info.name,
        "metric": "mean over classes of the mean cosine similarity of each image's penultimate "
        "feature to its class centroid; lower = more diverse",
        "model": {
            "path": str(model_path),
            "arch": checkpoint.meta["arch"],
            "arch_kwargs": checkpoint.meta["arch_kwargs"],
        },
        "feature_dim": int(features.shape[1]),
        "num_images": int(images.shape[0]),
        "mean": mean,
        "std": std,
        "per_class": [None if np.isnan(v) else float(v) for v in per_class.tolist()],
        "class_names": list(info.class_names),
        "versions": versions(),
    }
    write_json(out, document)
    logger.info("diversity: %.4f ± %.4f over %d classes -> %s", mean, std, len(present), out)
    return DiversityResult(out, mean, std, document["per_class"], reused=False)
