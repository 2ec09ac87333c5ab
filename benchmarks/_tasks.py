"""Task functions for benchmarks/bench.py.

They live in an importable module (not in ``__main__``) so that every peer -- including
ProcessPoolExecutor with the spawn method, Dask and Ray -- can import them by name in its workers.
bench.py puts this folder on PYTHONPATH before it starts any system, so worker processes inherit it.
"""
import os
import time


def noop(x=None):
    """The no-op task: returns its argument."""
    return x


def busy(loops):
    """Pure-Python busy loop (holds the GIL, never sleeps). Returns a checksum."""
    acc = 0
    for i in range(loops):
        acc += i
    return acc


def busy_timed(loops):
    """``busy`` that also reports how long it ran inside the worker (perf_counter seconds)."""
    t = time.perf_counter()
    busy(loops)
    return time.perf_counter() - t


def payload_len(data):
    """Receives a large bytes argument; returns its length (a tiny result)."""
    return len(data)


def wait_for_file(path, timeout=120.0):
    """Blocks a worker until ``path`` exists (or ``timeout`` s pass). Used to keep futures pending."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)


def block_on_gate(gate, started_dir, timeout=120.0):
    """Announces itself (a file in ``started_dir``), then blocks its worker until ``gate`` exists."""
    try:
        open(os.path.join(started_dir, f"{os.getpid()}-{time.monotonic_ns()}"), "w").close()
    except OSError:
        pass
    return wait_for_file(gate, timeout)


def calibrate_busy(target_s=0.100, rounds=5):
    """Loop count for which ``busy`` takes about ``target_s`` seconds in this process."""
    loops = 200_000
    # grow until one run takes >= 20 ms, then scale and refine
    while True:
        t = time.perf_counter()
        busy(loops)
        dt = time.perf_counter() - t
        if dt >= 0.02:
            break
        loops *= 2
    for _ in range(rounds):
        loops = max(1, int(loops * target_s / dt))
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            busy(loops)
            samples.append(time.perf_counter() - t)
        dt = sorted(samples)[2]
        if abs(dt - target_s) / target_s < 0.02:
            break
    return loops
