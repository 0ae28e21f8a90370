"""One student epoch and one test pass: main's loop vs the models alone vs delt's.

The rows are those of ``delt bench eval`` (:mod:`delt.bench_eval`, whose docstring defines them):
``reference`` (main a713465's loop and eager test pass at batch 500, written in the benchmark),
``floor`` (the teacher's forward and the student's forward and backward alone; the folded
student's forward alone), ``delt`` and ``+channels_last``. Each case times the epoch and the
test pass as separate benchmarks (groups ``eval epoch ...`` and ``eval test ...``);
``extra_info`` holds the steps of an epoch and the images of a test pass, so that ms per step
and images per second follow from the median.

Run: pytest benchmarks/bench_eval.py --benchmark-only  (or `make bench`).
"""

import pytest
import torch
from delt.bench_eval import EVAL_ROWS, EvalBenchConfig, prepare_eval_rows

# (id, config fields): ConvNet-3 w64 on Fashion-MNIST-sized images (28 px, 1 channel, 10
# classes, 10,000 test images) at IPC 10 and 50; ResNet-18-small at 32 px (CIFAR-10-sized);
# ResNet-18 at 224 px on a GPU.
CASES = [
    ("cpu-convnet3-28px-ipc10", dict(arch="convnet3", resolution=28, channels=1, ipc=10,
                                     device="cpu")),
    ("cpu-convnet3-28px-ipc50", dict(arch="convnet3", resolution=28, channels=1, ipc=50,
                                     device="cpu")),
    ("cpu-resnet18_small-32px-ipc10", dict(arch="resnet18_small", resolution=32, channels=3,
                                           ipc=10, test_images=1000, device="cpu")),
    ("cuda-resnet18-224px-ipc10", dict(arch="resnet18", resolution=224, channels=3, ipc=10,
                                       classes=100, test_images=5000, device="cuda")),
]  # fmt: skip

_setups: dict[str, object] = {}


def _setup(case_id: str, fields: dict):
    if case_id not in _setups:
        _setups[case_id] = prepare_eval_rows(EvalBenchConfig(progress=False, **fields))
    return _setups[case_id]


@pytest.mark.parametrize("part", ["epoch", "test"])
@pytest.mark.parametrize("impl", EVAL_ROWS)
@pytest.mark.parametrize("case_id, fields", CASES, ids=[case_id for case_id, _ in CASES])
def test_eval(benchmark, case_id, fields, impl, part):
    if fields["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    setup = _setup(case_id, fields)
    run = setup.rows[impl][0 if part == "epoch" else 1]

    def step():
        run()
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)

    benchmark.group = f"eval {part} {case_id}"
    benchmark.extra_info.update(
        steps=setup.steps, train_images=setup.train_images, test_images=setup.test_images
    )
    step()  # warm-up
    benchmark.pedantic(step, rounds=3 if fields["device"] == "cpu" else 10, warmup_rounds=0)
