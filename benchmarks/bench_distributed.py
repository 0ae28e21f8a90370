"""Synthesis throughput under torchrun (issue 13): one process vs 1 and 2 Gloo ranks.

Every configuration runs ``delt recover --method cda`` on the same teacher and the same chunks,
each process with one intra-op thread, side by side in one run (interleaved, ``--repeats``
times; the table takes each configuration's best):

* ``one process``: plain ``python -m delt``-style call of :func:`delt.recover.recover`;
* ``torchrun 1 rank``, ``torchrun 2 ranks``: ``torchrun --standalone --nproc-per-node N``.

The time is the wall time of :func:`delt.recover.recover` on rank 0 between two barriers (the
teacher load, every chunk, the barrier before assembling, rank 0's writes), not Python's and
torch's import or the process group's start, which do not grow with the set. Throughput is
images x iterations per second; scaling is a throughput over the one-process one.

    .venv/bin/python benchmarks/bench_distributed.py --out /tmp/bench-dist --repeats 4

Each configuration's set is checked to be bitwise the one-process set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("one process", None), ("torchrun 1 rank", 1), ("torchrun 2 ranks", 2)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONSAFEPATH="1")
    return env


def worker(args: argparse.Namespace) -> None:
    """One configuration: times recover() on rank 0 and writes ``timing.json`` into --out."""
    import torch
    from delt.distributed import barrier, is_main, session
    from delt.recover import RecoverConfig, recover

    torch.set_num_threads(1)
    config = RecoverConfig(
        teacher=args.teacher, ipc=args.ipc, out=args.out, method="cda",
        iterations=args.iterations, batch_size=args.batch_size, device="cpu", progress=False,
    )  # fmt: skip
    with session("cpu", args.out):
        barrier()
        start = time.perf_counter()
        result = recover(config)
        barrier()
        seconds = time.perf_counter() - start
        if is_main():
            image_iterations = sum(result.iterations_per_image)
            document = {"seconds": seconds, "image_iterations": image_iterations}
            Path(args.out, "timing.json").write_text(json.dumps(document))


def _run(label: str, ranks: int | None, out: Path, common: list[str]) -> dict:
    script = [str(Path(__file__).resolve()), "--worker", "--out", str(out), *common]
    if ranks is None:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}", *script,
        ]  # fmt: skip
    subprocess.run(command, env=_env(), check=True, timeout=3600)
    timing = json.loads((out / "timing.json").read_text())
    return {"label": label, **timing, "rate": timing["image_iterations"] / timing["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="scratch folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help="teacher.pt (default: one trained into --out)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch
    from delt.runtime import machine
    from delt.teacher import TeacherConfig, train_teacher

    out = Path(args.out)
    teacher = args.teacher
    if teacher is None:
        trained = train_teacher(
            TeacherConfig(
                out=str(out / "teacher"), dataset="synthetic:classes=10,channels=3,size=32,"
                "train=200,test=50", arch="convnet3", width=32, epochs=1, batch_size=50,
                device="cpu", progress=False,
            )
        )  # fmt: skip
        teacher = str(trained.path)
    common = [
        "--teacher", teacher, "--ipc", str(args.ipc), "--iterations", str(args.iterations),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    best: dict[str, dict] = {}
    rates: dict[str, list[float]] = {label: [] for label, _ in CONFIGS}
    for repeat in range(args.repeats):
        for label, ranks in CONFIGS:
            folder = out / f"{label.replace(' ', '-')}-{repeat}"
            if folder.exists():
                subprocess.run(["rm", "-rf", str(folder)], check=True)
            row = _run(label, ranks, folder, common)
            print(f"{label} (repeat {repeat}): {row['seconds']:.2f} s, {row['rate']:.0f} img*it/s")
            rates[label].append(row["rate"])
            if label not in best or row["rate"] > best[label]["rate"]:
                best[label] = {**row, "folder": str(folder)}
    reference = torch.load(Path(best["one process"]["folder"], "distilled.pt"), weights_only=True)
    for row in best.values():
        other = torch.load(Path(row["folder"], "distilled.pt"), weights_only=True)
        assert torch.equal(other["images"], reference["images"]), row["label"]
    base = best["one process"]["rate"]
    info = machine()
    print(f"\nmachine: {info['cpu']}, {os.cpu_count()} cores; started {info['started']}")
    print(
        f"cda, 10 classes x IPC {args.ipc} of 32x32, ConvNet-3 width 32, {args.iterations} "
        f"iterations, chunks of {args.batch_size}; one thread per process; best of "
        f"{args.repeats}\n"
    )
    print("| configuration | seconds | images x iterations / s | vs one process |")
    print("|---|---:|---:|---:|")
    for label, _ in CONFIGS:
        row = best[label]
        print(f"| {label} | {row['seconds']:.2f} | {row['rate']:.0f} | {row['rate'] / base:.2f}x |")
    # Pair by pair: each repeat's three rows ran back to back, so their ratios share the
    # machine's state; the median of those ratios is steadier than a best-of on a noisy host.
    columns = " | ".join(f"repeat {r}" for r in range(args.repeats))
    print(f"\n| 2 ranks over | {columns} | median |")
    print("|---|" + "---:|" * (args.repeats + 1))
    for label in ("one process", "torchrun 1 rank"):
        pairs = zip(rates["torchrun 2 ranks"], rates[label], strict=True)
        ratios = [two / one for two, one in pairs]
        cells = " | ".join(f"{ratio:.2f}x" for ratio in ratios)
        print(f"| {label} | {cells} | {statistics.median(ratios):.2f}x |")
    print("\nevery set bitwise equal to the one-process set: yes")


if __name__ == "__main__":
    main()
