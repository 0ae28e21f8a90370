"""Integrity: digests of checkpoints and sets checked at load, content identities of chunks,
the data fingerprint in check_compatible, and a finished run re-run writing nothing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from delt.config import ConfigError
from delt.data import load_like
from delt.distilled_set import load_distilled
from delt.diversity import DiversityConfig, measure_diversity
from delt.evaluate import EvalConfig, evaluate
from delt.io import IntegrityError
from delt.models import TeacherMismatchError, load_checkpoint, save_checkpoint
from delt.recover import RecoverConfig, recover
from delt.select import SelectConfig, select_images


def _flip_bytes(path, offset_from_end=None):
    """Changes 8 bytes in the middle of the file (inside a tensor record)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 if offset_from_end is None else len(data) - offset_from_end
    for i in range(middle, middle + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _cda(teacher, out, **overrides):
    values = dict(
        teacher=str(teacher), ipc=2, out=str(out), method="cda", iterations=4, batch_size=4,
        progress=False, keep_chunks=True,  # the tests handle the chunks of finished runs
    )  # fmt: skip
    values.update(overrides)
    return RecoverConfig(**values)


def _snapshot(folder):
    """(inode, mtime, size) of every file under ``folder``: equal before and after = no write."""
    return {
        str(path.relative_to(folder)): (path.stat().st_ino, path.stat().st_mtime_ns,
                                        path.stat().st_size)
        for path in sorted(folder.rglob("*"))
    }  # fmt: skip


def test_a_bit_flipped_teacher_is_refused_naming_the_file(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(tiny_teacher.path, teacher)
    shutil.copy(tiny_teacher.path.with_suffix(".json"), teacher.with_suffix(".json"))
    load_checkpoint(teacher)  # the copy is fine
    _flip_bytes(teacher)
    with pytest.raises(IntegrityError, match=r"teacher\.pt: its SHA-256 differs from the one "):
        load_checkpoint(teacher)
    with pytest.raises(IntegrityError):
        recover(_cda(teacher, tmp_path / "out"))
    assert not (tmp_path / "out" / "run.json").exists()  # refused before any work
    # The command line: one line naming the file, rc 2.
    result = subprocess.run(
        [sys.executable, "-m", "delt", "recover", "--teacher", str(teacher), "--ipc", "1",
         "--method", "cda", "--iterations", "2", "--out", str(tmp_path / "cli")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("delt recover: error: ") and str(teacher) in lines[-1]


def test_a_checkpoint_without_a_digest_still_loads(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(tiny_teacher.path, teacher)
    sidecar = json.loads(tiny_teacher.path.with_suffix(".json").read_text())
    assert sidecar["sha256"]  # written at save
    del sidecar["sha256"]
    teacher.with_suffix(".json").write_text(json.dumps(sidecar))
    assert load_checkpoint(teacher).meta["arch"] == "convnet2"
    teacher.with_suffix(".json").unlink()  # no sidecar at all
    assert load_checkpoint(teacher).meta["arch"] == "convnet2"


def test_a_bit_flipped_distilled_set_is_refused(tiny_set, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(tiny_set, folder, ignore=shutil.ignore_patterns("*.json.*", "eval*.json"))
    load_distilled(folder)
    _flip_bytes(folder / "distilled.pt", offset_from_end=2000)
    with pytest.raises(IntegrityError, match=r"distilled\.pt: its SHA-256 differs"):
        load_distilled(folder)
    with pytest.raises(IntegrityError):
        evaluate(EvalConfig(distilled=str(folder), epochs=1, progress=False))
    with pytest.raises(IntegrityError):
        measure_diversity(DiversityConfig(distilled=str(folder)))
    # A manifest of before the digest: still loads (and the flipped tensor is not detected).
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["distilled_sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    load_distilled(folder)


def test_a_chunk_copied_from_another_run_is_refused(tiny_teacher, tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    reference = recover(_cda(tiny_teacher.path, first))
    recover(_cda(tiny_teacher.path, other, lr=0.1))
    chunks = sorted(p.name for p in (first / "chunks").iterdir())
    assert len(chunks) == 2
    # As if the first run had been killed after its first chunk and the other run's second
    # chunk had been copied in.
    for name in ("manifest.json", "distilled.pt"):
        (first / name).unlink()
    shutil.copy(other / "chunks" / chunks[1], first / "chunks" / chunks[1])
    with pytest.raises(ConfigError, match=r"chunks/00001\.pt was made by another run \(--lr: "
                                          r"0\.1 -> 0\.25\)"):  # fmt: skip
        recover(_cda(tiny_teacher.path, first))
    assert not (first / "distilled.pt").exists()  # nothing mixed, nothing written
    # Deleting it recomputes it: the set is the uninterrupted one.
    (first / "chunks" / chunks[1]).unlink()
    assert torch.equal(recover(_cda(tiny_teacher.path, first)).images, reference.images)


def test_a_chunk_of_before_identities_is_accepted_when_run_json_matches(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    reference = recover(_cda(tiny_teacher.path, out))
    for path in (out / "chunks").iterdir():
        chunk = torch.load(path, weights_only=True)
        assert json.loads(chunk["identity"]) == json.loads((out / "run.json").read_text())
        del chunk["identity"], chunk["digest"]  # chunks before identities had no digest either
        torch.save(chunk, path)
    (out / "manifest.json").unlink()
    assert torch.equal(recover(_cda(tiny_teacher.path, out)).images, reference.images)
    with pytest.raises(ConfigError, match="--lr: 0.25 -> 0.1"):  # run.json still guards them
        recover(_cda(tiny_teacher.path, out, lr=0.1))


def test_a_moved_run_folder_resumes_by_content(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    teacher = tmp_path / "t" / "teacher.pt"
    teacher.parent.mkdir()
    shutil.copy(tiny_teacher.path, teacher)
    shutil.copy(tiny_teacher.path.with_suffix(".json"), teacher.with_suffix(".json"))
    reference = recover(_cda(teacher, out))
    (out / "manifest.json").unlink()
    shutil.move(tmp_path / "t", tmp_path / "moved")
    shutil.move(out, tmp_path / "out2")
    resumed = recover(_cda(tmp_path / "moved" / "teacher.pt", tmp_path / "out2"))
    assert torch.equal(resumed.images, reference.images)


def test_data_of_the_same_shape_but_other_contents_is_refused(
    tiny_teacher, tiny_selection, tmp_path
):
    checkpoint = load_checkpoint(tiny_teacher.path)
    fingerprint = checkpoint.meta["dataset"]["fingerprint"]
    assert fingerprint == load_like(checkpoint.info).fingerprint()
    assert fingerprint.startswith("sha256:")
    # The same teacher weights, recorded as trained on other data of this name and shape.
    other = tmp_path / "other" / "teacher.pt"
    meta = {**checkpoint.meta, "dataset": {**checkpoint.meta["dataset"], "fingerprint": "sha256:0"}}
    save_checkpoint(other, checkpoint.model, meta)
    config = RecoverConfig(
        teacher=str(other), ipc=2, out=str(tmp_path / "out"), selection=str(tiny_selection),
        iterations=2, round_iterations=1, progress=False,
    )  # fmt: skip
    with pytest.raises(TeacherMismatchError, match="fingerprint"):
        recover(config)
    with pytest.raises(TeacherMismatchError, match="fingerprint"):
        select_images(SelectConfig(teacher=str(other), ipc=2, out=str(tmp_path / "s")))


def test_a_teacher_of_other_data_is_refused_in_eval(tiny_set, tiny_teacher, tmp_path):
    # Issue 18 point 7: a set made with a teacher of synthetic seed=0 evaluated with a teacher
    # of the same shape trained on seed=1 (once a warning, now refused).
    from delt.teacher import TeacherConfig, train_teacher

    dataset = load_checkpoint(tiny_teacher.path).info.name + ",seed=1"
    other = train_teacher(
        TeacherConfig(
            out=str(tmp_path / "t1"), dataset=dataset, arch="convnet2", width=8, epochs=1,
            batch_size=16, amp="none", channels_last=False, progress=False,
        )
    )  # fmt: skip
    with pytest.raises(TeacherMismatchError, match=r"made on synthetic:.*seed=1, but the data"):
        evaluate(
            EvalConfig(distilled=str(tiny_set), teacher=str(other.path), epochs=1, progress=False)
        )


def test_a_finished_recovery_re_run_writes_nothing(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    first = recover(_cda(tiny_teacher.path, out))
    before = _snapshot(out)
    assert not any(name.endswith(".lock") or name.endswith(".tmp") for name in before)
    again = recover(_cda(tiny_teacher.path, out))
    assert _snapshot(out) == before
    assert torch.equal(again.images, first.images)
    assert again.iterations_per_image == first.iterations_per_image
    assert again.synthesis_seconds == first.synthesis_seconds


def _can_mount_read_only():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_mount_read_only(), reason="needs root and unshare (a private read-only bind mount)"
)
def test_a_finished_recovery_re_runs_on_read_only_media(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recover(_cda(tiny_teacher.path, out))
    before = _snapshot(out)
    # In a private mount namespace (invisible to every other process): OUT and the teacher
    # read-only, then the same command.
    folder = tiny_teacher.path.parent
    script = (
        f"mount --bind {out} {out} && mount -o remount,bind,ro {out} {out} && "
        f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} {folder} && "
        f"touch {out}/probe 2>/dev/null && exit 9; "
        f"exec {sys.executable} -m delt recover --teacher {tiny_teacher.path} --ipc 2 "
        f"--out {out} --method cda --iterations 4 --batch-size 4 --no-progress"
    )
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "recover: 8 images" in result.stdout
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "content, expected",
    [('{"arch": ', "truncated or corrupt JSON"), ("[1, 2]", "a JSON list"),
     ('{"sha256": null}', "it lacks arch, arch_kwargs, dataset"),
     ("garbage", "truncated or corrupt JSON"), ("NaN", "NaN"),
     ("SHA", "its sha256 'abc' is not a SHA-256 hex digest")],
)  # fmt: skip
def test_a_corrupt_sidecar_is_an_error_naming_it(tiny_teacher, tmp_path, content, expected):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(tiny_teacher.path, teacher)
    if content == "SHA":
        sidecar = json.loads(tiny_teacher.path.with_suffix(".json").read_text())
        content = json.dumps({**sidecar, "sha256": "abc"})
    teacher.with_suffix(".json").write_text(content)
    _flip_bytes(teacher)  # a damaged sidecar must not let a damaged checkpoint through
    with pytest.raises(ValueError, match=expected) as caught:
        load_checkpoint(teacher)
    assert str(teacher.with_suffix(".json")) in str(caught.value)
    # The command line: one line naming the sidecar, rc 2, before any work.
    result = subprocess.run(
        [sys.executable, "-m", "delt", "recover", "--teacher", str(teacher), "--ipc", "1",
         "--method", "cda", "--iterations", "2", "--out", str(tmp_path / "cli")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("delt recover: error: "), result.stderr
    assert str(teacher.with_suffix(".json")) in lines[0]
    assert not (tmp_path / "cli" / "run.json").exists()


def test_a_teacher_out_with_a_corrupt_sidecar_is_refused(tiny_teacher, tmp_path):
    from delt.teacher import TeacherConfig, train_teacher

    out = tmp_path / "t"
    out.mkdir()
    shutil.copy(tiny_teacher.path, out / "teacher.pt")
    (out / "teacher.json").write_text("[]")
    config = TeacherConfig(out=str(out), dataset="synthetic", arch="convnet1", progress=False)
    with pytest.raises(ValueError, match=r"teacher\.json: not a sidecar"):
        train_teacher(config)


# --------------------------------------------------------------------------------------------
# Chunks carry a content digest; a cleanup a kill cut short is finished by the re-run


def test_a_bit_flipped_chunk_is_refused_by_name(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    reference = recover(_cda(tiny_teacher.path, out))
    (out / "manifest.json").unlink()  # as if killed before the manifest: the chunks are read
    chunk = out / "chunks" / "00001.pt"
    saved = torch.load(chunk, weights_only=True)
    flipped = saved["images"].clone()
    flipped.view(-1).view(torch.int32)[5] ^= 1 << 3  # one bit of one pixel
    torch.save({**saved, "images": flipped}, chunk)
    with pytest.raises(IntegrityError, match=r"chunks/00001\.pt: .*corrupt.*delete it"):
        recover(_cda(tiny_teacher.path, out))
    assert not (out / "manifest.json").exists()  # nothing mixed, nothing written
    assert saved["digest"].startswith("sha256:")
    chunk.unlink()  # deleting it recomputes it
    assert torch.equal(recover(_cda(tiny_teacher.path, out)).images, reference.images)


def test_a_chunk_of_before_digests_is_accepted(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    reference = recover(_cda(tiny_teacher.path, out))
    for path in (out / "chunks").iterdir():
        chunk = torch.load(path, weights_only=True)
        del chunk["digest"]
        torch.save(chunk, path)
    (out / "manifest.json").unlink()
    assert torch.equal(recover(_cda(tiny_teacher.path, out)).images, reference.images)


def _killed_before_cleanup(monkeypatch, module):
    """Makes ``module``'s run die where it would delete its resume state."""

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during cleanup")

    monkeypatch.setattr(f"{module}.delete_resume_state", killed)


def _rded(teacher, out, **overrides):
    values = dict(
        teacher=str(teacher), ipc=2, out=str(out), method="rded", candidates=10, num_crop=3,
        factor=2, progress=False,
    )  # fmt: skip
    values.update(overrides)
    return RecoverConfig(**values)


def _pdd(teacher, out, **overrides):
    return _cda(teacher, out, method="pdd", base="cda", stages=2, **overrides)


@pytest.mark.parametrize(
    "module, make, resume_state",
    # pixels and rded finish through delt.synthesis's Run.finish; pdd deletes its stages itself.
    [("delt.synthesis", _cda, ["chunks"]),
     ("delt.synthesis", _rded, ["chunks"]),
     ("delt.methods.pdd", _pdd,
      ["stages/1/chunks", "stages/1/distilled.pt", "stages/2/chunks", "stages/2/manifest.json"])],
)  # fmt: skip
def test_a_kill_during_cleanup_is_finished_by_the_re_run(
    tiny_teacher, tmp_path, monkeypatch, module, make, resume_state
):
    reference = tmp_path / "reference"
    recover(make(tiny_teacher.path, reference, keep_chunks=False))
    assert not any((reference / name).exists() for name in resume_state)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _killed_before_cleanup(patch, module)
        with pytest.raises(KeyboardInterrupt):
            recover(make(tiny_teacher.path, out, keep_chunks=False))
    assert (out / "distilled.pt").is_file() and (out / "manifest.json").is_file()
    assert all((out / name).exists() for name in resume_state)
    again = recover(make(tiny_teacher.path, out, keep_chunks=False))
    assert not any((out / name).exists() for name in resume_state)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(
        p.relative_to(reference) for p in reference.rglob("*")
    )
    assert torch.equal(again.images, load_distilled(reference)[0])
    # Finished and clean: a re-run writes nothing.
    before = _snapshot(out)
    recover(make(tiny_teacher.path, out, keep_chunks=False))
    assert _snapshot(out) == before


def test_chunks_kept_on_purpose_stay(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recover(_cda(tiny_teacher.path, out, keep_chunks=True))
    before = _snapshot(out)
    recover(_cda(tiny_teacher.path, out, keep_chunks=False))  # the manifest says: kept
    assert _snapshot(out) == before and (out / "chunks").is_dir()


def test_pdd_hard_init_refuses_training_data_other_than_the_teachers(tiny_teacher, tmp_path):
    # The picks of --stage-init hard come from the training split: it must be the teacher's
    # (the run's identity records the teacher's fingerprint as its data).
    checkpoint = load_checkpoint(tiny_teacher.path)
    other = tmp_path / "other" / "teacher.pt"
    meta = {**checkpoint.meta, "dataset": {**checkpoint.meta["dataset"], "fingerprint": "sha256:0"}}
    save_checkpoint(other, checkpoint.model, meta)
    config = _cda(
        other, tmp_path / "out", method="pdd", base="cda", stages=2, stage_init="hard",
        hard_student_epochs=1,
    )  # fmt: skip
    with pytest.raises(TeacherMismatchError, match="fingerprint"):
        recover(config)
    assert not (tmp_path / "out" / "distilled.pt").exists()


def test_a_kill_while_deleting_the_chunks_is_finished_by_the_re_run(
    tiny_teacher, tmp_path, monkeypatch
):
    import delt.synthesis as synthesis_module

    out = tmp_path / "out"

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt(f"killed while deleting {path}")

    with monkeypatch.context() as patch:
        patch.setattr(synthesis_module.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            recover(_cda(tiny_teacher.path, out, keep_chunks=False))
    assert (out / "chunks-deleted").is_file() and (out / "chunks").is_dir()
    recover(_cda(tiny_teacher.path, out, keep_chunks=False))
    assert not (out / "chunks").exists()
