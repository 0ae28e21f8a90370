"""delt.recover: each method on a tiny synthetic set, EarlyLate masking, resume, bad configs."""

import json
import time

import delt.synthesis as synthesis_module
import pytest
import torch
from conftest import count_calls
from delt.chunks import chunk_digest
from delt.config import ConfigError
from delt.data import DatasetInfo
from delt.identity import config_identity
from delt.models import TeacherMismatchError, build_model, load_checkpoint, save_checkpoint
from delt.recover import RecoverConfig, recover
from delt.schedules import early_late_iterations
from delt.select import Selection


def _config(tiny_teacher, tiny_selection, out, method="delt", **overrides):
    values = dict(
        teacher=str(tiny_teacher.path), ipc=5, out=str(out), method=method, iterations=8,
        batch_size=8, progress=False,
    )  # fmt: skip
    if method == "delt":
        values.update(selection=str(tiny_selection), round_iterations=2)
    values.update(overrides)
    return RecoverConfig(**values)


@pytest.mark.parametrize("method", ["cda", "delt", "sre2l"])
def test_each_method_writes_a_distilled_set(tiny_teacher, tiny_selection, tmp_path, method):
    result = recover(_config(tiny_teacher, tiny_selection, tmp_path, method))
    payload = torch.load(tmp_path / "distilled.pt", weights_only=True)
    images, labels = payload["images"], payload["labels"]
    assert images.shape == (20, 3, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [c for c in range(4) for _ in range(5)]
    info = load_checkpoint(tiny_teacher.path).info
    low, high = info.pixel_bounds()
    assert bool(((images >= low - 1e-6) & (images <= high + 1e-6)).all())
    assert len(list((tmp_path / "images").glob("*/*.png"))) == 20
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000", "001", "002", "003"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["seed"] == 0
    assert set(manifest["versions"]) >= {"python", "torch", "delt_ext"}
    assert manifest["dataset"]["class_names"] == list(info.class_names)
    assert manifest["image_iterations"] == sum(manifest["iterations_per_image"])
    assert manifest["synthesis_seconds"] > 0
    if method == "delt":
        per_class = early_late_iterations(5, 8, 2)  # 4 rounds: [8, 8, 6, 4, 2]
        assert manifest["iterations_per_image"] == per_class * 4
        assert manifest["config"]["jitter"] == 0
    else:
        assert manifest["iterations_per_image"] == [8] * 20
        assert manifest["config"]["jitter"] == 4 and manifest["config"]["round_iterations"] is None
    assert result.iterations_per_image == manifest["iterations_per_image"]


def test_delt_starts_from_the_selection(tiny_teacher, tiny_selection, tmp_path, monkeypatch):
    seen = []
    original = synthesis_module.optimize_chunk

    def spy(teacher, bn_matching, init, *args, **kwargs):
        seen.append(init.clone())
        return original(teacher, bn_matching, init, *args, **kwargs)

    monkeypatch.setattr(synthesis_module, "optimize_chunk", spy)
    recover(_config(tiny_teacher, tiny_selection, tmp_path, batch_size=5))
    from delt.data import load_like

    dataset = load_like(load_checkpoint(tiny_teacher.path).info)
    chosen = Selection.load(tiny_selection).indices
    for c in range(4):  # batch 5 = IPC: chunk c is class c in selection order
        assert torch.equal(seen[c], dataset.images(chosen[c]))


@pytest.mark.parametrize("method", ["delt", "cda"])
def test_resume_after_a_kill_is_bitwise_identical(
    tiny_teacher, tiny_selection, tmp_path, monkeypatch, method
):
    reference = recover(_config(tiny_teacher, tiny_selection, tmp_path / "uninterrupted", method))

    count_calls(monkeypatch, synthesis_module, "optimize_chunk", die_after=1)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        recover(_config(tiny_teacher, tiny_selection, out, method))
    assert [p.name for p in (out / "chunks").iterdir()] == ["00000.pt"]
    assert not (out / "distilled.pt").exists()

    rerun = count_calls(monkeypatch, synthesis_module, "optimize_chunk")
    resumed = recover(_config(tiny_teacher, tiny_selection, out, method, keep_chunks=True))
    assert len(rerun) == len(list((out / "chunks").iterdir())) - 1  # chunk 0 was skipped
    assert torch.equal(resumed.images, reference.images)
    # The very same bytes: distilled.pt, and every image file.
    assert (out / "distilled.pt").read_bytes() == (
        tmp_path / "uninterrupted" / "distilled.pt"
    ).read_bytes()
    first = torch.load(tmp_path / "uninterrupted" / "distilled.pt", weights_only=True)
    second = torch.load(out / "distilled.pt", weights_only=True)
    assert torch.equal(first["images"], second["images"]) and torch.equal(
        first["labels"], second["labels"]
    )
    for png in (tmp_path / "uninterrupted" / "images").glob("*/*.png"):
        assert png.read_bytes() == (out / png.relative_to(tmp_path / "uninterrupted")).read_bytes()


def test_manifest_synthesis_seconds_is_the_chunks_optimization_time_summed(
    tiny_teacher, tiny_selection, tmp_path
):
    # Documented in delt.recover: not the command's wall time, but each chunk's optimization
    # seconds as saved in OUT/chunks/, also for chunks an earlier (killed) process finished.
    config = _config(tiny_teacher, tiny_selection, tmp_path, "cda", keep_chunks=True)
    first = recover(config)
    chunk_files = sorted((tmp_path / "chunks").iterdir())
    assert len(chunk_files) > 1
    saved = [torch.load(path, weights_only=True)["seconds"] for path in chunk_files]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["synthesis_seconds"] == first.synthesis_seconds == pytest.approx(sum(saved))
    # As if an earlier process had spent 1000 s on chunk 0 and been killed before writing the
    # manifest: a re-run optimizes nothing, yet reports that time.
    chunk = {**torch.load(chunk_files[0], weights_only=True), "seconds": 1000.0}
    torch.save({**chunk, "digest": chunk_digest(chunk)}, chunk_files[0])  # as that process saved it
    (tmp_path / "manifest.json").unlink()
    start = time.perf_counter()
    again = recover(config)
    assert time.perf_counter() - start < 1000
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    expected = pytest.approx(1000 + sum(saved[1:]))
    assert manifest["synthesis_seconds"] == again.synthesis_seconds == expected


def test_resume_with_another_config_is_refused(tiny_teacher, tiny_selection, tmp_path):
    recover(_config(tiny_teacher, tiny_selection, tmp_path))
    with pytest.raises(ConfigError, match="--lr: 0.25 -> 0.1"):
        recover(_config(tiny_teacher, tiny_selection, tmp_path, lr=0.1))


def test_options_run(tiny_teacher, tiny_selection, tmp_path):
    recover(
        _config(
            tiny_teacher, tiny_selection, tmp_path, per_sample_aug=True, jitter=2, amp="bf16",
            channels_last=True, image_format="jpeg",
        )
    )  # fmt: skip
    assert len(list((tmp_path / "images").glob("*/*.jpg"))) == 20


def test_ipc1_delt_has_no_rounds(tiny_teacher, tiny_selection, tmp_path):
    result = recover(_config(tiny_teacher, tiny_selection, tmp_path, ipc=1))
    assert result.iterations_per_image == [8] * 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["round_iterations"] == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ipc": 0}, "--ipc must be an integer >= 1"),
        ({"method": "mtt"}, "--method 'mtt': unknown method"),
        ({"round_iterations": 16}, r"--round-iterations \(16\) must be <= --iterations \(8\)"),
        ({"round_iterations": 3}, "multiple"),
        ({"selection": None}, "pass --selection"),
        ({"lr": 0.0}, "--lr must be"),
        ({"beta2": 1.0}, "--beta2"),
        ({"jitter": -1}, "--jitter"),
    ],
)
def test_bad_configs(tiny_teacher, tiny_selection, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tiny_teacher, tiny_selection, tmp_path, **overrides)


