"""The one resolver of ``module:attr`` names (model.name, data.name), and the call of what it finds.

Every role (worker, chief, `train`, `launch`'s early check, `replay`, `eval`, `sample`) reaches a
user's model or data loader through `asyncps.worker.models.build_model` and
`asyncps.worker.data.load_dataset`, which call `resolve` and `call_factory` here, so a name means
the same thing everywhere and every failure is one line (a UserError: exit 2 on the CLI).

Where modules are looked for: `sys.path` as Python sets it (PYTHONPATH included), plus the
current directory, appended at the end (as `python -m` and uvicorn do; the `asyncps` console
script alone would not see it), so ``asyncps train cfg.yaml`` run from the folder that holds
``mypkg/`` finds ``mypkg.models:MyNet``. Processes started by `asyncps launch` inherit its
environment and directory, so they find the same code.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback

from asyncps.config import is_import_path
from asyncps.errors import ConfigError, UserError

__all__ = ["accepts", "call_factory", "check_call", "is_import_path", "resolve"]


def resolve(spec: str, key: str):
    """The object ``module:attr`` names (attr may be dotted). `key` (e.g. "model.name") starts
    every error message: module not found, import failed (with the file and line), no such
    attribute."""
    if not is_import_path(spec):
        raise ConfigError(f"{key} {spec!r} is not an import path module:attr (e.g. mypkg.models:MyNet)")
    module_name, _, attr = spec.partition(":")
    _cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UserError(f"{key} {spec}: no module named {exc.name!r} (looked in PYTHONPATH and the current "
                            f"directory {os.getcwd()}; put the folder that holds it on PYTHONPATH)") from None
        raise UserError(f"{key} {spec}: importing {module_name} failed: {_describe(exc)}") from None
    except Exception as exc:  # the user's module itself raised (SyntaxError, ImportError, ...)
        raise UserError(f"{key} {spec}: importing {module_name} failed: {_describe(exc)}") from None
    obj = module
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            where = getattr(module, "__file__", None) or module_name
            raise UserError(f"{key} {spec}: {owner} has no attribute {part!r} ({where})") from None
    return obj


def call_factory(factory, spec: str, key: str, args: tuple, options: dict, section: str):
    """``factory(*args, **options)``, after checking that the options fit its signature.

    A missing required parameter or an unknown option is a ConfigError naming the config key
    (``model.width``); an exception raised by the user's code is a UserError with its type,
    message and the file and line it came from. UserErrors the code raises pass unchanged.
    """
    check_call(factory, spec, key, args, options, section)
    try:
        return factory(*args, **options)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{key} {spec}: {_describe(exc)}") from None


def check_call(factory, spec: str, key: str, args: tuple, options: dict, section: str) -> None:
    """ConfigError unless ``factory(*args, **options)`` fits the factory's signature (without calling it)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: calling it will tell
        return
    try:
        signature.bind(*args, **options)
    except TypeError as exc:
        raise ConfigError(_signature_problem(exc, spec, key, signature, section, len(args))) from None


def accepts(factory, parameter: str) -> bool:
    """True when `factory` has a parameter named `parameter` (or takes **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return parameter in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _signature_problem(exc: TypeError, spec: str, key: str, signature, section: str, nargs: int) -> str:
    text = str(exc)
    name = text.split("'")[1] if text.count("'") >= 2 else None
    if "missing a required argument" in text and name is not None:
        positional = [p for p in signature.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if any(p.name == name for p in positional[:nargs]):
            return f"{key} {spec}: must accept {nargs} positional arguments, its signature is {signature}"
        return f"{key} {spec}: missing parameter {section}.{name} (its signature is {signature})"
    if "unexpected keyword argument" in text and name is not None:
        return f"{key} {spec}: {section}.{name} is not one of its parameters (its signature is {signature})"
    if "too many positional arguments" in text:
        return f"{key} {spec}: must accept {nargs} positional arguments, its signature is {signature}"
    if "multiple values for argument" in text and name is not None:
        return f"{key} {spec}: {section}.{name} is already given positionally (its signature is {signature})"
    return f"{key} {spec}: {text} (its signature is {signature})"


def _describe(exc: BaseException) -> str:
    """``Type: message (file:line)``, on one line, the location being the innermost frame."""
    message = " ".join(str(exc).split()) or "(no message)"
    if len(message) > 300:
        message = message[:297] + "..."
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}:{exc.lineno})"
        message = " ".join((exc.msg or "").split())
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        # the innermost frame in the user's code: not in asyncps, numpy or the standard library
        own = [f for f in frames if os.path.isabs(f.filename) and not f.filename.startswith(_package_dirs())
               and "site-packages" not in f.filename]
        if own or frames:
            frame = (own or frames)[-1]
            where = f" ({frame.filename}:{frame.lineno})"
    return f"{type(exc).__name__}: {message}{where}"


def _package_dirs() -> tuple[str, ...]:
    """The folders of asyncps's own packages (role folders are siblings in an editable install)."""
    import importlib.util

    dirs = {os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(os.__file__) + os.sep, "<frozen"}
    for sub in ("worker", "cli", "chief", "ps", "protos"):
        spec = importlib.util.find_spec(f"asyncps.{sub}")
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.add(os.path.abspath(location) + os.sep)
    return tuple(dirs)


def _cwd_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
