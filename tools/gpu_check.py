#!/usr/bin/env python3
"""The prepared check for a lent GPU machine: ``make gpu-check`` (docs/gpu-check.md).

One command, no interaction, no network, no virtualenv: it runs its steps in order with the
Python that runs it (the machine's own, holding its torch), each under a time limit, each
logged; a step that fails does not stop the others (a step that needs the build is skipped
when the build failed). The whole run stays inside ``--budget`` seconds (default 570, under the
device tool's 10-minute limit per command): a step gets at most what is left of it, and the steps
that find none left are reported as skipped.

    python3 tools/gpu_check.py [OUT] [--steps a,b] [--budget S] [--work DIR]
    python3 tools/gpu_check.py --dry OUT     # on a CPU: check every command and file (CI)
    python3 tools/gpu_check.py --tables OUT  # the benchmark tables of a run, for the READMEs

OUT (default ``$OUT``, which the device tool sets) receives three files, written again after
every step so that a run stopped from outside still returns what it did (the device tool brings
back at most 8 files): ``summary.md`` (also printed last), ``summary.json`` and ``logs.tar.gz``
(every log and JSON of the run). The logs themselves are written under ``--work`` (default
``out/gpu-check-work/<UTC time>`` in the checkout).

Steps (``--steps`` takes a comma-separated subset; ``build`` runs before any that need it):

    environment      the GPU, driver, CUDA, nvcc, compute-sanitizer, Python and torch versions
    build            pip install --no-build-isolation --no-deps --no-index --target WORK/site .
                     with FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST from the visible GPU, MAX_JOBS =
                     the CPU count; WORK/site then comes first on every later step's PYTHONPATH
    import           the installed delt_ext: compiled library loaded, CUDA kernels, a GPU
    pytest-cuda      pytest tests -m cuda (kernels, ResNet-18 loss, delt recover + eval on CUDA
                     and under torchrun with one NCCL rank)
    memcheck,        compute-sanitizer --tool memcheck / racecheck / synccheck over
    racecheck,         tools/sanitize_kernels.py (skipped, not failed, where the sanitizer
    synccheck          refuses the device: it does on the gVisor runtime)
    bench-synthesis  delt bench synthesis: ResNet-18, 224 px, batch 100, every row
    bench-kernels    make bench-installed BENCH_ARGS="-k cuda ...": the CUDA rows of `make bench`
    bench-eval       delt bench eval, once it exists (a hook; skipped until then)
    tables           the benchmark tables (``--tables``), into summary.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEFAULT_BUDGET = 570.0
# Seconds kept back from the budget: for the steps marked ``final`` (the tables, which only read
# files) and the last summary and archive, after every other step.
RESERVE = 30.0
# Seconds of the budget the final steps leave for the last summary and archive.
FINAL_RESERVE = 5.0
# A step is not started with less than this left of the budget.
MIN_STEP_SECONDS = 15.0
# Exit status of a probe meaning "the command does not exist yet" (a hook's step is skipped).
ABSENT = 3
# The build installs the package here, in the work folder (pip --target): the machine's own
# environment is left as it is, whether or not it is writable.
SITE = "site"
# Files packed into logs.tar.gz (not checkpoints, images or build objects).
PACKED_SUFFIXES = (".log", ".json", ".jsonl", ".xml", ".md", ".txt")
PACK_LIMIT_BYTES = 8 * 2**20  # per file
# compute-sanitizer on the gVisor runtime: «Device not supported», then error 999.
SANITIZER_REFUSALS = (r"Device not supported", r"device is not supported")

STATUSES = ("passed", "failed", "timeout", "skipped")


def cpu_count() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---------------------------------------------------------------------------------------------
# The step runner (tests/test_gpu_check.py): a step is one or more commands run in order under
# one time limit; the first that fails ends the step.


@dataclass
class Context:
    """What the commands of a run may read: its folders, the Python, the results so far."""

    work: Path
    dry: bool = False
    python: str = PYTHON
    results: dict[str, StepResult] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.work / name


Commands = Callable[[Context], list[list[str]]]


@dataclass
class Step:
    """One step: ``commands(context)`` gives the argv lists, run in order.

    ``requires``: executables that must be on PATH (else skipped: the machine lacks the tool).
    ``needs``: steps that must have passed (else skipped). ``probe``: an argv run first; exit
    status ABSENT means the thing checked does not exist yet (skipped, ``absent`` says why).
    ``refusals``: regular expressions which, found in the output of a failed command, mean
    that a tool refused the device: skipped, not failed. ``env(context)``: variables added to
    the commands' environment. ``note``: a line about the result, from the log and the files
    (e.g. "12 passed"); ``success``: a check beyond exit status 0 (a problem, or None).
    ``dry``: the commands that replace the step in ``--dry`` mode (None: the step runs as is),
    with their own ``dry_requires``, ``dry_note`` and ``dry_success``. ``final``: the step may
    use the budget's RESERVE too (a short step that must run even when the others used theirs).
    """

    name: str
    limit: float
    commands: Commands
    what: str = ""
    requires: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    probe: Commands | None = None
    absent: str = ""
    refusals: tuple[str, ...] = ()
    env: Callable[[Context], dict[str, str]] = lambda context: {}
    note: Callable[[Context, str], str] | None = None
    success: Callable[[Context, str], str | None] | None = None
    dry: Commands | None = None
    dry_requires: tuple[str, ...] = ()
    dry_note: Callable[[Context, str], str] | None = None
    dry_success: Callable[[Context, str], str | None] | None = None
    final: bool = False


@dataclass
class StepResult:
    name: str
    status: str
    seconds: float
    limit: float
    note: str = ""
    returncode: int | None = None
    commands: list[str] = field(default_factory=list)
    log: str = ""


def _kill_group(process: subprocess.Popen) -> None:
    """Ends a command and everything it started (its own process group), politely first."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(
    argv: Sequence[str], log, limit: float, env: dict[str, str], cwd: Path
) -> tuple[int | None, float]:
    """Runs ``argv`` with its output appended to ``log``; (exit status or None on timeout,
    seconds). The command runs in its own process group, which is killed at the limit."""
    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    start = time.monotonic()
    try:
        process = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=env, start_new_session=True,
        )  # fmt: skip
    except OSError as error:
        log.write(f"cannot start: {error}\n")
        return 127, time.monotonic() - start
    try:
        returncode = process.wait(timeout=max(limit, 0.1))
    except subprocess.TimeoutExpired:
        _kill_group(process)
        log.write(f"\n[gpu-check] stopped at the time limit of {limit:.0f} s\n")
        return None, time.monotonic() - start
    except BaseException:
        _kill_group(process)
        raise
    log.write(f"[gpu-check] exit status {returncode}\n")
    return returncode, time.monotonic() - start


