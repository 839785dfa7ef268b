"""The package layout: every module imports on its own, and the core stays free of the outer layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "extproc"
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
)
# What the per-request core must never import: transports and their protocols, Envoy config,
# Kubernetes, the process layer, adapters (network clients) and the clients themselves.
CORE_FORBIDDEN = (
    "extproc.transport",
    "extproc.envoy",
    "extproc.kube",
    "extproc.process",
    "extproc.adapters",
    "extproc.rollout",
    "extproc.cli",
    "grpc",
    # Envoy's protobufs: the core is protocol-free, each transport decodes and encodes.
    "envoy",
    "httptools",
    "redis",
    "boto3",
    "botocore",
    "aiohttp",
    "kubernetes_asyncio",
)
# Packages that describe Envoy or the registry must not reach into the request path.
LOWER_FORBIDDEN = {
    "extproc.registry": ("extproc.core", "extproc.transport", "extproc.envoy", "extproc.process", "extproc.adapters"),
    "extproc.envoy": ("extproc.core", "extproc.transport", "extproc.process", "extproc.adapters", "extproc.kube"),
    "extproc.audit": ("extproc.core", "extproc.transport", "extproc.envoy", "extproc.process", "boto3"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _files(package: str) -> list[Path]:
    return sorted((PACKAGE.parent / package.replace(".", "/")).rglob("*.py"))


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in _files(package)
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_every_module_imports_alone() -> None:
    """Each module imports in a fresh interpreter: no package-level cycle hides behind import order."""
    # extproc.adapters.kube needs the optional `k8s` extra; the reconciler's tests import it.
    runs = {
        m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for m in MODULES
        if m != "extproc.adapters.kube"
    }
    failed = [f"{m}: {run.communicate()[1].decode().strip().splitlines()[-1:]}" for m, run in runs.items()]
    assert [f for m, f in zip(runs, failed, strict=True) if runs[m].returncode] == []


def test_core_imports_no_outer_layer() -> None:
    """The per-request core never imports a transport, Envoy config, Kubernetes, AWS or a network client."""
    assert _violations("extproc.core", CORE_FORBIDDEN) == []


@pytest.mark.parametrize("package", sorted(LOWER_FORBIDDEN))
def test_lower_layers_stay_below(package: str) -> None:
    """The registry, Envoy config and audit packages never import the request path or the process layer."""
    assert _violations(package, LOWER_FORBIDDEN[package]) == []


def test_every_package_declares_its_public_names() -> None:
    """Each subpackage's __init__ lists its public names in __all__, and each one resolves."""
    for init in sorted(PACKAGE.rglob("__init__.py")):
        module = ".".join(init.relative_to(PACKAGE.parent).parent.parts)
        tree = ast.parse(init.read_text(encoding="utf-8"))
        declared = [n for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign) and "__all__" in ast.dump(n)]
        assert declared or module == "extproc", f"{module} has no __all__"
        imported = __import__(module, fromlist=["__all__"])
        for name in getattr(imported, "__all__", []):
            assert hasattr(imported, name), f"{module}.__all__ names {name}, which it does not define"