def test_method_specific_flags_are_refused_elsewhere(tiny_teacher, tiny_selection, tmp_path):
    with pytest.raises(ConfigError, match="--round-iterations applies to --method delt"):
        _config(tiny_teacher, tiny_selection, tmp_path, "sre2l", round_iterations=2)
    with pytest.raises(ConfigError, match="--selection applies to --method delt"):
        _config(tiny_teacher, tiny_selection, tmp_path, "cda", selection=str(tiny_selection))


def test_selection_too_small(tiny_teacher, tiny_selection, tmp_path):
    with pytest.raises(ConfigError, match="only 5 images per class"):
        recover(_config(tiny_teacher, tiny_selection, tmp_path, ipc=6))


def test_teacher_dataset_mismatch(tiny_teacher, tiny_selection, tmp_path):
    other = DatasetInfo.from_dict(
        {**load_checkpoint(tiny_teacher.path).info.to_dict(), "class_names": ["w", "x", "y", "z"]}
    )
    path = tmp_path / "other.pt"
    meta = {"arch": "convnet2", "arch_kwargs": {"width": 8}, "dataset": other.to_dict()}
    save_checkpoint(path, build_model("convnet2", other, {"width": 8}), meta)
    config = _config(tiny_teacher, tiny_selection, tmp_path / "run", teacher=str(path))
    with pytest.raises(TeacherMismatchError, match="class order"):
        recover(config)


