"""pydist: distribute Python functions and scripts over the computers of a network.

The public face (import everything from here)::

    from pydist import ClusterExecutor, LocalCluster, task_context, ScriptResult
    from pydist import PydistError, ClusterUnavailable, WorkerLost, AuthenticationError, ...

Names load lazily, so a worker process that only needs ``pydist.workers`` does not import Pyro5.
"""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "ClusterExecutor": "executor",
    "PydistFuture": "executor",
    "AsyncClusterExecutor": "aio",
    "LocalCluster": "cluster",
    "task_context": "workers",
    "TaskContext": "workers",
    "ScriptResult": "scripts",
    "ScriptTimeout": "scripts",
    "NodeConfig": "config",
    "ClientConfig": "config",
    "BundleInfo": "codesync",
    "Comm": "comm",
    "CommTimeout": "comm",
    "ANY_SOURCE": "comm",
    "ANY_TAG": "comm",
    "Status": "comm",
    "Request": "comm",
    "TaskGroup": "taskgroup",
    "progress": "progressbar",
}
_ERRORS = ("PydistError", "ClusterUnavailable", "BrokenCluster", "VersionMismatch", "AuthenticationError",
           "ConfigError", "TaskError", "SerializationError", "DeserializationError", "WorkerLost",
           "MemoryLimitExceeded", "NodeLost", "RemoteError", "CodeSyncError", "BundleTooLarge", "UnsafeArchive",
           "BundleNotFound", "ProtocolError", "GroupAborted", "MessageTooLarge", "ResourceLimit")
for _e in _ERRORS:
    _EXPORTS[_e] = "errors"

__all__ = sorted(_EXPORTS) + ["__version__", "comm"]


def __getattr__(name: str):
    if name == "comm":   # the module; calling it (pydist.comm()) gives the current rank's Comm
        import importlib

        return importlib.import_module("pydist.comm")
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'pydist' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"pydist.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
