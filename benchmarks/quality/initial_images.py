"""Ablation: DELT's initial images, evaluated without any synthesis.

For every finished ``delt`` run of the quality benchmark (``OUT/delt/ipc<IPC>/seed<s>``), writes
a set holding the real images its recovery started from (the first IPC picks per class of the
run's own ``delt select`` ranking) with the run's manifest, to ``OUT-init/ipc<IPC>/seed<s>``,
and evaluates it with the benchmark's student protocol and the same seed. The gap between this
and the DELT row of the table is what the synthesis adds on top of the selection.

    python benchmarks/quality/initial_images.py --out runs/quality --ipcs 1,10
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quality", help="the quality benchmark's folder")
    parser.add_argument("--ipcs", default="1,10", help="comma-separated IPCs")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--eval-epochs", type=int, default=100, help="student epochs")
    parser.add_argument("--eval-every", type=int, default=50, help="test every k epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)

    import torch
    from delt.data import load_like
    from delt.evaluate import EvalConfig, evaluate
    from delt.io import torch_load, torch_save
    from delt.models import load_checkpoint
    from delt.select import Selection

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    teacher_path = out / "teacher" / "teacher.pt"
    teacher = load_checkpoint(teacher_path)
    dataset = load_like(teacher.info, "train", None)
    classes = teacher.info.num_classes
    for ipc in (int(v) for v in args.ipcs.split(",")):
        accuracies = []
        for seed in (int(v) for v in args.seeds.split(",")):
            run = out / "delt" / f"ipc{ipc}" / f"seed{seed}"
            target = Path(f"{out}-init") / f"ipc{ipc}" / f"seed{seed}"
            if not (target / "distilled.pt").is_file():
                shutil.copytree(
                    run / "distilled", target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("chunks", "images", "*.json"),
                )  # fmt: skip
                shutil.copy(run / "distilled" / "manifest.json", target / "manifest.json")
                selection = Selection.load(run / "select")
                distilled = torch_load(run / "distilled" / "distilled.pt")
                picks = [selection.indices[c][j] for c in range(classes) for j in range(ipc)]
                initial = dataset.images(picks).float()
                if initial.shape != distilled["images"].shape:
                    raise SystemExit(f"{run}: {tuple(initial.shape)} initial images for a set "
                                     f"of {tuple(distilled['images'].shape)}")  # fmt: skip
                torch_save({**distilled, "images": initial}, target / "distilled.pt")
            result = evaluate(
                EvalConfig(
                    distilled=str(target), teacher=str(teacher_path), epochs=args.eval_epochs,
                    eval_every=args.eval_every, seeds=(seed,), amp="bf16", channels_last=True,
                    progress=False,
                )
            )  # fmt: skip
            accuracies.append(result.accuracy_mean)
            print(f"IPC {ipc} seed {seed}: initial images {result.accuracy_mean:.2f}%", flush=True)
        array = np.asarray(accuracies)
        print(f"IPC {ipc}: initial images {array.mean():.2f} ± {array.std():.2f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
