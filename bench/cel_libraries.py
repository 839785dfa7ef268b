"""`python -m bench.cel_libraries`: CPU time per CEL expression in each Python CEL library.

How the broker's CEL library was chosen (README, "Why cel-expr-python"). The same six
expressions (3 derived features, 3 rules) are compiled once, then per simulated request one
activation is built from a small body and feature map and every expression evaluated.
Only `cel-expr-python` is a dependency; to compare, install the others into the venv first:
`pip install common-expression-language cel-python`. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

BODY = {"customer_id": "c-42", "amount": 1200.0, "country": "DE", "channel": "web", "user_id": "u1"}
FEATURES = {"income": 81500.0, "debt": 25000.0, "avg_amount_30d": 400.0, "segment": "premium", "tenure_months": 12.0}
EXPRESSIONS = (
    "features.debt / features.income",
    "body.amount / features.avg_amount_30d",
    "features.tenure_months < 24.0 && features.debt > 1000.0",
    "body.country == 'DE' || features.segment == 'premium'",
    "body.channel == 'app' && body.amount > 5000.0",
    "features.segment in ['gold', 'platinum']",
)
ROUNDS = 20_000


def cel_expr_python() -> Callable[[], Any]:
    from cel_expr_python import cel

    dyn = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
    env = cel.NewEnv(variables={"body": dyn, "features": dyn})
    programs = [env.compile(e) for e in EXPRESSIONS]

    def one_request() -> Any:
        activation = env.Activation({"body": BODY, "features": FEATURES})
        return [p.eval(activation).value() for p in programs]

    return one_request


def common_expression_language() -> Callable[[], Any]:
    # Its extension module directly: the package shares the top-level name `cel` with
    # xds-protos' `cel.expr`, and whichever installs last owns `cel/__init__.py`.
    from cel import cel  # type: ignore[attr-defined,unused-ignore]  # optional, for this comparison only

    programs = [cel.compile(e) for e in EXPRESSIONS]

    def one_request() -> Any:
        context = cel.Context(variables={"body": BODY, "features": FEATURES})
        return [p.execute(context) for p in programs]

    return one_request


def cel_python() -> Callable[[], Any]:
    import celpy  # type: ignore[import-not-found]  # optional, for this comparison only

    env = celpy.Environment()
    programs = [env.program(env.compile(e)) for e in EXPRESSIONS]

    def one_request() -> Any:
        activation = {"body": celpy.json_to_cel(BODY), "features": celpy.json_to_cel(FEATURES)}
        return [p.evaluate(activation) for p in programs]

    return one_request


LIBRARIES = {
    "cel-expr-python (cel-cpp)": ("cel_expr_python", cel_expr_python, ROUNDS),
    "common-expression-language (Rust)": ("cel.cel", common_expression_language, ROUNDS),
    "cel-python (pure Python)": ("celpy", cel_python, ROUNDS // 20),
}


def main() -> None:
    for name, (module, build, rounds) in LIBRARIES.items():
        if importlib.util.find_spec(module) is None:
            print(f"{name}: not installed")
            continue
        one_request = build()
        for _ in range(rounds // 20):
            one_request()
        start = time.process_time()
        for _ in range(rounds):
            one_request()
        micros = (time.process_time() - start) / rounds * 1e6
        print(f"{name}: {micros:.1f} µs CPU per request, {micros / len(EXPRESSIONS):.2f} µs per expression")


if __name__ == "__main__":
    main()
