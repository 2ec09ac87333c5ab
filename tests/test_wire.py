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
