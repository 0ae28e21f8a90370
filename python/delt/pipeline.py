"""``delt distill``: teacher → select (delt, pdd over delt) → recover (or a seeded random-real
draw) → eval → diversity → report in one folder, every step cached by its flags and the SHA-256
of its inputs (docs/quickstart.md). ``OUT/report.json`` holds exactly
:data:`delt.report.REPORT_KEYS`; ``synthesis_seconds`` is the recovery's optimization time, not
teacher training or selection.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from delt.config import ConfigError, check_int_fields, flag, identity_dict, option
from delt.data import load_dataset, load_like
from delt.distilled_set import Manifest, load_distilled
from delt.distributed import barrier, is_main, main_first
from delt.diversity import DiversityConfig, measure_diversity
from delt.eval_results import EvalResult
from delt.evaluate import EvalConfig, evaluate
from delt.identity import check_or_reuse, config_defaults, config_identity
from delt.io import check_output, read_json, sha256_file, write_json
from delt.lock import output_lock
from delt.matching import MatchOptions
from delt.method import (
    DEFAULT_ROUND_ITERATIONS,
    Method,
    check_method_options,
    methods,
    option_types,
)
from delt.models import TeacherMismatchError, load_checkpoint, model_spec
from delt.recover import RecoverConfig, recover
from delt.report import write_image_grid, write_run_report
from delt.runtime import logger
from delt.select import SelectConfig, select_images
from delt.stats import StatsConfig, collect_statistics, load_statistics
from delt.teacher import TeacherConfig, train_teacher

__all__ = ["DistillConfig", "DistillResult", "distill", "distill_methods"]
# DistillConfig's fields that only configure the teacher trained here: refused with --teacher.
TEACHER_TRAINING_FIELDS = ("arch", "width", "teacher_epochs")


def distill_methods() -> tuple[str, ...]:
    """The registered methods: the baseline first, then the methods of `delt recover`."""
    return (*methods(recovers=False), *methods(recovers=True))


_RECOVER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RecoverConfig)}


@dataclass(kw_only=True)
class DistillConfig(*reversed(option_types()), MatchOptions):  # type: ignore[misc]
    """Configuration of ``delt distill`` (one field per flag): its own, every registered
    method's options (:func:`delt.method.option_types`), as ``delt recover``, and the matching
    target's (:class:`delt.matching.MatchOptions`; ``--match class`` without ``--stats``:
    ``delt stats`` runs as a step into ``OUT/stats.pt``)."""

    method: str = option(
        help="synthesis method, or the random-real baseline", choices=distill_methods
    )
    ipc: int = option(help="images per class")
    out: str = option(
        help="output folder (re-running into it reuses finished steps)", identity=False
    )
    dataset: str = option("fashion-mnist", help="dataset name (see delt.data.DATASETS)")
    data_root: str | None = option(
        None, help="dataset folder (default: the dataset's own)", identity=False
    )
    teacher: str | None = option(
        None,
        help="an existing teacher checkpoint (default: train one into OUT/teacher)",
        identity=False,
    )
    arch: str = option("convnet3", help="architecture of the teacher trained here (and student)")
    width: int | None = option(None, help="convnetD width of that teacher (default 128)")
    teacher_epochs: int = option(
        3, help="epochs of that teacher (all three: refused with --teacher, whose own are used)"
    )
    # Not part of the identity, as `delt teacher --save-epochs`: the final teacher is the same.
    teacher_save_epochs: tuple[int, ...] | None = option(
        None,
        help="also save that teacher after these epochs (`delt teacher --save-epochs`; pdd "
        "--stage-teachers checkpoints: one per stage, early phase first)",
        identity=False,
    )
    strategy: Literal["medium", "top", "min", "random"] = option(
        "medium", help="delt: selection strategy of the initial real images"
    )
    iterations: int = option(
        _RECOVER_DEFAULTS["iterations"], help="recovery iterations per chunk (DELT's MI)"
    )
    round_iterations: int | None = option(
        None,
        help=f"delt, pdd over delt: RI (default {DEFAULT_ROUND_ITERATIONS}; pdd: per stage)",
    )
    recover_batch_size: int = option(
        _RECOVER_DEFAULTS["batch_size"],
        help="images per recovery chunk (rded: crops per scoring forward)",
    )
    recover_lr: float = option(
        _RECOVER_DEFAULTS["lr"],
        help="recovery's Adam learning rate (`delt recover --lr`; not rded, random-real)",
    )
    eval_epochs: int = option(300, help="student training epochs")
    seeds: tuple[int, ...] = option((0,), help="evaluation seeds, one student each")
    eval_every: int = option(10, help="test the student every k epochs (and after the last)")
    eval_batch_size: int | None = option(None, help="student batch size (default: delt eval's)")
    diversity_model: str = option("teacher", help="feature model: 'teacher' or a checkpoint")
    amp: Literal["none", "bf16"] = option(
        "none", help="autocast of teacher training, selection and eval (recovery: always fp32)"
    )
    channels_last: bool = option(False, help="channels_last memory format (faster on CPU)")
    seed: int = option(0, help="seed of teacher, selection and recovery (or random-real draw)")
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        if self.method not in distill_methods():
            raise ConfigError(
                f"--method {self.method!r}: unknown; known: {', '.join(distill_methods())}"
            )
        method = self.recovery
        self.seeds = tuple(self.seeds)
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError(f"--seeds must list distinct seeds, got {self.seeds}")
        check_int_fields(
            self,
            ("ipc", "teacher_epochs", "iterations", "recover_batch_size", "eval_epochs")
            + ("eval_every", "eval_batch_size"),
        )
        try:
            spec = model_spec(self.arch)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.width is not None and "width" not in spec.kwargs:
            raise ConfigError(f"--width applies to convnetD architectures, not --arch {self.arch}")
        self._check_teacher_training_flags()
        check_method_options(self, method, self.ipc)
        if self.round_iterations is not None and not self.starts_from_selection:
            raise ConfigError(
                "--round-iterations applies to --method delt and to pdd --base delt; "
                f"{method.label(self)} has no rounds"
            )
        self._check_teacher_save_epochs()
        if self.match != "global" and not method.optimizes:
            raise ConfigError(
                f"--match applies to the methods that optimize pixels, not {self.method}"
            )
        if not math.isfinite(self.recover_lr) or self.recover_lr <= 0:
            raise ConfigError(f"--recover-lr must be a finite number > 0, got {self.recover_lr}")
        if not method.optimizes and self.recover_lr != _RECOVER_DEFAULTS["lr"]:
            raise ConfigError(
                f"--recover-lr applies to the methods that optimize pixels, not {self.method}"
            )
        # The sub-configs validate the rest now, before any work, with their own messages
        # (rded: --iterations, as delt recover's).
        self.eval_config(Path(self.out) / "distilled", None)
        if method.recovers:
            self.recover_config(None, None)

    @property
    def recovery(self) -> Method:
        """The method that makes the set (:func:`delt.method.methods`)."""
        return methods()[self.method]

    @property
    def starts_from_selection(self) -> bool:
        """Whether the recovery starts from `delt select`'s images (delt, pdd over delt)."""
        return self.recovery.starts_from_selection(self)

    def _check_teacher_training_flags(self) -> None:
        # The flags of the teacher trained here; --teacher-save-epochs has its own message.
        if self.teacher is None:
            return
        given = [
            flag(f.name)
            for f in dataclasses.fields(self)
            if f.name in TEACHER_TRAINING_FIELDS and getattr(self, f.name) != f.default
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to the teacher "
                f"trained here, not to --teacher {self.teacher} (the student and every step use "
                "that teacher's architecture)"
            )

    def _check_teacher_save_epochs(self) -> None:
        epochs = self.teacher_save_epochs
        if epochs is not None:
            self.teacher_save_epochs = epochs = tuple(epochs)
            shown = ",".join(map(str, epochs))
            if self.teacher is not None:
                raise ConfigError(
                    "--teacher-save-epochs applies to the teacher trained here, not to --teacher"
                )
            if not epochs or list(epochs) != sorted(set(epochs)):
                raise ConfigError(
                    f"--teacher-save-epochs must be strictly increasing (early phase first), got "
                    f"{shown}"
                )
            if not 1 <= epochs[0] <= epochs[-1] <= self.teacher_epochs:
                raise ConfigError(
                    f"--teacher-save-epochs must lie in [1, --teacher-epochs "
                    f"{self.teacher_epochs}], got {shown}"
                )
        # (pdd's flag: at its default on the other methods, refused above)
        if self.stage_teachers != "checkpoints":
            return
        stages = self.stage_count
        if self.teacher is None and epochs is None:
            raise ConfigError(
                f"--stage-teachers checkpoints needs {stages} teacher checkpoints: pass "
                f"--teacher-save-epochs e1,...,e{stages} (the teacher trained here) or --teacher "
                "PATH of `delt teacher --save-epochs`"
            )
        if epochs is not None and len(epochs) != stages:
            raise ConfigError(
                f"--teacher-save-epochs {shown}: --stage-teachers checkpoints with --stages "
                f"{stages} needs {stages} epochs, got {len(epochs)}"
            )

    # The sub-commands' configs: distill is a composition of them, not a copy.

    def teacher_config(self) -> TeacherConfig:
        return TeacherConfig(
            out=str(Path(self.out) / "teacher"), dataset=self.dataset, data_root=self.data_root,
            arch=self.arch, width=self.width, epochs=self.teacher_epochs,
            save_epochs=self.teacher_save_epochs, seed=self.seed, amp=self.amp,
            channels_last=self.channels_last, device=self.device, progress=self.progress,
        )  # fmt: skip

    def select_config(self, teacher: str) -> SelectConfig:
        return SelectConfig(
            teacher=teacher, ipc=self.ipc, out=str(Path(self.out) / "select"),
            strategy=self.strategy, data_root=self.data_root, seed=self.seed, batch_size=2000,
            amp=self.amp, channels_last=self.channels_last, device=self.device,
            progress=self.progress,
        )  # fmt: skip

    def recover_config(self, teacher: str | None, selection: str | None) -> RecoverConfig:
        method = self.recovery
        options = {
            field.name: getattr(self, field.name)
            for options in option_types()
            for field in dataclasses.fields(options)
        }
        return RecoverConfig(
            teacher=teacher or "", ipc=self.ipc, out=str(Path(self.out) / "distilled"),
            method=self.method,
            selection=(selection or str(Path(self.out) / "select"))
            if self.starts_from_selection
            else None,
            data_root=self.data_root if method.reads_training_set(self) else None,
            round_iterations=self.round_iterations, batch_size=self.recover_batch_size,
            lr=self.recover_lr, channels_last=self.channels_last, seed=self.seed,
            device=self.device, progress=self.progress, iterations=self.iterations, **options,
            **self.match_fields(),
        )  # fmt: skip

    def match_fields(self) -> dict:
        """The matching flags of the recovery (``--stats`` default: ``OUT/stats.pt``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(MatchOptions)}
        if self.match != "global" and self.stats is None:
            fields["stats"] = str(Path(self.out) / "stats.pt")
        return fields

    def eval_config(self, distilled: Path, teacher: str | None) -> EvalConfig:
        return EvalConfig(
            distilled=str(distilled), teacher=teacher, data_root=self.data_root,
            epochs=self.eval_epochs, seeds=self.seeds, eval_every=self.eval_every,
            batch_size=self.eval_batch_size, amp=self.amp, channels_last=self.channels_last,
            device=self.device, progress=self.progress,
        )  # fmt: skip


@dataclass
class DistillResult:
    """A finished pipeline: the report (eight keys), the evaluation, and per-step timings."""

    out: Path
    report: dict
    evaluation: EvalResult
    steps: list[dict]


def _step_is_current(
    out: Path, name: str, identity: dict, defaults: dict, outputs: list[Path]
) -> bool:
    """True when ``OUT/steps/NAME.json`` records ``identity`` (:func:`delt.identity.
    check_or_reuse`) and the outputs it hashed are unchanged."""
    record_path = out / "steps" / f"{name}.json"
    if not record_path.is_file() or "identity" not in read_json(record_path):
        return False
    if not check_or_reuse(record_path, identity, defaults, key="identity"):
        return False
    record = read_json(record_path)
    for path in outputs:
        if not path.is_file() or record.get("outputs", {}).get(path.name) != sha256_file(path):
            return False
    return True


def _record_step(out: Path, name: str, identity: dict, outputs: list[Path], seconds: float):
    write_json(
        out / "steps" / f"{name}.json",
        {
            "identity": identity,
            "outputs": {path.name: sha256_file(path) for path in outputs},
            "seconds": seconds,
        },
    )


def distill(config: DistillConfig, print_summary: bool = True) -> DistillResult:
    """Runs (or reuses) every step of the pipeline; writes the report files; returns them.

    ``print_summary``: print the table of steps (``delt demo`` prints its own).

    Holds ``OUT/.lock`` (each step also locks its own folder). Every step is keyed by content
    (flags and input SHA-256s, never paths), so a copied or moved folder is reused as it is; a
    re-run with every step cached writes nothing.
    """
    with output_lock(config.out) as lock:
        # The steps' own folders are cleaned by the steps; distill's own: OUT, OUT/steps and
        # the random-real draw's.
        out = Path(config.out)
        draw = () if config.recovery.recovers else (out / "distilled",)
        lock.sweep(out, out / "steps", *draw, recursive=False)
        return _distill(config, print_summary)


def _distill(config: DistillConfig, print_summary: bool) -> DistillResult:
    out = Path(config.out)
    # Each step probes its own folder before its work; a cached run writes nothing.
    check_output(out, "--out", probe=False)
    steps: list[dict] = []
    method = config.recovery
    if method.checks_data:
        # rded's --factor and --candidates against the data, before the teacher is trained.
        if config.teacher is not None:
            data = load_like(load_checkpoint(config.teacher).info, "train", config.data_root)
        else:
            data = load_dataset(config.dataset, "train", config.data_root)
        method.check_data(config, data)

    def timed(name: str, cached: bool, seconds: float, result: str) -> None:
        steps.append({"step": name, "cached": cached, "seconds": seconds, "result": result})
        logger.info("distill: %s %s(%.1f s) %s", name, "cached " if cached else "", seconds, result)

    # 1. teacher
    if config.teacher is not None:
        teacher_path = config.teacher
        checkpoint = load_checkpoint(teacher_path)
        if checkpoint.info.name != config.dataset:
            raise TeacherMismatchError(
                f"--teacher {teacher_path} was trained on {checkpoint.info.name}, but --dataset "
                f"is {config.dataset}"
            )
        accuracy = checkpoint.meta.get("test_accuracy", float("nan"))
        timed("teacher", True, 0.0, f"given: {teacher_path} ({accuracy:.2f}% test)")
    else:
        # Under torchrun rank 0 trains it; the other ranks then find it trained (reused).
        with main_first():
            teacher = train_teacher(config.teacher_config())
        teacher_path = str(teacher.path)
        timed(
            "teacher", teacher.reused, teacher.train_seconds,
            f"{config.arch} {teacher.test_accuracy:.2f}% test",
        )  # fmt: skip
    teacher_sha256 = sha256_file(teacher_path)
    # 1b. the teacher's per-class statistics (--match class without --stats; cached by content)
    stats_sha256 = None
    if config.match != "global":
        stats_path = config.match_fields()["stats"]
        if config.stats is None:
            start = time.perf_counter()
            cached = Path(stats_path).is_file()
            collect_statistics(
                StatsConfig(
                    teacher=teacher_path, out=stats_path, data_root=config.data_root,
                    channels_last=config.channels_last, device=config.device,
                    progress=config.progress,
                )
            )  # fmt: skip
            timed("stats", cached, time.perf_counter() - start, f"BN statistics -> {stats_path}")
        statistics = load_statistics(stats_path)  # another teacher's: refused before any work
        statistics.check_teacher(load_checkpoint(teacher_path), teacher_sha256, "--stats")
        stats_sha256 = sha256_file(stats_path)
    if method.recovers:
        # (pdd: a teacher without its P checkpoints is refused now, before selection.)
        method.check_teacher(config.recover_config(teacher_path, None), teacher_path)

    # 2. selection (delt, pdd over delt; it reuses its own result when config and teacher are
    # unchanged)
    selection_dir = out / "select"
    selection_sha256 = None
    if config.starts_from_selection:
        start = time.perf_counter()
        select_config = config.select_config(teacher_path)
        saved_config = (
            read_json(selection_dir / "selection.json").get("config", {})
            if (selection_dir / "selection.json").is_file()
            else None
        )
        # Selections of before the teacher path left their identity still record it.
        cached = saved_config is not None and {
            k: v for k, v in saved_config.items() if k != "teacher"
        } == identity_dict(select_config)
        select_images(select_config)
        selection_sha256 = sha256_file(selection_dir / "selection.json")
        timed("select", cached, time.perf_counter() - start, f"{config.strategy}, IPC {config.ipc}")

    # 3. recovery (or the random-real draw)
    distilled = out / "distilled"
    outputs = [distilled / "distilled.pt", distilled / "manifest.json"]
    defaults: dict = {}
    if method.recovers:
        recover_config = config.recover_config(teacher_path, str(selection_dir))
        step_identity: dict = {"recover": config_identity(recover_config)}
        defaults = {"recover": config_defaults(recover_config)}
    else:
        step_identity = {"ipc": config.ipc, "seed": config.seed, "dataset": config.dataset}
    step_identity.update(teacher_sha256=teacher_sha256, selection_sha256=selection_sha256)
    if stats_sha256 is not None:
        step_identity["stats_sha256"] = stats_sha256
    start = time.perf_counter()
    if _step_is_current(out, "recover", step_identity, defaults, outputs):
        cached = True
    else:
        cached = False
        if not method.recovers:
            if is_main():
                method.draw_set(teacher_path, config.ipc, config.seed, config.data_root, distilled)
        else:
            try:
                recover(recover_config)
            except ConfigError as error:
                raise ConfigError(
                    f"{error}. The recovery in {distilled} was made with other flags: delete "
                    f"{distilled} to recompute it, or pass another --out"
                ) from None
        if is_main():
            _record_step(out, "recover", step_identity, outputs, time.perf_counter() - start)
    barrier()  # rank 0's outputs, read by every rank
    manifest = Manifest.load(distilled)
    timed(
        "recover" if method.recovers else "draw",
        cached,
        manifest.synthesis_seconds,
        f"{config.method} IPC {config.ipc}: {manifest.image_iterations:,} image-iterations",
    )

    # 4. evaluation (cached by delt eval itself, per seed)
    evaluation = evaluate(config.eval_config(distilled, teacher_path))
    timed(
        "eval", evaluation.reused, evaluation.document["wall_seconds"],
        f"{evaluation.accuracy_mean:.2f} ± {evaluation.accuracy_std:.2f}% best top-1 "
        f"({len(config.seeds)} seed(s), {config.eval_epochs} epochs)",
    )  # fmt: skip

    # 5. diversity (cached by delt diversity itself)
    start = time.perf_counter()
    with main_first():  # rank 0 measures it; the other ranks then read it (cached)
        diversity = measure_diversity(
            DiversityConfig(
                distilled=str(distilled), model=config.diversity_model, device=config.device
            )
        )
    timed(
        "diversity", diversity.reused, time.perf_counter() - start,
        f"{diversity.mean:.4f} ± {diversity.std:.4f} (cosine to class centroid)",
    )  # fmt: skip

    # 6. report
    images, labels, _ = load_distilled(distilled)
    teacher_checkpoint = load_checkpoint(teacher_path)
    if is_main():
        write_image_grid(images, labels, teacher_checkpoint.info, out / "grid.png")  # if changed
    report = {
        "method": config.method,
        "dataset": config.dataset,
        "ipc": config.ipc,
        "accuracy_mean": float(evaluation.accuracy_mean),
        "accuracy_std": float(evaluation.accuracy_std),
        "diversity": float(diversity.mean),
        "synthesis_seconds": float(manifest.synthesis_seconds),
        "image_iterations": int(manifest.image_iterations),
    }
    markdown = _markdown(report, evaluation, diversity, manifest, steps, teacher_checkpoint.meta)
    if not is_main():
        return DistillResult(out, report, evaluation, steps)
    outputs = [out / "report.json", out / "report.md", out / "grid.png"]
    if not (
        all(step["cached"] for step in steps)
        and all(path.is_file() for path in outputs)
        and read_json(out / "report.json") == report
    ):
        # (A re-run with every step cached keeps the report of the run that computed them.)
        write_run_report(out, report, markdown)
    if print_summary:
        _print_summary(out, steps)
    return DistillResult(out, report, evaluation, steps)


def _markdown(report, evaluation, diversity, manifest, steps, teacher_meta) -> str:
    eval_config = evaluation.document["config"]
    lines = [
        f"# {report['method']} on {report['dataset']}, IPC {report['ipc']}",
        "",
        "| | |",
        "|---|---|",
        f"| accuracy (best top-1, mean ± std over {len(evaluation.seeds)} seed(s)) "
        f"| {report['accuracy_mean']:.2f} ± {report['accuracy_std']:.2f} % |",
        f"| final-epoch top-1 | {evaluation.final_mean:.2f} ± {evaluation.final_std:.2f} % |",
        f"| diversity (cosine to class centroid, lower = more diverse) "
        f"| {diversity.mean:.4f} ± {diversity.std:.4f} |",
        f"| synthesis seconds (recovery) | {report['synthesis_seconds']:.1f} |",
        f"| image-iterations | {report['image_iterations']:,} |",
        f"| teacher | {teacher_meta['arch']} {teacher_meta['arch_kwargs'] or ''}, "
        f"{teacher_meta.get('test_accuracy', float('nan')):.2f} % test |",
        f"| student | {eval_config['student']} {eval_config['student_kwargs'] or ''}, "
        f"{eval_config['epochs']} epochs, batch {eval_config['batch_size']}, "
        f"{eval_config['randaugment']}, CutMix β {eval_config['cutmix_beta']}, "
        f"T {eval_config['temperature']} |",
        f"| recovery | MI {manifest.config.get('iterations', '-')}, RI "
        f"{manifest.config.get('round_iterations', '-') or '-'}{_stages(manifest)}, seed "
        f"{manifest.seed} |",
        # Results differ in the last bits between thread counts (docs/reliability.md).
        f"| torch CPU threads (recovery, evaluation) "
        f"| {manifest.versions.get('torch_threads', '-')}, "
        f"{evaluation.document['versions'].get('torch_threads', '-')} |",
        "",
        "## Seeds",
        "",
        "| seed | best top-1 % | at epoch | final top-1 % | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for seed in evaluation.seeds:
        lines.append(
            f"| {seed.seed} | {seed.best_accuracy:.2f} | {seed.best_epoch} "
            f"| {seed.final_accuracy:.2f} | {seed.seconds:.1f} |"
        )
    lines += ["", "## Steps", "", "| step | cached | seconds | result |", "|---|---|---:|---|"]
    for step in steps:
        lines.append(
            f"| {step['step']} | {'yes' if step['cached'] else 'no'} | {step['seconds']:.1f} "
            f"| {step['result']} |"
        )
    lines += [
        "",
        "Outputs: `distilled/` (distilled.pt, manifest.json, eval.json, diversity.json), "
        "`report.json`.",
        "",
        "![the distilled images, one row per class](grid.png)",
        "",
    ]
    return "\n".join(lines)


def _stages(manifest: Manifest) -> str:
    """pdd: its stages (MI and RI above are per stage); others: nothing."""
    if not manifest.stages:
        return ""
    sizes = ",".join(str(entry["ipc"]) for entry in manifest.stages)
    return f" per stage; {len(manifest.stages)} stages of {sizes} images per class"


def _print_summary(out: Path, steps: list[dict]) -> None:
    width = max(len(step["step"]) for step in steps)
    print()
    print(f"{'step':<{width}}  {'seconds':>8}  result")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 60}")
    for step in steps:
        cached = " (cached)" if step["cached"] else ""
        print(f"{step['step']:<{width}}  {step['seconds']:8.1f}  {step['result']}{cached}")
    print(f"report: {out / 'report.json'}, {out / 'report.md'}, {out / 'grid.png'}")
