"""Sending a function to spawned processes that cannot import it: by its code, not by its name.

    payload = dumps((fn, args))        # in the parent, before any process starts
    fn, args = pickle.loads(payload)   # in each child

pickle sends a function by its name (module and qualified name), and the child
imports it. That fails for a function defined in a notebook, in `python -` or
`python -c`: it lives in `__main__`, which a spawned child cannot import (a
notebook's has no file; `python -` names its file "<stdin>", and spawn's
attempt to run it again kills the child before it runs anything). Such a
function, and a lambda or a nested function anywhere, goes by value: its code
(marshal, the same interpreter at both ends), its defaults, its closure and
the globals its code names, each pickled the same way (modules by name,
functions by name where the child can import them). In the child it is rebuilt
over the `__main__` module there (or over its own module, imported, when that
is not `__main__`), so the functions sent share one namespace and may call one
another, or themselves.

Classes defined in such a `__main__` are not sent: a class's methods,
descriptors and metaclass have no general by-value form here. A function
that names one is refused in the parent, before any process starts, with the
fix (define the class in a module the processes import). Annotations are not
sent.
"""

from __future__ import annotations

import contextlib
import dis
import importlib
import io
import marshal
import os
import pickle
import sys
import types
from multiprocessing import process as mp_process


def main_importable() -> bool:
    """Whether a spawned process can import the parent's __main__: `python -m name`, or a script's file."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.isfile(os.path.join(mp_process.ORIGINAL_DIR or "", path))


@contextlib.contextmanager
def main_hidden():
    """Inside, spawn sees a bare __main__ when the real one cannot be imported (module docstring): it then runs
    no file in the child, and what the child needs of __main__ travels in the payload."""
    if main_importable():
        yield
        return
    real = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = real


def _by_name(fn: types.FunctionType) -> bool:
    """Whether the child finds fn by its module and qualified name (what pickle does by default)."""
    module = fn.__module__
    if module is None or (module == "__main__" and not main_importable()):
        return False
    owner = sys.modules.get(module)
    for part in fn.__qualname__.split("."):
        owner = getattr(owner, part, None)
    return owner is fn


GLOBAL_OPS = ("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME")  # LOAD_NAME: a class body's globals


def _names(code: types.CodeType) -> set[str]:
    """The global names that code and the code nested in it use (not attribute names: x.model sends no `model`)."""
    found = {ins.argval for ins in dis.get_instructions(code) if ins.opname in GLOBAL_OPS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _names(const)
    return found


def _cell(cell) -> tuple[bool, object]:
    try:
        return True, cell.cell_contents
    except ValueError:  # a cell not assigned yet (a nested function's later name)
        return False, None


def _function(fn: types.FunctionType) -> tuple:
    """fn's reduction: a skeleton (code, home module, names, empty cells), then its state, set once pickle has
    memoized the skeleton, so that a function that reaches itself (recursion) pickles."""
    home = fn.__module__ or "__main__"
    shipped = {}
    if home == "__main__":  # the child's __main__ does not have the parent's globals: send those the code names
        shipped = {name: fn.__globals__[name] for name in sorted(_names(fn.__code__))
                   if name in fn.__globals__ and not (name.startswith("__") and name.endswith("__"))}
    cells = tuple(_cell(c) for c in fn.__closure__ or ())
    state = {"globals": shipped, "defaults": fn.__defaults__, "kwdefaults": fn.__kwdefaults__, "cells": cells,
             "dict": dict(fn.__dict__), "module": fn.__module__, "doc": fn.__doc__}
    return make_function, (fn.__code__, home, fn.__name__, fn.__qualname__, len(cells)), state, None, None, \
        fill_function


def make_function(code: types.CodeType, home: str, name: str, qualname: str, cells: int) -> types.FunctionType:
    """In the child: the function over its home module's namespace, its closure's cells still empty."""
    namespace = vars(importlib.import_module(home))  # "__main__": the child's own, already in sys.modules
    closure = tuple(types.CellType() for _ in range(cells)) or None
    fn = types.FunctionType(code, namespace, name, None, closure)
    fn.__qualname__ = qualname
    return fn


def fill_function(fn: types.FunctionType, state: dict) -> None:
    """In the child: the globals, defaults, closure and attributes that `_function` sent."""
    fn.__globals__.update(state["globals"])
    fn.__defaults__, fn.__kwdefaults__ = state["defaults"], state["kwdefaults"]
    for cell, (filled, value) in zip(fn.__closure__ or (), state["cells"]):
        if filled:
            cell.cell_contents = value
    fn.__dict__.update(state["dict"])
    fn.__module__, fn.__doc__ = state["module"], state["doc"]


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType) and not _by_name(obj):
            return _function(obj)
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (obj.__name__,)
        if isinstance(obj, types.CodeType):
            return marshal.loads, (marshal.dumps(obj),)
        if isinstance(obj, type) and obj.__module__ == "__main__" and not main_importable():
            raise pickle.PicklingError(
                f"class {obj.__qualname__} is defined in __main__ (a notebook, `python -` or `python -c`), which "
                f"the processes cannot import; define it in a module they import (a .py file beside the notebook "
                f"or script) and import it from there")
        return NotImplemented


def dumps(obj) -> bytes:
    """obj pickled for a spawned child: functions it cannot import by name go by value (module docstring)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()
