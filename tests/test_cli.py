"""delt.cli: flags map one-to-one onto the config dataclasses; errors are one clear line."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import SYNTHETIC
from delt.cli import COMMANDS, build_parser, main


def _subparser(name):
    parser = build_parser()
    names = name.split()
    action = next(a for a in parser._actions if a.dest == "command")
    sub = action.choices[names[0]]
    if len(names) == 2:  # delt bench synthesis
        action = next(a for a in sub._actions if a.dest == "subcommand")
        sub = action.choices[names[1]]
    return sub


# Every command that runs something: `delt bench synthesis` for the group `bench`.
LEAF_COMMANDS = {
    **{name: command for name, command in COMMANDS.items() if command.subcommands is None},
    **{
        f"{name} {part_name}": part
        for name, command in COMMANDS.items()
        for part_name, part in (command.subcommands or {}).items()
    },
}


@pytest.mark.parametrize("name", sorted(LEAF_COMMANDS))
def test_flags_map_one_to_one_onto_config_fields(name):
    sub = _subparser(name)
    dests = {a.dest for a in sub._actions if a.dest != "help"}
    fields = dataclasses.fields(LEAF_COMMANDS[name].config)
    assert dests == {f.name for f in fields}
    for field in fields:
        shown = field.metadata.get("cli_flag") or "--" + field.name.replace("_", "-")
        assert shown in sub.format_help()


def test_distill_help_lists_pdd_and_its_flags():
    text = " ".join(_subparser("distill").format_help().split())
    assert "pdd" in text.split("--method", 1)[1].split("--ipc", 1)[0]  # among the choices
    for shown in ("--stages", "--base", "--stage-ipc", "--stage-teachers", "--union-in-batch",
                  "--union-sample", "--stage-init", "--hard-student-epochs",
                  "--teacher-save-epochs"):  # fmt: skip
        assert shown in text


def test_pipeline_through_the_cli(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    checkpoint = str(teacher / "teacher.pt")
    argv = f"teacher --out {teacher} --dataset {SYNTHETIC} --arch convnet2 --width 8 --epochs 1"
    argv += " --batch-size 16 --amp none --no-channels-last --no-progress"
    assert main(argv.split()) == 0
    assert "test accuracy" in capsys.readouterr().out
    argv = f"select --teacher {checkpoint} --ipc 3 --out {tmp_path / 'select'} --strategy top"
    assert main([*argv.split(), "--no-progress"]) == 0
    argv = f"recover --teacher {checkpoint} --ipc 3 --out {tmp_path / 'delt'}"
    argv += f" --selection {tmp_path / 'select'} --iterations 4 --round-iterations 2"
    assert main([*argv.split(), "--batch-size", "6", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "delt" / "manifest.json").read_text())
    assert manifest["iterations_per_image"] == [4, 4, 2] * 4
    assert "image-iterations" in capsys.readouterr().out
    argv = f"eval --distilled {tmp_path / 'delt'} --epochs 1 --seeds 0,1 --no-progress"
    assert main(argv.split()) == 0
    out = capsys.readouterr().out
    assert "seed 1: best" in out and "over 2 seed(s)" in out
    assert json.loads((tmp_path / "delt" / "eval.json").read_text())["config"]["seeds"] == [0, 1]
    assert main(["diversity", "--distilled", str(tmp_path / "delt")]) == 0
    assert "lower = more diverse" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["recover", "--teacher", "t.pt", "--ipc", "0", "--out", "o"], "--ipc must be an integer"),
        (["recover", "--teacher", "missing.pt", "--ipc", "1", "--out", "o", "--method", "sre2l"],
         "no such file"),
        (["recover", "--teacher", "t.pt", "--ipc", "1", "--out", "o", "--selection", "s",
          "--iterations", "100", "--round-iterations", "200"], "must be <= --iterations"),
        (["teacher", "--out", "o", "--dataset", "fashion-mnist", "--data-root", "/nonexistent"],
         "apt-get install dataset-fashion-mnist"),
        (["teacher", "--out", "o", "--arch", "resnet18_small", "--width", "3"], "--width applies"),
        (["teacher", "--out", "o", "--arch", "nonet"], "unknown architecture"),
        (["eval", "--distilled", "nowhere"], "--distilled nowhere: no distilled.pt"),
        (["eval", "--distilled", "d", "--student", "nonet"], "--student 'nonet': unknown"),
        (["diversity", "--distilled", "nowhere"], "no distilled.pt"),
        (["distill", "--method", "delt", "--ipc", "1", "--out", "o", "--eval-epochs", "0"],
         "--eval-epochs must be an integer >= 1"),
        (["report", "--runs", "nowhere", "--out", "c.png"], "no report.json"),
        (["recover", "--teacher", "t.pt", "--ipc", "10", "--out", "o", "--method", "rded",
          "--candidates", "30"], "--candidates 30 must be >= --ipc x --factor^2 = 40"),
        (["recover", "--teacher", "t.pt", "--ipc", "1", "--out", "o", "--method", "rded",
          "--iterations", "10"], "--iterations applies to the methods that optimize pixels"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_with_status_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"delt {argv[0]}: error:") and message in err


def test_python_dash_m_delt(tmp_path):
    # Outside the source tree, so that the installed packages are the ones imported.
    done = subprocess.run(
        [sys.executable, "-m", "delt", "recover", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "--round-iterations" in done.stdout and "--per-sample-aug" in done.stdout


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["recover", "--teacher", "t.pt", "--ipc", "1", "--out", "o", "--method", "mtt"])
    assert exit_info.value.code == 2
    assert "argument --method: invalid choice: 'mtt'" in capsys.readouterr().err


def test_bench_synthesis_through_the_cli(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = "bench synthesis --arch convnet1 --resolution 8 --channels 1 --classes 10"
    argv += " --batch-size 6 --ipc 3 --iterations 4 --rounds 2 --repeats 1 --device cpu"
    argv += f" --threads 1 --rows reference,floor,delt --no-progress --json {path}"
    assert main(argv.split()) == 0
    out = capsys.readouterr().out
    assert "| reference |" in out and "| floor |" in out and "| delt |" in out
    document = json.loads(path.read_text())
    assert [row["row"] for row in document["rows"]] == ["reference", "floor", "delt"]
    assert document["config"]["rows"] == ["reference", "floor", "delt"]
    assert document["schedule"]["active_counts"] == [4, 4, 6, 6]
    assert document["versions"]["delt_ext_ops"] in ("True", "False")


def test_bench_synthesis_bad_rows_is_one_line(capsys):
    assert main(["bench", "synthesis", "--rows", "floor,fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("delt bench synthesis: error: --rows floor,fast: expected one or more")
    assert "\n" not in err
