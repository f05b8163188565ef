"""Triton's interpreter, made to patch triton.language once per kernel launch instead of once per helper call.

Under TRITON_INTERPRET=1 a kernel launch (`GridExecutor.__call__`) replaces triton.language's builtins with host
implementations for the launch (`_patch_lang`) and restores them after it. Every call of a @triton.jit helper
from inside the kernel (`InterpretedFunction.__call__`) runs `_patch_lang` again — `inspect.getmembers` over
tl, tl.tensor, tl.math and tl.core.tensor_descriptor_base — and drops the result: with the launch's patches in
place that finds nothing left to patch and sets a few attributes to copies of what they hold. kdops' kernels
are built from helpers (`kernels/passes.py`, `kernels/divergences.py`), called per tile and per program, so
this repetition was about 45 % of an interpreted test's time (42 000 calls in a 13 s test).

`cache_language_patches()` makes a helper call's `_patch_lang` a no-op where a patch earlier in the same launch
covered the helper's triton.language modules (tl, or tl.core for triton.language's own helpers such as tl.zeros:
Triton patches tl.core on their first call and never restores it); everything else goes to Triton's own function.
It is only a speed-up of the tests: if this Triton's interpreter does not have that structure it changes nothing.
"""

from __future__ import annotations

import inspect


class _Nothing:
    """The scope of a patch that was not needed: nothing to restore."""

    def restore(self) -> None:
        pass


def cache_language_patches() -> bool:
    """Install the cache (once per process); True where it is installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or executor is None:
        return False
    if getattr(original, "kdops_cached", False):
        return True
    launch = executor.__call__
    languages = (tl, tl.core)
    launches: list = []  # per launch in progress: the ids of the modules patched so far in it (None: none yet)

    def run_launch(self, *args, **kwargs):
        launches.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    modules_of: dict = {}  # function -> the ids of the language modules in its globals

    def patch_lang(fn):
        used = modules_of.get(fn)
        if used is None:
            used = modules_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                              if inspect.ismodule(v) and v in languages)
        if used and launches and launches[-1] is not None and used <= launches[-1]:
            return _Nothing()  # a helper called inside a launch whose patches cover its modules
        # (a helper that sees no triton.language module goes to Triton, which refuses it)
        scope = original(fn)
        if launches:  # the launch's own patch (its first), or a helper's, which Triton never restores: in place
            launches[-1] = used | (launches[-1] or frozenset())  # for the rest of the launch either way
        return scope

    patch_lang.kdops_cached = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = run_launch
    return True
