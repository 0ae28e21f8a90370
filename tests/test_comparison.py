"""delt.comparison: runs pooled by method variant, gains over random-real paired by seed, other
evaluations pooled by name and protocol, the tables, the JSON document and the gains chart."""

import json
import re
from pathlib import Path

import pytest
from delt.comparison import (
    OtherEvaluation,
    PairedGain,
    ProtocolMismatchError,
    RunRecord,
    compare,
    other_evaluations,
    paired_gains,
    plot_gains,
)


def write_eval_document(path: Path, ipc: int, seed: int, accuracy: float, **config) -> None:
    """A finished eval document (the keys other_evaluations reads): its identity config is
    delt eval's, ConvNet-3 w64 at 100 epochs tested every 50 unless ``config`` says otherwise
    (``shuffle_patches`` is absent unless given, as delt eval writes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = {"student": "convnet3", "student_kwargs": {"width": 64}, "student_width": None,
                "epochs": 100, "eval_every": 50, "batch_size": 100 if ipc >= 50 else 50,
                "temperature": 20.0, "lr": 0.001, "weight_decay": 0.01, "cutmix_beta": 1.0,
                "randaugment_ops": 2, "randaugment_magnitude": 6, "min_crop": 0.25,
                "hard_labels": False, "random_real": False, "ipc": ipc, "amp": "none",
                "channels_last": False, **config}  # fmt: skip
    document = {"complete": True, "ipc": ipc, "num_images": 10 * ipc,
                "identity": {"config": identity, "teacher_sha256": "t", "distilled_sha256": "d",
                             "dataset": "fashion-mnist"},
                "config": {"seeds": [seed], "device": "cpu", **identity},
                "seeds": [{"seed": seed, "best_accuracy": accuracy}]}  # fmt: skip
    path.write_text(json.dumps(document))


def _report(method: str, ipc: int, accuracy: float, seconds: float = 1.0) -> dict:
    return {"method": method, "dataset": "fashion-mnist", "ipc": ipc, "accuracy_mean": accuracy,
            "accuracy_std": 0.0, "diversity": 0.9, "synthesis_seconds": seconds,
            "image_iterations": 0 if method == "random-real" else 10}  # fmt: skip


def _run(folder: Path, method: str, seed: int = 0) -> RunRecord:
    return RunRecord(method, seed, _report(method, 10, 0.0), folder)


def test_gains_over_random_real_are_paired_by_seed():
    accuracies = {
        ("random-real", 10, 0): 80.0, ("random-real", 10, 1): 82.0,
        ("delt", 10, 0): 81.0, ("delt", 10, 1): 85.0,
        ("delt", 10, 2): 99.0,  # no random-real seed 2: not paired
        ("rded", 50, 0): 70.0,  # no random-real at IPC 50
    }  # fmt: skip
    (row,) = paired_gains(accuracies)
    assert row.ipc == 10 and row.method == "delt" and row.gains == {0: 1.0, 1: 3.0}
    assert row.mean == pytest.approx(2.0) and row.std == pytest.approx(1.0)
    assert row.to_dict() == {"ipc": 10, "method": "delt", "gains": {0: 1.0, 1: 3.0},
                             "mean": row.mean, "std": row.std}  # fmt: skip
    # Another baseline: each method against it, the same pairing.
    (rded,) = paired_gains({("a", 50, 0): 70.0, ("b", 50, 0): 75.5}, baseline="a")
    assert (rded.method, rded.gains) == ("b", {0: 5.5})


def test_compare_pools_variants_apart_and_pairs_them_by_seed():
    runs = [
        RunRecord("random-real", 0, _report("random-real", 10, 80.0)),
        RunRecord("random-real", 1, _report("random-real", 10, 82.0)),
        RunRecord("delt", 0, _report("delt", 10, 81.0)),
        RunRecord("delt", 1, _report("delt", 10, 84.0)),
        RunRecord("delt-lr0.05", 0, _report("delt", 10, 83.0)),
    ]
    comparison = compare(runs)
    assert [row["method"] for row in comparison.rows] == ["random-real", "delt", "delt-lr0.05"]
    assert comparison.rows[1]["runs"] == 2
    assert comparison.rows[1]["accuracy_mean"] == pytest.approx(82.5)
    gains = {gain.method: gain for gain in comparison.gains}
    assert gains["delt"].mean == pytest.approx(1.5) and gains["delt-lr0.05"].mean == 3.0
    assert comparison.evaluations == []  # runs without folders have no other evaluations
    markdown = comparison.markdown()
    assert "| 10 | delt | 0: +1.00, 1: +2.00 | +1.50 ± 0.50 |" in markdown
    assert "gain over random-real, per seed (points)" in markdown
    assert "Other evaluations" not in markdown and markdown.endswith("|\n")
    document = comparison.document()
    assert list(document) == ["rows", "gains", "evaluations", "runs"]
    assert document["runs"][4] == {"method": "delt-lr0.05", "seed": 0, "ipc": 10,
                                   "accuracy_mean": 83.0, "diversity": 0.9,
                                   "synthesis_seconds": 1.0, "image_iterations": 10}  # fmt: skip
    json.dumps(document)  # JSON values only
    # Not paired (one set evaluated by several seeds): the pooled table alone.
    unpaired = compare(runs, pair_by_seed=False)
    assert unpaired.gains == [] and "gain over" not in unpaired.markdown()


def test_other_evaluations_pool_by_name_and_pair_with_random_real(tmp_path):
    runs = []
    values = {("random-real", 0): 70.0, ("random-real", 1): 72.0, ("delt", 0): 75.0,
              ("delt", 1): 74.0, ("rded", 1): 60.0}  # fmt: skip
    for (method, seed), accuracy in values.items():
        run = tmp_path / method / "ipc10" / f"seed{seed}"
        write_eval_document(run / "distilled" / "eval-100ep.json", 10, seed, accuracy)
        # the run's own: not listed
        write_eval_document(run / "distilled" / "eval.json", 10, seed, 99.0)
        runs.append(_run(run, method, seed))
    shuffled = tmp_path / "rded" / "ipc10" / "seed1" / "distilled" / "eval-shuffle2.json"
    write_eval_document(shuffled, 10, 1, 65.0, epochs=300, eval_every=10, shuffle_patches=2,
                        min_crop=0.5, randaugment_ops=0)  # fmt: skip
    # A run known only from a log (no folder) has no other evaluations.
    runs.append(RunRecord("delt", 2, _report("delt", 10, 0.0)))
    rows = other_evaluations(runs)
    assert all(isinstance(row, OtherEvaluation) for row in rows)
    assert [(r.evaluation, r.method) for r in rows] == [
        ("100ep", "random-real"),
        ("100ep", "delt"),
        ("100ep", "rded"),
        ("shuffle2", "rded"),
    ]
    baseline, delt, rded, shuffle = rows
    assert baseline.mean == pytest.approx(71.0) and baseline.gain is None
    assert "gains" not in baseline.to_dict()
    assert baseline.protocol == "convnet3 w64, 100 epochs, tested every 50"
    assert delt.gain == PairedGain(10, "delt", {0: 5.0, 1: 2.0}, delt.gain.mean, delt.gain.std)
    assert delt.gain.mean == pytest.approx(3.5) and delt.gain.std == pytest.approx(1.5)
    assert delt.to_dict()["gains"] == {0: 5.0, 1: 2.0}
    assert list(delt.to_dict())[-3:] == ["gains", "gain_mean", "gain_std"]
    assert rded.gain.gains == {1: -12.0}
    assert shuffle.protocol == (
        "convnet3 w64, 300 epochs, tested every 10, ShufflePatches 2, min crop 0.5, RandAugment off"
    )
    assert shuffle.gain is None  # random-real has no shuffle2 evaluation to pair with
    table = compare(runs).markdown()
    assert "| 10 | 100ep | convnet3 w64, 100 epochs, tested every 50 | delt | 2 | 74.50 ± 0.50 " \
           "| +3.50 ± 1.50 |" in table  # fmt: skip
    assert "| rded | 1 | 65.00 ± 0.00 | – |" in table


def test_the_printed_protocol_names_every_setting_off_the_defaults(tmp_path):
    run = tmp_path / "delt" / "ipc10" / "seed0"
    write_eval_document(run / "distilled" / "eval-odd.json", 10, 0, 80.0,
                        student="resnet18_small", student_kwargs={}, randaugment_magnitude=9,
                        cutmix_beta=0.0, temperature=4.0, amp="bf16", batch_size=20,
                        hard_labels=True)  # fmt: skip
    (row,) = other_evaluations([_run(run, "delt")])
    assert row.protocol == (
        "resnet18_small, 100 epochs, tested every 50, RandAugment rand-m9-n2, CutMix off, "
        "hard labels, --temperature 4.0, --amp bf16, batch 20"
    )


def test_one_evaluation_name_means_one_protocol(tmp_path):
    a, b = tmp_path / "random-real" / "ipc10" / "seed0", tmp_path / "delt" / "ipc10" / "seed0"
    write_eval_document(a / "distilled" / "eval-long.json", 10, 0, 80.0, epochs=300)
    write_eval_document(b / "distilled" / "eval-long.json", 10, 0, 81.0, epochs=200)
    with pytest.raises(ProtocolMismatchError, match="eval-long.json: protocol .* differs"):
        other_evaluations([_run(a, "random-real"), _run(b, "delt")])


@pytest.mark.parametrize(
    "other, difference",
    [({"student_kwargs": {"width": 128}}, "'convnet4 w128, .*--student-kwargs"),
     ({"min_crop": 0.5}, "min crop 0.5.*--min-crop: 0.25 -> 0.5"),
     ({"randaugment_ops": 0}, "RandAugment off.*--randaugment-ops: 2 -> 0"),
     ({"batch_size": 25}, "batch 25.*--batch-size: 50 -> 25"),
     ({"temperature": 4.0}, "--temperature: 20.0 -> 4.0"),
     ({"hard_labels": True}, "hard labels"),
     ({"shuffle_patches": 2}, "ShufflePatches 2.*--shuffle-patches: None -> 2")],
)  # fmt: skip
def test_a_name_with_another_training_protocol_is_refused_by_file(tmp_path, other, difference):
    # Beyond what the protocol column used to print: the student's width, the crop, the batch...
    a, b = tmp_path / "random-real" / "ipc10" / "seed0", tmp_path / "delt" / "ipc10" / "seed0"
    write_eval_document(a / "distilled" / "eval-convnet4.json", 10, 0, 80.0, student="convnet4")
    write_eval_document(
        b / "distilled" / "eval-convnet4.json", 10, 0, 81.0, student="convnet4", **other
    )
    pattern = re.escape(str(b / "distilled" / "eval-convnet4.json")) + ": protocol .*" + difference
    with pytest.raises(ProtocolMismatchError, match=pattern):
        other_evaluations([_run(a, "random-real"), _run(b, "delt")])


def test_what_legitimately_differs_under_one_name_is_pooled(tmp_path):
    # Per IPC (batch sizes default by IPC); the requested --student-width (the resolved width
    # is the same), the memory format, --random-real, the workers' random stream.
    runs = []
    for method, ipc, config in [
        ("random-real", 10, {"random_real": True, "channels_last": True}),
        ("delt", 10, {"student_width": 64, "augmentation": "workers: per-batch seeds"}),
        ("delt", 50, {}),
    ]:
        run = tmp_path / method / f"ipc{ipc}" / "seed0"
        write_eval_document(run / "distilled" / "eval-100ep.json", ipc, 0, 80.0, **config)
        runs.append(_run(run, method))
    rows = other_evaluations(runs)
    assert [(r.ipc, r.method) for r in rows] == [(10, "random-real"), (10, "delt"), (50, "delt")]
    assert {r.protocol for r in rows} == {"convnet3 w64, 100 epochs, tested every 50"}


def test_plot_gains_without_any_pairing_or_cost(tmp_path):
    # No gains (not paired by seed), a gain whose method has no pooled row, a zero-second method.
    rows = [
        {"method": "delt", "ipc": 10, "synthesis_seconds": 0.0, "image_iterations": 0},
        {"method": "cda", "ipc": 10, "synthesis_seconds": 5.0, "image_iterations": 10},
    ]
    plot_gains([], rows, tmp_path / "none.png")
    gains = [
        PairedGain(10, "delt", {0: 1.0, 1: 2.0}, 1.5, 0.5),
        PairedGain(50, "sre2l", {0: -1.0}, -1.0, 0.0),
    ]
    plot_gains(gains, rows, tmp_path / "some.png", "title")
    plot_gains([], [], tmp_path / "empty.png")
    for name in ("none", "some", "empty"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
