"""delt.bench_eval: ``delt bench eval`` rows, JSON, projection and its flags."""

import json
import subprocess
import sys

import pytest
from delt.bench_eval import EVAL_ROWS, EvalBenchConfig, projected_hours, run_eval_bench
from delt.config import ConfigError

TINY = dict(
    arch="convnet2", width=8, resolution=8, channels=3, classes=4, ipc=5, batch_size=6,
    test_images=30, repeats=2, device="cpu", threads=1, progress=False,
)  # fmt: skip


def test_projection_counts_300_epochs_3_seeds_and_31_test_passes():
    hours = projected_hours(ms_per_step=2.0, ms_per_test_image=0.1)
    # Fashion-MNIST IPC 10: 100 images in batches of 50 = 2 steps; IPC 50: 500 / 100 = 5 steps.
    assert hours["fashion-mnist ipc10"] == pytest.approx(3 * (300 * 2 * 2.0 + 31 * 1000) / 3.6e6)
    assert hours["fashion-mnist ipc50"] == pytest.approx(3 * (300 * 5 * 2.0 + 31 * 1000) / 3.6e6)
    # ImageNet-1K IPC 50: 50,000 images in batches of 200 = 250 steps; 50,000 test images.
    assert hours["imagenet-1k ipc50"] == pytest.approx(3 * (300 * 250 * 2.0 + 31 * 5000) / 3.6e6)


def test_bench_eval_writes_every_row(tmp_path, capsys):
    path = tmp_path / "bench.json"
    document = run_eval_bench(EvalBenchConfig(json=str(path), **TINY))
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(document))
    assert [row["row"] for row in saved["rows"]] == list(EVAL_ROWS)
    assert saved["steps"] == 4 and saved["step_batch"] == 6  # 20 images in batches of 6
    by_name = {row["row"]: row for row in saved["rows"]}
    floor = by_name["floor"]
    assert floor["epoch_floor_over_row"] == 1.0 and by_name["reference"]["test_vs_reference"] == 1.0
    for row in saved["rows"]:
        # +lean's floor is floor+lean (channels_last, the teacher folded); the others' floor.
        floor = by_name["floor+lean" if row["row"] in ("+lean", "floor+lean") else "floor"]
        assert len(row["epoch_seconds"]) == 2 and len(row["test_seconds"]) == 2
        epoch, test = sorted(row["epoch_seconds"]), sorted(row["test_seconds"])
        median_epoch, median_test = sum(epoch) / 2, sum(test) / 2
        assert row["ms_per_step"] == pytest.approx(1e3 * median_epoch / 4)
        assert row["train_images_per_second"] == pytest.approx(20 / median_epoch)
        assert row["test_images_per_second"] == pytest.approx(30 / median_test)
        assert row["test_floor_over_row"] == pytest.approx(
            sum(floor["test_seconds"]) / 2 / median_test
        )
        assert row["projected_hours"] == pytest.approx(
            projected_hours(row["ms_per_step"], 1e3 * median_test / 30)
        )
    assert saved["machine"]["threads"] == 1
    assert by_name["floor+lean"]["epoch_floor_over_row"] == 1.0
    assert by_name["+lean"]["epoch_floor_over_row"] == pytest.approx(
        sum(by_name["floor+lean"]["epoch_seconds"]) / sum(by_name["+lean"]["epoch_seconds"])
    )
    assert "| +channels_last |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rows=("reference", "nope")), "--rows reference,nope: expected distinct rows"),
        (dict(rows=("floor", "floor")), "--rows floor,floor: expected distinct rows"),
        (dict(ipc=0), "--ipc must be an integer >= 1"),
        (dict(batch_size=-1), "--batch-size must be an integer >= 0"),
    ],
)
def test_bad_bench_eval_config_names_the_flag(overrides, message):
    with pytest.raises(ConfigError, match=message):
        EvalBenchConfig(**{**TINY, **overrides})


def test_cli_refuses_bad_rows_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "delt", "bench", "eval", "--rows", "floor,nope"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("delt bench eval: error: --rows")
