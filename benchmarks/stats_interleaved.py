"""The cost of ``delt stats``' collector against the teacher's forward, interleaved per batch.

For each batch of 100 training images (dataset order, the first ``--images``), in one process:
the teacher's forward alone, the forward with the collector's hooks (``delt.stats``' own
``_Collector``, fused ``delt_ext.image_channel_sums``), and the forward with the version 1 sums
(a float64 copy, ``delt_ext.reference.image_channel_sums``), in rotating order, so the load of
a shared machine falls on all three alike. Prints the summed times and forward / collector
(issue 30's target: >= 0.9). ConvNet-3 width 128, untrained (the speed is the same).

Run: PYTHONPATH=python python benchmarks/stats_interleaved.py --images 60000
"""

import argparse
import time

import delt.stats
import torch
from delt.batches import iterate_batches
from delt.data import DatasetNotFoundError, load_dataset
from delt.models import build_model

from delt_ext import image_channel_sums, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--no-copy", action="store_true", help="leave out collector-copy")
    args = parser.parse_args()
    try:
        dataset = load_dataset("fashion-mnist", "train")
    except DatasetNotFoundError:
        dataset = load_dataset("synthetic:classes=10,channels=1,size=28,train=6000", "train")
    torch.manual_seed(0)
    model = build_model("convnet3", dataset.info, {"width": 128}).eval()
    images = min(args.images, len(dataset))
    batches = -(-images // args.batch_size)
    collector = delt.stats._Collector(model, dataset.info.num_classes, 1, batches)
    collector.remove()
    collector.reset()
    rows = {"forward": None, "collector": image_channel_sums, "collector-copy": None}
    rows["collector-copy"] = reference.image_channel_sums
    if args.no_copy:
        del rows["collector-copy"]
    seconds = dict.fromkeys(rows, 0.0)
    index = torch.arange(images)
    with torch.inference_mode():
        for b, (x, labels) in enumerate(iterate_batches(dataset, args.batch_size, indices=index)):
            collector.labels = labels
            collector.class_batch = torch.zeros_like(labels)
            collector.global_batch = torch.full_like(labels, b)
            names = list(rows)
            for name in names[b % len(names) :] + names[: b % len(names)]:
                sums = rows[name]
                handles = []
                if sums is not None:
                    delt.stats.image_channel_sums = sums
                    handles = [
                        m.register_forward_pre_hook(collector._hook(i))
                        for i, (_, m) in enumerate(collector.layers)
                    ]
                start = time.perf_counter()
                model(x)
                seconds[name] += time.perf_counter() - start
                for handle in handles:
                    handle.remove()
    print(f"{images} images, batches of {args.batch_size}, {torch.get_num_threads()} threads")
    for name, total in seconds.items():
        ratio = seconds["forward"] / total
        print(f"{name:15s} {total:9.2f} s  {images / total:8.1f} img/s  forward/this {ratio:.3f}")


if __name__ == "__main__":
    main()