def test_missing_teacher(tiny_teacher, tiny_selection, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        recover(
            _config(tiny_teacher, tiny_selection, tmp_path, "sre2l", teacher=str(tmp_path / "x.pt"))
        )


@pytest.mark.slow
def test_compiled_teacher_gives_a_distilled_set(tiny_teacher, tiny_selection, tmp_path):
    result = recover(_config(tiny_teacher, tiny_selection, tmp_path, compile=True))
    assert result.images.shape == (20, 3, 8, 8) and torch.isfinite(result.images).all()


# --------------------------------------------------------------------------------------------
# PDD's union in the batch (optimize_chunk's frozen images)


def test_pdd_fields_stay_out_of_other_methods_identity(tiny_teacher, tiny_selection, tmp_path):
    # Runs started before PDD existed have no such keys in run.json; they must still resume.
    identity = config_identity(_config(tiny_teacher, tiny_selection, tmp_path))
    assert not {"stages", "base", "union_in_batch", "stage_init"} & set(identity)
    with pytest.raises(ConfigError, match="--union-in-batch applies to --method pdd"):
        _config(tiny_teacher, tiny_selection, tmp_path, union_in_batch=True)


def test_a_finished_run_keeps_one_copy_of_the_images(tiny_teacher, tiny_selection, tmp_path):
    kept = recover(_config(tiny_teacher, tiny_selection, tmp_path / "kept", keep_chunks=True))
    one = recover(_config(tiny_teacher, tiny_selection, tmp_path / "one"))
    assert not (tmp_path / "one" / "chunks").exists() and (tmp_path / "kept" / "chunks").is_dir()
    for name in ("distilled.pt", "manifest.json"):
        assert (tmp_path / "one" / name).is_file()
    assert (tmp_path / "one" / "distilled.pt").read_bytes() == (
        tmp_path / "kept" / "distilled.pt"
    ).read_bytes()
    for png in (tmp_path / "kept" / "images").glob("*/*.png"):
        assert (
            png.read_bytes() == (tmp_path / "one" / png.relative_to(tmp_path / "kept")).read_bytes()
        )
    # Float32 files: at most 1.1 x one copy of the images (PNGs are an 8-bit view beside it).
    float_copy = one.images.numel() * 4
    assert [p.name for p in (tmp_path / "one").rglob("*.pt")] == ["distilled.pt"]
    # (+ 4 KiB: torch.save's zip headers, which dominate a set this small.)
    assert (tmp_path / "one" / "distilled.pt").stat().st_size <= 1.1 * float_copy + 4096
    assert sum(p.stat().st_size for p in (tmp_path / "kept").rglob("*.pt")) > 1.9 * float_copy
    # Re-running the finished run optimizes nothing and returns the same images.
    before = (tmp_path / "one" / "distilled.pt").stat().st_mtime_ns
    again = recover(_config(tiny_teacher, tiny_selection, tmp_path / "one"))
    assert torch.equal(again.images, kept.images) and again.iterations_per_image == (
        kept.iterations_per_image
    )
    assert (tmp_path / "one" / "distilled.pt").stat().st_mtime_ns == before


# --------------------------------------------------------------------------------------------
# Disk: a finished run of every method keeps one float32 copy of its images

FOOTPRINT_DATA = "synthetic:classes=4,channels=3,size=32,train=16,test=4"
# What a finished run holds besides its images: manifest.json (the teacher's metadata, per-image
# lists: a few bytes per image, rded's crop sources about 60), run.json, the finished mark, pdd's
# init.json and distilled.pt's zip headers. Measured 6.4 kB (sre2l, cda) to 10.0 kB (rded) for
# the 16 images below; 16 kB leaves room for longer temporary paths.
METADATA_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def footprint_inputs(tmp_path_factory):
    """A teacher of 32-pixel images (so that the images outweigh the metadata) and a selection."""
    from delt.select import SelectConfig, select_images
    from delt.teacher import TeacherConfig, train_teacher

    teacher = train_teacher(
        TeacherConfig(
            out=str(tmp_path_factory.mktemp("teacher32")), dataset=FOOTPRINT_DATA,
            arch="convnet2", width=8, epochs=1, batch_size=32, amp="none",
            channels_last=False, progress=False,
        )
    ).path  # fmt: skip
    selection = tmp_path_factory.mktemp("select32")
    select_images(SelectConfig(teacher=str(teacher), ipc=4, out=str(selection), progress=False))
    return teacher, selection


def _footprint_config(inputs, method, out, **overrides):
    teacher, selection = inputs
    values = dict(teacher=str(teacher), ipc=4, out=str(out), progress=False)
    if method == "rded":
        values.update(method="rded", candidates=16, num_crop=2, factor=2)
    else:
        base = "delt" if method == "pdd" else method
        values.update(method=method, iterations=4, batch_size=8)
        if method == "pdd":
            values.update(stages=2, base="delt")
        if base == "delt":
            values.update(selection=str(selection), round_iterations=2)
    values.update(overrides)
    return RecoverConfig(**values)


def _sizes(folder):
    """``(bytes of the image files (images/ folders), bytes of every other file)``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    images = sum(p.stat().st_size for p in files if "images" in p.relative_to(folder).parts)
    return images, sum(p.stat().st_size for p in files) - images


@pytest.mark.parametrize("method", ["sre2l", "cda", "delt", "pdd", "rded"])
def test_a_finished_runs_footprint_is_one_float32_copy(footprint_inputs, tmp_path, method):
    one, kept = tmp_path / "one", tmp_path / "kept"
    result = recover(_footprint_config(footprint_inputs, method, one))
    recover(_footprint_config(footprint_inputs, method, kept, keep_chunks=True))
    float_copy = result.images.numel() * 4  # 16 images of 3x32x32: 196,608 bytes
    image_bytes, other_bytes = _sizes(one)
    # The float32 store: distilled.pt alone (pdd's U_k are prefixes of it), plus metadata.
    assert [str(p.relative_to(one)) for p in one.rglob("*.pt")] == ["distilled.pt"]
    assert other_bytes <= 1.1 * float_copy + METADATA_BYTES, (other_bytes, float_copy)
    # The image files are an 8-bit view beside it: PNG stores at most a byte per value (+ its
    # headers and the deflate framing); pdd's stages/<k>/images repeat each stage's new images.
    copies = 2 if method == "pdd" else 1
    assert image_bytes <= copies * (float_copy / 4 + result.images.shape[0] * 200)
    # --keep-chunks keeps the resume state: the chunks (and pdd's stage sets), a second copy.
    chunk_files = list(kept.glob("chunks/*.pt")) + list(kept.glob("stages/*/chunks/*.pt"))
    assert chunk_files and sum(p.stat().st_size for p in chunk_files) >= float_copy
    if method == "pdd":
        assert all((kept / "stages" / k / "distilled.pt").is_file() for k in ("1", "2"))
    assert (one / "distilled.pt").read_bytes() == (kept / "distilled.pt").read_bytes()
    # Re-running the finished run (chunks gone) returns the same images and writes no file.
    before = {p: p.stat().st_mtime_ns for p in one.rglob("*")}
    again = recover(_footprint_config(footprint_inputs, method, one))
    assert torch.equal(again.images, result.images)
    assert {p: p.stat().st_mtime_ns for p in one.rglob("*")} == before


def test_with_the_papers_jpegs_a_finished_run_is_within_1_1_float32_copies(
    footprint_inputs, tmp_path
):
    # The ImageNet recipe's disk target counts everything a finished run keeps: distilled.pt,
    # the metadata and the image files. With quality-75 JPEGs (the papers' format) the image
    # files are a few percent of the float32 copy, even at 32 px where JPEG's headers weigh most.
    result = recover(_footprint_config(footprint_inputs, "delt", tmp_path, image_format="jpeg"))
    float_copy = result.images.numel() * 4
    image_bytes, other_bytes = _sizes(tmp_path)
    assert sorted(p.suffix for p in (tmp_path / "images").rglob("*.*")) == [".jpg"] * 16
    assert image_bytes + other_bytes <= 1.1 * float_copy + METADATA_BYTES, (
        image_bytes, other_bytes, float_copy,
    )  # fmt: skip
