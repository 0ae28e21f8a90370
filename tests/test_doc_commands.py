"""The commands of README.md and docs/ work as written.

Every ``delt`` command of their shell blocks (also under ``torchrun ... -m delt`` and
``python -m delt``) is parsed by ``delt``'s own parser; every ``delt X --flag`` written inline is
checked against subcommand X's flags; every ``make X`` names a target of the Makefile; every
relative link of README.md points to a file. The cheap commands (``--help``, ``python -m
delt_ext``) are run; the others train or synthesize (minutes to days) and are listed as skipped,
with the reason, as tests/test_compat.py applies the drop-in's diffs instead of running them.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from delt.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
INLINE = re.compile(r"`([^`\n]+)`")


def read(page: Path) -> str:
    """A page's text less its HTML comments (notes to the maintainers, not commands)."""
    return re.sub(r"<!--.*?-->", "", page.read_text(), flags=re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block of a page, in order."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        fence = re.match(r"\s*```(\S*)", line)
        if fence and language is None:
            language, body = fence.group(1), []
        elif fence:
            blocks.append((language, "\n".join(body)))
            language = None
        elif language is not None:
            body.append(line)
    return blocks


def shell_lines(text: str) -> list[str]:
    """The lines of a page's shell blocks (untagged ones too), continuations joined."""
    lines = []
    for language, body in code_blocks(text):
        if language not in ("", "bash", "sh", "shell", "console") or "|---" in body:
            continue  # code of another language, a committed table of output
        joined = re.sub(r"\\\n\s*", " ", body)
        lines += [line.strip() for line in joined.splitlines() if line.strip()]
    return lines


def delt_argv(line: str) -> list[str] | None:
    """The arguments given to ``delt`` by a shell line, or None when it runs no delt."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # environment assignments
    if words[:1] == ["srun"]:
        words = words[1:]
    if words[:1] == ["delt"]:
        # `delt eval: error: ...` is a message the page quotes, not a command
        return None if words[1:2] and words[1].endswith(":") else words[1:]
    for launcher in (["torchrun"], ["python", "-m"], ["python3", "-m"]):
        if words[: len(launcher)] == launcher and "-m" in words and "delt" in words:
            index = words.index("-m")
            if words[index + 1 : index + 2] == ["delt"]:
                return words[index + 2 :]
    return None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for line in shell_lines(read(page)):
            argv = delt_argv(line)
            if argv is not None:
                found.append((page.relative_to(ROOT).as_posix(), line, argv))
    return found


COMMANDS = documented_commands()


def subparsers(parser) -> dict:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


PARSER = build_parser()


def test_the_pages_hold_commands():
    pages = {page for page, _, _ in COMMANDS}
    assert "README.md" in pages and "docs/quickstart.md" in pages
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize(
    "page, line, argv", COMMANDS, ids=[f"{p}:{' '.join(a[:3])}" for p, _, a in COMMANDS]
)
def test_every_documented_delt_command_parses(page, line, argv):
    if "--help" in argv or "-h" in argv:
        return  # run below
    try:
        PARSER.parse_args(argv)
    except SystemExit as raised:
        pytest.fail(f"{page}: `{line}` does not parse (exit {raised.code})")


def flag_mentions() -> list[tuple[str, str, list[str], list[str]]]:
    """Inline ``delt X [Y] --flag ...`` spans: (page, span, command path, flags)."""
    mentions = []
    for page in PAGES:
        for span in INLINE.findall(read(page)):
            words = span.replace("[", " ").replace("]", " ").split()
            if words[:1] != ["delt"]:
                continue
            rest = [w for w in words[1:] if not w.startswith("-")] or [""]
            names = rest[0].split("|")
            if not all(re.fullmatch(r"[a-z][a-z-]*", name) for name in names):
                continue  # a placeholder: `delt COMMAND --help`
            for name in names:
                path = [name]
                parts = subparsers(subparsers(PARSER).get(name, PARSER))
                if parts and len(rest) > 1:
                    path += rest[1].split("|")[:1]
                flags = [re.split(r"[=|,.;:)]", w)[0] for w in words if w.startswith("--")]
                mentions.append((page.relative_to(ROOT).as_posix(), span, path, flags))
    return mentions


MENTIONS = flag_mentions()


def test_every_inline_delt_flag_exists():
    assert len(MENTIONS) >= 50
    global_flags = set(PARSER._option_string_actions)
    wrong = []
    for page, span, path, flags in MENTIONS:
        parser = PARSER
        for name in path:
            choices = subparsers(parser)
            if name not in choices:
                wrong.append(f"{page}: `{span}`: no subcommand {' '.join(path)}")
                break
            parser = choices[name]
        else:
            known = set(parser._option_string_actions) | global_flags
            wrong += [f"{page}: `{span}`: {flag}" for flag in flags if flag not in known]
    assert not wrong, "\n".join(wrong)


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, re.M))


def make_target(words: list[str]) -> str | None:
    """The target of a ``make`` command line (after its options and variables), else None."""
    if words[:1] != ["make"]:
        return None
    for word in words[1:]:
        if not word.startswith("-") and "=" not in word:
            return word if re.fullmatch(r"[a-z][a-z-]*", word) else None  # `make X`: a placeholder
    return None


def test_every_documented_make_target_exists():
    targets = make_targets()
    used = set()
    for page in PAGES:
        text = read(page)
        for words in [line.split() for line in shell_lines(text)] + [
            span.split() for span in INLINE.findall(text)
        ]:
            target = make_target(words)
            if target:
                used.add((page.name, target))
    assert {"test", "demo", "docs", "lint"} <= {target for _, target in used}
    missing = sorted(f"{page}: make {target}" for page, target in used if target not in targets)
    assert not missing, missing


def test_readme_links_point_to_files():
    text = read(ROOT / "README.md")
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


# ---- run the cheap ones ------------------------------------------------------------------------

SUBCOMMANDS = [
    [name, *([part] if part else [])]
    for name, parser in subparsers(PARSER).items()
    for part in (list(subparsers(parser)) or [None])
]
CHEAP = [["--help"], *[[*path, "--help"] for path in SUBCOMMANDS]]
CHEAP += [argv for _, _, argv in COMMANDS if "--help" in argv and argv not in CHEAP]
EXPENSIVE = [(page, line) for page, line, argv in COMMANDS if "--help" not in argv]


@pytest.mark.parametrize("argv", CHEAP, ids=[" ".join(a) for a in CHEAP])
def test_cheap_commands_run(argv, capsys):
    # In this process (a subprocess per command would import torch a dozen times); the one
    # below runs the command line itself.
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 0
    assert capsys.readouterr().out.startswith("usage: delt")


def test_python_m_delt_help_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "delt", "--help"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: delt")
    assert all(name in result.stdout for name in subparsers(PARSER))


def test_python_m_delt_ext_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "delt_ext"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "active path" in result.stdout


@pytest.mark.parametrize("page, line", EXPENSIVE, ids=[f"{p}:{ln[:60]}" for p, ln in EXPENSIVE])
def test_expensive_commands_are_listed(page, line):
    pytest.skip("not run here: trains, synthesizes or evaluates (minutes to days); parsed above")
