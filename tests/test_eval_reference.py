"""``delt eval`` numbers stay bitwise identical to a saved run of main ac83428's evaluator.

The evaluator is being changed for scale (issue 12: the set stays on the host in its stored
dtype, batches go to the device, epoch checkpoints, workers); at ``--workers 0`` on the CPU none
of that may change a single loss or accuracy. ``fixtures/eval_reference.json`` holds, per case,
the exact config and every seed's per-epoch training losses and test curve (floats, exact in
JSON), written by main's code: ``PYTHONPATH=/path/to/main/python python
tests/test_eval_reference.py``. Inputs: the untrained teacher of ``test_recover_reference`` and a
CDA set recovered with it. Like that test, it is pinned to one thread and skipped on another
torch build or CPU kernel family.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_recover_reference import (  # noqa: E402
    _platform,
    at_threads,
    build_inputs,
    saved_reference,
)

FIXTURE = Path(__file__).parent / "fixtures" / "eval_reference.json"

CASES: dict[str, dict] = {
    "default": dict(epochs=3, seeds=(0, 1), eval_every=1),
    "bf16-channels-last": dict(epochs=2, seeds=(0,), eval_every=1, amp="bf16", channels_last=True),
    "hard-labels": dict(epochs=2, seeds=(3,), eval_every=2, hard_labels=True),
    "random-real": dict(epochs=2, seeds=(0,), eval_every=1, random_real=True, ipc=3),
}


def make_set(folder: Path) -> Path:
    from delt.recover import RecoverConfig, recover

    teacher, _ = build_inputs(folder)
    out = folder / "set"
    recover(
        RecoverConfig(
            teacher=str(teacher), out=str(out), device="cpu", progress=False, method="cda",
            ipc=3, iterations=3, batch_size=6,
        )
    )  # fmt: skip
    return out


def run_case(name: str, distilled: Path, results: Path, **extra) -> dict:
    from delt.evaluate import EvalConfig, evaluate

    result = evaluate(
        EvalConfig(
            distilled=str(distilled), out=str(results), device="cpu", progress=False,
            **CASES[name], **extra,
        )
    )  # fmt: skip
    return {
        "seeds": [
            {"seed": s.seed, "train_loss": s.train_loss, "curve": s.curve} for s in result.seeds
        ]
    }


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


@pytest.fixture(scope="module")
def reference_set(tmp_path_factory):
    saved = saved_reference(FIXTURE)
    distilled = at_threads(saved["threads"], make_set, tmp_path_factory.mktemp("eval-reference"))
    return saved, distilled


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_matches_the_saved_run_bitwise(reference_set, tmp_path, num_threads, name):
    saved, distilled = reference_set
    num_threads(saved["threads"])
    case = saved["cases"][name]
    assert case["config"] == _jsonable(CASES[name]), f"{name}: the case changed since the fixture"
    got = run_case(name, distilled, tmp_path / "eval.json", **WORKERS_ZERO)
    assert got["seeds"] == case["seeds"], f"{name}: delt eval's numbers differ from main's"


# The path that must reproduce main's numbers (filled in when --workers exists).
WORKERS_ZERO: dict = {}


def main() -> None:
    import tempfile

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        distilled = make_set(Path(folder))
        cases = {}
        for name in CASES:
            result = run_case(name, distilled, Path(folder) / f"{name}.json")
            cases[name] = {"config": _jsonable(CASES[name]), **result}
            print(name, result["seeds"][0]["train_loss"])
    document = {"platform": _platform(), "threads": threads, "cases": cases}
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else FIXTURE
    target.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
