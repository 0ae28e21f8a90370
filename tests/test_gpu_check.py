"""tools/gpu_check.py (`make gpu-check`), its step runner and summary, on the CPU: time limits, a
failing step that does not stop the others, tools refusing the device, hooks, the budget."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load()
Step = gpu_check.Step


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def step(name, code, limit=30.0, **kwargs):
    return Step(name, limit, lambda context: [py(code)], **kwargs)


def run(steps, tmp_path, **kwargs):
    lines = []
    document = gpu_check.run(
        steps, tmp_path / "out", tmp_path / "work", echo=lines.append, **kwargs
    )
    return document, {s["name"]: s for s in document["steps"]}, lines


def test_a_failing_step_does_not_stop_the_others_and_everything_is_summarized(tmp_path):
    steps = [
        step("first", "print('one'); raise SystemExit(3)"),
        step("second", "print('two')", note=lambda context, text: f"said two: {'two' in text}"),
        step("third", "import sys; print('bad', file=sys.stderr); sys.exit(1)"),
    ]
    document, by_name, lines = run(steps, tmp_path)
    assert [s["status"] for s in document["steps"]] == ["failed", "passed", "failed"]
    assert by_name["first"]["returncode"] == 3 and by_name["first"]["note"] == "exit status 3"
    assert by_name["second"]["note"] == "said two: True"
    assert document["counts"] == {"passed": 1, "failed": 2, "timeout": 0, "skipped": 0}
    # Every command's output is in its step's log, and the logs are in the archive.
    work = tmp_path / "work"
    assert "one" in (work / "first.log").read_text()
    assert "bad" in (work / "third.log").read_text()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {Path(name).name for name in tar.getnames()}
    assert {"first.log", "second.log", "third.log"} <= names
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == document["steps"] and saved["counts"] == document["counts"]
    markdown = (out / "summary.md").read_text()
    assert "| first | FAILED |" in markdown and "| second | passed |" in markdown
    assert "1 passed, 2 failed" in markdown
    assert lines[-1] == markdown  # printed last: the device tool returns the output's end


def test_a_step_past_its_limit_is_stopped_with_everything_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The step starts a grandchild that would outlive a plain kill of the step's process.
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    steps = [step("slow", code, limit=2.0), step("after", "print('still runs')")]
    start = time.monotonic()
    document, by_name, _ = run(steps, tmp_path)
    assert time.monotonic() - start < 30
    assert by_name["slow"]["status"] == "timeout" and by_name["slow"]["returncode"] is None
    assert by_name["slow"]["seconds"] < 15
    assert by_name["after"]["status"] == "passed"
    assert "stopped at the time limit of 2 s" in (tmp_path / "work" / "slow.log").read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # the group was sent SIGTERM; give the grandchild a moment to go
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's grandchild {child} is still running")
    assert document["counts"]["timeout"] == 1


def test_a_tool_refusing_the_device_is_skipped_not_failed(tmp_path):
    refusing = (
        "print('========= COMPUTE-SANITIZER'); "
        "print('========= Error: Device not supported'); raise SystemExit(1)"
    )
    patterns = gpu_check.SANITIZER_REFUSALS
    steps = [
        step("refused", refusing, refusals=patterns),
        step("broken", "print('Segmentation fault'); raise SystemExit(1)", refusals=patterns),
        # A refusal pattern in the output of a command that succeeded changes nothing.
        step("fine", "print('Device not supported')", refusals=patterns),
    ]
    _, by_name, _ = run(steps, tmp_path)
    assert by_name["refused"]["status"] == "skipped"
    assert by_name["refused"]["note"] == (
        "the tool refused the device: ========= Error: Device not supported"
    )
    assert by_name["broken"]["status"] == "failed"
    assert by_name["fine"]["status"] == "passed"


def test_missing_tools_unmet_needs_and_absent_commands_are_skipped(tmp_path):
    absent = gpu_check.ABSENT
    steps = [
        step("build", "raise SystemExit(1)"),
        step("uses-build", "print('never')", needs=("build",)),
        step("no-tool", "print('never')", requires=("no-such-tool-here",)),
        Step(
            "hook",
            30,
            lambda c: [py("print('never')")],
            probe=lambda c: [py(f"raise SystemExit({absent})")],
            absent="hook: not there yet",
        ),
        Step(
            "probe-fails",
            30,
            lambda c: [py("print('never')")],
            probe=lambda c: [py("raise SystemExit(1)")],
        ),
    ]
    _, by_name, _ = run(steps, tmp_path)
    assert by_name["uses-build"]["status"] == "skipped"
    assert by_name["uses-build"]["note"] == "needs build, which did not pass"
    assert by_name["no-tool"]["status"] == "skipped"
    assert by_name["no-tool"]["note"] == "not on PATH: no-such-tool-here"
    assert by_name["hook"]["status"] == "skipped"
    assert by_name["hook"]["note"] == "hook: not there yet"
    assert by_name["probe-fails"]["status"] == "failed"
    assert "never" not in "".join(p.read_text() for p in (tmp_path / "work").glob("*.log"))


def test_the_budget_bounds_the_run_and_later_steps_are_skipped(tmp_path, monkeypatch):
    # Budget 6 s, the last 3 s kept for final steps: the first step's limit of 60 s is cut to
    # what is left, too little (under MIN_STEP_SECONDS) is left for the second, and the final
    # step (the tables) still runs in the reserve.
    monkeypatch.setattr(gpu_check, "RESERVE", 3.0)
    monkeypatch.setattr(gpu_check, "FINAL_RESERVE", 0.0)
    monkeypatch.setattr(gpu_check, "MIN_STEP_SECONDS", 1.0)
    steps = [
        step("long", "import time; time.sleep(60)", limit=60),
        step("later", "print(1)"),
        step("final", "print(1)", final=True),
    ]
    start = time.monotonic()
    _, by_name, _ = run(steps, tmp_path, budget=6.0)
    assert time.monotonic() - start < 20
    assert by_name["long"]["status"] == "timeout" and by_name["long"]["limit"] <= 3.1
    assert by_name["later"]["status"] == "skipped"
    assert by_name["later"]["note"] == "out of time: the run's budget is spent"
    assert by_name["final"]["status"] == "passed"


def test_the_summary_is_written_after_every_step(tmp_path):
    # The second step reads what the first left in OUT: a run stopped from outside still
    # returns the steps that finished.
    out = tmp_path / "out"
    check = (
        f"import json; d = json.load(open({str(out / 'summary.json')!r})); "
        "assert [s['name'] for s in d['steps']] == ['first'], d; print('seen')"
    )
    _, by_name, _ = run([step("first", "print(1)"), step("second", check)], tmp_path)
    assert by_name["second"]["status"] == "passed"


def test_dry_mode_runs_the_dry_commands_and_notes_tools_missing_here(tmp_path):
    steps = [
        Step(
            "gpu",
            30,
            lambda c: [py("raise SystemExit(1)")],
            requires=("no-such-sanitizer",),
            dry=lambda c: [py("print('checked')")],
            dry_note=lambda c, text: "dry ok",
        ),
        step("plain", "print('runs in both modes')"),
        Step(
            "dry-fails",
            30,
            lambda c: [py("print(1)")],
            dry=lambda c: [py("print(1)")],
            dry_success=lambda c, text: "nothing collected",
        ),
    ]
    document, by_name, _ = run(steps, tmp_path, dry=True)
    assert document["dry"] is True
    assert by_name["gpu"]["status"] == "passed"
    assert by_name["gpu"]["note"] == "dry ok; not on PATH here: no-such-sanitizer"
    assert "checked" in (tmp_path / "work" / "gpu.log").read_text()
    assert by_name["plain"]["status"] == "passed"
    assert by_name["dry-fails"]["status"] == "failed"
    assert by_name["dry-fails"]["note"] == "nothing collected"
    assert "gpu-check --dry" in (tmp_path / "out" / "summary.md").read_text()


def test_parsers_of_tool_output():
    assert gpu_check.arch_list([(9, 0)]) == "9.0"
    assert gpu_check.arch_list([(9, 0), (8, 0), (9, 0)]) == "8.0;9.0"
    assert gpu_check.collect_count("372/1558 tests collected (1186 deselected) in 6.0s") == 372
    assert gpu_check.collect_count("1 test collected in 0.1s") == 1
    assert gpu_check.collect_count("no tests ran") is None
    text = (
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
        "sanitize_kernels: 96 cases on cuda in 12.0 s, 0 mismatches against the CPU kernels\n"
        "========= ERROR SUMMARY: 0 errors\n"
    )
    assert gpu_check.sanitizer_note(text) == (
        "0 errors; 0 hazards; 96 cases on cuda in 12.0 s, 0 mismatches against the CPU kernels"
    )
    assert gpu_check.refusal(gpu_check.SANITIZER_REFUSALS, "a\n= Device not supported\n") == (
        "= Device not supported"
    )


def test_junit_note(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="10" failures="2" '
        'errors="1" skipped="3"></testsuite></testsuites>'
    )
    assert gpu_check.junit_note(path) == "4 passed, 2 failed, 1 errors, 3 skipped"


def test_step_selection_and_the_declared_steps():
    steps = gpu_check.steps()
    names = [s.name for s in steps]
    assert len(set(names)) == len(names)
    assert names[:2] == ["environment", "build"]
    chosen = [s.name for s in gpu_check.select_steps(steps, "memcheck")]
    assert chosen == ["environment", "build", "memcheck"]  # what it needs comes along
    with pytest.raises(ValueError, match="--steps: unknown nope; known: environment, build"):
        gpu_check.select_steps(steps, "pytest-cuda,nope")
    for item in steps:
        assert set(item.needs) <= set(names[: names.index(item.name)]), item.name
        if item.requires:  # a tool only the GPU machine has: the dry run must not need it
            assert item.dry is not None and "compute-sanitizer" not in item.dry_requires
    sanitizers = [s for s in steps if "compute-sanitizer" in s.requires]
    assert [s.name for s in sanitizers] == ["memcheck", "racecheck", "synccheck"]
    assert all(s.refusals == gpu_check.SANITIZER_REFUSALS for s in sanitizers)


def test_build_environment_uses_the_visible_gpus_and_every_cpu():
    context = gpu_check.Context(work=Path("."), environment={"arch_list": "9.0"})
    env = gpu_check.build_env(context)
    assert env == {
        "FORCE_CUDA": "1", "MAX_JOBS": str(gpu_check.cpu_count()), "TORCH_CUDA_ARCH_LIST": "9.0"
    }  # fmt: skip
    assert "TORCH_CUDA_ARCH_LIST" not in gpu_check.build_env(gpu_check.Context(work=Path(".")))


def test_delt_commands_of_the_check_parse_and_hooks_are_detected(capsys):
    assert gpu_check.parse_delt([*gpu_check.SYNTHESIS_ARGS, "--json", "x.json"]) == 0
    assert gpu_check.parse_delt(["bench", "synthesis", "--iterations", "7"]) == 2
    assert "--iterations (7) must be a multiple of --rounds" in capsys.readouterr().err
    assert gpu_check.has_command(["bench", "synthesis"]) == 0
    assert gpu_check.has_command(["bench", "no-such-suite"]) == gpu_check.ABSENT
    assert gpu_check.has_command(["no-such-command"]) == gpu_check.ABSENT


def test_command_line_errors():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    script = [sys.executable, str(ROOT / "tools" / "gpu_check.py")]
    result = subprocess.run(script, capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "error: no output folder: give OUT, or set the OUT environment variable" in (
        result.stderr
    )
    result = subprocess.run([*script, "x", "--steps", "bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "--steps: unknown bogus" in result.stderr
    listed = subprocess.run([*script, "--list"], capture_output=True, text=True, check=True)
    assert listed.stdout.split()[0] == "environment"


def test_tables_from_a_runs_archive(tmp_path, capsys):
    from delt.bench import SynthesisBenchConfig, run_synthesis_bench

    work = tmp_path / "work"
    work.mkdir()
    run_synthesis_bench(
        SynthesisBenchConfig(
            arch="convnet1", resolution=8, classes=4, batch_size=4, ipc=2, iterations=8,
            repeats=1, rows=("reference", "floor", "delt"), device="cpu", progress=False,
            json=str(work / "synthesis.json"),
        )
    )  # fmt: skip
    environment = {
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "580.159.04"},
        "torch": {"version": "2.11.0+cu130", "cuda": "13.0"},
        "commit": "abc1234",
    }
    (work / "environment.json").write_text(json.dumps(environment))
    # The fields of pytest-benchmark's JSON that benchmarks/report.py reads.
    bench = {
        "machine_info": {"cpu": {"brand_raw": "test CPU"}},
        "datetime": "2026-12-08T10:00:00",
        "benchmarks": [
            {"group": "bn_stat fwd+bwd cuda (100, 64, 32, 32)", "name": f"test_x[{impl}]",
             "params": {"impl": impl}, "stats": {"median": median}, "extra_info": {"bytes": 3e8}}
            for impl, median in (("fused", 1e-4), ("eager-hook", 1e-3))
        ],
    }  # fmt: skip
    (work / "bench-kernels.json").write_text(json.dumps(bench))
    out = tmp_path / "out"
    out.mkdir()
    gpu_check.pack(work, out / "logs.tar.gz")
    capsys.readouterr()
    assert gpu_check.tables(out, tmp_path / "tables.md") == 0
    printed = capsys.readouterr().out
    assert printed.strip() == (tmp_path / "tables.md").read_text().strip()
    assert (
        "<!-- NVIDIA H100 80GB HBM3, driver 580.159.04, torch 2.11.0+cu130 (CUDA 13.0)" in printed
    )
    assert "| row | ms / iteration | images·it / s | vs reference |" in printed
    assert "| reference |" in printed and "| delt |" in printed
    assert "| cuda (100, 64, 32, 32) | eager-hook | 1.000 | 10.00x | 300.0 |  |" in printed
    # Without the files: says which step did not finish.
    assert gpu_check.tables(tmp_path / "empty", None) == 0
    assert "(no synthesis.json: the step did not finish)" in capsys.readouterr().out
