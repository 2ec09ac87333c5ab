"""Pyro5 calls on the hot path without Pyro5's generic machinery: the same wire format, fewer steps.

::

    client: SecureProxy._pyroInvoke ──▶ invoke(): marshal.dumps((obj, method, args, kwargs)), one header
                                          ──▶ send ─── node: SecureDaemon.handleRequest ──▶ serve_one():
                                                         header, payload, the exposed method, the reply
            ◀── marshal.loads(reply) ◀── one header + marshal.dumps(result) ◀──────────────────┘
    anything else (oneway, batch, annotations, compression, correlation ids, another serializer, an
    unknown object or method, arguments marshal cannot carry) ──▶ Pyro5's own code, unchanged

Pyro5 spends ~80 µs of server CPU and ~60-70 µs of client CPU on one call, most of it outside the
method: a ``uuid4`` correlation id and a ``getpeername`` per request, message objects, a walk over the
arguments, annotation dictionaries.  A lone task costs one call, every hop of a chain two, so this is
latency (#15).  What crosses is byte for byte what Pyro5 sends (a Pyro5 peer on the other side reads
it), and every check stays: message sizes against ``MAX_MESSAGE_SIZE``, exposure and private names
(``Pyro5.server._get_attribute``), the connection's scope (``Daemon.objectsById``), errors back with
their remote traceback.  Only connections that passed the pydist hello get here.
"""
from __future__ import annotations

import inspect
import marshal
import struct
from typing import Any, Callable, Optional

import Pyro5.client
import Pyro5.errors as errors
import Pyro5.server
from Pyro5 import config as pyro_config
from Pyro5 import protocol, serializers
from Pyro5.callcontext import current_context

__all__ = ["serve_one", "invoke"]

_HDR = struct.Struct(protocol._header_format)
_VERSION = protocol.PROTOCOL_VERSION
_MAGIC = protocol._magic_number
_NO_CORR = b"\0" * 16
_MARSHAL = serializers.MarshalSerializer.serializer_id
#: result types sent as they are (anything else goes by Pyro5's iterator check first)
_PLAIN = frozenset({list, tuple, dict, str, bytes, int, float, bool, type(None), set, frozenset})
#: argument types marshal carries as they are (Pyro5 converts anything else first: the slow path)
_ARGS = _PLAIN | {bytearray, complex}


def _header(msgtype: int, flags: int, seq: int, size: int) -> bytes:
    return _HDR.pack(b"PYRO", _VERSION, msgtype, _MARSHAL, flags, seq, size, 0, _NO_CORR, 0, _MAGIC)


def _check(tag: bytes, ver: int, magic: int, size: int) -> None:
    if tag != b"PYRO" or ver != _VERSION or magic != _MAGIC:
        raise errors.ProtocolError("invalid message or protocol version")
    if size > pyro_config.MAX_MESSAGE_SIZE:
        raise errors.ProtocolError(f"message too large ({size:d}, max={pyro_config.MAX_MESSAGE_SIZE:d})")


# ------------------------------------------------------------------------------------------ node side
def serve_one(daemon: Pyro5.server.Daemon, conn, slow: Callable[[Any], None]) -> None:
    """Read one request from ``conn`` (a served connection with an ``unread`` buffer) and answer it; what
    this path does not handle is put back and given to ``slow`` (Pyro5's ``handleRequest``)."""
    header = conn.recv(_HDR.size)
    tag, ver, mtype, ser_id, flags, seq, dsize, asize, _corr, _res, magic = _HDR.unpack(header)
    _check(tag, ver, magic, dsize + asize)
    payload = conn.recv(dsize + asize) if dsize + asize else b""
    call = None
    if mtype == protocol.MSG_INVOKE and not flags and not asize and ser_id == _MARSHAL:
        call = _lookup(daemon, payload)
    if call is None:
        conn.unread = header + payload
        slow(conn)
        return
    fn, vargs, kwargs = call
    ctx = current_context
    ctx.client = conn
    ctx.client_sock_addr = conn.peer
    ctx.seq, ctx.annotations, ctx.msg_flags, ctx.serializer_id = seq, {}, 0, ser_id
    ctx.correlation_id = None
    ctx.response_annotations = {}
    ser = serializers.serializers_by_id[ser_id]
    try:
        data = fn(*vargs, **kwargs)
        if type(data) not in _PLAIN:
            stream, data = daemon._streamResponse(data, conn)
            if stream:   # as Pyro5 answers a method that returned an iterator
                daemon._sendExceptionResponse(conn, seq, ser_id, errors.ProtocolError("result of call is an iterator"),
                                              None, annotations={"STRM": data.encode()} if data else {},
                                              flags=protocol.FLAGS_ITEMSTREAMRESULT)
                return
        body = ser.dumps(data)
    except Exception as xv:   # the method's error (or its result's) goes back with its remote traceback
        daemon.methodcall_error_handler(daemon, conn.peer, fn, vargs, kwargs, xv)
        daemon._sendExceptionResponse(conn, seq, ser_id, xv,
                                      errors.format_traceback(detailed=pyro_config.DETAILED_TRACEBACK))
        if isinstance(xv, (errors.CommunicationError, errors.SecurityError)):
            raise
        return
    annotations = ctx.response_annotations or daemon.annotations()
    if annotations:   # a method set reply annotations: Pyro5 builds that reply
        msg = protocol.SendingMessage(protocol.MSG_RESULT, 0, seq, ser_id, body, annotations=dict(annotations))
        conn.send(msg.data)
        return
    if len(body) > pyro_config.MAX_MESSAGE_SIZE:
        raise errors.ProtocolError(f"message too large ({len(body):d}, max={pyro_config.MAX_MESSAGE_SIZE:d})")
    conn.send(_header(protocol.MSG_RESULT, 0, seq, len(body)) + body)


