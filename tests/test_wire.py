"""Records and frames: pickling helpers, out-of-band buffers, pipe frames (no processes but a pipe)."""
import hashlib
import os
import threading

import pytest

from pydist import wire
from pydist.errors import RemoteError, SerializationError, TaskError

pytestmark = pytest.mark.timeout(60)


def test_plain_and_cloudpickled_calls_round_trip():
    small = wire.dumps_call((1, "a", [2.0]), {})
    assert isinstance(small, bytes) and wire.loads_payload(small) == ((1, "a", [2.0]), None)
    fn_arg = wire.dumps_call((lambda x: x + 1,), {"k": 3})
    (f,), kw = wire.loads_payload(fn_arg)
    assert f(1) == 2 and kw == {"k": 3}


def test_large_bytes_travel_out_of_band_and_come_back_as_bytes():
    big = os.urandom(wire.OOB_MIN * 3)
    payload = wire.dumps_call((big, 7), {"also": [big]})
    assert isinstance(payload, list) and len(payload) == 3          # pickle + two buffers, no copy inside
    assert len(payload[0]) < 1000
    (a, n), kw = wire.loads_payload([bytes(p) for p in payload])
    assert type(a) is bytes and a == big and n == 7 and kw["also"][0] == big
    assert wire.payload_size(payload) > 2 * len(big)


def test_unpicklable_argument_names_the_object():
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="lock"):
        wire.dumps_call((lock,), {})


def test_exception_with_odd_init_keeps_message_and_traceback():
    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"odd {a}")

    try:
        raise Odd(1, 2)
    except Odd as exc:
        blob = wire.dumps_exception(exc)
    err = wire.loads_exception(blob)
    assert isinstance(err, TaskError) and "odd 1" in str(err)
    assert isinstance(err.__cause__, RemoteError) and "raise Odd(1, 2)" in err.__cause__.tb


@pytest.mark.parametrize("size", [0, 10, 70_000, wire.OOB_MIN * 5 + 3])
def test_frames_over_a_pipe_keep_large_buffers_intact(size):
    data = os.urandom(size)
    rec = ("t.1", "f", wire.frame_payload(data), None, 0, [], 0, "c")
    r, w = os.pipe()
    out = {}

    def reader():
        out["msg"] = wire.read_frame(r)

    t = threading.Thread(target=reader)
    t.start()
    parts = wire.frame(("run", {}, [rec]), big=True)
    while parts:
        parts = wire.skip(parts, os.writev(w, parts))
    t.join(10)
    os.close(r)
    os.close(w)
    got = out["msg"][2][0][2]
    assert hashlib.sha256(bytes(got)).digest() == hashlib.sha256(data).digest()


def test_closed_pipe_is_eof():
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(EOFError):
        wire.read_frame(r)
    os.close(r)


# -- every payload size through the real frame path (the node's wrapping, the worker's reading) -----------
def _through_pipe(payload):
    """What a worker gets for ``payload`` after the node framed it as it does (wire.frame_payload).
    The node received it over Pyro5's marshal, so the list form's parts are bytes by then."""
    if isinstance(payload, list):
        payload = [bytes(p) for p in payload]
    big = isinstance(payload, list) or len(payload) >= wire.OOB_MIN
    rec = ("t.1", "f", wire.frame_payload(payload) if big else payload, None, 0, [], 0, "c")
    r, w = os.pipe()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("msg", wire.read_frame(r)), daemon=True)
    t.start()
    try:
        parts = wire.frame(("run", {}, [rec]), big=big)
        while parts:
            parts = wire.skip(parts, os.writev(w, parts))
        t.join(30)
    finally:
        os.close(w)   # a failed write ends the reader (EOF) instead of leaving it blocked
        t.join(30)
        os.close(r)
    return out["msg"][2][0][2]


def _sizes_around(n):
    return [n - 1, n, n + 1]


@pytest.mark.parametrize("n", [1000] + _sizes_around(wire.OOB_MIN) + _sizes_around(1 << 20) + [5 << 20])
@pytest.mark.parametrize("kind", ["str", "list", "dict", "nested", "bytes-in-tuple", "bytearray"])
def test_non_bytes_arguments_of_any_size_reach_the_worker(kind, n):
    """Issue 9 item 1: a pickle >= OOB_MIN that is not top-level bytes came back as a memoryview and
    was read as the list form ('a bytes-like object is required, not int')."""
    if kind == "str":
        obj = "x" * n
    elif kind == "list":
        obj = list(range(n // 5))
    elif kind == "dict":
        obj = {i: i for i in range(n // 10)}
    elif kind == "nested":
        obj = {"a": ["y" * (n // 2)], "b": ("z" * (n // 2),)}
    elif kind == "bytes-in-tuple":
        obj = (os.urandom(n // 2), os.urandom(n // 2))
    else:
        obj = bytearray(os.urandom(n))
    payload = wire.dumps_call((obj,), {})
    args, kwargs = wire.loads_payload(_through_pipe(payload))
    assert args == (obj,) and not kwargs


@pytest.mark.parametrize("n", _sizes_around(wire.OOB_MIN) + [3 << 20])
def test_map_chunk_payload_of_any_size_reaches_the_worker(n):
    calls = [("s" * (n // 4),)] * 4
    payload = wire.dumps(calls, "map arguments")
    assert wire.loads_payload(_through_pipe(payload)) == calls


def test_numpy_arrays_of_any_size_reach_the_worker():
    np = pytest.importorskip("numpy")
    for n in (10, wire.OOB_MIN // 8, wire.OOB_MIN // 8 + 1, 1 << 18):
        a = np.arange(n, dtype=np.float64)
        (b,), _ = wire.loads_payload(_through_pipe(wire.dumps_call((a,), {})))
        assert (a == b).all() and b.dtype == a.dtype
