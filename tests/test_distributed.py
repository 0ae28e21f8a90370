"""delt.distributed under torchrun (Gloo, CPU, one thread per rank): recover (cda, delt), pdd and
select give the one-process bytes at world size 2; a killed rank fails the job and the re-run
resumes to the same bytes; world size 2 then 1; two "nodes" through a c10d rendezvous.

Every launch runs under a hard timeout (``LAUNCH_TIMEOUT``) and the process group's own timeout
is ``DELT_DIST_TIMEOUT=60``, so nothing here can hang.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from delt.distributed import (
    World,
    all_gather,
    barrier,
    broadcast,
    is_main,
    main_first,
    session,
    timeout_seconds,
    torchrun_environment,
    world,
)

LAUNCH_TIMEOUT = 240  # seconds; a launch that takes longer fails the test (no hang)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DELT = ["-m", "delt"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # One thread per rank (results depend on the thread count), a short collective timeout.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DELT_DIST_TIMEOUT="60")
    # `python -m` would put the working folder (the checkout) first on sys.path, and the
    # checkout's delt_ext (no compiled library) would shadow the installed one.
    env["PYTHONSAFEPATH"] = "1"
    return env


def _here(args: list[str]) -> None:
    """``delt ARGS`` as one process, this one (one thread: the CLI's default), which saves the
    interpreter's start of a subprocess."""
    from delt.cli import main

    assert main(args) == 0


def _one_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *DELT, *args], env=_env(), capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip


