"""Ablation: why DELT falls below random real images at IPC 1 on Fashion-MNIST.

Same setup as ``run.py`` (ConvNet-3 width 64 teacher, 10 epochs, seed 0; ``delt select
--strategy medium``; MI 400; student protocol of ``delt eval`` for 100 epochs, tested after 50
and 100, bf16, channels_last), at IPC 1 only. Each variant changes one thing of DELT's recipe and
is synthesized and evaluated with seeds 0, 1, 2 (synthesis seed = student seed, as ``run.py``):

==============  ==================================================================================
``init``        DELT's starting images (the medium-ranked real image per class), no optimization
``random-real`` one random real image per class, drawn with the seed (``run.py``'s baseline)
``delt``        the benchmark's DELT recipe (``delt recover`` defaults, MI 400): r_bn 0.01, first
                BN x10, batch-shared crop/flip, cosine crop curriculum
``it50/it100/`` MI 50 / 100 / 200 (cosine LR and crop schedule over the shorter loop)
``it200``
``ce-only``     ``--r-bn 0``: cross-entropy only
``bn-only``     BN-statistic loss only (the teacher's logits are detached, so CE adds no gradient;
                ``delt recover`` has no CE weight)
``fbm1``        ``--first-bn-multiplier 1``
``per-sample``  ``--per-sample-aug``: a crop/flip per image instead of one per step
``bn-union``    the 10 images are optimized with 90 frozen random real images (9 per class) in
                every forward pass, so the BN statistics are those of 100 images (CE on the 10
                only; ``delt.synthesis.optimize_chunk``'s ``frozen``)
``lr0.05``      ``--lr 0.05`` (Adam's step size; DELT: 0.25), MI 400
``lr0.01``      ``--lr 0.01``
``no-crop``     the crop curriculum held at scale 1 (the whole image, random flip only)
==============  ==================================================================================

Diagnostics, all under the teacher in eval mode, float32, without augmentation unless said:

* the BN loss ``sum_l w_l (||mu_l - RM_l|| + ||var_l - RV_l||)`` (w_1 = 10, the objective's BN
  term before r_bn) of real batches: 10 images (1 per class), 100 (10 per class) and 1000 (100
  per class), over random draws, and of the 10 initial images;
* for every synthesized / real set: that BN loss, on the whole images and averaged over 32
  batch-shared crops of scale (0.08, 1) (the synthesis's last augmentation, the same draws for
  every set), the teacher's top-1 and mean true-class probability on the clean images and on
  student-augmented views (RandAugment + crop, the views the student's soft labels come from),
  and the RMS pixel change from the initial images.

Outputs in ``OUT`` (default ``runs/ipc1_ablation``): one folder per variant and seed,
``results.json`` and ``results.md``. Cached: finished recoveries and evaluations are reused.

    PYTHONPATH=python python benchmarks/quality/ipc1_ablation.py --out runs/ipc1_ablation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = (
    "init", "random-real", "delt", "it50", "it100", "it200", "ce-only", "bn-only", "fbm1",
    "per-sample", "bn-union", "lr0.05", "lr0.01", "no-crop",
)  # fmt: skip
# Recovery flags of each optimized variant (on top of the benchmark's DELT recipe).
RECOVER_FLAGS = {
    "delt": {},
    "it50": {"iterations": 50},
    "it100": {"iterations": 100},
    "it200": {"iterations": 200},
    "ce-only": {"r_bn": 0.0},
    "bn-only": {},
    "fbm1": {"first_bn_multiplier": 1.0},
    "per-sample": {"per_sample_aug": True},
    "bn-union": {},
    "lr0.05": {"lr": 0.05},
    "lr0.01": {"lr": 0.01},
    "no-crop": {},
}
OPTIMIZED = ("delt", "it50", "it100", "it200", "ce-only", "fbm1", "per-sample", "lr0.05", "lr0.01")
UNION_PER_CLASS = 9


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ipc1_ablation", help="output folder")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--iterations", type=int, default=400, help="MI (run.py's default)")
    parser.add_argument("--eval-epochs", type=int, default=100, help="student epochs")
    parser.add_argument("--eval-every", type=int, default=50, help="test every k epochs")
    parser.add_argument("--views", type=int, default=32, help="student-augmented views per image")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from delt import runtime
    from delt.chunks import ChunkStore
    from delt.data import load_like
    from delt.distilled_set import Manifest, save_distilled
    from delt.evaluate import EvalConfig, draw_random_real, evaluate
    from delt.io import torch_load, write_json
    from delt.models import load_checkpoint
    from delt.recover import RecoverConfig, recover
    from delt.runtime import derive_seed, resolve_device
    from delt.select import SelectConfig, Selection, select_images
    from delt.student_augment import StudentAugment
    from delt.synthesis import (
        ChunkOptimizer,
        frozen_teacher,
        load_selection,
        prepare_run,
    )
    from delt.teacher import TeacherConfig, train_teacher
    from torch import nn

    import delt_ext

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    started = time.time()
    machine = {**runtime.machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(json.dumps(machine), flush=True)

    # The benchmark's teacher and selection (run.py / DistillConfig.select_config).
    teacher_result = train_teacher(
        TeacherConfig(
            out=str(out / "teacher"), dataset="fashion-mnist", data_root=args.data_root,
            arch="convnet3", width=64, epochs=10, seed=0, device="auto", progress=False,
        )
    )  # fmt: skip
    teacher_path = str(teacher_result.path)
    print(f"teacher: {teacher_path} {teacher_result.test_accuracy:.2f}% test", flush=True)
    select_dir = out / "select"
    select_images(
        SelectConfig(
            teacher=teacher_path, ipc=1, out=str(select_dir), strategy="medium",
            data_root=args.data_root, seed=0, batch_size=2000, amp="bf16", channels_last=True,
            device="auto", progress=False,
        )
    )  # fmt: skip
    selection = Selection.load(select_dir)
    checkpoint = load_checkpoint(teacher_path)
    info = checkpoint.info
    classes = info.num_classes
    dataset = load_like(info, "train", args.data_root)
    init_indices = [selection.indices[c][0] for c in range(classes)]
    init_images = dataset.images(init_indices).float()
    labels = torch.arange(classes)
    device = resolve_device("auto")

    def recover_config(folder: Path, seed: int, **flags) -> RecoverConfig:
        iterations = flags.pop("iterations", args.iterations)
        return RecoverConfig(
            teacher=teacher_path, ipc=1, out=str(folder), method="delt",
            selection=str(select_dir), data_root=args.data_root, iterations=iterations,
            round_iterations=min(50, iterations), batch_size=100, channels_last=True, seed=seed,
            device="auto", progress=False, **flags,
        )  # fmt: skip

    class DetachedLogits(nn.Module):
        """The hooked teacher with its logits cut from the graph: CE then gives no gradient."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).detach()

    def custom_recover(
        config: RecoverConfig, ce: bool, frozen: torch.Tensor | None, full_crop: bool = False
    ) -> None:
        """``delt.recover.recover`` for IPC 1 with CE switchable, optional frozen images, and
        optionally the crop curriculum held at scale 1 (``full_crop``)."""
        run = prepare_run(config)
        config = run.config
        if full_crop:
            run.settings = dataclasses.replace(run.settings, crop_curriculum="full")
        chosen_selection, chosen_dataset = load_selection(config, run.teacher, 1)
        picks = chosen_selection.indices
        model = frozen_teacher(run.teacher.model, run.device, True)
        chunks = config.recipe.chunks(classes, 1, config.batch_size)

        def initial(chunk, generator):
            pairs = zip(chunk.classes, chunk.within_class, strict=True)
            return chosen_dataset.images([picks[c][j] for c, j in pairs])

        with delt_ext.BNStatMatching(model, config.first_bn_multiplier) as bn_matching:
            forward = model if ce else DetachedLogits(model)
            optimizer = ChunkOptimizer(
                forward, bn_matching, run.settings, run.device, config.iterations, progress=False
            )
            images, per_image, seconds = optimizer.optimize_set(
                ChunkStore(run.out / "chunks", info, 1), chunks, config.round_iterations,
                chunk_seed=lambda chunk: derive_seed(config.seed, chunk.index),
                initial_images=initial,
                frozen_images=None if frozen is None else (lambda chunk: frozen),
            )  # fmt: skip
        run.write_outputs(
            run.out, chosen_selection, images, torch.arange(classes), 1, per_image, seconds
        )

    def save_real_set(folder: Path, images: torch.Tensor, method: str, indices, template: Path):
        folder.mkdir(parents=True, exist_ok=True)
        manifest = dataclasses.replace(
            Manifest.load(template), method=method, indices=[int(i) for i in indices],
            iterations_per_image=[0] * classes, synthesis_seconds=0.0, files={},
        )  # fmt: skip
        save_distilled(folder, images, labels.clone(), manifest)

    # ---- diagnostics helpers
    model = frozen_teacher(load_checkpoint(teacher_path).model, device, False).eval()
    bn_probe = delt_ext.BNStatMatching(model, first_bn_multiplier=10.0)

    @torch.no_grad()
    def bn_loss(images: torch.Tensor) -> tuple[float, list[float]]:
        model(images.to(device))
        layers = [float(v) for v in bn_probe.layer_losses()]
        return float(bn_probe.loss()), layers

    @torch.no_grad()
    def teacher_stats(images: torch.Tensor, seed: int) -> dict:
        logits = model(images.to(device)).float().cpu()
        probs = logits.softmax(1)
        clean_top1 = float((probs.argmax(1) == labels).float().mean() * 100)
        clean_p = float(probs[torch.arange(classes), labels].mean())
        ce = float(nn.functional.cross_entropy(logits, labels))
        generator = torch.Generator().manual_seed(10_000 + seed)
        torch.manual_seed(10_000 + seed)  # RandAugment draws from the global generator
        augment = StudentAugment(info, 2, 6, 0.25, generator)
        views = augment(images.repeat(args.views, 1, 1, 1))
        view_labels = labels.repeat(args.views)
        view_probs = model(views.to(device)).float().softmax(1).cpu()
        return {
            "teacher_top1": clean_top1,
            "teacher_p_true": clean_p,
            "teacher_ce": ce,
            "aug_top1": float((view_probs.argmax(1) == view_labels).float().mean() * 100),
            "aug_p_true": float(view_probs[torch.arange(len(view_labels)), view_labels].mean()),
        }

    @torch.no_grad()
    def bn_loss_crops(images: torch.Tensor, draws: int = 32) -> float:
        """Mean BN loss over batch-shared crops of scale (0.08, 1), the synthesis's last
        augmentation (the same draws for every set)."""
        crop = delt_ext.RandomResizedCropFlip(
            size=tuple(images.shape[-2:]), scale=(0.08, 1.0), per_sample=False,
            generator=torch.Generator().manual_seed(30_000),
        )  # fmt: skip
        return float(np.mean([bn_loss(crop(images))[0] for _ in range(draws)]))

    # Real-batch BN-loss reference: what real images of each batch size reach.
    reference = {}
    generator = torch.Generator().manual_seed(12345)
    members = [torch.nonzero(dataset.targets == c).view(-1) for c in range(classes)]
    for per_class, draws in ((1, 200), (10, 50), (100, 10)):
        values = []
        for _ in range(draws):
            picks = torch.cat(
                [m[torch.randperm(m.numel(), generator=generator)[:per_class]] for m in members]
            )
            values.append(bn_loss(dataset.images(picks).float())[0])
        array = np.asarray(values)
        reference[f"real_{per_class * classes}"] = {
            "draws": draws, "mean": float(array.mean()), "std": float(array.std()),
            "min": float(array.min()), "max": float(array.max()),
        }  # fmt: skip
        print(f"BN loss of random real batches of {per_class * classes:>4}: "
              f"{array.mean():.3f} ± {array.std():.3f} (min {array.min():.3f}, {draws} draws)",
              flush=True)  # fmt: skip
    init_bn, init_layers = bn_loss(init_images)
    reference["init_10"] = {"value": init_bn, "layers": init_layers}
    print(f"BN loss of the 10 initial (medium) images: {init_bn:.3f} {init_layers}", flush=True)

    # ---- the variants
    rows = []
    results_path = out / "results.json"

    def write_results():
        write_json(results_path, {"machine": machine, "args": vars(args), "reference": reference,
                                  "rows": rows})  # fmt: skip

    delt_template = None
    order = ["delt"] + [v for v in variants if v != "delt"]  # init/random-real copy its manifest
    for variant in order:
        if variant not in variants and variant != "delt":
            continue
        for seed in seeds:
            folder = out / variant / f"seed{seed}"
            if variant in OPTIMIZED:
                config = recover_config(folder, seed, **RECOVER_FLAGS[variant])
                result = recover(config)
                if variant == "delt" and seed == seeds[0]:
                    delt_template = folder
                    # The mirror used by bn-only / bn-union reproduces recover() exactly.
                    mirror = out / "mirror-check"
                    shutil.rmtree(mirror, ignore_errors=True)
                    custom_recover(recover_config(mirror, seed), ce=True, frozen=None)
                    difference = float(
                        (torch_load(mirror / "distilled.pt")["images"] - result.images).abs().max()
                    )
                    print(
                        f"mirror check: max |difference| to delt recover = {difference}", flush=True
                    )
                    if difference != 0.0:
                        raise SystemExit("the custom recovery does not reproduce delt recover")
                    shutil.rmtree(mirror)
            elif variant in ("bn-only", "bn-union", "no-crop"):
                if not (folder / "distilled.pt").is_file():
                    frozen = None
                    if variant == "bn-union":
                        real, _, _ = draw_random_real(dataset, UNION_PER_CLASS, 20_000 + seed)
                        frozen = real.float()
                    custom_recover(recover_config(folder, seed), ce=variant != "bn-only",
                                   frozen=frozen, full_crop=variant == "no-crop")  # fmt: skip
            elif variant == "init":
                if not (folder / "distilled.pt").is_file():
                    save_real_set(folder, init_images, "delt-init", init_indices, delt_template)
            else:  # random-real
                if not (folder / "distilled.pt").is_file():
                    images, _, indices = draw_random_real(dataset, 1, seed)
                    save_real_set(folder, images.float(), "random-real", indices, delt_template)
            if variant not in variants:
                continue
            evaluation = evaluate(
                EvalConfig(
                    distilled=str(folder), teacher=teacher_path, data_root=args.data_root,
                    epochs=args.eval_epochs, seeds=(seed,), eval_every=args.eval_every,
                    amp="bf16", channels_last=True, device="auto", progress=False,
                )
            )  # fmt: skip
            images = torch_load(folder / "distilled.pt")["images"].float()
            manifest = Manifest.load(folder)
            value, layers = bn_loss(images)
            row = {
                "variant": variant,
                "seed": seed,
                "accuracy": evaluation.accuracy_mean,
                "final": evaluation.final_mean,
                "bn_loss": value,
                "bn_layers": layers,
                "bn_loss_crops": bn_loss_crops(images),
                "pixel_rms_change": float(
                    (info.denormalize(images) - info.denormalize(init_images)).pow(2).mean().sqrt()
                ),
                "image_iterations": manifest.image_iterations,
                **teacher_stats(images, seed),
            }
            rows.append(row)
            write_results()
            print(
                f"{variant:>11} seed {seed}: {row['accuracy']:6.2f}% (final {row['final']:.2f}), "
                f"BN loss {value:7.3f} (crops {row['bn_loss_crops']:6.3f}), teacher top-1 "
                f"{row['teacher_top1']:5.1f} p_true "
                f"{row['teacher_p_true']:.3f}, aug top-1 {row['aug_top1']:5.1f} p_true "
                f"{row['aug_p_true']:.3f}, RMS change {row['pixel_rms_change']:.3f}",
                flush=True,
            )

    # ---- summary
    lines = [
        "| variant | accuracy (%) | BN loss | BN loss, crops | teacher top-1 / p(true), clean "
        "| teacher top-1 / p(true), student views | RMS pixel change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        picked = [r for r in rows if r["variant"] == variant]
        if not picked:
            continue

        def ms(key, fmt, picked=picked):
            array = np.asarray([r[key] for r in picked])
            return f"{array.mean():{fmt}} ± {array.std():{fmt}}"

        lines.append(
            f"| {variant} | {ms('accuracy', '.2f')} | {ms('bn_loss', '.2f')} | "
            f"{ms('bn_loss_crops', '.2f')} | "
            f"{np.mean([r['teacher_top1'] for r in picked]):.0f} / "
            f"{np.mean([r['teacher_p_true'] for r in picked]):.3f} | "
            f"{np.mean([r['aug_top1'] for r in picked]):.1f} / "
            f"{np.mean([r['aug_p_true'] for r in picked]):.3f} | "
            f"{np.mean([r['pixel_rms_change'] for r in picked]):.3f} |"
        )
    lines += ["", "BN loss of random real batches (teacher, no augmentation):", ""]
    for key, entry in reference.items():
        if key.startswith("real_"):
            lines.append(f"- {key[5:]} images: {entry['mean']:.3f} ± {entry['std']:.3f} "
                         f"(min {entry['min']:.3f}, {entry['draws']} draws)")  # fmt: skip
    lines.append(f"- the 10 initial images: {reference['init_10']['value']:.3f}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    write_results()
    print("\n".join(lines))
    print(f"done in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
