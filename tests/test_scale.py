"""The ImageNet-1K path at small scale: 1,000 classes of 16-pixel JPEGs end to end.

A generated ImageFolder (2 train and 1 val image per class), a torchvision ``resnet18`` with
random weights put in a private torch hub cache as ``resnet18-f37072fd.pth``, then through the
CLI: ``delt teacher --import resnet18 --weights IMAGENET1K_V1``, ``select``, ``recover --method
delt`` (IPC 2, 2 iterations), ``import`` of an SRe2L-layout folder
(``new{c:03d}/class{c:03d}_id{k:03d}.jpg``) and ``eval`` for one epoch. Each step's peak RSS
(``ru_maxrss`` of this process, which only grows) goes to ``scale.json`` in the test's folder
and the log; the eval runs in a child process for a peak of its own (``VmHWM``, Linux). The
set that eval trains on stays on the host as uint8 (``images_dtype``), so eval's memory grows
with IPC by the set's own bytes only (batches, not the set, go to the device): checked on the
loaded context.
"""

import json
import os
import resource
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from delt.cli import main
from delt.distilled_set import load_stored
from delt.evaluate import EvalConfig, EvalContext
from imagefolders import write_image_folder, write_images

CLASSES = 1000
SIZE = 16


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow  # about a minute on an idle 2-core machine; `make test` (CI) runs it
def test_imagenet_1k_path_end_to_end(tmp_path, monkeypatch, capsys, num_threads):
    num_threads(1)  # tiny convolutions: threads only add synchronization
    wnids = [f"n{index:08d}" for index in range(CLASSES)]
    data = write_image_folder(tmp_path / "imagenet", wnids, train=2, val=1, size=SIZE)
    hub = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(hub))
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(
        torchvision.models.resnet18().state_dict(),
        hub / "hub" / "checkpoints" / "resnet18-f37072fd.pth",
    )
    peaks = {"start": _peak_mib()}
    seconds: dict[str, float] = {}
    common = ["--device", "cpu", "--no-progress"]

    def step(name, *argv):
        start = time.perf_counter()
        assert main([*argv, *(common if name != "import" else ())]) == 0, name
        peaks[name] = _peak_mib()
        seconds[name] = round(time.perf_counter() - start, 1)
        return capsys.readouterr().out

    teacher = tmp_path / "teacher"
    shown = step(
        "teacher --import", "teacher", "--import", "resnet18", "--weights", "IMAGENET1K_V1",
        "--dataset", "imagefolder", "--data-root", str(data), "--resolution", str(SIZE),
        "--out", str(teacher), "--measure", "--no-channels-last", "--amp", "none",
    )  # fmt: skip
    assert "imported from torchvision:ResNet18_Weights.IMAGENET1K_V1" in shown
    step(
        "select", "select", "--teacher", str(teacher / "teacher.pt"), "--ipc", "2",
        "--data-root", str(data), "--out", str(tmp_path / "selection"),
    )  # fmt: skip
    step(
        "recover", "recover", "--teacher", str(teacher / "teacher.pt"), "--ipc", "2",
        "--method", "delt", "--selection", str(tmp_path / "selection"), "--data-root", str(data),
        "--iterations", "2", "--round-iterations", "1", "--batch-size", "500",
        "--out", str(tmp_path / "recovered"),
    )  # fmt: skip
    recovered, labels, manifest = load_stored(tmp_path / "recovered")
    assert recovered.shape == (2 * CLASSES, 3, SIZE, SIZE) and manifest.method == "delt"

    released = tmp_path / "released"
    for c in range(CLASSES):
        write_images(released / f"new{c:03d}", 2, SIZE, seed=c, name=f"class{c:03d}_id{{k:03d}}")
    shown = step(
        "import", "import", "--images", str(released), "--teacher", str(teacher / "teacher.pt"),
        "--data-root", str(data), "--out", str(tmp_path / "imported"),
    )  # fmt: skip
    assert "new999 -> class 999 (n00000999, by number): 2 images" in shown
    images, labels, manifest = load_stored(tmp_path / "imported")
    assert images.dtype == torch.uint8 and images.shape == (2 * CLASSES, 3, SIZE, SIZE)
    assert labels.tolist() == [c for c in range(CLASSES) for _ in range(2)]

    context = EvalContext.from_config(
        EvalConfig(distilled=str(tmp_path / "imported"), epochs=1, device="cpu", progress=False)
    )
    # The set is kept as stored (2,000 x 768 bytes), on the host; batches go to the device.
    assert context.images.dtype == torch.uint8 and context.images.device.type == "cpu"
    assert context.images.untyped_storage().nbytes() == 2 * CLASSES * 3 * SIZE * SIZE
    del context
    # VmHWM: the peak RSS of the child's own address space (ru_maxrss would carry the
    # parent's peak over fork and exec on Linux).
    probe = (
        "import sys; from delt.cli import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print('peak_rss_mib', int(hwm) / 1024); sys.exit(rc)"
    )
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", probe, "eval", "--distilled", str(tmp_path / "imported"),
         "--epochs", "1", "--student", "convnet2", "--student-width", "8", "--batch-size",
         "200", *common],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "eval: best top-1" in run.stdout
    peaks["eval (child process)"] = float(run.stdout.split("peak_rss_mib")[1].split()[0])
    seconds["eval (child process)"] = round(time.perf_counter() - start, 1)
    result = json.loads((tmp_path / "imported" / "eval.json").read_text())
    assert result["num_images"] == 2 * CLASSES and len(result["seeds"][0]["curve"]) == 1
    record = {"peak_rss_mib": peaks, "seconds": seconds}
    (tmp_path / "scale.json").write_text(json.dumps(record, indent=1))
    print("scale:", json.dumps(record))