def refusal(patterns: Sequence[str], text: str) -> str | None:
    """The first line of ``text`` matching one of ``patterns`` (a tool refusing the device),
    not counting the lines the runner writes itself (``$ command``, ``[gpu-check] ...``)."""
    for line in text.splitlines():
        if line.startswith(("$ ", "[gpu-check]")):
            continue
        for pattern in patterns:
            if re.search(pattern, line):
                return line.strip()
    return None


def _environ(step: Step, context: Context) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # `python -m` must not put the checkout first on sys.path: its delt_ext holds no compiled
        # library and would shadow the installed one (Python >= 3.11).
        PYTHONSAFEPATH="1",
        PYTHONUNBUFFERED="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"  # as the Makefile: `which nvcc` may be a wrapper
    site = context.path(SITE)
    if site.is_dir():  # the build's install: first on the path of every later step
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.update(step.env(context))
    return env


def run_step(step: Step, context: Context, deadline: float) -> StepResult:
    """Runs one step (or its dry replacement) within its limit and what is left before
    ``deadline`` (a ``time.monotonic()`` value); never raises for a failing command."""
    dry = context.dry and step.dry is not None
    limit = min(step.limit, deadline - time.monotonic())
    log_name = f"{step.name}.log"

    def result(status: str, note: str, seconds: float = 0.0, **kwargs) -> StepResult:
        return StepResult(step.name, status, round(seconds, 1), round(limit, 1), note, **kwargs)

    failed_needs = [
        name
        for name in step.needs
        if name in context.results and context.results[name].status != "passed"
    ]
    if failed_needs:
        return result("skipped", f"needs {', '.join(failed_needs)}, which did not pass")
    if limit < min(step.limit, MIN_STEP_SECONDS):
        return result("skipped", "out of time: the run's budget is spent")
    requires = step.dry_requires if dry else step.requires
    missing = [name for name in requires if shutil.which(name) is None]
    if missing:
        return result("skipped", f"not on PATH: {', '.join(missing)}")
    # In --dry mode, what the GPU machine must have and this one lacks is said, not failed.
    absent_here = [name for name in step.requires if dry and shutil.which(name) is None]
    try:
        env = _environ(step, context)
    except Exception as error:
        return result("failed", f"cannot form the environment: {error}")
    start = time.monotonic()
    log_path = context.path(log_name)
    commands: list[str] = []
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        if step.probe is not None:
            for argv in step.probe(context):
                returncode, _ = run_command(argv, log, limit, env, ROOT)
                if returncode == ABSENT:
                    return result("skipped", step.absent, time.monotonic() - start, log=log_name)
                if returncode != 0:
                    return result(
                        "failed", f"probe exit status {returncode}", time.monotonic() - start,
                        returncode=returncode, log=log_name,
                    )  # fmt: skip
        try:
            argvs = (step.dry if dry else step.commands)(context)
        except Exception as error:  # a step that cannot even say its command
            log.write(f"[gpu-check] cannot form the command: {error!r}\n")
            return result("failed", f"cannot form the command: {error}", log=log_name)
        returncode: int | None = 0
        for argv in argvs:
            commands.append(shlex.join(argv))
            left = limit - (time.monotonic() - start)
            returncode, _ = run_command(argv, log, left, env, ROOT)
            if returncode != 0:
                break
    seconds = time.monotonic() - start
    text = log_path.read_text(encoding="utf-8", errors="replace")
    note = ""
    note_of = step.dry_note if dry else step.note
    if note_of is not None:
        try:
            note = note_of(context, text)
        except Exception as error:
            note = f"(no note: {error!r})"
    if absent_here:
        here = f"not on PATH here: {', '.join(absent_here)}"
        note = f"{note}; {here}" if note else here
    common = dict(returncode=returncode, commands=commands, log=log_name)
    if returncode is None:
        return result("timeout", note or f"stopped at {limit:.0f} s", seconds, **common)
    if returncode != 0:
        refused = refusal(step.refusals, text)
        if refused is not None:
            return result("skipped", f"the tool refused the device: {refused}", seconds, **common)
        return result("failed", note or f"exit status {returncode}", seconds, **common)
    success = step.dry_success if dry else step.success
    if success is not None:
        try:
            problem = success(context, text)
        except Exception as error:
            problem = f"its check failed: {error!r}"
        if problem:
            return result("failed", problem, seconds, **common)
    return result("passed", note, seconds, **common)


