"""The Feast side of the Feast tests, run with the Python of the Feast virtualenv (scripts/feast-venv).

    <feast-python> -P tests/feast_tool.py write REPO ROWS.json   # Feast's online writer, per view
    <feast-python> -P tests/feast_tool.py read REPO REQUEST.json  # get_online_features → JSON on stdout
    <feast-python> -P tests/feast_tool.py parquet REPO ROWS.json # rows → data/<view>.parquet (offline source)

Values read back are turned into JSON as the README's type table says the broker
sends them (bytes base64, timestamps RFC 3339), each with Feast's Python type name,
so the test compares value for value and type for type.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
from typing import Any

from feast import FeatureStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.type_map import python_values_to_proto_values


def _write(repo: str, spec: dict[str, Any]) -> None:
    """Rows through Feast's online-store writer (what `materialize` calls), values typed by the view's schema.

    Not `write_to_online_store`: in a DataFrame an int64 column with a null becomes float64,
    and int64 values beyond 2**53 would not survive.
    """
    store = FeatureStore(repo_path=repo)
    provider = store._get_provider()
    for view_name, rows in spec.items():
        view = store.get_feature_view(view_name)
        join_keys = {e.join_key: e.value_type for e in map(store.get_entity, view.entities)}
        dtypes = {f.name: f.dtype.to_value_type() for f in view.features}
        data = []
        for row in rows:
            keys = sorted(join_keys)
            entity = EntityKeyProto(
                join_keys=keys,
                entity_values=[python_values_to_proto_values([row[k]], join_keys[k])[0] for k in keys],
            )
            values = {
                name: python_values_to_proto_values([_python(name, row[name])], dtype)[0]
                for name, dtype in dtypes.items()
                if name in row
            }
            data.append((entity, values, _python("event_timestamp", row["event_timestamp"]), None))
        provider.online_write_batch(store.config, view, data, progress=None)


def _python(name: str, value: Any) -> Any:
    """JSON in, the Python value Feast expects out: `{"b64": ...}` is bytes, event times are epoch seconds."""
    if name == "event_timestamp":
        return dt.datetime.fromtimestamp(value, tz=dt.UTC)
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    if isinstance(value, dict) and "epoch" in value:
        return dt.datetime.fromtimestamp(value["epoch"], tz=dt.UTC)
    return value


def _parquet(repo: str, spec: dict[str, Any]) -> None:
    """Each view's rows as its FileSource's parquet file, for `feast materialize` to load."""
    import pandas as pd  # Feast's own dependency, present in its venv

    for view_name, rows in spec.items():
        frame = pd.DataFrame([{k: _python(k, v) for k, v in row.items()} for row in rows])
        frame.to_parquet(f"{repo}/data/{view_name}.parquet", index=False)


def _read(repo: str, request: dict[str, Any]) -> dict[str, Any]:
    store = FeatureStore(repo_path=repo)
    found = store.get_online_features(features=request["features"], entity_rows=request["entity_rows"]).to_dict()
    return {name: [[_json(v), type(v).__name__] for v in values] for name, values in found.items()}


def _json(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, (list, tuple, set)):
        return [_json(v) for v in value]
    return value


if __name__ == "__main__":
    command, repo_dir, spec_file = sys.argv[1:4]
    with open(spec_file) as f:
        spec = json.load(f)
    if command == "write":
        _write(repo_dir, spec)
    elif command == "parquet":
        _parquet(repo_dir, spec)
    else:
        json.dump(_read(repo_dir, spec), sys.stdout)
