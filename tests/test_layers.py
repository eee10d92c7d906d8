"""Layer rules that a reader would otherwise have to trust: which package may import which (read from the source, so
an import inside a function counts too), api and the frontend never import torch, importing does no work.

The layers, bottom up (docs/architecture.md): errors, types, progress, settings (leaves: nothing of ours) · storage ·
fast (the engine) · runtime · backends · frontend · api · serve and cli (composition) · tools (nothing imports them).
Imports under `if TYPE_CHECKING:` are annotations only and are not counted."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PKG = "bloom_server"

# package -> the packages and top-level modules of ours it must never import (a name covers what is under it).
FORBIDDEN = {
    "api": ("backends", "fast", "runtime", "storage", "tools", "cli", "serve"),
    "frontend": (
        "api",
        "backends",
        "fast",
        "runtime.lockstep",
        "runtime.distributed",
        "storage",
        "tools",
        "cli",
        "serve",
    ),  # of runtime, only protocol.py: the step types the batchers build
    "fast": ("api", "backends", "frontend", "runtime", "tools", "cli", "serve", "settings"),
    "runtime": ("api", "backends", "fast", "frontend", "storage", "tools", "cli", "serve"),
    "backends": ("api", "frontend", "tools", "cli", "serve"),
    "storage": None,  # see STORAGE_MAY
    # structured output's grammar engine: rank 0's frontend checks grammars with it, every rank's sampling (backends,
    # the fast engine's batcher) masks with it; so it sits below them all, on the leaves only.
    "structured": ("api", "backends", "cli", "fast", "frontend", "runtime", "serve", "settings", "storage", "tools"),
}
# storage sits on the standard library (and third-party packages); of ours only the leaf modules below.
STORAGE_MAY = ("errors", "storage", "")  # "": the package itself (its __version__)
LEAVES = ("errors", "types", "progress", "settings", "host")  # import nothing of ours (outside TYPE_CHECKING)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC / PKG).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: pathlib.Path) -> set[str]:
    """Our modules that `path` imports anywhere (relative to the package: "fast.model"; "" for the package)."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == PKG or name.startswith(PKG + "."):
                rel = name[len(PKG) + 1 :]
                if (
                    rel == ""
                    or (SRC / PKG / rel.replace(".", "/")).exists()
                    or (SRC / PKG / (rel.replace(".", "/") + ".py")).exists()
                ):
                    out.add(rel)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted((SRC / PKG).rglob("*.py"))}


def _under(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    wrong = []
    for mod, deps in _graph().items():
        if not _under(mod, package):
            continue
        for dep in deps:
            if package == "storage":
                if not any(_under(dep, ok) if ok else dep == "" for ok in STORAGE_MAY):
                    wrong.append(f"{mod} -> {dep}")
            elif any(_under(dep, bad) for bad in FORBIDDEN[package]):
                wrong.append(f"{mod} -> {dep}")
    assert not wrong, f"{package} imports against the layers: {wrong}"


def test_leaf_modules_import_nothing_of_ours():
    graph = _graph()
    wrong = {leaf: graph[leaf] for leaf in LEAVES if graph[leaf]}
    assert not wrong, wrong


def test_nothing_imports_tools_but_the_command_line():
    # `bloom-server bench` is the one way in: the cli dispatches to tools.bench, nothing else reaches it.
    wrong = [f"{m} -> {d}" for m, d2 in _graph().items() for d in d2
             if _under(d, "tools") and not _under(m, "tools") and not _under(m, "cli")]  # fmt: skip
    assert not wrong, wrong


def test_the_composition_root_names_no_backend():
    """serve.py wires the layers through the backend's declared capabilities; it imports no backend module and no
    part of the fast engine."""
    deps = _graph()["serve"]
    wrong = [d for d in deps if _under(d, "fast") or (_under(d, "backends") and d != "backends")]
    assert not wrong, wrong
    source = (SRC / PKG / "serve.py").read_text()
    assert "backend ==" not in source and "backend !=" not in source and "getattr(" not in source


CHECK = """
import sys, threading, os
before = set(threading.enumerate())
env_before = dict(os.environ)
import {modules}
assert "torch" not in sys.modules, "torch imported by: {modules}"
assert "fastapi" not in sys.modules or {allow_fastapi}, "fastapi imported"
assert set(threading.enumerate()) == before, "a thread was started at import"
assert dict(os.environ) == env_before, "environment changed at import"
print("ok")
"""


def run(modules: str, allow_fastapi: bool = True) -> None:
    code = CHECK.format(modules=modules, allow_fastapi=allow_fastapi)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_api_and_frontend_do_not_import_torch():
    run("bloom_server.api.app, bloom_server.api.routes_bloom, bloom_server.frontend.core, bloom_server.runtime.protocol,"
        " bloom_server.frontend.batching.dynamic, bloom_server.frontend.batching.continuous")  # fmt: skip


def test_cli_storage_settings_do_not_import_torch():
    run("bloom_server.cli, bloom_server.storage.download, bloom_server.storage.marker, bloom_server.settings,"
        " bloom_server.storage.model_dir, bloom_server.storage.prefetch, bloom_server.progress")  # fmt: skip


def test_backends_and_runtime_do_not_import_fastapi_or_torch_at_import():
    run(
        "bloom_server.backends, bloom_server.backends.base, bloom_server.backends.hf, bloom_server.backends.ds_inference,"
        " bloom_server.backends.ds_zero, bloom_server.runtime.lockstep, bloom_server.runtime.distributed,"
        " bloom_server.backends.fast_loader, bloom_server.fast.loaders",
        allow_fastapi=False,
    )