# ---------------------------------------------------------------------------------------------
# The summary and the archive.


def counts(results: Sequence[StepResult]) -> dict[str, int]:
    return {status: sum(r.status == status for r in results) for status in STATUSES}


def summary_document(context: Context, results: Sequence[StepResult], meta: dict) -> dict:
    return {
        **meta,
        "dry": context.dry,
        "environment": context.environment,
        "counts": counts(results),
        "steps": [dataclasses.asdict(r) for r in results],
    }


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def summary_markdown(document: dict, tables: str = "") -> str:
    env = document.get("environment") or {}
    gpu = env.get("gpu") or {}
    torch_info = env.get("torch") or {}
    title = "gpu-check --dry" if document.get("dry") else "gpu-check"
    lines = [
        f"# {title}: {document.get('started', '?')}",
        "",
        f"- device: {gpu.get('name', 'none visible')}; driver {gpu.get('driver', '?')}; "
        f"memory {gpu.get('memory', '?')}; compute capability {gpu.get('capability', '?')}",
        f"- CUDA: torch built with {torch_info.get('cuda', '?')}; nvcc "
        f"{env.get('nvcc') or 'not found'}; compute-sanitizer "
        f"{env.get('compute_sanitizer') or 'not found'}",
        f"- torch {torch_info.get('version', '?')}, Python {env.get('python', '?')}, "
        f"{env.get('cpus', '?')} CPUs, kernel {env.get('kernel', '?')}",
        f"- checkout: {env.get('commit') or '?'}; budget {document.get('budget', '?')} s, "
        f"used {document.get('seconds', '?')} s",
        "",
        "| step | status | seconds | limit | note |",
        "|---|---|---:|---:|---|",
    ]
    for step in document["steps"]:
        # What needs a look stands out: FAILED, TIMEOUT, SKIPPED.
        status = step["status"] if step["status"] == "passed" else step["status"].upper()
        lines.append(
            f"| {step['name']} | {status} | {step['seconds']:.0f} | {step['limit']:.0f} "
            f"| {_cell(step['note'])} |"
        )
    total = document["counts"]
    lines += ["", ", ".join(f"{total[s]} {s}" for s in STATUSES if total.get(s))]
    if tables.strip():
        lines += ["", tables.strip()]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def pack(work: Path, archive: Path) -> None:
    """``logs.tar.gz``: the run's logs and JSON (files up to PACK_LIMIT_BYTES each)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if (
                path.is_file()
                and path.suffix in PACKED_SUFFIXES
                and path.stat().st_size <= PACK_LIMIT_BYTES
            ):
                tar.add(path, arcname=str(Path(work.name) / path.relative_to(work)))
    _atomic_write(archive, buffer.getvalue())


def write_outputs(out: Path, context: Context, results, meta: dict, tables: str = "") -> str:
    document = summary_document(context, results, meta)
    markdown = summary_markdown(document, tables)
    _atomic_write(out / "summary.json", (json.dumps(document, indent=2) + "\n").encode())
    _atomic_write(out / "summary.md", markdown.encode())
    _atomic_write(context.path("summary.md"), markdown.encode())
    pack(context.work, out / "logs.tar.gz")
    return markdown


# ---------------------------------------------------------------------------------------------
# What the steps run. Several are modes of this script (run in a subprocess: the runner itself
# never imports torch, so a crash or hang there cannot take the summary with it).


def arch_list(capabilities: Sequence[tuple[int, int]]) -> str:
    """TORCH_CUDA_ARCH_LIST for the visible GPUs' compute capabilities: "9.0", "8.0;9.0"."""
    return ";".join(f"{major}.{minor}" for major, minor in sorted(set(capabilities)))


