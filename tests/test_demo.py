"""delt.demo: the whole `make demo` pipeline on a tiny stand-in for Fashion-MNIST."""

import gzip
import json

import numpy as np
import pytest
from delt.data import DatasetNotFoundError
from delt.demo import DemoConfig, run_demo


def _fake_fashion_mnist(folder, per_class_train=12, per_class_test=3):
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        images = rng.integers(0, 256, size=(labels.size, 28, 28)).astype(np.uint8)
        images[:, :, :4] = labels[:, None, None] * 25  # a learnable stripe per class
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(
                d.to_bytes(4, "big") for d in array.shape
            )
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as handle:
                handle.write(header + array.tobytes())


def test_demo_end_to_end_on_tiny_data(tmp_path, capsys):
    data = tmp_path / "fmnist"
    data.mkdir()
    _fake_fashion_mnist(data)
    config = DemoConfig(
        out=str(tmp_path / "demo"), data_root=str(data), width=8, teacher_epochs=1, ipc=2,
        iterations=8, round_iterations=2, eval_epochs=2, eval_every=1, progress=False,
    )  # fmt: skip
    summary = run_demo(config)
    printed = capsys.readouterr().out
    for step in (
        "teacher",
        "delt: select",
        "delt: recover",
        "delt: eval",
        "delt: diversity",
        "random-real: draw",
        "random-real: eval",
        "| fashion-mnist | 2 | delt |",
    ):
        assert step in printed, step
    demo = tmp_path / "demo"
    for path in (
        "comparison.png",
        "comparison.md",
        "delt-ipc2/grid.png",
        "delt-ipc2/report.json",
        "random-real-ipc2/report.json",
    ):
        assert (demo / path).is_file(), path
    assert json.loads((demo / "summary.json").read_text()) == summary
    manifest = json.loads((demo / "delt-ipc2" / "distilled" / "manifest.json").read_text())
    assert manifest["config"]["iterations"] == 8 and manifest["config"]["round_iterations"] == 2
    assert summary["reports"]["delt"]["image_iterations"] == 10 * (8 + 6)  # per class: 8 + 6
    # A second run reuses every step.
    again = run_demo(config)
    assert again["teacher_cached"] and again["reports"] == summary["reports"]


def test_demo_without_data_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), data_root=str(tmp_path), progress=False))
