"""delt.select: DELT's medium order, the other strategies, and the select command."""

import csv
import json

import pytest
import torch
from delt.config import ConfigError
from delt.select import SelectConfig, Selection, order_class, select_images


def test_medium_alternates_around_the_median():
    # Scores 0..9 in shuffled positions; ascending order = positions sorted by score.
    scores = torch.tensor([5.0, 0.0, 9.0, 2.0, 7.0, 1.0, 8.0, 3.0, 6.0, 4.0])
    order = order_class(scores, "medium")
    picked_scores = scores[order].tolist()
    # mid = ceil(10 / 2) = 5 -> scores 5, 6, 4, 7, 3, 8, 2, 9, 1, 0 (the upper end runs out first).
    assert picked_scores == [5, 6, 4, 7, 3, 8, 2, 9, 1, 0]
    assert sorted(order) == list(range(10))


def test_medium_odd_count():
    scores = torch.arange(7, dtype=torch.float32)
    # mid = ceil(7 / 2) = 4.
    assert order_class(scores, "medium") == [4, 5, 3, 6, 2, 1, 0]


def test_top_min_random():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.9])
    assert order_class(scores, "top") == [1, 3, 2, 0]  # ties keep dataset order
    assert order_class(scores, "min") == [0, 2, 1, 3]
    first = order_class(scores, "random", torch.Generator().manual_seed(1))
    again = order_class(scores, "random", torch.Generator().manual_seed(1))
    assert first == again and sorted(first) == [0, 1, 2, 3]


def test_select_writes_ranking_and_order(tiny_teacher, tiny_selection):
    selection = Selection.load(tiny_selection)
    assert selection.ipc == 5 and len(selection.indices) == 4
    meta = json.loads((tiny_selection / "selection.json").read_text())
    assert meta["strategy"] == "medium" and meta["dataset"]["num_classes"] == 4
    with open(tiny_selection / "ranking.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 48
    for c, chosen in enumerate(selection.indices):
        members = [r for r in rows if int(r["label"]) == c]
        scores = torch.tensor([float(r["score"]) for r in members])
        indices = [int(r["index"]) for r in members]
        expected = [indices[k] for k in order_class(scores, "medium")[:5]]
        assert chosen == expected
    # Same command again: reused, not recomputed.
    again = select_images(
        SelectConfig(teacher=str(tiny_teacher.path), ipc=5, out=str(tiny_selection), progress=False)
    )
    assert again.meta["seconds"] == meta["seconds"]


def test_select_errors(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="--ipc must be an integer >= 1"):
        SelectConfig(teacher=str(tiny_teacher.path), ipc=0, out=str(tmp_path))
    with pytest.raises(ConfigError, match="only 12 training images"):
        select_images(
            SelectConfig(teacher=str(tiny_teacher.path), ipc=13, out=str(tmp_path), progress=False)
        )
    with pytest.raises(FileNotFoundError, match="delt teacher"):
        select_images(SelectConfig(teacher=str(tmp_path / "none.pt"), ipc=1, out=str(tmp_path)))


def test_scores_in_shards_resume_and_match_the_unsharded_ranking(tiny_teacher, tmp_path):
    from delt.select import score_images

    def config(out, **overrides):
        values = dict(
            teacher=str(tiny_teacher.path), ipc=3, out=str(out), progress=False, batch_size=5
        )
        values.update(overrides)
        return SelectConfig(**values)

    whole, labels, _ = score_images(config(tmp_path / "whole", shard_batches=1000))
    assert not (tmp_path / "whole" / "scores").exists()  # one shard: nothing saved
    sharded, _, _ = score_images(config(tmp_path / "sharded", shard_batches=2))
    assert torch.equal(whole, sharded)  # the same batches, the same bits
    shards = sorted((tmp_path / "sharded" / "scores").iterdir())
    assert [p.name for p in shards] == [f"{start:09d}.pt" for start in range(0, len(whole), 10)]
    # A killed run: the last shard is missing, the first is read back (not scored again).
    shards[-1].unlink()
    first = torch.load(shards[0], weights_only=True)
    torch.save({**first, "scores": first["scores"] + 1}, shards[0])
    resumed, _, _ = score_images(config(tmp_path / "sharded", shard_batches=2))
    assert torch.equal(resumed[:10], whole[:10] + 1) and torch.equal(resumed[10:], whole[10:])
    # Shards of another identity (batch size) are scored again.
    again, _, _ = score_images(config(tmp_path / "sharded", shard_batches=1, batch_size=10))
    assert not torch.equal(again[:10], whole[:10] + 1)
    # The selection is the unsharded one, and the shards go once selection.json is written.
    one = select_images(config(tmp_path / "a", shard_batches=1000))
    two = select_images(config(tmp_path / "b", shard_batches=1))
    assert one.indices == two.indices and not (tmp_path / "b" / "scores").exists()
    assert labels.numel() == len(whole)


def test_fp16_scores_are_close_to_full_precision(tiny_teacher, tmp_path):
    from delt.select import score_images

    def scores(amp):
        config = SelectConfig(
            teacher=str(tiny_teacher.path), ipc=3, out=str(tmp_path / amp), progress=False,
            amp=amp,
        )  # fmt: skip
        return score_images(config)[0]

    full, half = scores("none"), scores("fp16")
    assert not torch.equal(full, half) and torch.allclose(full, half, atol=2e-2)


# --------------------------------------------------------------------------------------------
# selection.json's digest and its indices, checked before any work


def _delt_argv(teacher, selection, out):
    return [
        "recover", "--teacher", str(teacher), "--ipc", "2", "--out", str(out), "--selection",
        str(selection), "--iterations", "2", "--round-iterations", "1", "--no-progress",
    ]  # fmt: skip


def _edited(tiny_selection, tmp_path, change, digest="keep"):
    """A copy of the tiny selection with ``change(document)`` applied; its digest kept as it
    was (``"keep"``: an edit), recomputed (``"renew"``: a well-formed file of that content) or
    dropped (``"drop"``: a file of before digests)."""
    import shutil

    from delt.select import content_digest

    folder = tmp_path / "selection"
    shutil.copytree(tiny_selection, folder)
    path = folder / "selection.json"
    document = json.loads(path.read_text())
    change(document)
    if digest == "renew":
        document["content_sha256"] = content_digest(document)
    elif digest == "drop":
        del document["content_sha256"]
    path.write_text(json.dumps(document))
    return folder


def _one_error(capsys, argv):
    from delt.cli import main

    status = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("delt ")]
    assert status == 2 and len(lines) == 1, lines
    return lines[0]


