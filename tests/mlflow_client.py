"""MLflow's own client, run with the MLflow virtualenv's python (scripts/mlflow-venv) by the tests.

Usage: mlflow_client.py TRACKING_URI COMMAND ARGS...; prints one JSON line.
  register NAME [FEATURES]     a new version of NAME (created if missing); FEATURES go in its tag
  alias NAME ALIAS VERSION     move ALIAS to VERSION
  unalias NAME ALIAS           delete ALIAS
  show NAME                    aliases and every version's tags
"""

from __future__ import annotations

import json
import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

FEATURES_TAG = "model_broker.features"


def main(uri: str, command: str, *args: str) -> object:
    client = MlflowClient(tracking_uri=uri)
    if command == "register":
        name = args[0]
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name)
        tags = {FEATURES_TAG: args[1]} if len(args) > 1 else {}
        # A remote URI: MLflow refuses local paths outside a run's artifacts; the broker never reads it.
        version = client.create_model_version(name, source=f"s3://models/{name}", tags=tags)
        return {"version": int(version.version)}
    if command == "alias":
        client.set_registered_model_alias(args[0], args[1], args[2])
        return {"ok": True}
    if command == "unalias":
        client.delete_registered_model_alias(args[0], args[1])
        return {"ok": True}
    if command == "show":
        model = client.get_registered_model(args[0])
        tags = {}
        for number in range(1, int(model.latest_versions[-1].version) + 1 if model.latest_versions else 1):
            tags[number] = dict(client.get_model_version(args[0], str(number)).tags)
        return {"aliases": {alias: int(number) for alias, number in model.aliases.items()}, "tags": tags}
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
