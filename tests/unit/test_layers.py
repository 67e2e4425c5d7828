"""The package's layers import one way only, and ``import megatron_bottleneck`` stays light.

Layers, low to high: base (0); ops (1); heads and probe (2, never importing each other); models (3);
integrations (4); the application: train, data, sweep, report, cli (5). A module may import its own layer
or lower ones. Function-level imports are allowed only for optional dependencies and where they keep a
light path (``import megatron_bottleneck``, ``--help``) free of megatron-core; each is listed here.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[2] / "megatron_bottleneck"
LAYER = {"base": 0, "ops": 1, "heads": 2, "probe": 2, "models": 3, "integrations": 4,
         "megatron_lm": 4, "train": 5, "data": 5, "sweep": 5, "report": 5, "measure": 5, "plots": 5, "cli": 5, "zoo": 5, "zoo_report": 5, "convert": 5,
         "evaluate": 5}
OPTIONAL = ("transformers", "tqdm", "tensorboard", "torch.utils.tensorboard", "wandb", "sentencepiece", "tokenizers", "lightning",
            "transformer_engine", "matplotlib", "megatron.training", "megatron.bridge", "liger_kernel",
            "cut_cross_entropy", "triton", "megatron.core", "fused_weight_gradient_mlp_cuda", "lm_eval")
# (module, imported name) pairs allowed inside functions for a stated reason.
LIGHT_PATHS = {
    "base/groups.py": "keeps the base importable without megatron-core",
    "cli.py": "keeps `megatron-bottleneck --help` free of megatron-core",
    "__init__.py": "lazy public names",
}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        yield rel, ast.parse(path.read_text(), str(path))


def _layer_of(rel: pathlib.PurePath):
    top = rel.parts[0].removesuffix(".py")
    return top, LAYER.get(top)


def _resolve(rel, node):
    """Top-level package part imported by an ``from .x import`` / ``import megatron_bottleneck.x`` node."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = list(rel.parts[:-1])[: len(rel.parts) - node.level]
            parts = base + (node.module.split(".") if node.module else [])
            if not parts:  # from .. import name
                return [n.name for n in node.names]
            return [parts[0]]
        if node.module and node.module.startswith("megatron_bottleneck."):
            return [node.module.split(".")[1]]
        return []
    return [a.name.split(".")[1] for a in node.names if a.name.startswith("megatron_bottleneck.")]


def test_imports_go_one_way():
    wrong = []
    for rel, tree in _modules():
        top, own = _layer_of(rel)
        if own is None:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _resolve(rel, node):
                layer = LAYER.get(target.removesuffix(".py"))
                if layer is None or target == top:
                    continue
                if layer > own or {top, target} == {"heads", "probe"}:
                    wrong.append(f"{rel}:{node.lineno} imports {target} (layer {layer} > {own})")
    assert not wrong, "\n".join(wrong)


def test_function_level_imports_are_optional_dependencies_or_light_paths():
    wrong = []
    for rel, tree in _modules():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                else:
                    continue
                for name in names:
                    # megatron.core itself is a hard dependency; its extensions wrap optional ones (TE)
                    optional = name.startswith(OPTIONAL) and (not name.startswith("megatron.core")
                                                              or name.startswith("megatron.core.extensions"))
                    if optional or str(rel) in LIGHT_PATHS:
                        continue
                    wrong.append(f"{rel}:{node.lineno} imports {name} inside {fn.name}()")
    assert not wrong, "\n".join(wrong)


def test_import_is_light_and_changes_nothing():
    code = ("import sys, torch; cd = torch.cuda.current_device; import megatron_bottleneck as mb; "
            "assert not [m for m in sys.modules if m.startswith('megatron.')], 'megatron imported'; "
            "assert torch.cuda.current_device is cd; print(mb.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    setup = (PKG.parent / "setup.py").read_text()
    assert "VERSION = re.search" in setup and out.stdout.strip()  # one place for the version


@pytest.mark.parametrize("name", ["probe/stats.py", "probe/linalg.py", "probe/spectrum.py", "heads/low_rank.py"])
def test_heads_and_probe_do_not_import_each_other(name):
    text = (PKG / name).read_text()
    other = "probe" if name.startswith("heads") else "heads"
    assert f"..{other}" not in text and f"megatron_bottleneck.{other}" not in text
