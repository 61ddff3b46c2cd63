"""The calculator every model may call, and the one transcript syntax for its calls and results.

A call is `<calc>EXPRESSION</calc>`; the runtime (shared.tool_runtime) executes a complete call the moment
the model closes it and appends `<result>VALUE</result>`, or `<result>error: REASON</result>` for a call it
cannot execute; the model then writes its final answer. A worked tool-use example reads

    use the calculator: 12 plus 53 ? <calc>12+53</calc><result>65</result> 65

and its final answer is what follows the last result ("65"). Expressions are integers joined by + - * with
parentheses, parsed with `ast` and evaluated node by node: never eval. A call longer than MAX_CALL_CHARS or
a value of more than MAX_RESULT_DIGITS digits is refused with an error result, so no call can make the
runtime spend unbounded time or memory.
"""
from __future__ import annotations

import ast
import operator
import re

CALC_OPEN, CALC_CLOSE = "<calc>", "</calc>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
MAX_CALL_CHARS = 64
MAX_RESULT_DIGITS = 18

# The first complete call in a text, whatever is inside it (well-formed or not); a result the runtime wrote.
CALL = re.compile(re.escape(CALC_OPEN) + r"(.*?)" + re.escape(CALC_CLOSE), re.DOTALL)
RESULT = re.compile(re.escape(RESULT_OPEN) + r".*?" + re.escape(RESULT_CLOSE), re.DOTALL)
ERROR_PREFIX = "error: "

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calc_call(expression: str) -> str:
    return f"{CALC_OPEN}{expression}{CALC_CLOSE}"


def parse_calc(text: str) -> str | None:
    """The expression of the first complete calculator call in text (stripped), or None."""
    match = CALL.search(text)
    return match.group(1).strip() if match else None


def evaluate_calc(expression: str) -> int:
    """Integer + - * with parentheses; anything else is a ValueError (never eval)."""

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not a calculator expression: {expression!r}")

    if len(expression) > MAX_CALL_CHARS:
        raise ValueError(f"a calculator call takes at most {MAX_CALL_CHARS} characters, got {len(expression)}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as error:  # ValueError: a null byte in the source
        raise ValueError(f"not a calculator expression: {expression!r}") from error
    result = value(tree.body)
    if len(str(abs(result))) > MAX_RESULT_DIGITS:
        raise ValueError(f"the result has more than {MAX_RESULT_DIGITS} digits")
    return result


def execute(expression: str) -> str:
    """What the runtime appends for a call: its value, or an error naming why it could not be computed."""
    try:
        return str(evaluate_calc(expression))
    except ValueError as error:
        return ERROR_PREFIX + str(error)


def result_text(value: str) -> str:
    return f"{RESULT_OPEN}{value}{RESULT_CLOSE}"


def worked_call(expression: str) -> str:
    """A call and the result the runtime appends to it, as in a transcript."""
    return calc_call(expression) + result_text(execute(expression))


def result_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of every result in a transcript: text the runtime writes and a model only reads."""
    return [match.span() for match in RESULT.finditer(text)]
