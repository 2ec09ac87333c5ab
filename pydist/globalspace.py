"""One globals namespace per client and module on a worker, for functions pickled by value.

cloudpickle pickles a function of ``__main__`` (or of any module it pickles by value) with the globals
it names, and rebuilds it around a *fresh* dict each time ``cloudpickle.loads`` runs.  An initializer
that sets a global (a model loaded once per worker, a connection) and a task that reads it therefore
see two different dicts: the task reads the client's value (often ``None``).  With
``ProcessPoolExecutor`` both run in the worker's one ``__main__`` and share it.

Here every function a client's pickles rebuild for module ``M`` gets one dict, the same for that
client on that worker: ``ClientUnpickler`` swaps the dict cloudpickle made for it (its
``_make_function`` hook) and merges the globals each pickle carries into it (its
``_function_setstate`` hook) with one rule:

* a name the worker never got from this client, or whose value no code on the worker has rebound
  since the client last sent it, takes the value the client sends now (a redefined helper function,
  a changed constant: the client's latest wins, as loky's nested-functions test expects);
* a name that code on the worker rebound (``global MODEL; MODEL = load()`` in the initializer)
  keeps the worker's value; the client's stale copy is dropped.

Tasks of different clients never share a namespace.  Nothing here runs in the node or the client.
"""
from __future__ import annotations

import builtins
import pickle
import types
from typing import Any, Dict, Optional, Tuple

_CP_MODULES = ("cloudpickle.cloudpickle", "cloudpickle.cloudpickle_fast")
_MODULE_KEYS = ("__package__", "__name__", "__path__", "__file__")


class _Space:
    """A namespace and, per name, the object last taken from the client (to see worker rebinding)."""

    __slots__ = ("ns", "sent")

    def __init__(self) -> None:
        self.ns: Dict[str, Any] = {"__builtins__": builtins}
        self.sent: Dict[str, Any] = {}


class ClientSpaces:
    """The namespaces of one worker process: ``(client, module name) -> namespace``."""

    def __init__(self) -> None:
        self._spaces: Dict[Tuple[str, str], _Space] = {}
        self._by_id: Dict[int, _Space] = {}

    def space(self, client: str, module: str) -> _Space:
        key = (client, module)
        sp = self._spaces.get(key)
        if sp is None:
            sp = self._spaces[key] = _Space()
            self._by_id[id(sp.ns)] = sp
        return sp

    def of(self, ns: dict) -> Optional[_Space]:
        sp = self._by_id.get(id(ns))
        return sp if sp is not None and sp.ns is ns else None

    def forget(self, client: str) -> None:
        """Drop every namespace of ``client`` (it closed)."""
        for key in [k for k in self._spaces if k[0] == client]:
            sp = self._spaces.pop(key)
            self._by_id.pop(id(sp.ns), None)

    def loads(self, data, client: str, buffers=None) -> Any:
        """Unpickle ``data`` with this client's namespaces (see the module docstring)."""
        import io

        return ClientUnpickler(io.BytesIO(data) if not isinstance(data, io.IOBase) else data,
                               self, client, buffers=buffers).load()


class ClientUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that rebinds functions pickled by value to their client's namespace."""

    def __init__(self, file, spaces: ClientSpaces, client: str, buffers=None):
        super().__init__(file, buffers=buffers)
        self._spaces = spaces
        self._client = client

    def find_class(self, module: str, name: str) -> Any:
        if module == "pydist.sources" and name == "_load":
            return self._load_with_sources
        if module in _CP_MODULES:
            if name == "_make_function":
                return self._make_function
            if name == "_function_setstate":
                return self._function_setstate
        return super().find_class(module, name)

    def _load_with_sources(self, sources, blob):
        from .sources import register

        register(sources)
        return self._spaces.loads(blob, self._client)   # the inner pickle rebinds like the outer

    def _make_function(self, code, base_globals, name, argdefs, closure):
        module = base_globals.get("__name__")
        if not isinstance(module, str):
            base_globals["__builtins__"] = builtins
            return types.FunctionType(code, base_globals, name, argdefs, closure)
        sp = self._spaces.space(self._client, module)
        for k in _MODULE_KEYS:
            if k in base_globals:
                sp.ns.setdefault(k, base_globals[k])
        return types.FunctionType(code, sp.ns, name, argdefs, closure)

    def _function_setstate(self, obj, state) -> None:
        from cloudpickle.cloudpickle import _function_setstate

        sp = self._spaces.of(obj.__globals__)
        if sp is not None:
            st, slotstate = state
            sent = slotstate.get("__globals__") or {}
            take = {}
            for k, v in sent.items():
                if k in sp.ns and sp.ns[k] is not sp.sent.get(k, _MISSING):
                    continue   # rebound on the worker (or created there): the worker's value stays
                take[k] = v
                sp.sent[k] = v
            state = (st, dict(slotstate, __globals__=take))
        _function_setstate(obj, state)
        if sp is not None:
            obj.__globals__["__builtins__"] = builtins


_MISSING = object()