def _first_line(argv: Sequence[str], pattern: str = "") -> str | None:
    try:
        output = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in output.splitlines() if re.search(pattern, line)]
    return lines[-1] if lines else None


def environment(path: Path) -> int:
    """``--environment FILE``: the machine, as JSON (a GPU is not required)."""
    info: dict = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "kernel": platform.release(),
        "cpus": cpu_count(),
        "commit": _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "nvcc": _first_line(["nvcc", "--version"], r"release"),
        "compute_sanitizer": _first_line(["compute-sanitizer", "--version"], r"[Vv]ersion"),
    }
    smi = _first_line(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
         "--format=csv,noheader"],
    )  # fmt: skip
    gpu: dict = {}
    if smi:
        name, driver, memory, capability = ([*smi.split(", "), "", "", ""])[:4]
        gpu = {"name": name, "driver": driver, "memory": memory, "capability": capability}
    try:
        import torch

        torch_info = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cuda_available": torch.cuda.is_available(),
            "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        }
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            capabilities = [
                torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
            ]
            info["arch_list"] = arch_list(capabilities)
            gpu.setdefault("name", props.name)
            gpu.setdefault("capability", f"{props.major}.{props.minor}")
            gpu["multiprocessors"] = props.multi_processor_count
            gpu.setdefault("memory", f"{props.total_memory / 2**30:.1f} GiB")
        import torchvision

        torch_info["torchvision"] = torchvision.__version__
    except Exception as error:  # the summary says what is wrong rather than nothing
        torch_info = {"error": repr(error)}
    info["torch"] = torch_info
    info["gpu"] = gpu
    versions = {}
    for name in ("pytest", "pytest_benchmark", "numpy", "setuptools", "pip", "ninja", "pybind11"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
    info["packages"] = versions
    path.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


def import_check(dry: bool) -> int:
    """``--import-check``: the installed delt_ext loads its compiled library, with CUDA kernels
    and a GPU (``--dry``: the library alone). Run from outside the checkout."""
    import delt_ext

    info = delt_ext.build_info()
    print(info)
    problems = []
    if not info.compiled_library:
        problems.append("the compiled library is not loaded")
    if not dry and not info.cuda_kernels:
        problems.append("the build has no CUDA kernels")
    if not dry and not info.cuda_available:
        problems.append("torch sees no GPU")
    if Path(info.package_path).resolve() == ROOT / "delt_ext":
        problems.append(f"delt_ext was imported from the checkout's sources ({info.package_path})")
    for problem in problems:
        print(f"import check: {problem}", file=sys.stderr)
    return 1 if problems else 0


def parse_delt(argv: Sequence[str]) -> int:
    """``--parse-delt ARGS``: ``delt ARGS`` parsed and its configuration built (validated), not
    run: exit status 0, or the command's own one-line error and status 2."""
    from delt.cli import COMMANDS, build_parser
    from delt.config import ConfigError, from_namespace

    args = build_parser().parse_args(list(argv))
    command = COMMANDS[args.command]
    name = args.command
    if command.subcommands is not None:
        command, name = command.subcommands[args.subcommand], f"{name} {args.subcommand}"
    try:
        from_namespace(command.config, args)
    except (ConfigError, ValueError) as error:
        print(f"delt {name}: error: {error}", file=sys.stderr)
        return 2
    print(f"delt {name}: the arguments parse: {shlex.join(argv)}")
    return 0


def has_command(words: Sequence[str]) -> int:
    """``--has-command bench eval``: exit status 0 when ``delt WORDS`` exists, else ABSENT."""
    from delt.cli import COMMANDS

    table: dict | None = COMMANDS
    for word in words:
        if table is None or word not in table:
            print(f"delt {' '.join(words)}: does not exist yet")
            return ABSENT
        table = table[word].subcommands
    print(f"delt {' '.join(words)}: exists")
    return 0


def collect_count(text: str) -> int | None:
    """Tests collected by ``pytest --collect-only -q``: "12/30 tests collected (18 deselected)"
    or "12 tests collected"."""
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    return int(match.group(1)) if match else None


def junit_note(path: Path) -> str:
    """ "N passed, F failed, E errors, S skipped" from pytest's JUnit XML."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in
             ("tests", "failures", "errors", "skipped")}  # fmt: skip
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    parts = [f"{passed} passed"]
    parts += [f"{total['failures']} failed"] if total["failures"] else []
    parts += [f"{total['errors']} errors"] if total["errors"] else []
    parts += [f"{total['skipped']} skipped"] if total["skipped"] else []
    return ", ".join(parts)


def sanitizer_note(text: str) -> str:
    summaries = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    races = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?", text)
    last = [line for line in text.splitlines() if line.startswith("sanitize_kernels:")]
    parts = [f"{summaries[-1]} errors"] if summaries else []
    parts += [f"{races[-1][0]} hazards"] if races else []
    parts += [last[-1].removeprefix("sanitize_kernels: ")] if last else []
    return "; ".join(parts)


def tables(folder: Path, write: Path | None = None) -> int:
    """``--tables DIR``: prints the benchmark tables of a run (DIR: a run's work folder, or an
    output folder holding logs.tar.gz) in the form of benchmarks/README.md, with the device
    named; ``--tables-out FILE`` also writes them there."""
    folder = Path(folder)
    files = {}
    archive = folder / "logs.tar.gz"
    for name in ("synthesis.json", "bench-kernels.json", "environment.json"):
        if (folder / name).exists():
            files[name] = (folder / name).read_text()
        elif archive.exists():
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if Path(member.name).name == name:
                        files[name] = tar.extractfile(member).read().decode()
    env = json.loads(files.get("environment.json", "{}"))
    gpu = env.get("gpu") or {}
    torch_info = env.get("torch") or {}
    out = [
        "## Benchmark tables",
        "",
        f"<!-- {gpu.get('name', '?')}, driver {gpu.get('driver', '?')}, torch "
        f"{torch_info.get('version', '?')} (CUDA {torch_info.get('cuda', '?')}), "
        f"checkout {env.get('commit') or '?'} -->",
    ]
    if "synthesis.json" in files:
        try:
            from delt.bench import format_table
        except ImportError:  # delt not installed in this Python: the checkout's sources
            sys.path.insert(0, str(ROOT / "python"))
            from delt.bench import format_table

        synthesis = format_table(json.loads(files["synthesis.json"]))
    else:
        synthesis = "(no synthesis.json: the step did not finish)"
    out += ["", "### delt bench synthesis", "", synthesis]
    if "bench-kernels.json" in files:
        import importlib.util

        spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
        report = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(report)
        staged = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-bench-{os.getpid()}.json"
        staged.write_text(files["bench-kernels.json"])
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                report.main(str(staged))
        finally:
            staged.unlink()
        kernels = printed.getvalue().strip()
    else:
        kernels = "(no bench-kernels.json: the step did not finish)"
    out += ["", "### make bench (CUDA rows)", "", kernels]
    text = "\n".join(out) + "\n"
    print(text)
    if write is not None:
        _atomic_write(Path(write), text.encode())
    return 0


# ---------------------------------------------------------------------------------------------
# The steps.

SYNTHESIS_ARGS = [
    "bench", "synthesis", "--arch", "resnet18", "--resolution", "224", "--batch-size", "100",
    "--device", "cuda", "--iterations", "16", "--repeats", "5", "--no-progress",
]  # fmt: skip
# HOOK(delt bench eval): the flags of `delt bench eval` for this check, once the command exists
# (its issue): the --dry check parses them with the command's own parser, so CI says when they
# no longer fit.
# A CIFAR-shaped student (ResNet-18-small, 32 px, 3 channels): one epoch and one test pass.
BENCH_EVAL_ARGS = [
    "bench",
    "eval",
    "--device",
    "cuda",
    "--arch",
    "resnet18_small",
    "--resolution",
    "32",
    "--channels",
    "3",
]
# pytest-benchmark: shorter rounds than its 1 s default, to fit the budget.
KERNEL_BENCH_ARGS = "-k cuda --benchmark-max-time=0.5"
PYTEST_CUDA = ["tests", "-m", "cuda", "-p", "no:cacheprovider", "-q", "-rfEs"]


def _this(context: Context, *args: str) -> list[str]:
    return [context.python, str(Path(__file__).resolve()), *args]


def _build_commands(context: Context) -> list[list[str]]:
    return [[context.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
             "--no-index", "--target", str(context.path(SITE)), "-v", "."]]  # fmt: skip


def build_env(context: Context) -> dict[str, str]:
    """FORCE_CUDA=1, MAX_JOBS = every CPU, TORCH_CUDA_ARCH_LIST = the visible GPUs' archs (from
    the environment step; without it cpp_extension reads the visible GPUs itself)."""
    env = {"FORCE_CUDA": "1", "MAX_JOBS": str(cpu_count())}
    archs = context.environment.get("arch_list")
    if archs:
        env["TORCH_CUDA_ARCH_LIST"] = archs
    return env


def _build_step() -> Step:

    def note(context: Context, text: str) -> str:
        line = [x for x in text.splitlines() if x.strip().startswith("delt-ext build:")]
        return line[-1].strip().removeprefix("delt-ext build: ") if line else ""

    return Step(
        "build",
        300,
        _build_commands,
        "pip install --no-build-isolation --no-deps --no-index --target WORK/site .",
        env=build_env,
        note=note,
        dry=lambda c: [
            [c.python, "-m", "pip", "--version"],
            [c.python, "-m", "py_compile", str(ROOT / "setup.py")],
        ],
    )


def _sanitizer_step(tool: str, limit: float, extra_env: dict[str, str]) -> Step:
    def commands(context: Context) -> list[list[str]]:
        return [["compute-sanitizer", "--tool", tool, "--error-exitcode", "1",
                 "--print-limit", "50", context.python, str(ROOT / "tools/sanitize_kernels.py"),
                 "--device", "cuda"]]  # fmt: skip

    def dry(context: Context) -> list[list[str]]:
        if tool == "memcheck":  # the script itself, once, on the CPU
            return [[context.python, str(ROOT / "tools/sanitize_kernels.py"), "--device", "cpu"]]
        return [[context.python, "-m", "py_compile", str(ROOT / "tools/sanitize_kernels.py")]]

    return Step(
        tool, limit, commands, f"compute-sanitizer --tool {tool} tools/sanitize_kernels.py",
        requires=("compute-sanitizer",), needs=("build",), refusals=SANITIZER_REFUSALS,
        env=lambda context: dict(extra_env), note=lambda c, text: sanitizer_note(text), dry=dry,
        dry_note=lambda c, text: sanitizer_note(text),
    )  # fmt: skip


def steps() -> list[Step]:
    def environment_commands(context: Context) -> list[list[str]]:
        return [_this(context, "--environment", str(context.path("environment.json")))]

    def pytest_commands(context: Context) -> list[list[str]]:
        xml = context.path("pytest-cuda.xml")
        return [[context.python, "-m", "pytest", *PYTEST_CUDA, f"--junitxml={xml}"]]

    def pytest_note(context: Context, text: str) -> str:
        xml = context.path("pytest-cuda.xml")
        if xml.exists():
            return junit_note(xml)
        tail = [line for line in text.splitlines() if line.strip()]
        return tail[-1] if tail else ""

    def pytest_dry(context: Context) -> list[list[str]]:
        return [[context.python, "-m", "pytest", *PYTEST_CUDA, "--collect-only"]]

    def pytest_success(context: Context, text: str) -> str | None:
        note = pytest_note(context, text)
        if note.startswith("0 passed"):
            return f"no CUDA test ran ({note})"
        return None

    def collected(context: Context, text: str) -> str:
        count = collect_count(text)
        return f"{count} tests collected" if count is not None else ""

    def some_collected(context: Context, text: str) -> str | None:
        return None if collect_count(text) else "no test collected"

    def synthesis_commands(context: Context) -> list[list[str]]:
        json_path = str(context.path("synthesis.json"))
        return [[context.python, "-m", "delt", *SYNTHESIS_ARGS, "--json", json_path]]

    def synthesis_note(context: Context, text: str) -> str:
        path = context.path("synthesis.json")
        if not path.exists():
            return ""
        rows = json.loads(path.read_text())["rows"]
        return ", ".join(f"{r['row']} {r['ms_per_iteration']:.1f} ms/it" for r in rows)

    def kernel_bench_commands(context: Context) -> list[list[str]]:
        return [["make", "--no-print-directory", "bench-installed",
                 f"BENCH_PYTHON={context.python}",
                 f"BENCH_JSON={context.path('bench-kernels.json')}",
                 f"BENCH_ARGS={KERNEL_BENCH_ARGS}"]]  # fmt: skip

    def kernel_bench_dry(context: Context) -> list[list[str]]:
        return [
            ["make", "-n", *kernel_bench_commands(context)[0][1:]],
            [context.python, "-m", "pytest", "benchmarks", "-p", "no:cacheprovider",
             "--collect-only", "-q", *KERNEL_BENCH_ARGS.split()],
        ]  # fmt: skip

    def kernel_note(context: Context, text: str) -> str:
        path = context.path("bench-kernels.json")
        if path.exists():
            return f"{len(json.loads(path.read_text())['benchmarks'])} benchmarks"
        return collected(context, text)

    def tables_commands(context: Context) -> list[list[str]]:
        written = str(context.path("tables.md"))
        return [_this(context, "--tables", str(context.work), "--tables-out", written)]

    return [
        Step("environment", 60, environment_commands, "GPU, driver, CUDA and torch versions"),
        _build_step(),
        Step(
            "import",
            60,
            lambda c: [_this(c, "--import-check")],
            "the installed delt_ext: compiled library, CUDA kernels, GPU",
            needs=("build",),
            dry=lambda c: [_this(c, "--import-check", "--dry")],
        ),
        Step(
            "pytest-cuda",
            200,
            pytest_commands,
            "pytest tests -m cuda",
            needs=("build",),
            note=pytest_note,
            success=pytest_success,
            dry=pytest_dry,
            dry_note=collected,
            dry_success=some_collected,
        ),
        # The caching allocator hands out pieces of larger blocks, which would hide an
        # out-of-bounds access from memcheck: one cudaMalloc per tensor there.
        _sanitizer_step("memcheck", 120, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        _sanitizer_step("racecheck", 120, {}),
        _sanitizer_step("synccheck", 90, {}),
        Step(
            "bench-synthesis",
            200,
            synthesis_commands,
            "delt bench synthesis: ResNet-18, 224 px, batch 100, every row",
            needs=("build",),
            note=synthesis_note,
            dry=lambda c: [_this(c, "--parse-delt", *SYNTHESIS_ARGS, "--json", "x.json")],
        ),
        Step(
            "bench-kernels",
            150,
            kernel_bench_commands,
            "make bench-installed (CUDA rows)",
            requires=("make",),
            needs=("build",),
            note=kernel_note,
            dry=kernel_bench_dry,
            dry_requires=("make",),
            dry_note=collected,
            dry_success=some_collected,
        ),
        Step(
            "bench-eval",
            120,
            lambda c: [[c.python, "-m", "delt", *BENCH_EVAL_ARGS]],
            "delt bench eval (hook)",
            needs=("build",),
            probe=lambda c: [_this(c, "--has-command", "bench", "eval")],
            absent="hook: `delt bench eval` does not exist yet",
            dry=lambda c: [_this(c, "--parse-delt", *BENCH_EVAL_ARGS)],
        ),
        Step(
            "tables",
            60,
            tables_commands,
            "the benchmark tables, into summary.md",
            needs=("build",),
            final=True,
        ),
    ]


# ---------------------------------------------------------------------------------------------


def select_steps(all_steps: Sequence[Step], names: str | None) -> list[Step]:
    """The steps named in ``names`` (comma-separated; None: all), in the run's order; a step's
    ``needs`` come along. Unknown names raise ValueError naming the known ones."""
    if not names:
        return list(all_steps)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    known = {step.name: step for step in all_steps}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = set(wanted)
    for name in wanted:
        chosen.update(known[name].needs)
    if "build" in chosen:
        chosen.add("environment")  # the build's arch list comes from it
    return [step for step in all_steps if step.name in chosen]


def run(
    all_steps: Sequence[Step], out: Path, work: Path, dry: bool = False,
    budget: float = DEFAULT_BUDGET, echo: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    """Runs the steps; writes OUT/summary.md, summary.json and logs.tar.gz after each one."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + budget - RESERVE
    final_deadline = started + budget - FINAL_RESERVE
    context = Context(work=work, dry=dry)
    meta = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "budget": budget,
        "work": str(work),
        "argv": sys.argv,
    }
    results: list[StepResult] = []
    for step in all_steps:
        echo(f"[gpu-check] {step.name}: {step.what or ''}".rstrip())
        result = run_step(step, context, final_deadline if step.final else deadline)
        context.results[step.name] = result
        results.append(result)
        if step.name == "environment":
            with contextlib.suppress(OSError, ValueError):
                context.environment = json.loads(context.path("environment.json").read_text())
        echo(
            f"[gpu-check] {step.name}: {result.status} in {result.seconds:.0f} s"
            f"{': ' + result.note if result.note else ''}"
        )
        meta["seconds"] = round(time.monotonic() - started, 1)
        write_outputs(out, context, results, meta)
    table_text = ""
    if not dry and context.path("tables.md").exists():
        table_text = context.path("tables.md").read_text(errors="replace")
    meta["seconds"] = round(time.monotonic() - started, 1)
    markdown = write_outputs(out, context, results, meta, table_text)
    echo(markdown)
    return summary_document(context, results, meta)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="The prepared check for a lent GPU machine (docs/gpu-check.md).",
    )
    parser.add_argument("out", nargs="?", help="output folder (default: $OUT)")
    parser.add_argument("--dry", action="store_true", help="on a CPU: check commands and files")
    parser.add_argument("--steps", help="comma-separated steps to run (default: all)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help="seconds for the whole run (default: %(default)s)")  # fmt: skip
    parser.add_argument("--work", help="folder of the logs (default: out/gpu-check-work/<time>)")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    # Modes run by the steps themselves.
    parser.add_argument("--environment", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--import-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parse-delt", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--has-command", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--tables", metavar="DIR", help="print the benchmark tables of a run")
    parser.add_argument("--tables-out", metavar="FILE", help="with --tables: also write them here")
    args = parser.parse_args(argv)
    if args.environment:
        return environment(Path(args.environment))
    if args.import_check:
        return import_check(args.dry)
    if args.parse_delt is not None:
        return parse_delt(args.parse_delt)
    if args.has_command:
        return has_command(args.has_command)
    if args.tables:
        return tables(Path(args.tables), args.tables_out and Path(args.tables_out))
    all_steps = steps()
    if args.list:
        for step in all_steps:
            print(f"{step.name:16} {step.limit:4.0f} s  {step.what}")
        return 0
    out = args.out or os.environ.get("OUT")
    if not out:
        parser.error("no output folder: give OUT, or set the OUT environment variable")
    if args.budget < MIN_STEP_SECONDS + RESERVE:
        parser.error(f"--budget must be at least {MIN_STEP_SECONDS + RESERVE:.0f} seconds")
    try:
        chosen = select_steps(all_steps, args.steps)
    except ValueError as error:
        parser.error(str(error))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = Path(args.work) if args.work else ROOT / "out" / "gpu-check-work" / stamp
    document = run(chosen, Path(out), work, dry=args.dry, budget=args.budget)
    return 0 if document["counts"]["failed"] == 0 and document["counts"]["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
