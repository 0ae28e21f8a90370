"""delt.report: report.json's eight keys, pooling, the comparison chart and image grids."""

import json

import pytest
import torch
from delt.data import DatasetInfo
from delt.report import (
    REPORT_KEYS,
    ReportConfig,
    check_report,
    compare_runs,
    pool_reports,
    write_image_grid,
    write_run_report,
)


def _report(method="delt", ipc=10, accuracy=80.0, std=1.0, diversity=0.9):
    return {
        "method": method, "dataset": "fashion-mnist", "ipc": ipc, "accuracy_mean": accuracy,
        "accuracy_std": std, "diversity": diversity, "synthesis_seconds": 12.5,
        "image_iterations": 1000,
    }  # fmt: skip


def test_run_report_has_exactly_the_eight_keys(tmp_path):
    write_run_report(tmp_path, _report(), "# x\n")
    document = json.loads((tmp_path / "report.json").read_text())
    assert tuple(document) == REPORT_KEYS
    assert (tmp_path / "report.md").read_text() == "# x\n"


@pytest.mark.parametrize(
    "change, message",
    [({"extra": 1}, "keys must be"), ({"ipc": 10.5}, "ipc must be int"),
     ({"accuracy_mean": "80"}, "accuracy_mean must be float"),
     ({"image_iterations": True}, "image_iterations must be int")],
)  # fmt: skip
def test_malformed_reports_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        check_report({**_report(), **change})


def test_runs_of_one_method_are_pooled():
    rows = pool_reports(
        [_report("delt", accuracy=80.0), _report("delt", accuracy=82.0),
         _report("random-real", accuracy=70.0, std=2.0), _report("cda", ipc=1)]
    )  # fmt: skip
    assert [(r["ipc"], r["method"], r["runs"]) for r in rows] == [
        (1, "cda", 1), (10, "random-real", 1), (10, "delt", 2)
    ]  # fmt: skip
    assert rows[2]["accuracy_mean"] == 81.0 and rows[2]["accuracy_std"] == 1.0  # spread of runs
    assert rows[1]["accuracy_std"] == 2.0  # a single run keeps its seeds' std


def test_compare_runs_writes_a_chart_and_a_table(tmp_path, capsys):
    runs = []
    for method, accuracy in (("delt", 80.0), ("cda", 75.0)):
        run = tmp_path / method
        write_run_report(run, _report(method, accuracy=accuracy), "")
        runs.append(str(run))
    rows = compare_runs(ReportConfig(runs=tuple(runs), out=str(tmp_path / "chart.png")))
    assert len(rows) == 2
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "chart.md").read_text()
    assert "| fashion-mnist | 10 | cda |" in table and table in capsys.readouterr().out


def test_report_of_a_folder_without_report_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report.json"):
        compare_runs(ReportConfig(runs=(str(tmp_path),), out=str(tmp_path / "c.png")))


def test_image_grid_has_one_row_per_class(tmp_path):
    from PIL import Image

    info = DatasetInfo("x", 3, 1, 4, (0.5,), (0.25,), ("a", "b", "c"))
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    write_image_grid(torch.zeros(6, 1, 4, 4), labels, info, tmp_path / "g.png", upscale=2)
    with Image.open(tmp_path / "g.png") as image:
        # 3 columns (the largest class) x 3 rows of 8-pixel tiles with 2-pixel padding.
        assert image.size == (3 * 10 + 2, 3 * 10 + 2)
