"""CEL expressions over one request: compiled and checked once at registry load, evaluated per request.

Google's CEL (cel-cpp, through `cel-expr-python`) type-checks each expression against
`body`, `features` and `now`; the checked AST (a `cel.expr.CheckedExpr`, decoded with the
generated protobufs that xds-protos ships) is then walked for what a type checker cannot
see: feature names the model does not declare, non-deterministic functions, and size.
"""

from __future__ import annotations

import datetime
import functools
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cel.expr import checked_pb2, syntax_pb2
from cel_expr_python import cel
from cel_expr_python.ext import ext_math, ext_strings
from google.protobuf import any_pb2

ResultType = Literal["double", "int", "bool", "string"]

# The names an expression may use: the client's JSON body, the model's features (stored, then
# derived ones in order), and the request's arrival time (recorded in the audit record, so a
# derived value can be recomputed from it; a clock read inside an expression could not).
BODY, FEATURES, NOW = "body", "features", "now"

# Size limits of one expression, checked at load. Comprehensions (`all`, `exists`, `map`, …) may
# not nest, and cel-cpp's runtime stops one evaluation after ITERATION_BUDGET loop steps, so an
# evaluation costs at most about MAX_NODES x ITERATION_BUDGET steps whatever the input.
MAX_CHARS = 1000
MAX_NODES = 100
ITERATION_BUDGET = 10_000  # cel-cpp's comprehension budget (measured; an error beyond it)

# Functions some CEL dialects or other languages offer that would make a value depend on when or
# where it was computed. Declared (so the checker accepts them) only to be refused by name.
NON_DETERMINISTIC = ("now", "random", "rand", "uuid")

_DYN_MAP = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
# Static result types the checker may report for each declared type (DYN is settled at run time).
_ACCEPTS: dict[str, frozenset[str]] = {
    "double": frozenset({"DOUBLE", "INT", "UINT", "DYN"}),
    "int": frozenset({"INT", "UINT", "DOUBLE", "DYN"}),
    "bool": frozenset({"BOOL", "DYN"}),
    "string": frozenset({"STRING", "DYN"}),
}


def _environment() -> Any:
    refused = [
        cel.FunctionDecl(name, [cel.Overload(f"{name}_refused", return_type=cel.Type.DYN, parameters=[])])
        for name in NON_DETERMINISTIC
    ]
    return cel.NewEnv(
        variables={BODY: _DYN_MAP, FEATURES: _DYN_MAP, NOW: cel.Type.TIMESTAMP},
        functions=refused,
        extensions=[ext_math.ExtMath(), ext_strings.ExtStrings()],
    )


_ENV = _environment()


@dataclass(frozen=True, slots=True)
class Expression:
    """One checked CEL program and what it reads, so a request passes it only that."""

    source: str
    program: Any  # cel_expr_python's Expression: no type stubs worth exporting
    result: ResultType
    # Top-level body fields read by name; None when the expression reads the body as a whole.
    body_fields: tuple[str, ...] | None
    features: tuple[str, ...]
    uses_now: bool
    # Second-level names read under a top-level field (`body.inputs.age` → ("inputs", "age")), and the
    # top-level fields read otherwise (`size(body.inputs)`): what an OIP request's row view must hold.
    body_paths: tuple[tuple[str, str], ...] = ()
    opaque_fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EvaluationError:
    """Why one evaluation produced no value (division by zero, a missing input, a type mismatch)."""

    message: str


def _clean(message: str) -> str:
    """cel-cpp's checker text, without its status prefix, caret drawings and `<input>` source name."""
    message = message.replace(" (in container '')", "")
    errors = re.findall(r"ERROR: <input>:(-?\d+):(-?\d+): ([^\n]*)", message)
    if not errors:
        return message.removeprefix("INVALID_ARGUMENT: ").strip()
    shown = (f"{text} (at {line}:{col})" if int(line) > 0 else text for line, col, text in errors)
    return "; ".join(dict.fromkeys(text.removesuffix(" [INVALID_ARGUMENT]") for text in shown))


@functools.lru_cache(maxsize=4096)
def compile_expression(source: str, declared: tuple[str, ...], result: ResultType) -> Expression | str:
    """The checked program, or what is wrong with it (for `check`). Cached: a registry reload, or a live
    weight change that recompiles the routes, reuses every unchanged expression's program."""
    if len(source) > MAX_CHARS:
        return f"the expression is {len(source)} characters long; the limit is {MAX_CHARS}"
    try:
        program = _ENV.compile(source)
    except RuntimeError as exc:
        return _clean(str(exc))
    returns = program.return_type().name()
    if returns not in _ACCEPTS[result]:
        return f"the expression returns {returns.lower()}, not {result}"
    checked = _checked(program)
    walk = _Walk()
    walk.visit(checked.expr, bound=frozenset(), in_loop=False)
    problem = walk.problem(declared)
    if problem:
        return problem
    body = None if walk.whole_body else tuple(sorted(walk.body_fields))
    paths = tuple(sorted(walk.body_paths))
    opaque = tuple(sorted(walk.opaque_fields))
    return Expression(source, program, result, body, tuple(sorted(walk.features)), walk.uses_now, paths, opaque)


