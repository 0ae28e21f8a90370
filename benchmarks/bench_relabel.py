"""Soft-label store: size and a student's epoch time, online teacher vs `delt eval --labels`.

    PYTHONPATH=python OMP_NUM_THREADS=1 python benchmarks/bench_relabel.py \
        --set /tmp/set10 --data-root /usr/share/datasets/fashion-mnist --epochs 3

Makes a full fp32 store of ``--epochs`` epochs of the set (timing `delt relabel`), then trains
two students of seed 0 epoch by epoch, interleaved: one with the online teacher (`delt eval`'s
CPU default, --workers 0) and one on the store; prints the median seconds per epoch of each,
projected to 300 epochs, and the store's size at 300 epochs for full / top-100 / top-10 (fp32 and
fp16) from the format (:class:`delt.soft_labels.StoreLayout`). One thread (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from delt import relabel as relabel_module
from delt.evaluate import EvalConfig, EvalContext
from delt.relabel import RelabelConfig, relabel
from delt.soft_labels import StoreLayout, data_offset, header_capacity, store_header
from delt.student_trainer import default_batch_size, seeded

PROJECTED_EPOCHS = 300


def projected_size(epochs: int, rows: int, classes: int, top_k: int | None, dtype: str) -> int:
    """Bytes of a store (header area included) from the format alone."""
    layout = StoreLayout.plan(epochs, rows, classes, top_k, dtype)
    protocol = {"distilled_sha256": "0" * 64, "teacher_sha256": "0" * 64, "dataset": "x" * 40}
    header = store_header(protocol, layout, {"path": "x" * 80}, {"torch": "2.x"}, 20.0)
    return data_offset(header_capacity(header)) + epochs * layout.epoch_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = Path(args.set) / "bench.labels"
    store.unlink(missing_ok=True)
    # The teacher's epochs alone (not the command's setup: loading the set, test split, digests).
    label_times = []
    label_epoch = relabel_module._label_epoch

    def timed(*a, **k):
        begin = time.perf_counter()
        block = label_epoch(*a, **k)
        label_times.append(time.perf_counter() - begin)
        return block

    relabel_module._label_epoch = timed
    made = relabel(
        RelabelConfig(
            distilled=args.set, epochs=args.epochs, out=str(store), progress=False,
            data_root=args.data_root, device="cpu",
        )
    )  # fmt: skip
    relabel_module._label_epoch = label_epoch
    relabel_seconds = statistics.median(label_times)

    def context(labels):
        config = EvalConfig(
            distilled=args.set, epochs=args.epochs, seeds=(0,), progress=False,
            data_root=args.data_root, device="cpu", labels=labels,
        )  # fmt: skip
        return EvalContext.from_config(config)

    contexts = {"online": context(None), "store": context(str(store))}
    trainers = {}
    for name, ctx in contexts.items():
        with seeded(0):
            trainers[name] = ctx.make_trainer(0)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.epochs):
        for name, trainer in trainers.items():
            ctx = contexts[name]
            begin = time.perf_counter()
            trainer.train_epoch(ctx.images, ctx.labels)
            times[name].append(time.perf_counter() - begin)
    ctx = contexts["online"]
    rows, classes = int(ctx.images.shape[0]), ctx.info.num_classes
    result = {
        "set": args.set,
        "rows": rows,
        "batch_size": ctx.settings.batch_size,
        "measured_epochs": args.epochs,
        "store_bytes_measured": made.size,
        "relabel_s_per_epoch": relabel_seconds,
        "epoch_s": {name: statistics.median(values) for name, values in times.items()},
        "epoch_s_runs": times,
        "projected_300_epochs_h": {
            name: statistics.median(values) * PROJECTED_EPOCHS / 3600
            for name, values in times.items()
        },
        "relabel_300_epochs_h": relabel_seconds * PROJECTED_EPOCHS / 3600,
        "store_bytes_300": {
            f"{kind}-{dtype}": projected_size(PROJECTED_EPOCHS, rows, classes, k, dtype)
            for kind, k in (("full", None), ("top-5", 5))
            for dtype in ("fp32", "fp16")
        },
    }
    imagenet = {}
    for ipc in (10, 50):
        n = ipc * 1000
        for kind, k in (("full", None), ("top-100", 100), ("top-10", 10)):
            for dtype in ("fp32", "fp16"):
                imagenet[f"ipc{ipc}-{kind}-{dtype}"] = projected_size(
                    PROJECTED_EPOCHS, n, 1000, k, dtype
                )
        imagenet[f"ipc{ipc}-batch"] = default_batch_size(ipc, 1000, n)
    result["imagenet_1k_300_epochs"] = imagenet
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    store.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
