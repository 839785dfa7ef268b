"""The Dockerfile: hadolint clean, pinned, non-root, nothing to build with in the image it ships."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "docker" / "requirements.lock"
BUILD_TOOLS = ("apt-get", "apk ", "gcc", "build-essential", "make ", "git ")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions, by stage name."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if instruction == "FROM":
            current = []
            out[args.split()[-1]] = current
        current.append((instruction, args))
    return out


def last(stage: list[tuple[str, str]], instruction: str) -> str:
    return [args for name, args in stage if name == instruction][-1]


def test_hadolint_is_clean() -> None:
    """hadolint (bundled binary, offline) reports nothing at any level."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_base_image_is_pinned_and_slim() -> None:
    """The one base image is a slim Python with an exact patch version, never `latest`."""
    arg = next(args for name, args in instructions(DOCKERFILE.read_text()) if name == "ARG")
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", arg)


@pytest.mark.parametrize("target", ["runtime", "envoy"])
def test_shipped_images_run_as_non_root_with_a_healthcheck(target: str) -> None:
    """Both shipped targets run as the numeric non-root user and declare a HEALTHCHECK and an entrypoint."""
    stage = stages()[target]
    user = last(stages()["runtime"], "USER") if target == "envoy" else last(stage, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user)
    assert any(name == "HEALTHCHECK" for name, _ in stage)
    assert last(stage, "ENTRYPOINT") == ('["model-broker"]' if target == "runtime" else '["envoy"]')


def test_runtime_stage_has_no_build_tools() -> None:
    """The shipped stage copies the built venv and installs nothing: no package manager, compiler or pip."""
    runs = " ".join(args for name, args in stages()["runtime"] if name == "RUN")
    assert not [tool for tool in BUILD_TOOLS if tool in runs]
    assert "pip" not in runs
    assert ("COPY", "--from=build /opt/venv /opt/venv") in stages()["runtime"]


def test_dependencies_install_from_the_lock() -> None:
    """Third-party packages come only from docker/requirements.lock, which pins every runtime dependency."""
    runs = [args for name, args in stages()["build"] if name == "RUN" and "pip install" in args]
    assert all("--no-deps" in run for run in runs) and any("-r docker/requirements.lock" in run for run in runs)
    pins = dict(line.split("==") for line in LOCK.read_text().splitlines() if line and not line.startswith("#"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["k8s"]
    normal = {re.sub(r"[-_.]+", "-", name).lower() for name in pins}
    for requirement in wanted:
        name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in normal, f"{name} is not pinned in {LOCK.name}"


def test_chart_runs_as_the_image_user() -> None:
    """The chart's runAsUser is the uid the image creates, so files and the non-root check agree."""
    values = yaml.safe_load((ROOT / "helm" / "model-broker" / "values.yaml").read_text())
    uid = last(stages()["runtime"], "USER").split(":")[0]
    assert str(values["securityContext"]["runAsUser"]) == uid
