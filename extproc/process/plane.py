"""The control-plane process as `serve` and `control-plane` run it: live weights plus the model-registry follower."""

from __future__ import annotations

from extproc.adapters.mlflow import MlflowRegistry
from extproc.registry import MlflowSource
from extproc.rollout.control_plane import ControlPlane, run_control_plane
from extproc.rollout.registry_follow import RegistryFollower
from extproc.rollout.releases import ModelRegistry


def connect_mlflow(source: MlflowSource) -> ModelRegistry:
    return MlflowRegistry(source.tracking_uri, source.timeout_ms)


async def follow_model_registries(plane: ControlPlane, registry_file: str) -> None:
    await RegistryFollower(plane, registry_file, connect_mlflow).run()


def run_control_plane_process(config_path: str) -> None:
    """The supervisor's target: a spawned process needs a module-level function."""
    run_control_plane(config_path, follow_model_registries)
