"""delt_ext.compat.BNFeatureHook and the drop-in recipes for SRe2L, CDA, SC-DD and DELT.

The research loops are re-created here (written for these tests, small and on CPU): where the
hooks are built, how the list is passed, how the loss is summed, DELT's active sub-batch. The
recipes' diff blocks are read from docs/drop-in.md: the compat ones are applied with
``git apply`` to loop files holding their context lines, and the lines the BNStatMatching ones
add are run.
"""

import copy
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICES
from torch import nn

import delt_ext
from delt_ext.compat import BNFeatureHook, eager_bn_feature

ROOT = Path(__file__).resolve().parents[1]
RECIPES = (ROOT / "docs" / "drop-in.md").read_text()  # the page the users read
COMPAT_LINE = "from delt_ext.compat import BNFeatureHook"


class EagerHook:
    """The research hook's formula (their interface), the reference of these tests."""

    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        x = input[0]
        channels = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape([channels, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(
            module.running_mean.data - mean, 2
        )

    def close(self):
        self.hook.remove()


def make_teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )  # fmt: skip
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def diff_blocks() -> list[str]:
    return re.findall(r"```diff\n(.*?)```", RECIPES, re.S)


def added_lines(block: str) -> list[str]:
    return [
        line[1:].strip()
        for line in block.splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]


# ---- the hook itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hook_gives_the_eager_loss_and_gradient(dtype, device):
    model = make_teacher().to(device, dtype)
    bn = model[1]
    ours, theirs = BNFeatureHook(bn), EagerHook(bn)
    x = torch.randn(6, 3, 9, 9, dtype=dtype).to(device).requires_grad_(True)
    model(x)
    assert ours.r_feature.dtype == dtype
    (grad_ours,) = torch.autograd.grad(ours.r_feature, x, retain_graph=True)
    (grad_theirs,) = torch.autograd.grad(theirs.r_feature, x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours.r_feature, theirs.r_feature, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=tol, atol=tol * grad_theirs.abs().max())
    ours.close()
    theirs.close()
    before = ours.r_feature
    model(x)
    assert ours.r_feature is before  # closed: no longer updated


def test_hook_checks_its_module_and_precision():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        BNFeatureHook("bn")
    with pytest.raises(ValueError, match="track_running_stats=True"):
        BNFeatureHook(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="precision must be one of"):
        BNFeatureHook(nn.BatchNorm2d(3), precision="bf16")


def test_dataparallel_replicas_are_refused_not_raced():
    # nn.DataParallel over several GPUs calls shallow copies (replicas) of the modules, which
    # share the original's hooks; their r_feature would be overwritten by the last replica.
    model = make_teacher()
    hook = BNFeatureHook(model[1])
    replica = copy.copy(model[1])
    with pytest.raises(RuntimeError, match="nn.DataParallel replica.*CUDA_VISIBLE_DEVICES=0"):
        replica(torch.randn(2, 8, 4, 4))
    # With no or one device DataParallel calls the module itself: that works.
    wrapper = nn.DataParallel(model, device_ids=None if not torch.cuda.is_available() else [0])
    wrapper.to(next(wrapper.module.parameters()).device)
    wrapper(torch.randn(2, 3, 8, 8))
    assert hook.r_feature.ndim == 0


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bfloat16_float32_statistics_and_the_eager_option(device):
    model = make_teacher().to(device)
    ours, eager_option, theirs = (
        BNFeatureHook(model[4]), BNFeatureHook(model[4], precision="eager"), EagerHook(model[4])
    )  # fmt: skip
    captured = {}
    model[4].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    x = torch.randn(32, 3, 16, 16).to(device).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        model(x)
    bn_input = captured["x"]
    assert bn_input.dtype == torch.bfloat16
    # precision="eager" is their formula in their dtype: the same bits.
    assert torch.equal(eager_option.r_feature, theirs.r_feature)
    (g_eager,) = torch.autograd.grad(eager_option.r_feature, bn_input, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs.r_feature, bn_input, retain_graph=True)
    assert torch.equal(g_eager, g_theirs)
    # The default accumulates in float32: at least as close to float64 statistics of the same
    # bf16 input as theirs.
    exact = eager_bn_feature(
        bn_input.detach().double(), model[4].running_mean.double(), model[4].running_var.double()
    )
    assert ours.r_feature.dtype == torch.float32
    assert abs(ours.r_feature.double() - exact) <= abs(theirs.r_feature.double() - exact) + 1e-6
    assert abs(ours.r_feature.double() - exact) / exact < 1e-5


# ---- the recipes of docs/drop-in.md ----------------------------------------------------------

UTILS = """
import torch

class BNFeatureHook:  # the research repositories' eager hook
    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        x = input[0]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape([x.shape[1], -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(
            module.running_mean.data - mean, 2)

    def close(self):
        self.hook.remove()


def __getattr__(name):  # the other helpers their scripts import (clip, lr_cosine_policy, ...)
    if name.startswith("__"):
        raise AttributeError(name)
    return lambda *args, **kwargs: None
"""

# Loop bodies, one per repository's structure. Each ends by writing loss and input gradient.
LOOP_HEAD = """
import json, sys
import torch
import torch.nn as nn

def make_teacher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(); m.running_var.uniform_(0.5, 2.0)
    return model.eval()

first_bn_multiplier = 10.0
torch.manual_seed(1)
inputs = torch.randn(10, 3, 12, 12, requires_grad=True)

def report(loss, hooks):
    grad, = torch.autograd.grad(loss, inputs)
    json.dump({"loss": loss.item(), "grad": grad.flatten().tolist(),
               "hook": type(hooks[0]).__module__}, open(sys.argv[1], "w"))
"""

# SRe2L single GPU, CDA, SC-DD: hooks built in get_images on the DataParallel-wrapped teacher.
LOOP_IN_GET_IMAGES = """
def get_images(model_teacher):
    loss_r_feature_layers = []
    for module in model_teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            loss_r_feature_layers.append(BNFeatureHook(module))
    outputs = model_teacher(inputs)
    rescale = [first_bn_multiplier] + [1. for _ in range(len(loss_r_feature_layers) - 1)]
    loss_r_bn_feature = sum([mod.r_feature * rescale[idx]
                             for (idx, mod) in enumerate(loss_r_feature_layers)])
    report(loss_r_bn_feature, loss_r_feature_layers)

get_images(nn.DataParallel(make_teacher()))
"""

# SRe2L multi-GPU: hooks built before the teacher moves to its device; the sum names them bn_hooks.
LOOP_MULTI_GPU = """
def get_images(model_teacher, rank):
    loss_r_feature_layers = []
    for module in model_teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            loss_r_feature_layers.append(BNFeatureHook(module))
    model_teacher = model_teacher.to(rank)
    outputs = model_teacher(inputs.to(rank))
    rescale = [first_bn_multiplier] + [1. for _ in range(len(loss_r_feature_layers)-1)]
    loss_r_bn_feature = sum([bn_hooks.r_feature * rescale[idx]
                             for (idx, bn_hooks) in enumerate(loss_r_feature_layers)])
    report(loss_r_bn_feature, loss_r_feature_layers)

get_images(make_teacher(), "cpu")
"""

# DELT: hooks built in main_syn, passed into get_images, which forwards the active images only.
LOOP_DELT = """
def get_images(model_teacher, loss_r_feature_layers, slicing_list):
    total = 0
    for round_indx in range(len(slicing_list)):
        outputs = model_teacher(inputs[slicing_list[round_indx]])
        rescale = [first_bn_multiplier] + [1.0 for _ in range(len(loss_r_feature_layers) - 1)]
        loss_r_bn_feature = sum([mod.r_feature * rescale[idx]
                             for (idx, mod) in enumerate(loss_r_feature_layers)])
        total = total + loss_r_bn_feature
    report(total, loss_r_feature_layers)

def main_syn():
    model_teacher = nn.DataParallel(make_teacher())
    loss_r_feature_layers = []
    for module in model_teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            loss_r_feature_layers.append(BNFeatureHook(module))
    rounds = [[0, 1, 5], [0, 1, 2, 5, 6, 7], list(range(10))]
    get_images(model_teacher, loss_r_feature_layers, rounds)

main_syn()
"""


def loop_for(path: str) -> str:
    if "multi_gpu" in path:
        return LOOP_MULTI_GPU
    if path == "recover/recover.py":
        return LOOP_DELT
    return LOOP_IN_GET_IMAGES


def compat_files(block: str) -> dict[str, list[str]]:
    """Path -> the original side of its hunk (the lines the diff expects to find)."""
    files: dict[str, list[str]] = {}
    path = None
    for line in block.splitlines():
        if line.startswith("+++ b/"):
            path = line[len("+++ b/") :]
            files[path] = []
        elif path and not line.startswith(("---", "+", "@@", "diff ")):
            files[path].append(line[1:])
    return files


def run_loop(script: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"result-{len(list(tmp_path.glob('result-*')))}.json"
    result = subprocess.run(
        [sys.executable, script.name, str(out)], cwd=script.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


COMPAT_BLOCKS = [block for block in diff_blocks() if COMPAT_LINE in block]


def test_drop_in_page_has_the_compat_recipes_for_every_repository():
    assert len(COMPAT_BLOCKS) == 2  # VILA-Lab/SRe2L, VILA-Lab/DELT
    paths = [path for block in COMPAT_BLOCKS for path in compat_files(block)]
    for expected in [
        "SRe2L/recover/data_synthesis.py",
        "SRe2L/recover/multi_gpu/data_synthesis.py",
        "CDA/recover_cda_in1k.py",
        "SCDD/imagenet_code/recover/data_synthesis.py",
        "recover/recover.py",
    ]:
        assert expected in paths
    for block in COMPAT_BLOCKS:  # one added line per file, nothing else
        assert set(added_lines(block)) == {COMPAT_LINE}
        removed = [line for line in block.splitlines() if line.startswith("-")]
        assert all(line.startswith("---") for line in removed)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to apply the recipes' diffs")
@pytest.mark.parametrize("block_index", range(len(COMPAT_BLOCKS)))
def test_compat_recipe_applies_and_gives_the_eager_loss_and_gradient(block_index, tmp_path):
    block = COMPAT_BLOCKS[block_index]
    files = compat_files(block)
    for path, context in files.items():
        script = tmp_path / path
        script.parent.mkdir(parents=True, exist_ok=True)
        (script.parent / "utils.py").write_text(UTILS)
        (script.parent / "models.py").write_text(UTILS)
        script.write_text(LOOP_HEAD + "\n".join(context) + "\n" + loop_for(path))
    before = {path: run_loop(tmp_path / path, tmp_path) for path in files}
    (tmp_path / "recipe.diff").write_text(block)
    applied = subprocess.run(
        ["git", "apply", "recipe.diff"], cwd=tmp_path, capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    for path in files:
        after = run_loop(tmp_path / path, tmp_path)
        assert before[path]["hook"] == "utils" and after["hook"] == "delt_ext.compat", path
        assert after["loss"] == pytest.approx(before[path]["loss"], rel=1e-5)
        grad_after, grad_before = torch.tensor(after["grad"]), torch.tensor(before[path]["grad"])
        torch.testing.assert_close(
            grad_after, grad_before, rtol=1e-4, atol=1e-5 * grad_before.abs().max().item()
        )


BN_MATCHING_BLOCKS = [block for block in diff_blocks() if "BNStatMatching" in block]


def test_drop_in_page_bn_matching_recipes_add_only_the_lines_tested_here():
    assert len(BN_MATCHING_BLOCKS) == 4  # SRe2L single, multi-GPU, CDA, DELT
    allowed = {
        "import delt_ext",
        BN_MATCHING_LINE,
        LOSS_LINE,
        "def get_images(args, inputs, targets, model_teacher, bn_matching,",
        "get_images(args, images, labels, model_teacher, bn_matching,",
    }
    for block in BN_MATCHING_BLOCKS:
        assert set(added_lines(block)) <= allowed, added_lines(block)
        assert BN_MATCHING_LINE in added_lines(block) and LOSS_LINE in added_lines(block)


BN_MATCHING_LINE = (
    "bn_matching = delt_ext.BNStatMatching(model_teacher, "
    "first_bn_multiplier=args.first_bn_multiplier)"
)
LOSS_LINE = "loss_r_bn_feature = bn_matching.loss()"


@pytest.mark.parametrize("structure", ["get_images", "multi_gpu", "delt"])
def test_drop_in_page_bn_matching_lines_give_the_eager_loss_and_gradient(structure):
    class Args:
        first_bn_multiplier = 10.0

    torch.manual_seed(1)
    inputs = torch.randn(10, 3, 12, 12, requires_grad=True)
    rounds = [[0, 1, 5], [0, 1, 2, 5, 6, 7], list(range(10))] if structure == "delt" else [None]

    def losses(use_page_lines: bool):
        teacher = make_teacher()
        model_teacher = teacher if structure == "multi_gpu" else nn.DataParallel(teacher)
        if use_page_lines:
            scope = {"delt_ext": delt_ext, "model_teacher": model_teacher, "args": Args}
            exec(BN_MATCHING_LINE, scope)  # the page's line
        else:
            hooks = [EagerHook(m) for m in model_teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if structure == "multi_gpu":
            model_teacher = model_teacher.to("cpu")  # SRe2L moves it after building the hooks
        total = 0
        for active in rounds:
            model_teacher(inputs if active is None else inputs[active])
            if use_page_lines:
                exec(LOSS_LINE, scope)
                total = total + scope["loss_r_bn_feature"]
            else:
                rescale = [Args.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
                total = total + sum(h.r_feature * rescale[i] for i, h in enumerate(hooks))
        (grad,) = torch.autograd.grad(total, inputs)
        return total, grad

    loss_ours, grad_ours = losses(True)
    loss_eager, grad_eager = losses(False)
    torch.testing.assert_close(loss_ours, loss_eager, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_ours, grad_eager, rtol=1e-4, atol=1e-5 * grad_eager.abs().max())


# ---- import path, build report, packaging ------------------------------------------------------


def test_importing_from_a_source_tree_says_so_and_names_both_fixes(tmp_path):
    # A checkout without a build: setup.py and csrc/ beside a delt_ext/ that holds no _C.
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(delt_ext.__file__).parent, checkout / "delt_ext",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))  # fmt: skip
    (checkout / "csrc").mkdir()
    (checkout / "setup.py").write_text("")
    result = subprocess.run(
        [sys.executable, "-c", "import delt_ext; print(delt_ext.HAS_OPS)"],
        cwd=checkout, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert "circular import" not in result.stderr
    assert f"imported from the source tree {checkout / 'delt_ext'}" in result.stderr
    assert "run Python from another directory" in result.stderr
    assert "pip install -e . --no-build-isolation" in result.stderr
    if delt_ext.HAS_OPS:  # the compiled copy under test is on sys.path and named as shadowed
        assert f"shadows the compiled copy installed at {Path(delt_ext.__file__).parent}" in (
            result.stderr
        )
    report = subprocess.run(
        [sys.executable, "-m", "delt_ext"], cwd=checkout, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    assert "active path       pure-PyTorch reference fallback" in report.stdout
    assert f"imported from     {checkout / 'delt_ext'}" in report.stdout
    assert "circular import" not in report.stdout


def test_python_m_delt_ext_reports_the_active_compiled_path(tmp_path):
    if not delt_ext.HAS_OPS:
        pytest.skip("compiled delt_ext library not built")
    out = subprocess.run(
        [sys.executable, "-m", "delt_ext"], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "active path       compiled ops" in out
    assert f"imported from     {Path(delt_ext.__file__).parent}" in out
    assert f"loaded from {Path(delt_ext.__file__).parent}" in out


# Import name -> distribution name, where they differ.
DISTRIBUTION_OF = {"PIL": "pillow"}


def third_party_imports() -> set[str]:
    import ast

    names = set()
    packages = [Path(delt_ext.__file__).parent]
    try:
        import delt

        packages.append(Path(delt.__file__).parent)
    except ImportError:
        pass
    for package in packages:
        for source in package.rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    local = {"delt", "delt_ext"}
    return {n for n in names if n not in local and n not in sys.stdlib_module_names}


def test_every_third_party_import_is_a_declared_dependency():
    # `pip install --no-build-isolation .` into a clean environment installs exactly these.
    requirements = importlib.metadata.requires("delt-ext") or []
    declared = {
        re.split(r"[ ;<>=!~\[]", requirement, maxsplit=1)[0].lower()
        for requirement in requirements
        if "extra ==" not in requirement
    }
    imported = third_party_imports()
    assert {"torch", "numpy", "matplotlib"} <= imported
    missing = {DISTRIBUTION_OF.get(name, name).lower() for name in imported} - declared
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to list the tracked files")
def test_editable_install_builds_in_place_and_works(tmp_path):
    # A copy of the checkout, installed with `pip install -e . --no-build-isolation` into a fresh
    # virtual environment that sees torch and the other dependencies, not the installed delt_ext.
    # CPU-only to keep it short (a full compile here: the CUDA kernels are not what is tested).
    checkout = tmp_path / "checkout"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    deps = tmp_path / "deps"
    deps.mkdir()
    torch_site = Path(torch.__file__).resolve().parents[1]
    for entry in Path(torch.__file__).parents[1].iterdir():
        if entry.name.split("-")[0] not in ("delt", "delt_ext", "delt_ext.egg") and not (
            entry.name.startswith(("delt_ext", "__editable__", "__pycache__"))
        ):
            (deps / entry.name).symlink_to(entry)
    for entry in Path(sys.prefix).glob("lib/python*/site-packages/*.pth"):  # e.g. a base venv
        if not (deps / entry.name).exists():
            (deps / entry.name).symlink_to(entry)
    assert (deps / "torch").exists(), torch_site
    (Path(site) / "zz_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    env = {**__import__("os").environ, "FORCE_ONLY_CPU": "1"}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-e", ".",
         "--no-build-isolation", "--no-deps", "--quiet"],
        cwd=checkout, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    built = list((checkout / "delt_ext").glob("_C*"))
    assert built, "the editable install did not build delt_ext/_C in the checkout"
    for cwd in (tmp_path, checkout):  # from elsewhere, and from the checkout itself
        check = subprocess.run(
            [python, "-c", "import delt_ext, delt; print(delt_ext.HAS_OPS, delt_ext.__file__, "
             "delt.__file__)"],
            cwd=cwd, capture_output=True, text=True,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
        has_ops, ext_file, delt_file = check.stdout.split()
        assert has_ops == "True" and "RuntimeWarning" not in check.stderr
        assert Path(ext_file).parent == checkout / "delt_ext"
        assert Path(delt_file).parent == checkout / "python" / "delt"
    report = subprocess.run(
        [python, "-m", "delt_ext"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "active path       compiled ops" in report and str(built[0]) in report
    cli = subprocess.run([venv / "bin" / "delt", "--help"], capture_output=True, text=True)
    assert cli.returncode == 0 and "usage: delt" in cli.stdout, cli.stderr


# ---- the recipes against the repositories themselves -------------------------------------------

# The commit each recipe names on the page, and the variable pointing at a clone of its repository.
REAL_REPOSITORIES = {"VILA-Lab/SRe2L": "SRE2L_REPO", "VILA-Lab/DELT": "DELT_REPO"}


def recipe_commits() -> dict[str, tuple[str, str]]:
    """Repository -> (commit named on the page, its compat diff block)."""
    found = {}
    for repository in REAL_REPOSITORIES:
        match = re.search(
            rf"\[{repository}\]\(https://github.com/{repository}\).*?commit (\w+).*?"
            r"```diff\n(.*?)```",
            RECIPES,
            re.S,
        )
        assert match, f"docs/drop-in.md names no commit and recipe for {repository}"
        found[repository] = (match.group(1), match.group(2))
    return found


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to apply the recipes' diffs")
@pytest.mark.parametrize("repository", list(REAL_REPOSITORIES))
def test_compat_recipe_applies_to_the_real_repository(repository, tmp_path):
    clone = os.environ.get(REAL_REPOSITORIES[repository])
    if not clone:
        pytest.skip(f"set {REAL_REPOSITORIES[repository]} to a clone of {repository}")
    commit, block = recipe_commits()[repository]
    assert COMPAT_LINE in block
    for path in compat_files(block):  # the files at the named commit, nothing else
        shown = subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=clone, capture_output=True, check=True
        )
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(shown.stdout)
    (tmp_path / "recipe.diff").write_text(block)
    applied = subprocess.run(
        ["git", "apply", "recipe.diff"], cwd=tmp_path, capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    for path in compat_files(block):
        assert COMPAT_LINE in (tmp_path / path).read_text()