def _lookup(daemon: Pyro5.server.Daemon, payload: bytes) -> Optional[tuple]:
    """``(bound method, args, kwargs)`` of a plain call to an exposed method, else None (Pyro5 answers)."""
    try:
        obj_id, method, vargs, kwargs = marshal.loads(payload)
    except Exception:   # noqa: BLE001 - Pyro5 reads it again and answers the error
        return None
    if type(method) is not str or method.startswith("_") or type(vargs) not in (list, tuple) \
            or type(kwargs) is not dict:
        return None
    obj = Pyro5.server._unpack_weakref(daemon.objectsById.get(obj_id))   # the connection's scope applies
    if obj is None or inspect.isclass(obj):
        return None
    try:
        fn = Pyro5.server._get_attribute(obj, method)   # exposed, not private
    except AttributeError:
        return None
    return fn, vargs, kwargs


# ---------------------------------------------------------------------------------------- client side
def invoke(proxy, conn, methodname: str, vargs: tuple, kwargs: dict, object_id: str) -> Any:
    """One call on ``proxy``'s open connection ``conn`` (the caller checked that this path applies:
    marshal serializer, no oneway, no annotations, no compression, no correlation id)."""
    for v in vargs:
        if type(v) not in _ARGS:
            return NOT_FAST
    if kwargs and any(type(v) not in _ARGS for v in kwargs.values()):
        return NOT_FAST
    try:
        data = marshal.dumps((object_id, methodname, list(vargs), kwargs))
    except ValueError:   # something inside marshal cannot carry: Pyro5 converts it
        return NOT_FAST
    if len(data) > pyro_config.MAX_MESSAGE_SIZE:
        raise errors.ProtocolError(f"message too large ({len(data):d}, max={pyro_config.MAX_MESSAGE_SIZE:d})")
    seq = proxy._pyroSeq = (proxy._pyroSeq + 1) & 0xffff
    current_context.response_annotations = {}
    try:
        conn.send(_header(protocol.MSG_INVOKE, 0, seq, len(data)) + data)
        header = conn.recv(_HDR.size)
        tag, ver, mtype, ser_id, flags, rseq, dsize, asize, _corr, _res, magic = _HDR.unpack(header)
        _check(tag, ver, magic, dsize + asize)
        payload = conn.recv(dsize + asize) if dsize + asize else b""
        if mtype != protocol.MSG_RESULT:
            raise errors.ProtocolError(f"invalid msg type {mtype:d} received (expected: {protocol.MSG_RESULT:d})")
        if rseq != seq:
            raise errors.ProtocolError(f"invoke: reply sequence out of sync, got {rseq:d} expected {seq:d}")
        if ser_id != _MARSHAL:
            raise errors.SerializeError(f"invalid serializer in response: {ser_id:d}")
        if asize or flags & (protocol.FLAGS_COMPRESSED | protocol.FLAGS_ITEMSTREAMRESULT):
            msg = protocol.ReceivingMessage(header, payload)
            if msg.annotations:
                current_context.response_annotations = msg.annotations
            if msg.flags & protocol.FLAGS_ITEMSTREAMRESULT:   # as Pyro5's proxy: an iterator on the node
                stream = bytes(msg.annotations.get("STRM", b"")).decode()
                if not stream:
                    raise errors.ProtocolError("result of call is an iterator, but the server is not "
                                               "configured to allow streaming")
                return Pyro5.client._StreamResultIterator(stream, proxy)
            payload, flags = msg.data, msg.flags
        result = serializers.serializers_by_id[_MARSHAL].loads(payload)
    except (errors.CommunicationError, KeyboardInterrupt):
        proxy._pyroRelease()   # half a reply may be on the wire: never read it as the next call's
        raise
    if flags & protocol.FLAGS_EXCEPTION:
        try:
            raise result
        finally:
            del result
    return result


class _NotFast:
    def __repr__(self) -> str:
        return "<not for the fast path>"


#: what ``invoke`` returns when the call must go through Pyro5 (nothing was sent)
NOT_FAST: Any = _NotFast()