def _torchrun(
    args: list[str], nproc: int = 2, launcher: list[str] | None = None, env: dict | None = None
):
    command = [*TORCHRUN, *(launcher or ["--standalone"]), f"--nproc-per-node={nproc}", *DELT]
    return subprocess.run(
        [*command, *args], env={**_env(), **(env or {})}, capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _set_files(folder: Path) -> dict[str, bytes]:
    """The distilled set's bytes: distilled.pt and every image file (stages too)."""
    names = ["distilled.pt", *[str(p.relative_to(folder)) for p in folder.glob("**/*.png")]]
    names += [str(p.relative_to(folder)) for p in folder.glob("stages/*/distilled.pt")]
    return {name: (folder / name).read_bytes() for name in sorted(names)}


def _assert_same_set(folder: Path, reference: Path) -> None:
    files, expected = _set_files(folder), _set_files(reference)
    assert sorted(files) == sorted(expected)
    different = [name for name in expected if files[name] != expected[name]]
    assert not different, f"differ from the one-process run: {different}"


# --------------------------------------------------------------------------------------------
# Without torchrun: the world-size-1 case, nothing initialized, nothing written.


def test_without_torchrun_everything_is_the_one_process_world(monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_environment() is None
    with session("cpu", tmp_path) as job:
        assert job == World(0, 1, 0) == world()
        assert is_main()
        barrier()
        assert broadcast({"a": 1}) == {"a": 1}
        assert all_gather(3) == [3]
        with main_first():
            pass
    assert not (tmp_path / "logs").exists()
    assert not torch.distributed.is_initialized()


def test_the_session_holds_the_output_lock_while_the_command_runs(monkeypatch, tmp_path):
    # The hook for the output-folder lock: one process (rank 0 under torchrun) holds it.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    events = []

    @contextlib.contextmanager
    def lock(folder):
        events.append(("take", folder))
        yield
        events.append(("release", folder))

    with session("cpu", tmp_path, lock=lock):
        assert events == [("take", tmp_path)]
    assert events == [("take", tmp_path), ("release", tmp_path)]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "expected integers"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK=2 must be in \[0, "),
    ],
)
def test_a_bad_torchrun_environment_is_refused(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        torchrun_environment()


def test_the_collective_timeout_is_bounded_and_checked(monkeypatch):
    monkeypatch.delenv("DELT_DIST_TIMEOUT", raising=False)
    assert 0 < timeout_seconds() <= 3600
    monkeypatch.setenv("DELT_DIST_TIMEOUT", "12.5")
    assert timeout_seconds() == 12.5
    monkeypatch.setenv("DELT_DIST_TIMEOUT", "0")
    with pytest.raises(ValueError, match="DELT_DIST_TIMEOUT must be a number of seconds > 0"):
        timeout_seconds()


# --------------------------------------------------------------------------------------------
# Under torchrun (two Gloo ranks of one thread each).


def _recover_args(teacher, out, method, selection=None, **flags) -> list[str]:
    values = {"ipc": 3, "iterations": 6, "batch-size": 4, "device": "cpu", **flags}
    args = ["recover", "--teacher", str(teacher), "--out", str(out), "--method", method]
    if selection is not None:
        args += ["--selection", str(selection)]
    for name, value in values.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return [*args, "--no-progress"]


# One cda set of 16 chunks (4 classes x 8 images, 2 per chunk), made by one process, against
# which the torchrun runs below are compared.
def _cda_args(teacher, out) -> list[str]:
    return _recover_args(teacher, out, "cda", ipc=8, batch_size=2, iterations=30)


@pytest.fixture(scope="module")
def cda_reference(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("cda_one_process")
    _here(_cda_args(tiny_teacher.path, out))
    assert not (out / "logs").exists()  # a one-process run writes what it always wrote
    return out


def test_recover_cda_on_two_ranks_is_bitwise_the_one_process_set(
    tmp_path, tiny_teacher, cda_reference
):
    result = _ok(_torchrun(_cda_args(tiny_teacher.path, tmp_path)))
    _assert_same_set(tmp_path, cda_reference)
    assert result.stdout.count("recover: 32 images") == 1  # rank 0 alone reports
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank-{rank}.log").read_text()
        assert f"rank {rank} of 2" in log and "backend gloo" in log
        assert log.count("done in") == 8  # 16 chunks dealt round-robin


def test_recover_delt_on_two_ranks_is_bitwise_the_one_process_set(
    tmp_path, tiny_teacher, tiny_selection
):
    def args(out):
        return _recover_args(tiny_teacher.path, out, "delt", tiny_selection, round_iterations=2)

    reference, out = tmp_path / "one", tmp_path / "two"
    _here(args(reference))
    _ok(_torchrun(args(out)))
    _assert_same_set(out, reference)


def test_pdd_with_hard_init_on_two_ranks_is_bitwise_the_one_process_set(
    tmp_path, tiny_teacher, tiny_selection
):
    flags = {
        "ipc": 4, "stages": 2, "round-iterations": 2, "stage-init": "hard",
        "hard-student-epochs": 1, "union-sample": 2,
    }  # fmt: skip
    args = lambda out: [  # noqa: E731
        *_recover_args(tiny_teacher.path, out, "pdd", tiny_selection, **flags), "--base", "delt",
        "--union-in-batch",
    ]  # fmt: skip
    reference, out = tmp_path / "one", tmp_path / "two"
    _here(args(reference))
    _ok(_torchrun(args(out)))
    _assert_same_set(out, reference)
    init = "stages/2/init.json"
    assert (out / init).read_text() == (reference / init).read_text().replace(
        _seconds(reference / init), _seconds(out / init)
    )


def _seconds(path: Path) -> str:
    return re.search(r'"student_seconds": ([0-9.e+-]+)', path.read_text()).group(1)


_SWEEP_SCRIPT = """
import sys, time
from pathlib import Path
import delt.lock
from delt.distributed import barrier, session
from delt.lock import output_lock

out = Path(sys.argv[1])
sweep = delt.lock.remove_stray_temporaries
def slow_sweep(*args, **kwargs):
    time.sleep(1.0)  # rank 0 sweeps late: rank 1 must still wait for it
    return sweep(*args, **kwargs)
delt.lock.remove_stray_temporaries = slow_sweep
with session("cpu", out, lock=output_lock) as job:
    with output_lock(out) as lock:
        removed = lock.sweep()
        if job.rank == 1:  # this rank's write under way, named as atomic_open names it
            (out / ".chunk-1.pt.abcdefgh.tmp").write_text("rank 1, writing")
        barrier()
        print(f"rank {job.rank} held {lock.held} removed {[p.name for p in removed]}")
"""


def test_rank_0_sweeps_a_killed_runs_temporaries_before_the_other_ranks_write(tmp_path):
    # The failure this guards: rank 0's sweep deleted the files rank 1 had begun to write (its
    # writability probe, a chunk's temporary file) because both went on at once.
    out = tmp_path / "out"
    out.mkdir()
    (out / ".manifest.json.zyxwvuts.tmp").write_text("a killed run's")
    script = tmp_path / "sweep.py"
    script.write_text(_SWEEP_SCRIPT)
    result = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc-per-node=2", str(script), str(out)], env=_env(),
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    _ok(result)
    assert "rank 0 held True removed ['.manifest.json.zyxwvuts.tmp']" in result.stdout
    assert "rank 1 held False removed []" in result.stdout
    assert (out / ".chunk-1.pt.abcdefgh.tmp").read_text() == "rank 1, writing"
    assert not (out / ".manifest.json.zyxwvuts.tmp").exists()


def test_select_on_two_ranks_is_the_one_process_selection(tmp_path, tiny_teacher):
    def args(out):
        return [
            "select", "--teacher", str(tiny_teacher.path), "--ipc", "2", "--out", str(out),
            "--batch-size", "5", "--device", "cpu", "--no-progress",
        ]  # fmt: skip

    reference, out = tmp_path / "one", tmp_path / "two"
    _here(args(reference))
    _ok(_torchrun(args(out)))
    assert (out / "ranking.csv").read_bytes() == (reference / "ranking.csv").read_bytes()
    import json

    chosen = [json.loads((f / "selection.json").read_text())["classes"] for f in (out, reference)]
    assert chosen[0] == chosen[1]


def test_a_killed_rank_fails_the_job_and_a_one_process_rerun_resumes_to_the_same_bytes(
    tmp_path, tiny_teacher, cda_reference
):
    out = tmp_path / "killed"
    command = [*TORCHRUN, "--standalone", "--nproc-per-node=2", *DELT]
    job = subprocess.Popen(
        [*command, *_cda_args(tiny_teacher.path, out)], env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        log = out / "logs" / "rank-1.log"
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        pid = None
        while time.monotonic() < deadline and job.poll() is None:
            text = log.read_text() if log.is_file() else ""
            found = re.search(r"pid (\d+)", text)
            if found and "done in" in text:  # rank 1 finished a chunk: kill it mid-run
                pid = int(found.group(1))
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert pid is not None, "rank 1 never finished a chunk"
        # torchrun notices the dead rank, stops the other one and fails, well within the timeout.
        returncode = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert returncode != 0
    done = len(list((out / "chunks").glob("*.pt")))
    assert 1 <= done < 16 and not (out / "distilled.pt").exists()
    # Another world size (one process) resumes from the finished chunks to the same bytes.
    result = _ok(_one_process(_cda_args(tiny_teacher.path, out)))
    assert f"({done} already done)" in result.stderr
    _assert_same_set(out, cda_reference)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_through_a_c10d_rendezvous(tmp_path, tiny_teacher, cda_reference):
    # Two torchrun "nodes" of one rank each on this machine, as on two hosts sharing --out.
    port = _free_port()
    launcher = [
        "--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=delt-test",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                *launcher,
                "--nproc-per-node=1",
                *DELT,
                *_cda_args(tiny_teacher.path, tmp_path),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=LAUNCH_TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)[-4000:]
    _assert_same_set(tmp_path, cda_reference)
    for rank in (0, 1):
        assert f"rank {rank} of 2" in (tmp_path / "logs" / f"rank-{rank}.log").read_text()


def test_eval_with_ddp_matches_one_process_and_resumes_a_killed_run_to_the_same_numbers(
    tmp_path, tiny_set
):
    # 8 images, global batch 4 (2 per rank), GlobalBatchNorm2d over the global batch: the first
    # epoch's loss is the one-process loss up to the order of the sums.
    def args(out):
        return [
            "eval", "--distilled", str(tiny_set), "--epochs", "3", "--batch-size", "4",
            "--seeds", "0", "--eval-every", "1", "--checkpoint-every", "1", "--device", "cpu",
            "--out", str(out), "--no-progress",
        ]  # fmt: skip

    import json

    def numbers(path):
        return [
            {key: seed[key] for key in ("seed", "train_loss", "curve")}
            for seed in json.loads(path.read_text())["seeds"]
        ]

    one, two = tmp_path / "one" / "eval.json", tmp_path / "two" / "eval.json"
    _here(args(one))
    result = _ok(_torchrun(args(two)))
    assert result.stdout.count("eval: best top-1") == 1
    seeds = [json.loads(path.read_text())["seeds"][0] for path in (one, two)]
    assert seeds[1]["train_loss"][0] == pytest.approx(seeds[0]["train_loss"][0], rel=1e-4)
    assert len(seeds[1]["curve"]) == 3  # the sharded test ran after every epoch

    # Rank 0's atomic writes: the states after epochs 1 and 2, then eval.json. Killed at the
    # second (epoch 2's state written to its temporary, not yet in place), the job fails with
    # epoch 1's state saved; two ranks again resume from it (each its own generators) and end
    # with the uninterrupted run's numbers, bitwise.
    killed = tmp_path / "killed" / "eval.json"
    failed = _torchrun(args(killed), env={"DELT_FAULT_KILL_AT_WRITE": "2"})
    assert failed.returncode != 0 and not killed.exists()
    state_path = killed.parent / "eval-checkpoints" / "seed-0.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["trainer"]["epochs_done"] == 1 and len(state["ranks"]) == 2
    # On the CPU every rank draws the global batch's numbers: the same generators on each.
    first, second = state["ranks"]
    assert torch.equal(first["rng"], second["rng"])
    assert torch.equal(first["generator"], second["generator"])
    resumed = _ok(_torchrun(args(killed)))
    assert "seed 0 resumes after epoch 1" in resumed.stderr
    assert "resumes after epoch 1" in (killed.parent / "logs" / "rank-1.log").read_text()
    assert numbers(killed) == numbers(two)
    assert not state_path.parent.exists()  # the finished seed's state (and the stray) are gone


PROBE = Path(__file__).parent / "ddp_trainer_probe.py"


def _load_probe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_trainer_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_ddp_rank_augments_only_its_rows_and_their_cutmix_partners(
    tmp_path, tiny_teacher, num_threads
):
    # 10 images, global batch 4 (batches of 4, 4, 2), 2 epochs, ShufflePatches + RandAugment +
    # crops + CutMix, augmented in the process and in a DataLoader worker: each rank's student
    # sees exactly its rows of the one-process batches, and RandAugment ran only on the rows a
    # rank needs (its own and their CutMix partners).
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    probe = [str(PROBE), str(tiny_teacher.path)]
    _ok(
        subprocess.run(
            [*TORCHRUN, "--standalone", "--nproc-per-node=2", *probe, str(two)], env=_env(),
            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
        )
    )  # fmt: skip
    num_threads(1)
    _load_probe().main([str(tiny_teacher.path), str(one)])  # one process: this one
    for workers in (0, 1):
        _check_rank_rows(one / f"workers-{workers}", two / f"workers-{workers}")


def _check_rank_rows(one: Path, two: Path) -> None:
    reference = torch.load(one / "rank-0.pt", weights_only=True)
    ranks = [torch.load(two / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    batches = [4, 4, 2] * 2
    assert len(reference["seen"]) == len(batches) and reference["world"] == 1

    def calls(folder: Path, rank: int) -> int:
        return len((folder / f"calls-rank-{rank}.txt").read_text().split())

    assert calls(one, 0) == sum(batches)  # one process: every image once per epoch
    for rank, probed in enumerate(ranks):
        assert probed["world"] == 2 and len(probed["seen"]) == len(batches)
        needed = 0
        for step, count in enumerate(batches):
            half = count // 2
            own = torch.arange(rank * half, (rank + 1) * half)
            assert torch.equal(probed["seen"][step], reference["seen"][step][own])
            permutation = reference["permutations"][step]
            assert torch.equal(probed["permutations"][step], permutation)
            needed += torch.unique(torch.cat([own, permutation[own]])).numel()
        assert calls(two, rank) == needed < sum(batches)
        # Same draws on every rank as in one process: the generators end alike.
        assert torch.equal(probed["rng"], reference["rng"])
        assert torch.equal(probed["generator"], reference["generator"])
        # The losses to round-off (GlobalBatchNorm2d's sums; KL values of ~1e-5).
        assert probed["losses"] == pytest.approx(reference["losses"], rel=1e-3)


def test_teacher_diversity_and_report_run_on_rank_0_alone(
    tmp_path, tiny_set, monkeypatch, num_threads
):
    # Each writes one output: under torchrun rank 0 makes it, once (DELT_FAULT_LOG lists every
    # atomic write), with the one-process result; the other rank leaves at once, status 0.
    import json
    import shutil

    num_threads(1)
    scored = tmp_path / "set"
    shutil.copytree(tiny_set, scored, ignore=shutil.ignore_patterns("chunks", ".lock"))
    epochs = ["--epochs", "1", "--eval-every", "1", "--device", "cpu", "--no-progress"]
    _here(["eval", "--distilled", str(scored), *epochs])
    _here(["diversity", "--distilled", str(scored), "--device", "cpu"])

    def commands(root: Path) -> list[list[str]]:
        return [
            ["teacher", "--dataset", "synthetic:classes=4,channels=3,size=8,train=12,test=4",
             "--arch", "convnet2", "--width", "4", "--epochs", "1", "--batch-size", "16",
             "--amp", "none", "--out", str(root / "teacher"), "--device", "cpu",
             "--no-progress"],
            ["diversity", "--distilled", str(scored), "--out", str(root / "diversity.json"),
             "--device", "cpu"],
            ["report", "--runs", str(scored), "--out", str(root / "comparison.png")],
        ]  # fmt: skip

    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.setenv("DELT_FAULT_LOG", str(tmp_path / "writes-one.txt"))
    for args in commands(one):
        _here(args)
    monkeypatch.delenv("DELT_FAULT_LOG")
    for args in commands(two):
        result = _ok(_torchrun(args, env={"DELT_FAULT_LOG": str(tmp_path / "writes-two.txt")}))
        shown = {"teacher": "teacher: ", "diversity": "diversity: ", "report": "chart: "}
        assert result.stdout.count(shown[args[0]]) == 1  # rank 0 alone reports
    for log in (two / "teacher" / "logs" / "rank-1.log", two / "logs" / "rank-1.log"):
        assert "runs on rank 0 alone" in log.read_text()

    def writes(name: str, root: Path) -> list[str]:
        lines = (tmp_path / name).read_text().split()
        return [str(Path(line).relative_to(root)) for line in lines]

    written = writes("writes-two.txt", two)
    assert written == writes("writes-one.txt", one) and len(set(written)) == len(written)
    teachers = [
        torch.load(root / "teacher" / "teacher.pt", weights_only=True) for root in (one, two)
    ]
    for name, tensor in teachers[0]["state_dict"].items():
        assert torch.equal(tensor, teachers[1]["state_dict"][name]), name
    diversity = [json.loads((root / "diversity.json").read_text()) for root in (one, two)]
    assert diversity[0]["per_class"] == diversity[1]["per_class"]
    assert (one / "comparison.md").read_text() == (two / "comparison.md").read_text()


# --------------------------------------------------------------------------------------------
# On a GPU (`pytest -m cuda`, run by `make gpu-check`): recover and eval on CUDA, as one process
# and under torchrun with one NCCL rank.


def _cuda_pipeline(run, root: Path, teacher: Path, selection: Path) -> dict:
    """`delt recover --method delt` then `delt eval` on CUDA, each through ``run`` (one process
    or torchrun), under ``root``: the eval document."""
    import json

    distilled, results = root / "set", root / "eval" / "eval.json"
    run(_recover_args(teacher, distilled, "delt", selection, round_iterations=2, device="cuda"))
    run(
        ["eval", "--distilled", str(distilled), "--epochs", "2", "--batch-size", "4", "--seeds",
         "0", "--eval-every", "1", "--device", "cuda", "--out", str(results), "--no-progress"]
    )  # fmt: skip
    return json.loads(results.read_text())


@pytest.mark.cuda
def test_recover_and_eval_on_cuda_as_one_process_and_one_nccl_rank(
    tmp_path, tiny_teacher, tiny_selection
):
    def one_process(args):
        return _ok(_one_process(args))

    def one_rank(args):
        return _ok(_torchrun(args, nproc=1))

    documents = [
        _cuda_pipeline(run, tmp_path / name, tiny_teacher.path, tiny_selection)
        for run, name in ((one_process, "one"), (one_rank, "torchrun"))
    ]
    for document in documents:
        assert document["complete"] and document["config"]["device"].startswith("cuda")
        assert document["num_images"] == 12  # 4 classes x IPC 3
        assert len(document["seeds"][0]["curve"]) == 2  # tested after each of the 2 epochs
        assert 0.0 <= document["best"]["mean"] <= 100.0
    for log in ("set/logs/rank-0.log", "eval/logs/rank-0.log"):
        text = (tmp_path / "torchrun" / log).read_text()
        assert "rank 0 of 1" in text and "backend nccl" in text, log
    # `delt compare` of the one-process set, as one process and as one NCCL rank: the same
    # evaluations (labels, seeds, results files), each complete.
    import json

    compared = []
    for run, name in ((one_process, "one"), (one_rank, "torchrun")):
        out = tmp_path / f"compare-{name}"
        run(
            ["compare", "--sets", str(tmp_path / "one" / "set"), "--seeds", "0", "--epochs", "2",
             "--batch-size", "4", "--eval-every", "1", "--device", "cuda", "--no-progress",
             "--out", str(out)]
        )  # fmt: skip
        compared.append(json.loads((out / "compare.json").read_text()))
    evaluations = [document["budgets"][0]["evaluations"] for document in compared]
    assert [e["label"] for e in evaluations[0]] == [e["label"] for e in evaluations[1]]
    for entries in evaluations:
        assert len(entries) == 1 and list(entries[0]["accuracies"]) == ["0"]
        assert 0.0 <= entries[0]["mean"] <= 100.0