def test_selection_records_a_digest_of_its_content(tiny_selection):
    from delt.select import content_digest

    document = json.loads((tiny_selection / "selection.json").read_text())
    assert document["content_sha256"] == content_digest(document)
    assert document["dataset"]["fingerprint"]  # what its indices point into, covered by it


def test_an_edited_selection_is_refused_before_any_work(
    tiny_teacher, tiny_selection, tmp_path, capsys
):
    def swap(document):
        document["classes"][0][0], document["classes"][0][1] = (
            document["classes"][0][1],
            document["classes"][0][0],
        )

    folder = _edited(tiny_selection, tmp_path, swap)
    out = tmp_path / "r"
    line = _one_error(capsys, _delt_argv(tiny_teacher.path, folder, out))
    assert str(folder / "selection.json") in line and "content_sha256" in line
    assert not (out / "run.json").exists()


@pytest.mark.parametrize(
    "case, expected",
    [("-1", "lists index -1, outside"), ("out of range", "outside the training split"),
     ("another class", "an image of class 1"), ("a float", "not an integer")],
)  # fmt: skip
@pytest.mark.parametrize("digest", ["renew", "drop"])
def test_selection_indices_are_checked_against_range_and_class(
    tiny_teacher, tiny_selection, tmp_path, capsys, case, expected, digest
):
    other = json.loads((tiny_selection / "selection.json").read_text())["classes"][1][0]

    def change(document):
        value = {"-1": -1, "out of range": 10**6, "another class": other, "a float": 2.5}[case]
        document["classes"][0][1] = value

    folder = _edited(tiny_selection, tmp_path, change, digest)
    out = tmp_path / "r"
    line = _one_error(capsys, _delt_argv(tiny_teacher.path, folder, out))
    assert str(folder / "selection.json") in line and expected in line, line
    assert not (out / "chunks").exists()


def test_a_selection_of_before_digests_still_loads(tiny_teacher, tiny_selection, tmp_path):
    from delt.recover import RecoverConfig, recover

    folder = _edited(tiny_selection, tmp_path, lambda document: None, "drop")
    assert Selection.load(folder).indices == Selection.load(tiny_selection).indices
    config = RecoverConfig(
        teacher=str(tiny_teacher.path), ipc=2, out=str(tmp_path / "r"), selection=str(folder),
        iterations=2, round_iterations=1, progress=False,
    )  # fmt: skip
    assert recover(config).images.shape[0] == 8
