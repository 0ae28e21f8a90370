"""One recovery chunk end to end: the papers' eager loop vs the teacher alone vs delt's loop.

The rows are those of ``delt bench synthesis`` (:mod:`delt.bench`, whose docstring defines
them): ``reference`` (SRe2L's BN hooks, torchvision transforms on the batch, Adam, clamp; written
from the papers, not from the product), ``floor`` (the teacher's forward + backward w.r.t. its
input alone), ``delt`` and its ``+channels_last``, ``+bf16``, ``+compile`` and
``+per-sample-aug`` variants. One benchmark round = one chunk's loop of ``iterations`` steps;
``extra_info`` holds the iterations and the image-iterations of a round, so that ms/iteration and
images·iterations/s follow from the median.

``+compile`` runs only where ``DELT_BENCH_COMPILE=1`` (Inductor needs minutes to compile a
ResNet-18 on a small CPU); ``delt bench synthesis --rows ...`` runs it on demand.

Run: pytest benchmarks/bench_synthesis.py --benchmark-only  (or `make bench`).
"""

import os

import pytest
import torch
from delt.bench import ROWS, SynthesisBenchConfig, prepare_rows

# (id, config fields): the DELT chunk of ConvNet-3 on 28 px, 1 channel (Fashion-MNIST-sized)
# and of ResNet-18-small on 32 px (CIFAR-sized), batch 100; ResNet-18 at 224 px on a GPU.
CASES = [
    ("cpu-convnet3-28px", dict(arch="convnet3", resolution=28, channels=1, device="cpu")),
    ("cpu-resnet18_small-32px", dict(arch="resnet18_small", resolution=32, device="cpu")),
    ("cuda-resnet18-224px", dict(arch="resnet18", resolution=224, device="cuda")),
]
COMPILE = os.environ.get("DELT_BENCH_COMPILE") == "1"

_setups: dict[str, object] = {}


def _setup(case_id: str, fields: dict):
    # One teacher and chunk per case, shared by its rows (built once per session).
    if case_id not in _setups:
        config = SynthesisBenchConfig(
            method="delt", iterations=8, rows=ROWS, progress=False, **fields
        )
        if not COMPILE:
            config.rows = tuple(row for row in ROWS if row != "+compile")
        _setups[case_id] = prepare_rows(config)
    return _setups[case_id]


@pytest.mark.parametrize("impl", ROWS)
@pytest.mark.parametrize("case_id, fields", CASES, ids=[case_id for case_id, _ in CASES])
def test_synthesis_chunk(benchmark, case_id, fields, impl):
    if fields["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if impl == "+compile" and not COMPILE:
        pytest.skip("+compile runs with DELT_BENCH_COMPILE=1")
    setup = _setup(case_id, fields)
    run = setup.rows[impl]

    def step():
        run()
        setup.synchronize()

    benchmark.group = f"synthesis chunk {case_id}"
    benchmark.extra_info.update(
        iterations=setup.iterations, image_iterations=setup.image_iterations
    )
    step()  # warm-up (first-call dispatch, allocator, compilation)
    benchmark.pedantic(step, rounds=3 if fields["device"] == "cpu" else 10, warmup_rounds=0)
