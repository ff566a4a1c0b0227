"""What every command line shares: bad input is one line ``error: <sentence>`` on stderr and exit code 2.

``train.py``, ``evaluate.py``, ``experiments/recipes.py`` and ``benchmarks/run.py`` all end this way. A user's
mistake is a :class:`~robust.errors.RobustError`, also when a library re-raises it as its own exception
(``raise ... from``, as jsonargparse does for a class it instantiates); anything else is a bug and keeps its
traceback, as every error does with ``debug`` (``--debug``). :func:`parser_error` turns an argument parser's own
message (jsonargparse's run to dozens of lines) into one sentence: the closest valid option, the valid choices.
Standard library only: ``evaluate.py`` rejects bad arguments before torch is imported.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Sequence

from robust.errors import RobustError

EXIT_BAD_INPUT = 2


def robust_cause(exc: BaseException | None) -> RobustError | None:
    """``exc`` or the RobustError it was raised from (following ``__cause__``); None when there is none."""
    while exc is not None and not isinstance(exc, RobustError):
        exc = exc.__cause__
    return exc


def user_error(exc: Exception, debug: bool = False) -> int:
    """Print ``error: <sentence>`` on stderr for a user's mistake and return :data:`EXIT_BAD_INPUT`; re-raise
    ``exc`` when it is not one (:func:`robust_cause`) or when ``debug``."""
    error = robust_cause(exc)
    if debug or error is None:
        raise exc
    print(f"error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def exit_code(run: Callable[[], object], debug: bool = False) -> int:
    """Call ``run()``; the process's exit code: 0, or :data:`EXIT_BAD_INPUT` after :func:`user_error`'s line."""
    try:
        run()
    except Exception as exc:
        return user_error(exc, debug)
    return 0


# ---- argument-parser errors (jsonargparse, argparse) as one sentence ----------------------------------------------

_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\]")
_EXPECTED = re.compile(r"Expected an? <class '(?:[\w.]+\.)?(\w+)'>")
_KEY = re.compile(r'Parser key "([\w.]+)"')
_GIVEN = re.compile(r"Given value: (.*?)(?:\. Got value:|$)|Got value: (.*?)$", re.M)
_CLASS_PATH = re.compile(r"class_path[=\s]'([\w.]+)'")
_NOT_ACCEPTED = re.compile(r"Option '(\w+)' is not accepted")
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_NO_FILE = re.compile(r"File does not exist: '?([^'\n]+)'?")
_NOT_A_PATH = re.compile(r"Expected a dot import path string: (\S+)")
_SUBTYPE = re.compile(r"Subtypes: \[<class '([\w.]+)'>")
_INVALID_CHOICE = re.compile(r"argument ([\w.-]+): invalid choice: '(.*?)' \(choose from (.*)\)")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``candidates`` (difflib), or nothing when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _choices(message: str) -> list[str]:
    """The values of every ``typing.Literal[...]`` in ``message``, in order, once each."""
    values = [v.strip().strip("'\"") for group in _LITERAL.findall(message) for v in group.split(",")]
    return list(dict.fromkeys(v for v in values if v))


def _public_classes(module: str) -> list[str]:
    """The public class names of ``module`` (none when it does not import)."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return []
    return [n for n in dir(found) if not n.startswith("_") and inspect.isclass(getattr(found, n))]


def _subclasses(class_path: str) -> list[str]:
    """The names of the imported subclasses of the class at ``class_path``, at any depth (none when it does not
    import)."""
    module, _, name = class_path.rpartition(".")
    try:
        todo = [getattr(importlib.import_module(module), name)]
    except (ImportError, AttributeError):
        return []
    found = []
    while todo:
        found += [c.__name__ for c in todo[0].__subclasses__() if not c.__name__.startswith("_")]
        todo = todo[1:] + todo[0].__subclasses__()
    return list(dict.fromkeys(found))


def _init_args(class_path: str) -> list[str]:
    """The ``__init__`` argument names of the class at ``class_path`` (none when it does not import)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def parser_error(message: str, prog: str, options: Sequence[str] = ()) -> str:
    """One sentence for an argument parser's error ``message`` (jsonargparse's run to many lines and end in a
    value's repr): what was wrong, the valid choices or the closest valid option, and where the full list is
    (``<prog> --help``). ``options``: the parser's option strings, for "did you mean"."""
    keys = _KEY.findall(message)
    # A class's own argument (the optimizer's lr) is reported under the class's key, then its own.
    flag = "--" + ".init_args.".join(keys) if keys else None
    given = _GIVEN.findall(message)
    value = next((a or b for a, b in given if (a or b) and not (a or b).startswith("Namespace(")), None)
    help_tip = f"{prog} --help lists every option"
    if message.startswith("unrecognized arguments:"):
        word = message.split(":", 1)[1].split()[0]
        if word.startswith("-"):
            return f"unknown option {word}{did_you_mean(word.split('=')[0], options)}; {help_tip}"
        return f"unexpected argument {word}; {help_tip}"
    if match := _INVALID_CHOICE.search(message):
        name, value, listed = match.groups()
        choices = [c.strip().strip("'") for c in listed.split(",")]
        what = "command" if name == "subcommand" else name
        return f"unknown {what} {value}{did_you_mean(value, choices)}; one of {', '.join(choices)}"
    if flag == "--config" and (missing := _NO_FILE.search(message)):
        return f"--config {missing.group(1)}: no such file"
    if match := _NOT_ACCEPTED.search(message):
        option = match.group(1)
        path = (_CLASS_PATH.search(message) or match).group(1)
        return (
            f"{flag}.init_args.{option}: {path} has no option {option}"
            f"{did_you_mean(option, _init_args(path))}; {flag}.help {path} lists them"
        )
    if match := _NO_ATTRIBUTE.search(message):
        module, name = match.groups()
        return f"{flag} {module}.{name}: {module} has no class {name}{did_you_mean(name, _public_classes(module))}"
    if match := _NOT_A_PATH.search(message):
        base = _SUBTYPE.search(message)
        known = _subclasses(base.group(1)) if base else []
        if not known:
            return f"{flag} {match.group(1)}: not a class path (module.Class, as in configs/)"
        return (
            f"{flag} {match.group(1)}: no class of that name{did_you_mean(match.group(1), known)}; "
            f"give a name such as {', '.join(known[:6])} or a module.Class path"
        )
    if choices := _choices(message):
        hint = did_you_mean(value, choices) if value else ""
        return f"{flag} {value}: not one of {', '.join(choices)}{hint}"
    if flag and (expected := _EXPECTED.findall(message)):
        if _CLASS_PATH.search(message):  # the class's own argument, not the optional class itself (null)
            expected = [k for k in expected if k != "NoneType"] or expected
        kinds = " or ".join(dict.fromkeys(k.replace("NoneType", "null") for k in expected))
        return f"{flag} {value}: expected {kinds}" if value else f"{flag}: expected {kinds}"
    # Anything else: its first line (argparse's "argument X: ..." without the word) and the value it names.
    first = message.strip().splitlines()[0].rstrip(":").removeprefix("argument ")
    return first if value is None else f"{first} {value}"