def _checked(program: Any) -> checked_pb2.CheckedExpr:
    envelope = any_pb2.Any()
    envelope.ParseFromString(program.serialize())
    checked = checked_pb2.CheckedExpr()
    envelope.Unpack(checked)
    return checked


class _Walk:
    """One pass over the checked AST: names read, functions called, size and loop nesting."""

    def __init__(self) -> None:
        self.nodes = 0
        self.nested_loop = False
        self.body_fields: set[str] = set()
        self.body_paths: set[tuple[str, str]] = set()
        self.opaque_fields: set[str] = set()
        self.whole_body = False
        self.features: set[str] = set()
        self.features_as_whole = False
        self.uses_now = False
        self.refused: set[str] = set()

    def problem(self, declared: Collection[str]) -> str:
        if self.refused:
            names = ", ".join(f"{n}()" for n in sorted(self.refused))
            return (
                f"{names} is not deterministic; use `now`, the request's arrival time (recorded in the audit), "
                "so the value can be recomputed"
            )
        if self.features_as_whole:
            return "read features by name (features.x or features['x']), so check can verify each one"
        unknown = sorted(self.features - set(declared))
        if unknown:
            known = ", ".join(declared) or "none"
            return f"unknown feature {', '.join(map(repr, unknown))} (this model's features: {known})"
        if self.nested_loop:
            return "comprehensions (all, exists, map, filter) may not nest"
        if self.nodes > MAX_NODES:
            return f"the expression has {self.nodes} nodes; the limit is {MAX_NODES}"
        return ""

    def visit(self, node: syntax_pb2.Expr, *, bound: frozenset[str], in_loop: bool) -> None:
        self.nodes += 1
        kind = node.WhichOneof("expr_kind")
        if kind == "ident_expr":
            self._ident(node.ident_expr.name, bound)
        elif kind == "select_expr":
            self._select(node.select_expr, bound, in_loop)
        elif kind == "call_expr":
            self._call(node.call_expr, bound, in_loop)
        elif kind == "list_expr":
            for element in node.list_expr.elements:
                self.visit(element, bound=bound, in_loop=in_loop)
        elif kind == "struct_expr":
            for entry in node.struct_expr.entries:
                if entry.HasField("map_key"):
                    self.visit(entry.map_key, bound=bound, in_loop=in_loop)
                self.visit(entry.value, bound=bound, in_loop=in_loop)
        elif kind == "comprehension_expr":
            loop = node.comprehension_expr
            self.nested_loop |= in_loop
            self.visit(loop.iter_range, bound=bound, in_loop=in_loop)
            self.visit(loop.accu_init, bound=bound, in_loop=in_loop)
            inner = bound | {loop.iter_var, loop.accu_var}
            for part in (loop.loop_condition, loop.loop_step, loop.result):
                self.visit(part, bound=inner, in_loop=True)

    def _select(self, select: syntax_pb2.Expr.Select, bound: frozenset[str], in_loop: bool) -> None:
        """`body.x.y`, `body.x`, `features.x` record names; any other select walks its operand."""
        if self._nested(select.operand, select.field, bound):
            self.nodes += 2
        elif self._named(select.operand, select.field, bound):
            self.nodes += 1
        else:
            self.visit(select.operand, bound=bound, in_loop=in_loop)

    def _ident(self, name: str, bound: frozenset[str]) -> None:
        if name in bound:
            return
        if name == BODY:
            self.whole_body = True
        elif name == FEATURES:
            self.features_as_whole = True
        elif name == NOW:
            self.uses_now = True

    def _named(self, operand: syntax_pb2.Expr, name: str, bound: frozenset[str]) -> bool:
        """`body.x` / `features.x` (or the same with a constant string index): record the name."""
        if operand.WhichOneof("expr_kind") != "ident_expr" or operand.ident_expr.name in bound:
            return False
        if operand.ident_expr.name == BODY:
            self.body_fields.add(name)
            self.opaque_fields.add(name)  # read as a value, not only through names under it
            return True
        if operand.ident_expr.name == FEATURES:
            self.features.add(name)
            return True
        return False

    def _body_field(self, node: syntax_pb2.Expr, bound: frozenset[str]) -> str | None:
        """X when `node` is `body.X` or `body['X']` (body not shadowed by a loop variable)."""
        kind = node.WhichOneof("expr_kind")
        if kind == "select_expr" and not node.select_expr.test_only:
            operand = node.select_expr.operand
            if operand.WhichOneof("expr_kind") == "ident_expr" and operand.ident_expr.name not in bound:
                return node.select_expr.field if operand.ident_expr.name == BODY else None
        if kind == "call_expr" and node.call_expr.function == "_[_]" and len(node.call_expr.args) == 2:
            target, key = node.call_expr.args
            if target.WhichOneof("expr_kind") == "ident_expr" and target.ident_expr.name == BODY and BODY not in bound:
                return _constant_string(key)
        return None

    def _nested(self, operand: syntax_pb2.Expr, name: str, bound: frozenset[str]) -> bool:
        """`body.X.name` (or with constant string indexes): record the path X.name."""
        field = self._body_field(operand, bound)
        if field is None:
            return False
        self.body_fields.add(field)
        self.body_paths.add((field, name))
        return True

    def _call(self, call: syntax_pb2.Expr.Call, bound: frozenset[str], in_loop: bool) -> None:
        if call.function in NON_DETERMINISTIC and not call.HasField("target"):
            self.refused.add(call.function)
        if call.function == "_[_]" and len(call.args) == 2:
            key = _constant_string(call.args[1])
            if key is not None and (self._nested(call.args[0], key, bound) or self._named(call.args[0], key, bound)):
                self.nodes += 2
                return
        if call.HasField("target"):
            self.visit(call.target, bound=bound, in_loop=in_loop)
        for arg in call.args:
            self.visit(arg, bound=bound, in_loop=in_loop)


