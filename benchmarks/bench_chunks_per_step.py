"""K chunks per teacher step (``--chunks-per-step``) against one chunk per step, one thread.

The run of ``delt recover --chunks-per-step K``'s target (issue 30): Fashion-MNIST-sized
ConvNet-3 (28 px, 1 channel, 10 classes), IPC 1, a chunk per class (``--batch-size 1``), the
10 chunks optimized one after another (``delt``) and all in one loop (``+chunks-per-step``);
the rows of ``delt bench synthesis --chunks-per-step 10`` (:mod:`delt.bench`). ``extra_info``
holds the chunk-iterations and image-iterations of a round (all 10 chunks), so that
images·iterations/s follow from the median.

Run: pytest benchmarks/bench_chunks_per_step.py --benchmark-only
"""

import pytest
import torch
from delt.bench import SynthesisBenchConfig, prepare_rows

# (id, config fields): one class per chunk at IPC 1 (sre2l/cda: an image per class per chunk),
# and DELT's class-contiguous chunks of IPC 10 (a class per chunk, EarlyLate rounds).
CASES = [
    ("fmnist-ipc1-cda", dict(method="cda", ipc=1, batch_size=1, iterations=20, rounds=1)),
    ("fmnist-ipc10-delt", dict(method="delt", ipc=10, batch_size=10, iterations=16, rounds=8)),
]
ROWS = ("delt", "+chunks-per-step")
CHUNKS = 10

_setups: dict[str, object] = {}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(case_id: str, fields: dict):
    if case_id not in _setups:
        config = SynthesisBenchConfig(
            arch="convnet3", resolution=28, channels=1, classes=10, device="cpu",
            chunks_per_step=CHUNKS, rows=ROWS, progress=False, **fields,
        )  # fmt: skip
        _setups[case_id] = prepare_rows(config)
    return _setups[case_id]


@pytest.mark.parametrize("impl", ROWS)
@pytest.mark.parametrize("case_id, fields", CASES, ids=[case_id for case_id, _ in CASES])
def test_chunks_per_step(benchmark, one_thread, case_id, fields, impl):
    setup = _setup(case_id, fields)
    run = setup.rows[impl]
    benchmark.group = f"chunks per step {case_id}"
    benchmark.extra_info.update(
        chunks=CHUNKS, iterations=setup.iterations, image_iterations=setup.image_iterations
    )
    run()  # warm-up (first-call dispatch, allocator)
    benchmark.pedantic(run, rounds=5, warmup_rounds=0)
