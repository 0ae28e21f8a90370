"""PDD benchmark: progressive synthesis with each conditioning option vs DELT and CDA.

Fashion-MNIST, one ConvNet-3 teacher (width 64, 10 epochs, checkpoints after epochs 2, 4, 6, 8
and 10 for ``--stage-teachers checkpoints``), ConvNet-3 students of the same width. At IPC 10
and 50, seeds 0, 1, 2 (synthesis seed = student seed), methods:

* ``delt``: DELT, MI = ``--iterations`` T, RI = T / 8 (DELT's 8 rounds).
* ``cda``: CDA with as many iterations per image as DELT spends on average, so that both cost
  the same image-iterations (:func:`budgets`).
* ``pdd``: 5 stages of IPC / 5 images per class over a DELT base, nothing but freezing; each
  stage runs DELT's 8 rounds over its own images with a per-stage MI chosen so that the run's
  image-iterations match DELT's (:func:`budgets`).
* ``pdd+ckpt``, ``pdd+union``, ``pdd+hard``: ``pdd`` with one conditioning option each
  (``--stage-teachers checkpoints``; ``--union-in-batch --union-sample`` = the new images of a
  stage; ``--stage-init hard``); ``pdd+all``: the three together.

Every distilled set is evaluated by ``delt eval`` (plain: one student on the whole set); the
PDD variants of ``--stagewise-for`` (default ``pdd`` and ``pdd+all``) also by
``delt eval --stagewise`` (one student on U_1, then U_1 ∪ U_2, …, the same total
epochs split across the stages, the optimizer state carried over), which reports the plain
evaluation of the same set beside it.

Resumable: recoveries resume from their chunks, evaluations from their results files; finished
runs cost nothing. Every finished set is also measured by ``delt diversity``. Every finished step
appends a line to ``OUT/progress.jsonl``; ``--table`` prints the table of the finished runs (also
written to ``OUT/results.md`` at the end).

    nohup python benchmarks/pdd/run.py --out runs/pdd-bench > runs/pdd-bench/bench.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("delt", "cda", "pdd", "pdd+ckpt", "pdd+union", "pdd+hard", "pdd+all")
STAGES = 5
CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/pdd-bench", help="output folder")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--ipcs", default="10,50", help="comma-separated IPCs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--width", type=int, default=64, help="ConvNet-3 width")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--save-epochs", default="2,4,6,8,10", help="PDD's stage teachers")
    parser.add_argument("--iterations", type=int, default=400, help="DELT's MI T (RI = T/8)")
    parser.add_argument("--hard-student-epochs", type=int, default=30)
    parser.add_argument("--eval-epochs", type=int, default=100, help="student epochs")
    parser.add_argument("--eval-every", type=int, default=50, help="test every k epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1: on a shared 2-core machine two OpenMP threads ran the "
        "recovery 4-8x slower than one)",
    )  # fmt: skip
    parser.add_argument(
        "--stagewise-for",
        default="pdd,pdd+all",
        help="PDD variants also evaluated stage-wise (beside the plain student)",
    )
    parser.add_argument(
        "--continue-for",
        default="",
        help="variants also evaluated stage-wise with --stage-schedule continue (one LR curve)",
    )
    parser.add_argument("--no-eval", action="store_true", help="recover only (evaluate later)")
    parser.add_argument("--table", action="store_true", help="print the table of finished runs")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def budgets(ipc: int, iterations: int) -> dict:
    """Iterations of every method so that all spend DELT's image-iterations.

    DELT (MI T, RI T/8) gives each class ``sum(early_late_iterations(ipc, T, T/8))``. CDA gives
    every image the same count: that sum / ipc, rounded. PDD runs 5 stages of ipc/5 images with
    DELT's 8 rounds inside each, its per-stage MI the multiple of 8 whose total is closest to
    DELT's (:func:`delt.schedules.pdd_matched_iterations`).
    """
    from delt.schedules import pdd_matched_iterations

    round_iterations = iterations // 8
    pdd = pdd_matched_iterations(ipc, iterations, round_iterations, CLASSES, STAGES)
    delt = pdd.delt_image_iterations
    cda = round(delt / (ipc * CLASSES))
    return {
        "delt": {"iterations": iterations, "round_iterations": round_iterations},
        "cda": {"iterations": cda},
        "pdd": {"iterations": pdd.iterations, "round_iterations": pdd.round_iterations},
        "image_iterations": {
            "delt": delt,
            "cda": cda * ipc * CLASSES,
            "pdd": pdd.image_iterations,
        },
    }


def recover_config(variant, ipc, seed, args, paths):
    """The RecoverConfig of one run (every shared setting in one place)."""
    from delt.recover import RecoverConfig

    budget = budgets(ipc, args.iterations)
    common = dict(
        teacher=str(paths["teacher"]), ipc=ipc, out=str(paths["run"]), batch_size=100,
        channels_last=True, seed=seed, device=args.device, progress=False,
    )  # fmt: skip
    if variant == "delt":
        return RecoverConfig(
            method="delt", selection=str(paths["selection"]), **budget["delt"], **common
        )
    if variant == "cda":
        return RecoverConfig(method="cda", **budget["cda"], **common)
    options = {
        "pdd": {},
        "pdd+ckpt": {"stage_teachers": "checkpoints"},
        "pdd+union": {"union_in_batch": True, "union_sample": ipc // STAGES * CLASSES},
        "pdd+hard": {"stage_init": "hard", "hard_student_epochs": args.hard_student_epochs},
    }
    if variant == "pdd+all":
        chosen = {
            k: v for name in ("pdd+ckpt", "pdd+union", "pdd+hard") for k, v in options[name].items()
        }
    else:
        chosen = options[variant]
    return RecoverConfig(
        method="pdd", base="delt", stages=STAGES, selection=str(paths["selection"]),
        **budget["pdd"], **chosen, **common,
    )  # fmt: skip


def eval_config(run_dir, seed, args, stagewise, schedule="restart"):
    from delt.evaluate import EvalConfig

    out = None
    if schedule == "continue":
        out = str(run_dir / "eval-stagewise-continue.json")
    return EvalConfig(
        distilled=str(run_dir), epochs=args.eval_epochs, seeds=(seed,), eval_every=args.eval_every,
        amp="bf16", channels_last=True, stagewise=stagewise, stage_schedule=schedule, out=out,
        device=args.device, progress=False,
    )  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table(out))
        return 0
    import torch
    from delt import runtime
    from delt.recover import recover
    from delt.select import SelectConfig, select_images
    from delt.teacher import TeacherConfig, train_teacher

    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    started = time.time()
    machine = {
        **runtime.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": vars(args),
    }
    print(json.dumps(machine), flush=True)
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")

    step_started = time.time()
    teacher = train_teacher(
        TeacherConfig(
            out=str(out / "teacher"), dataset="fashion-mnist", data_root=args.data_root,
            arch="convnet3", width=args.width, epochs=args.teacher_epochs,
            save_epochs=tuple(_ints(args.save_epochs)), seed=0, device=args.device, progress=False,
        )
    )  # fmt: skip
    _log(
        out,
        {
            "step": "teacher",
            "accuracy": teacher.test_accuracy,
            "seconds": time.time() - step_started,
            "cached": teacher.reused,
        },
    )
    step_started = time.time()
    selection_dir = out / "selection"
    select_images(
        SelectConfig(
            teacher=str(teacher.path), ipc=max(_ints(args.ipcs)), out=str(selection_dir),
            data_root=args.data_root, channels_last=True, device=args.device, progress=False,
        )
    )  # fmt: skip
    _log(out, {"step": "select", "seconds": time.time() - step_started})

    for ipc in _ints(args.ipcs):
        print(json.dumps({"ipc": ipc, "budgets": budgets(ipc, args.iterations)}), flush=True)
        for seed in _ints(args.seeds):
            for variant in variants:
                run_dir = out / f"ipc{ipc}" / variant / f"seed{seed}"
                paths = {"teacher": teacher.path, "selection": selection_dir, "run": run_dir}
                step_started = time.time()
                result = recover(recover_config(variant, ipc, seed, args, paths))
                _log(out, {
                    "step": "recover", "variant": variant, "ipc": ipc, "seed": seed,
                    "image_iterations": sum(result.iterations_per_image),
                    "synthesis_seconds": result.synthesis_seconds,
                    "seconds": time.time() - step_started,
                })  # fmt: skip
                if args.no_eval:
                    continue
                from delt.evaluate import evaluate
                from delt.stagewise import evaluate_stagewise

                step_started = time.time()
                stagewise = variant.startswith("pdd") and variant in args.stagewise_for.split(",")
                evaluation = (evaluate_stagewise if stagewise else evaluate)(
                    eval_config(run_dir, seed, args, stagewise)
                )
                _log(out, {
                    "step": "eval", "variant": variant, "ipc": ipc, "seed": seed,
                    "stagewise": stagewise, "path": str(evaluation.path),
                    "seconds": time.time() - step_started,
                })  # fmt: skip
                if stagewise and variant in args.continue_for.split(","):
                    step_started = time.time()
                    evaluation = evaluate_stagewise(
                        eval_config(run_dir, seed, args, True, "continue")
                    )
                    _log(out, {
                        "step": "eval", "variant": variant, "ipc": ipc, "seed": seed,
                        "stagewise": "continue", "path": str(evaluation.path),
                        "seconds": time.time() - step_started,
                    })  # fmt: skip
                from delt.diversity import DiversityConfig, measure_diversity

                measure_diversity(DiversityConfig(distilled=str(run_dir), device=args.device))
                print(_row_line(out, ipc, variant, seed), flush=True)
    text = table(out)
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"done in {time.time() - started:.0f} s", flush=True)
    return 0


def _log(out: Path, record: dict) -> None:
    record = {**record, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(out / "progress.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------
# Results


def _run_results(run_dir: Path) -> dict | None:
    """Accuracies and costs of one finished run (None when it is not finished)."""
    manifest_path = run_dir / "manifest.json"
    plain_path, stagewise_path = run_dir / "eval.json", run_dir / "eval-stagewise.json"
    if not manifest_path.is_file():
        return None
    from delt.distilled_set import Manifest

    manifest = Manifest.load(run_dir)
    row = {
        "image_iterations": manifest.image_iterations,
        "synthesis_seconds": manifest.synthesis_seconds,
    }
    if stagewise_path.is_file():
        document = json.loads(stagewise_path.read_text())
        if not document.get("complete"):
            return None
        seed = document["seeds"][0]  # the stage-wise student; the plain one beside it
        plain = document["plain"]["seeds"][0]
        row.update(
            plain_best=plain["best_accuracy"], plain_final=plain["final_accuracy"],
            stagewise_best=seed["best_accuracy"], stagewise_final=seed["final_accuracy"],
            stage_accuracy=[stage["accuracy"] for stage in seed["stages"]],
            eval_seconds=document["wall_seconds"],
        )  # fmt: skip
        continued = run_dir / "eval-stagewise-continue.json"
        if continued.is_file() and json.loads(continued.read_text()).get("complete"):
            entry = json.loads(continued.read_text())["seeds"][0]
            row.update(continue_best=entry["best_accuracy"], continue_final=entry["final_accuracy"])
    elif plain_path.is_file():
        document = json.loads(plain_path.read_text())
        if not document.get("complete"):
            return None
        plain = document["seeds"][0]
        row.update(
            plain_best=plain["best_accuracy"],
            plain_final=plain["final_accuracy"],
            eval_seconds=document["wall_seconds"],
        )
    else:
        return None
    diversity_path = run_dir / "diversity.json"
    if diversity_path.is_file():
        row["diversity"] = json.loads(diversity_path.read_text())["mean"]
    return row


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    array = np.asarray(values, dtype=np.float64)
    return f"{array.mean():.{digits}f} ± {array.std():.{digits}f}"


def _row_line(out: Path, ipc: int, variant: str, seed: int) -> str:
    row = _run_results(out / f"ipc{ipc}" / variant / f"seed{seed}")
    return f"{variant:>10} IPC {ipc:>2} seed {seed}: {json.dumps(row)}"


def table(out: Path) -> str:
    """The markdown table of every finished run under ``out``, pooled over seeds."""
    lines = [
        "| IPC | method | seeds | image-its | synthesis s | plain best | plain final | "
        "stage-wise best | stage-wise final | stage-wise after each stage | "
        "stage-wise (continue) best | diversity (cos) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ipc_dir in sorted(out.glob("ipc*"), key=lambda p: int(p.name[3:])):
        for variant in VARIANTS:
            rows = [
                row
                for seed_dir in sorted((ipc_dir / variant).glob("seed*"))
                if (row := _run_results(seed_dir)) is not None
            ]
            if not rows:
                continue
            stages = [row["stage_accuracy"] for row in rows if "stage_accuracy" in row]
            per_stage = (
                " / ".join(f"{v:.1f}" for v in np.mean(np.asarray(stages), axis=0))
                if stages
                else "–"
            )
            lines.append(
                f"| {ipc_dir.name[3:]} | {variant} | {len(rows)} | "
                f"{int(np.mean([r['image_iterations'] for r in rows])):,} | "
                f"{np.mean([r['synthesis_seconds'] for r in rows]):.0f} | "
                f"{_mean_std([r['plain_best'] for r in rows])} | "
                f"{_mean_std([r['plain_final'] for r in rows])} | "
                f"{_mean_std([r['stagewise_best'] for r in rows if 'stagewise_best' in r])} | "
                f"{_mean_std([r['stagewise_final'] for r in rows if 'stagewise_final' in r])} | "
                f"{per_stage} | "
                f"{_mean_std([r['continue_best'] for r in rows if 'continue_best' in r])} | "
                f"{_mean_std([r['diversity'] for r in rows if 'diversity' in r], 4)} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