def _constant_string(node: syntax_pb2.Expr) -> str | None:
    if node.WhichOneof("expr_kind") == "const_expr" and node.const_expr.WhichOneof("constant_kind") == "string_value":
        return str(node.const_expr.string_value)
    return None


def cel_json(value: Any) -> Any:
    """JSON as CEL reads it (google.protobuf.Value): every number a double, so `debt / income`
    divides as the training code did instead of truncating two integers."""
    kind = type(value)
    if kind is int:
        return float(value)
    if kind is dict:
        return {k: cel_json(v) for k, v in value.items()}
    if kind is list:
        return [cel_json(v) for v in value]
    return value


class Inputs:
    """One request's values, converted once and shared by every expression of its model."""

    __slots__ = ("_activation",)

    def __init__(
        self, body: Mapping[str, Any] | None, features: Mapping[str, Any], now: datetime.datetime | None
    ) -> None:
        data: dict[str, Any] = {FEATURES: {k: cel_json(v) for k, v in features.items()}}
        if body is not None:
            data[BODY] = cel_json(body)
        if now is not None:
            data[NOW] = now
        self._activation = _ENV.Activation(data)

    def evaluate(self, expression: Expression) -> Any:
        """The value, converted to the expression's declared type, or an `EvaluationError`."""
        try:
            value = expression.program.eval(self._activation)
        except RuntimeError as exc:  # cel-cpp raises only past its iteration budget
            return EvaluationError(_clean(str(exc)))
        raw = value.value()
        if isinstance(raw, str) and value.type() == cel.Type.ERROR:
            return EvaluationError(_runtime_message(raw))
        return settle(raw, expression.result)


def _runtime_message(raw: str) -> str:
    """`NOT_FOUND: Key not found in map : "income"` → `no such key: "income"`, and so on."""
    text = re.sub(r"^[A-Z_]+: ", "", raw)
    text = text.replace("Key not found in map :", "missing input:")
    return text.replace("No matching overloads found :", "type mismatch:")


def settle(raw: Any, result: ResultType) -> Any:
    """A CEL value as the declared JSON type, or why it is not one (null, NaN, ∞, 2.5 as int)."""
    if result in ("bool", "string"):
        fits = isinstance(raw, bool) if result == "bool" else isinstance(raw, str)
        return raw if fits else _mismatch(raw, result)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return _mismatch(raw, result)
    if not math.isfinite(raw):
        return EvaluationError(f"the result is {raw} (a division by zero?), not a finite number")
    return float(raw) if result == "double" else _whole(raw)


def _whole(raw: float) -> int | EvaluationError:
    if raw != int(raw):
        return EvaluationError(f"the result {raw} is not a whole number, as type int needs")
    if not -(2**63) <= raw < 2**63:
        return EvaluationError(f"the result {raw} is outside the 64-bit integer range")
    return int(raw)


def _mismatch(raw: Any, result: ResultType) -> EvaluationError:
    shown = "null" if raw is None else type(raw).__name__
    return EvaluationError(f"the result is {shown}, not {result}")
