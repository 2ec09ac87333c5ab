"""Every exception pydist raises, in one small hierarchy.

::

    PydistError
     ├── ClusterUnavailable        no node answers at the address / name server
     │    └── BrokenCluster        (also a BrokenProcessPool) the node died under us
     ├── VersionMismatch           client and node would not understand each other's pickles
     ├── AuthenticationError       the other side does not know the cluster secret
     ├── ConfigError               a setting is invalid (names the setting and how to fix it)
     ├── TaskError                 a task could not be run as asked
     │    ├── SerializationError   (also a pickle.PicklingError) the function, an argument or a result
     │    │    │                   cannot be pickled
     │    │    └── DeserializationError  (also pickle.UnpicklingError and BrokenProcessPool) an argument
     │    │                        or a result cannot be unpickled where it arrived
     │    ├── WorkerLost           (also a BrokenProcessPool) the worker process running the task died
     │    │    └── MemoryLimitExceeded  ... restarted by its node: over ``--memory-limit``
     │    ├── NodeLost             (also a BrokenProcessPool) the node holding the task went away and it
     │    │                        could not be re-placed
     │    ├── GroupAborted         a rank of the task's group failed: the whole group stopped
     │    └── RemoteError          carrier of a remote traceback (set as ``__cause__``)
     ├── CodeSyncError             uploading or installing a code bundle failed
     │    ├── BundleTooLarge
     │    ├── UnsafeArchive        an archive member escapes its folder (absolute, ``..``, link)
     │    └── BundleNotFound       a task names a bundle no node has
     ├── ResourceLimit             a node refused work over one of its limits (names the limit and its flag)
     ├── ProtocolError             a peer sent something that is not a pydist message
     └── MessageTooLarge           (also a ValueError) a group message over the group's size limit

Messages say what went wrong and what to do about it.

Where ``ProcessPoolExecutor`` raises a standard type, the pydist error is *also* that type, so code
written for PPE catches it: a lost worker or node is a ``concurrent.futures.process.BrokenProcessPool``
(PPE's pool breaks; pydist's heals, and only the futures concerned fail), a pickling failure a
``pickle.PicklingError``, an argument or result that cannot be unpickled on arrival both a
``pickle.UnpicklingError`` and a ``BrokenProcessPool`` (what PPE reports for it).
"""
from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool


class PydistError(Exception):
    """Base class of every pydist error."""


class ClusterUnavailable(PydistError):
    """No pydist node answers at the given address (or the name server has none)."""


class BrokenCluster(ClusterUnavailable, BrokenProcessPool):
    """The node this executor talks to died or went away; pending futures failed with this.
    Also a ``BrokenProcessPool`` (hence a ``concurrent.futures.BrokenExecutor``)."""


class VersionMismatch(PydistError):
    """Client and node run pydist/Python/cloudpickle versions whose pickles are not compatible."""


class AuthenticationError(PydistError):
    """The peer does not prove knowledge of the cluster secret (or we do not have it)."""


class ConfigError(PydistError, ValueError):
    """A setting has an invalid value."""


class TaskError(PydistError):
    """A task could not be run as asked."""


class SerializationError(TaskError, pickle.PicklingError):
    """A function, argument or result could not be pickled (also a ``pickle.PicklingError``)."""


class DeserializationError(SerializationError, pickle.UnpicklingError, BrokenProcessPool):
    """A task's function, arguments or result could not be unpickled where they arrived (worker or
    client).  Also a ``pickle.UnpicklingError`` and, as ``ProcessPoolExecutor`` reports this case, a
    ``BrokenProcessPool``; unlike PPE's pool, the executor stays usable."""


class WorkerLost(TaskError, BrokenProcessPool):
    """The worker process that ran the task died (segfault, ``os._exit``, killed).  Also a
    ``BrokenProcessPool``; the node starts a replacement and the executor stays usable."""


class MemoryLimitExceeded(WorkerLost):
    """The task's worker went over the node's per-worker memory limit (``--memory-limit``) and was
    restarted (instead of the OOM killer taking the node)."""


class NodeLost(TaskError, BrokenProcessPool):
    """The node that held the task went away (also a ``BrokenProcessPool``)."""


class GroupAborted(TaskError):
    """A task group stopped as a whole because one rank failed (raised, died, lost its node, called
    ``comm.abort``) or its client went away.  ``rank`` is the rank that failed (-1: none of them, e.g.
    the client), ``cause`` what happened; every other rank's blocked call raised this, and its
    ``__cause__`` is the failing rank's own exception (when there was one)."""

    def __init__(self, group: str = "", rank: int = -1, cause: str = "", cause_blob: bytes = b""):
        who = f"rank {rank} {cause}" if rank >= 0 else cause
        super().__init__(f"task group {group} aborted: {who}")
        self.group, self.rank, self.cause, self.cause_blob = group, rank, cause, cause_blob or b""
        self.remote_traceback = ""

    def __reduce__(self):
        return (type(self), (self.group, self.rank, self.cause, self.cause_blob))

    def _resolve_cause(self, tb: str, loads_exception) -> None:
        """Where the exception is read (client, rank): the failing rank's exception becomes the cause."""
        self.remote_traceback = tb
        if self.cause_blob:
            try:
                self.__cause__ = loads_exception(self.cause_blob)
            except Exception:
                pass


class MessageTooLarge(PydistError, ValueError):
    """A message between ranks is over the group's size limit (the home node's ``--max-message-size``)."""


class RemoteError(PydistError):
    """Holds the formatted remote traceback (``tb``, as ``concurrent.futures.process._RemoteTraceback``
    does); set as ``__cause__`` of re-raised task exceptions."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n" + self.tb


class CodeSyncError(PydistError):
    """Uploading or installing a code bundle failed."""


class BundleTooLarge(CodeSyncError):
    """A code directory is over the size limit."""


class UnsafeArchive(CodeSyncError):
    """A bundle archive has a member whose path escapes the target folder."""


class BundleNotFound(CodeSyncError):
    """A task names a code bundle that no reachable node has."""


class ProtocolError(PydistError):
    """A peer sent a message that is not a valid pydist message."""


class ResourceLimit(PydistError):
    """A node refused work that would take it over one of its limits (queued tasks, their bytes, uploads
    in progress, ...); the message names the limit and the flag that sets it.  Retry later or raise it."""
