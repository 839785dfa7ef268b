"""Trains the Open Inference Protocol tests' models and writes an MLServer model repository.

Run by the MLServer virtualenv's python (scripts/mlserver-venv), never imported by pytest:
    python tests/mlserver_models.py DIR HTTP_PORT GRPC_PORT METRICS_PORT
Models: `risk` v1 and v2 (logistic regressions on one [N, 4] FP32 tensor, `features`),
`risk-columns` v1 (the same four features as one [N, 1] input each, MLServer's pandas codec),
and two trained on derived features as well, so their answers depend on the broker computing
them: `risk-derived` (one [N, 5] FP64 tensor, the fifth column debt = debt_ratio x income) and
`risk-derived-columns` (pandas: the four features, then debt FP64, senior BOOL, age_band INT64).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

FEATURES = ["income", "debt_ratio", "age", "tenure"]


def training_data(seed: int) -> pd.DataFrame:
    """The distribution the tests' feature store rows are drawn from."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "income": rng.normal(50.0, 15.0, 500),
            "debt_ratio": rng.uniform(0.0, 1.0, 500),
            "age": rng.integers(18, 80, 500),
            "tenure": rng.uniform(0.0, 30.0, 500),
        }
    )


def write_model(root: Path, folder: str, settings: dict[str, object], model: LogisticRegression) -> None:
    directory = root / folder
    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, directory / "model.joblib")
    (directory / "model-settings.json").write_text(json.dumps(settings))


def derived_columns(data: pd.DataFrame) -> pd.DataFrame:
    """The derived features as the registry's CEL computes them, columns in declared order."""
    frame = data.copy()
    frame["debt"] = frame["debt_ratio"] * frame["income"]
    frame["senior"] = frame["age"] >= 60
    frame["age_band"] = (frame["age"] // 10).astype("int64")
    return frame


def write_derived_models(root: Path, data: pd.DataFrame) -> None:
    """Labels driven by the derived values: a wrong or missing derived value changes the answer."""
    frame = derived_columns(data)
    labels = (frame["debt"] > frame["debt"].median()).astype(int)
    tensor = LogisticRegression(max_iter=1000).fit(frame[[*FEATURES, "debt"]].to_numpy(dtype=np.float64), labels)
    settings = {
        "name": "risk-derived",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "inputs": [{"name": "features", "datatype": "FP64", "shape": [-1, 5]}],
        "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]}],
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }
    write_model(root, "risk-derived", settings, tensor)
    labels = ((frame["debt"] > frame["debt"].median()) | frame["senior"]).astype(int)
    columns = {
        "name": "risk-derived-columns",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1", "content_type": "pd"},
    }
    write_model(root, "risk-derived-columns", columns, LogisticRegression(max_iter=1000).fit(frame, labels))


def main(root: Path, http_port: int, grpc_port: int, metrics_port: int) -> None:
    data = training_data(14)
    tensor_io = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]}],
    }
    for version, weights in (("v1", [0.05, -3.0, 0.02, 0.1]), ("v2", [0.03, -1.0, -0.04, 0.2])):
        score = data.to_numpy() @ np.array(weights)
        labels = (score > np.median(score)).astype(int)
        model = LogisticRegression(max_iter=1000).fit(data.to_numpy(dtype=np.float32), labels)
        settings = {
            "name": "risk",
            "implementation": "mlserver_sklearn.SKLearnModel",
            **tensor_io,
            "parameters": {"uri": "./model.joblib", "version": version},
        }
        write_model(root, f"risk-{version}", settings, model)
    labels = (data["income"] / 50 - data["debt_ratio"] > 0.5).astype(int)
    columns = {
        "name": "risk-columns",
        "implementation": "mlserver_sklearn.SKLearnModel",
        # One input per feature, decoded into a DataFrame whose columns are the input names.
        "parameters": {"uri": "./model.joblib", "version": "v1", "content_type": "pd"},
    }
    write_model(root, "risk-columns", columns, LogisticRegression(max_iter=1000).fit(data, labels))
    write_derived_models(root, data)
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        # In-process inference: no worker pool on a shared 2-core box.
        "parallel_workers": 0,
    }
    (root / "settings.json").write_text(json.dumps(settings))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:5]))
