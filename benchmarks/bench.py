#!/usr/bin/env python3
"""pydist side-by-side benchmark (issue #4).

    python benchmarks/bench.py                  # full run (3 repetitions, ~10-20 min on 2 cores)
    python benchmarks/bench.py --quick          # smoke run (1 repetition, small sizes, < 3 min)
    python benchmarks/bench.py --json out.json  # also write every repetition + machine info
    python benchmarks/bench.py --only pydist,ppe --workloads latency,map

Every workload runs the same code against each system through a small adapter (``System``:
start / submit / wait / map / shutdown). Systems: pydist (ClusterExecutor), ppe
(concurrent.futures.ProcessPoolExecutor), loky, dask (distributed), ray -- all with 2 workers.
A system whose package is missing is reported as "n/a", never a crash.

Isolation: the orchestrator (this process) never imports a system. Each measurement runs in a
fresh child interpreter (``bench.py --_child ...``): one per repetition for start-up / idle memory /
shutdown and for the pending-futures memory test, one per system for the throughput workloads.
Every child and everything it starts carries a marker in its environment; a child that exits or
is killed is followed by a sweep that reports (and terminates) any marked process left behind,
and the run ends by checking that none survive.
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import psutil  # noqa: E402

import _tasks  # noqa: E402

MARK = "PYDIST_BENCH_RUN"
SYSTEMS = ["pydist", "ppe", "loky", "dask", "ray"]
WORKERS = 2
MB = 1e6
DISTURBED = 0.10   # other processes' share of the machine above which a figure is starred
MIB = 1 << 20

FULL = dict(reps=3, n_big=1_000_000, big_chunk=1000, n_tasks=10_000, n_busy=40, busy_s=0.100, n_payload=20, payload_mib=16,
            chains=[1, 2, 4, 8], n_pending=100_000, lat_n=200, idle_s=1.0, t1_samples=7, task_timeout=120.0)
QUICK = dict(reps=1, n_big=100_000, big_chunk=1000, n_tasks=1_000, n_busy=8, busy_s=0.100, n_payload=4, payload_mib=4,
             chains=[1, 2], n_pending=10_000, lat_n=50, idle_s=0.5, t1_samples=5, task_timeout=30.0)

# workload groups: which kind of child process measures them
GROUPS = {
    "life": ["startup", "idle_rss", "shutdown"],
    "main": ["mainfn", "latency", "submit", "map", "efficiency", "payload"],  # + utilisation
    "pending": ["pending"],
    "cluster": ["tree", "chain"],          # pydist only
    "bigmap": ["bigmap"],                  # + its peak RSS rows; systems with a chunked map only
}
WORKLOAD_NAMES = [w for g in GROUPS.values() for w in g]
PYDIST_ONLY = {"tree", "chain"}
CHUNKED = {"pydist", "ppe", "loky"}       # systems whose map takes a chunksize (bigmap)
BIGMAP_ROWS = {"bigmap", "bigmap_rss_client", "bigmap_rss_node"}


def main_noop(x=None):
    """A task defined in __main__ (pydist must ship it by value)."""
    return ("main", x)


# --------------------------------------------------------------------------------------------
# helpers shared by orchestrator and children


def marked_processes(prefix, exclude=()):
    """Live processes whose environment carries MARK starting with ``prefix`` (excluding pids)."""
    out = []
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        if p.pid == me or p.pid in exclude:
            continue
        try:
            v = p.environ().get(MARK)
        except (psutil.Error, OSError):
            continue
        if v and v.startswith(prefix):
            out.append(p)
    return out


def is_helper(p):
    """multiprocessing/loky resource trackers: they exit by themselves when their parent exits."""
    try:
        return "resource_tracker" in " ".join(p.cmdline())
    except psutil.Error:
        return True


def descendants(prefix, helpers=True):
    """Children (recursive) of this process plus any re-parented process carrying our marker."""
    seen = {}
    try:
        for p in psutil.Process().children(recursive=True):
            seen[p.pid] = p
    except psutil.Error:
        pass
    for p in marked_processes(prefix):
        seen.setdefault(p.pid, p)
    procs = list(seen.values())
    return procs if helpers else [p for p in procs if not is_helper(p)]


def reap(procs, timeout=3.0):
    """Terminate, then kill, the given processes (ours, by pid). Returns descriptions of them."""
    desc = []
    for p in procs:
        try:
            desc.append(f"pid {p.pid} {' '.join(p.cmdline())[:120]}")
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return desc


def become_subreaper():
    """Linux: orphaned descendants are re-parented to this process instead of init, so they are
    swept by ``children(recursive=True)`` and, once reaped here, their CPU time counts as this run's
    own (not as "other load")."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def reap_zombies():
    """Collect exited children that nobody waits for (orphans handed to us as subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _cmdline(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def peak_rss(pid):
    """Peak resident set size (VmHWM) of a process, bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def rss_of(procs):
    total, detail = 0, []
    for p in procs:
        try:
            r = p.memory_info().rss
            total += r
            detail.append({"pid": p.pid, "name": p.name(), "rss_mb": round(r / MB, 1),
                           "cmd": " ".join(p.cmdline())[:100]})
        except psutil.Error:
            pass
    return total, detail


def err_text(e):
    return f"{type(e).__name__}: {e}"


def median(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------------------------
# system adapters (used only inside child processes)


class NotAvailable(Exception):
    pass


class System:
    name = "?"
    workers = WORKERS

    def import_(self):
        """Import the package; raise NotAvailable (or ImportError) when it is missing."""

    def start(self):
        raise NotImplementedError

    def submit(self, fn, *args):
        raise NotImplementedError

    def wait(self, fut, timeout=None):
        return fut.result(timeout=timeout)

    def map(self, fn, items, timeout=None):
        raise NotImplementedError

    def shutdown(self):
        raise NotImplementedError

    def cancel_and_shutdown(self, futs):
        for f in futs:
            f.cancel()
        self.shutdown()

    def version(self):
        return None


class FuturesSystem(System):
    """Any concurrent.futures.Executor."""
    ex = None

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def map(self, fn, items, timeout=None):
        return list(self.ex.map(fn, items, timeout=timeout, chunksize=1))

    def map_chunked(self, fn, items, chunksize, timeout=None):
        return list(self.ex.map(fn, items, timeout=timeout, chunksize=chunksize))

    def shutdown(self):
        if self.ex is not None:
            ex, self.ex = self.ex, None
            ex.shutdown(wait=True)

    def cancel_and_shutdown(self, futs):
        if self.ex is not None:
            ex, self.ex = self.ex, None
            try:
                ex.shutdown(wait=True, cancel_futures=True)
            except TypeError:
                for f in futs:
                    f.cancel()
                ex.shutdown(wait=True)


class PPE(FuturesSystem):
    name = "ppe"

    def import_(self):
        global cf
        import concurrent.futures as cf  # noqa: F401

    def start(self):
        self.ex = cf.ProcessPoolExecutor(max_workers=self.workers)

    def version(self):
        return f"python {platform.python_version()}"


class Loky(FuturesSystem):
    name = "loky"

    def import_(self):
        global loky
        import loky

    def start(self):
        self.ex = loky.ProcessPoolExecutor(max_workers=self.workers)

    def cancel_and_shutdown(self, futs):
        for f in futs:
            f.cancel()
        if self.ex is not None:
            ex, self.ex = self.ex, None
            ex.shutdown(wait=True, kill_workers=True)

    def version(self):
        return loky.__version__


class Pydist(FuturesSystem):
    name = "pydist"

    def import_(self):
        global pydist
        import pydist
        if not hasattr(pydist, "ClusterExecutor"):
            raise NotAvailable("pydist has no ClusterExecutor yet")

    def start(self):
        self.ex = pydist.ClusterExecutor(max_workers=self.workers)

    def version(self):
        return getattr(pydist, "__version__", None)


class Dask(System):
    name = "dask"

    def import_(self):
        global distributed
        import distributed

    def start(self):
        self.cluster = distributed.LocalCluster(
            n_workers=self.workers, threads_per_worker=1, processes=True,
            host="127.0.0.1", dashboard_address=None)
        self.client = distributed.Client(self.cluster)

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def map(self, fn, items, timeout=None):
        return self.client.gather(self.client.map(fn, list(items), pure=False))

    def shutdown(self):
        c, self.client = getattr(self, "client", None), None
        cl, self.cluster = getattr(self, "cluster", None), None
        try:
            if c is not None:
                c.close()
        finally:
            if cl is not None:
                cl.close()

    def cancel_and_shutdown(self, futs):
        if getattr(self, "client", None) is not None:
            try:
                self.client.cancel(futs)
            except Exception:
                pass
        self.shutdown()

    def version(self):
        return distributed.__version__


class Ray(System):
    name = "ray"

    def import_(self):
        global ray
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"   # no usage reporting: loopback only
        import ray
        self._remote = {}

    def start(self):
        ray.init(num_cpus=self.workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        self.started = True

    def _rf(self, fn):
        rf = self._remote.get(fn)
        if rf is None:
            rf = self._remote[fn] = ray.remote(fn)
        return rf

    def submit(self, fn, *args):
        return self._rf(fn).remote(*args)

    def wait(self, fut, timeout=None):
        return ray.get(fut, timeout=timeout)

    def map(self, fn, items, timeout=None):
        rf = self._rf(fn)
        return ray.get([rf.remote(x) for x in items], timeout=timeout)

    def shutdown(self):
        if getattr(self, "started", False):
            self.started = False
            ray.shutdown()

    def cancel_and_shutdown(self, futs):
        self.shutdown()

    def version(self):
        return ray.__version__


ADAPTERS = {"pydist": Pydist, "ppe": PPE, "loky": Loky, "dask": Dask, "ray": Ray}


# --------------------------------------------------------------------------------------------
# child process: measurements


class Child:
    def __init__(self, args):
        self.params = json.loads(args.params)
        self.out = args.out
        self.kind = args.child
        self.system_name = args.system
        self.marker = os.environ.get(MARK, "")
        self.data = {"kind": self.kind, "system": self.system_name, "results": {},
                     "errors": {}, "stray": []}
        self.save()

    def save(self):
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.out)

    def record(self, workload, value=None, extra=None, error=None):
        r = self.data["results"].setdefault(workload, {"reps": [], "extra": []})
        if error is not None:
            self.data["errors"][workload] = error
        else:
            r["reps"].append(value)
            r["extra"].append(extra or {})
        self.save()

    def run(self):
        P = self.params
        become_subreaper()
        t0 = time.perf_counter()
        sysobj = ADAPTERS[self.system_name]()
        try:
            sysobj.import_()
        except (ImportError, NotAvailable) as e:
            self.data["na"] = err_text(e)
            self.save()
            return
        t_import = time.perf_counter() - t0
        self.data["version"] = sysobj.version()
        try:
            getattr(self, "run_" + self.kind)(sysobj, P, t0, t_import)
        except Exception as e:
            self.data["errors"]["_child"] = err_text(e) + "\n" + traceback.format_exc()[-2000:]
        finally:
            try:
                sysobj.shutdown()
            except Exception as e:
                self.data["errors"].setdefault("_shutdown", err_text(e))
            left = descendants(self.marker, helpers=False)
            if left:
                _, alive = psutil.wait_procs(left, timeout=5.0)
                if alive:
                    self.data["stray"] = reap(alive)
            reap_zombies()
            self.save()

    # -- start-up, idle memory, shutdown: one fresh interpreter per repetition
    def run_life(self, s, P, t0, t_import):
        wl = P["workloads"]
        t1 = time.perf_counter()
        s.start()
        t2 = time.perf_counter()
        r = s.wait(s.submit(_tasks.noop, 1), timeout=P["task_timeout"])
        t3 = time.perf_counter()
        assert r == 1, r
        if "startup" in wl:
            self.record("startup", t3 - t0, {"import_s": t_import, "start_s": t2 - t1,
                                             "first_result_s": t3 - t2})
        # warm all workers, then rest
        futs = [s.submit(_tasks.noop, i) for i in range(4 * s.workers)]
        for f in futs:
            s.wait(f, timeout=P["task_timeout"])
        time.sleep(P["idle_s"])
        if "idle_rss" in wl:
            procs = descendants(self.marker)
            total, detail = rss_of(procs)
            # the target is "an idle node with its workers": pydist's name server is not a node
            ns = sum(d["rss_mb"] for d in detail if "pydist.cluster ns" in d["cmd"]) * MB
            self.record("idle_rss", (total - ns) / MB,
                        {"total_mb": total / MB, "name_server_mb": ns / MB, "processes": detail})
        t4 = time.perf_counter()
        s.shutdown()
        t5 = time.perf_counter()
        deadline = t5 + 10.0
        while descendants(self.marker, helpers=False) and time.perf_counter() < deadline:
            time.sleep(0.01)
        t6 = time.perf_counter()
        if "shutdown" in wl:
            self.record("shutdown", t5 - t4, {"until_no_child_process_s": t6 - t4})

    # -- 1,000,000 no-op tasks in chunks of 1,000: one fresh interpreter per system (peak RSS is its own)
    def run_bigmap(self, s, P, t0, t_import):
        to = P["task_timeout"]
        n = P["n_big"]
        s.start()
        if not hasattr(s, "map_chunked"):
            raise NotAvailable("no chunked map")
        s.map_chunked(_tasks.noop, range(10 * P["big_chunk"]), P["big_chunk"], timeout=to)
        for _ in range(P["reps"]):
            t = time.perf_counter()
            res = s.map_chunked(_tasks.noop, range(n), P["big_chunk"], timeout=to * 5)
            dt = time.perf_counter() - t
            ok = len(res) == n and res[-1] == n - 1
            del res
            assert ok, "wrong results"
            self.record("bigmap", n / dt, {"wall_s": dt})
        self.record("bigmap_rss_client", peak_rss(os.getpid()) / MB)
        procs = descendants(self.marker)
        nodes = [p for p in procs if "pydist.cli" in " ".join(_cmdline(p))]
        peaks = [peak_rss(p.pid) for p in (nodes or procs)]
        self.record("bigmap_rss_node", max(peaks) / MB if peaks else 0.0,
                    {"what": "node" if nodes else "largest worker"})

    # -- throughput workloads: one interpreter per system, repetitions inside
    def run_main(self, s, P, t0, t_import):
        wl = P["workloads"]
        to = P["task_timeout"]
        s.start()
        # warm-up: every worker has imported _tasks and run something
        futs = [s.submit(_tasks.noop, i) for i in range(8 * s.workers)]
        for f in futs:
            s.wait(f, timeout=to)
        s.map(_tasks.noop, range(50), timeout=to)
        if "mainfn" in wl:
            try:
                r = s.wait(s.submit(main_noop, 7), timeout=to)
                if r != ("main", 7):
                    raise AssertionError(f"wrong result {r!r}")
                self.record("mainfn", 1.0)
            except Exception as e:
                self.record("mainfn", error=err_text(e))
        n = P["n_tasks"]
        loops = P["busy_loops"]
        size = P["payload_mib"] * MIB
        payloads = []
        if "payload" in wl:
            base = os.urandom(size)
            payloads = [i.to_bytes(8, "little") + base[8:] for i in range(P["n_payload"])]
            del base
        broken = None
        for rep in range(P["reps"]):
            for w in ("latency", "submit", "map", "efficiency", "payload"):
                if w not in wl:
                    continue
                if broken:
                    self.record(w, error=f"skipped: system broken after {broken}")
                    continue
                try:
                    getattr(self, "w_" + w)(s, P, n, loops, payloads, to)
                except Exception as e:
                    self.record(w, error=err_text(e))
                    if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
                        broken = w

    def w_latency(self, s, P, n, loops, payloads, to):
        samples = []
        for i in range(P["lat_n"]):
            t = time.perf_counter()
            s.wait(s.submit(_tasks.noop, i), timeout=to)
            samples.append((time.perf_counter() - t) * 1e3)
        self.record("latency", statistics.median(samples),
                    {"mean_ms": statistics.fmean(samples), "min_ms": min(samples),
                     "p90_ms": sorted(samples)[int(0.9 * len(samples))]})

    def w_submit(self, s, P, n, loops, payloads, to):
        t = time.perf_counter()
        futs = [s.submit(_tasks.noop, i) for i in range(n)]
        t_sub = time.perf_counter() - t
        total = 0
        for f in futs:
            total += s.wait(f, timeout=to)
        dt = time.perf_counter() - t
        assert total == n * (n - 1) // 2, total
        self.record("submit", n / dt, {"wall_s": dt, "submit_phase_s": t_sub})

    def w_map(self, s, P, n, loops, payloads, to):
        t = time.perf_counter()
        res = s.map(_tasks.noop, range(n), timeout=to * 5)
        dt = time.perf_counter() - t
        assert len(res) == n and res[-1] == n - 1
        self.record("map", n / dt, {"wall_s": dt})

    def w_efficiency(self, s, P, n, loops, payloads, to):
        k = P["n_busy"]

        def serial():
            out = []
            for _ in range(P["t1_samples"]):
                t = time.perf_counter()
                _tasks.busy(loops)
                out.append(time.perf_counter() - t)
            return out
        # T1, the single-task duration, measured serially in this process just before and just
        # after the parallel run (this VM's speed drifts by up to +-30 % within seconds)
        before = serial()
        t = time.perf_counter()
        futs = [s.submit(_tasks.busy_timed, loops) for _ in range(k)]
        inside = [s.wait(f, timeout=to) for f in futs]
        dt = time.perf_counter() - t
        after = serial()
        t1 = statistics.median(before + after)
        eff = k * t1 / (s.workers * dt)
        # drift-free companion: share of the wall time the workers spent inside the tasks
        util = sum(inside) / (s.workers * dt)
        self.record("efficiency", eff, {"wall_s": dt, "t1_s": t1, "t1_before_s": before,
                                        "t1_after_s": after, "ideal_s": k * t1 / s.workers,
                                        "task_s_in_worker": inside, "utilisation": util})
        self.record("utilisation", util, {"wall_s": dt})

    def w_payload(self, s, P, n, loops, payloads, to):
        t = time.perf_counter()
        futs = [s.submit(_tasks.payload_len, b) for b in payloads]
        for f, b in zip(futs, payloads):
            r = s.wait(f, timeout=to)
            assert r == len(b), r
        dt = time.perf_counter() - t
        nbytes = sum(len(b) for b in payloads)
        self.record("payload", nbytes / MB / dt, {"wall_s": dt, "bytes": nbytes})

    # -- client memory with N pending futures: one fresh interpreter per repetition
    def run_pending(self, s, P, t0, t_import):
        to = P["task_timeout"]
        n = P["n_pending"]
        s.start()
        futs = [s.submit(_tasks.noop, i) for i in range(4 * s.workers)]
        for f in futs:
            s.wait(f, timeout=to)
        me = psutil.Process()
        rss0 = me.memory_info().rss
        # occupy every worker first, so the N futures really stay pending: submit blockers in
        # growing batches until each worker has started one (prefetching schedulers may queue
        # several blockers behind one worker)
        gate = os.path.join(tempfile.gettempdir(), f"bench-gate-{uuid.uuid4().hex}")
        started = gate + ".started"
        os.mkdir(started)
        blockers = []
        batch = s.workers
        deadline = time.monotonic() + 60.0
        while len(os.listdir(started)) < s.workers and time.monotonic() < deadline:
            blockers += [s.submit(_tasks.block_on_gate, gate, started, 300.0) for _ in range(batch)]
            t_poll = time.monotonic() + 0.3
            while len(os.listdir(started)) < s.workers and time.monotonic() < t_poll:
                time.sleep(0.005)
            batch *= 2
        n_blocked = len(os.listdir(started))
        futs = []
        try:
            t = time.perf_counter()
            futs = [s.submit(_tasks.noop, i) for i in range(n)]
            t_sub = time.perf_counter() - t
            time.sleep(0.2)
            rss1 = me.memory_info().rss
            done = sum(1 for f in futs if _is_done(f))
            self.record("pending", rss1 / MB, {"rss_before_mb": rss0 / MB,
                                                "delta_mb": (rss1 - rss0) / MB,
                                                "done_at_measure": done, "submit_s": t_sub,
                                                "blockers": len(blockers),
                                                "workers_blocked": n_blocked})
        finally:
            open(gate, "w").close()
            try:
                for b in blockers:
                    try:
                        s.wait(b, timeout=to)
                    except Exception:
                        pass
                s.cancel_and_shutdown(futs)
            finally:
                os.unlink(gate)
                for f in os.listdir(started):
                    os.unlink(os.path.join(started, f))
                os.rmdir(started)

    # -- pydist clusters: 4-node tree vs 1 node x 4 workers; latency through chains
    def run_cluster(self, s, P, t0, t_import):
        wl = P["workloads"]
        to = P["task_timeout"]
        n = P["n_tasks"]

        def with_cluster(kw, fn, cls=None):
            c = (cls or pydist.LocalCluster)(**kw)
            with c:
                # the brief's ClusterExecutor(c.address) is refused by the cluster's handshake
                # (AuthenticationError: ... requires the cluster secret): pass LocalCluster.secret
                secret = getattr(c, "secret", None)
                ex = (pydist.ClusterExecutor(address=c.address, secret=secret) if secret is not None
                      else pydist.ClusterExecutor(address=c.address))
                try:
                    for f in [ex.submit(_tasks.noop, i) for i in range(16)]:
                        f.result(timeout=to)
                    return fn(ex)
                finally:
                    ex.shutdown(wait=True)

        def map_rate(ex):
            out = []
            for _ in range(P["reps"]):
                t = time.perf_counter()
                res = list(ex.map(_tasks.noop, range(n), chunksize=1, timeout=to * 5))
                dt = time.perf_counter() - t
                assert len(res) == n
                out.append(n / dt)
            return out

        if "tree" in wl:
            try:
                tree = with_cluster(dict(nodes=4, workers_per_node=1, topology="tree"), map_rate)
                single = with_cluster(dict(nodes=1, workers_per_node=4), map_rate)
                for a, b in zip(tree, single):
                    self.record("tree", a / b, {"tree4_tasks_s": a, "single4_tasks_s": b})
            except Exception as e:
                self.record("tree", error=err_text(e))

        if "chain" in wl:
            def lat(ex):
                out = []
                for _ in range(P["reps"]):
                    samples = []
                    for i in range(P["lat_n"]):
                        t = time.perf_counter()
                        ex.submit(_tasks.noop, i).result(timeout=to)
                        samples.append((time.perf_counter() - t) * 1e3)
                    out.append(statistics.median(samples))
                return out
            per_k = {}
            for k in P["chains"]:
                try:
                    cls, kw = chain_cluster(k)
                    per_k[k] = with_cluster(kw, lat, cls)
                except Exception as e:
                    self.record("chain", error=f"chain of {k}: {err_text(e)}")
                    break
            if len(per_k) >= 2:
                ks = sorted(per_k)
                for r in range(P["reps"]):
                    ys = [per_k[k][r] for k in ks]
                    self.record("chain", slope([k - 1 for k in ks], ys),
                                {f"chain{k}_ms": per_k[k][r] for k in ks})


def chain_cluster(k):
    """(LocalCluster class, kwargs) for a chain of k nodes with workers on its last node only, so
    every task travels all k-1 hops (with workers everywhere the root would run a lone task itself:
    no hop at all). Uses ``workers_per_node=[0, ..., 0, 1]`` where LocalCluster accepts a list;
    older LocalClusters get a subclass that overrides ``_start_node`` (benchmark only)."""
    base = pydist.LocalCluster
    per_node = [0] * (k - 1) + [1]
    try:
        base(nodes=k, workers_per_node=per_node, topology="chain")   # validates, starts nothing
        return base, dict(nodes=k, workers_per_node=per_node, topology="chain")
    except (TypeError, ValueError):
        pass
    kw = dict(nodes=k, workers_per_node=1, topology="chain")
    if not hasattr(base, "_start_node"):
        return base, kw          # plain chain: latency then measures the root only

    class LeafWorkersChain(base):
        def _start_node(self, i, env):
            saved = self.workers_per_node
            self.workers_per_node = 1 if i == self.n - 1 else 0
            try:
                return super()._start_node(i, env)
            finally:
                self.workers_per_node = saved
    return LeafWorkersChain, kw


def slope(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def _is_done(f):
    try:
        return f.done()
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# orchestrator


ROWS = [
    # key, label(P), unit, better, target: (mode, op, value) mode "ratio" (pydist/PPE) or "abs"
    # targets of issue #15 (those of #4 where #15 sets none)
    ("startup", lambda P: "start to first result (incl. import)", "s", "lower", ("abs", "<=", 0.3)),
    ("latency", lambda P: "latency, 1 no-op task", "ms", "lower", ("ratio", "<=", 1.3)),
    ("submit", lambda P: f"{P['n_tasks']:,} no-op: submit, then await each", "tasks/s",
     "higher", ("ratio", ">=", 4.0)),
    ("map", lambda P: f"{P['n_tasks']:,} no-op: map(chunksize=1)/bulk", "tasks/s", "higher",
     ("ratio", ">=", 4.0)),
    ("efficiency", lambda P: f"{P['n_busy']} x {int(P['busy_s'] * 1000)} ms busy: parallel efficiency",
     "", "higher", ("abs", ">=", 0.95)),
    ("utilisation", lambda P: "  same: worker busy share (in-task time / wall)", "", "higher",
     None),
    ("bigmap", lambda P: f"{P['n_big']:,} no-op: map(chunksize={P['big_chunk']:,})", "tasks/s", "higher",
     ("ratio", ">=", 1.0)),
    ("bigmap_rss_client", lambda P: "  same: client peak RSS", "MB", "lower", ("ratio", "<=", 1.0)),
    ("bigmap_rss_node", lambda P: "  same: node peak RSS (others: largest worker)", "MB", "lower", None),
    ("payload", lambda P: f"{P['n_payload']} x {P['payload_mib']} MiB bytes argument", "MB/s",
     "higher", ("ratio", ">=", 1.6)),
    ("tree", lambda P: f"4-node tree / 1 node x 4 workers ({P['n_tasks']:,} map)", "x", "higher",
     ("abs", ">=", 0.8)),
    ("chain", lambda P: "cost per hop (chain of " + ",".join(map(str, P["chains"])) + ")",
     "ms/hop", "lower", ("abs", "<=", 0.3)),
    ("pending", lambda P: f"client RSS with {P['n_pending']:,} pending futures", "MB", "lower",
     ("abs", "<=", 300)),
    ("idle_rss", lambda P: "idle node+workers RSS (excl. name server)", "MB", "lower", ("abs", "<=", 80)),
    ("shutdown", lambda P: "shutdown time", "s", "lower", ("abs", "<=", 0.3)),
    ("mainfn", lambda P: "task fn defined in __main__", "", "", None),
]


def fmt(v, unit):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit in ("tasks/s",):
        return f"{v:,.0f}"
    if unit in ("MB", "MB/s"):
        return f"{v:,.1f}"
    if unit == "ms" or unit == "ms/hop":
        return f"{v:.3f}"
    return f"{v:.3f}"


def git_commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def git_dirty():
    """Uncommitted changes to pydist/ (the run measures the work tree, not the commit)."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "pydist"],
                             capture_output=True, text=True, timeout=10).stdout
        return [line[3:] for line in out.splitlines()]
    except Exception:
        return None


class OtherLoad:
    """CPU time used by processes that are not this run's, sampled once a second.

    A process is "ours" if it carries the run marker in its environment (every child and all it
    starts) or is this process. Machine-wide counters minus our own rusage would be simpler but
    misattribute the CPU of descendants that are never reaped by us (ray's daemons). Processes
    that live less than a sampling interval are missed, so this slightly under-reports."""

    def __init__(self, run_id, interval=1.0):
        import threading
        self.run_id = run_id
        self.interval = interval
        self.t_start = time.time()
        self.seen = {}            # (pid, create_time) -> [cpu at first sight, last cpu, ours]
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.sample()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop_ev.wait(self.interval):
            try:
                self.sample()
            except Exception:
                pass

    def sample(self):
        me = os.getpid()
        with self.lock:
            for p in psutil.process_iter(["create_time", "cpu_times"]):
                ct, cpu = p.info["create_time"], p.info["cpu_times"]
                if cpu is None or ct is None:
                    continue
                used = cpu.user + cpu.system
                key = (p.pid, ct)
                rec = self.seen.get(key)
                if rec is None:
                    ours = p.pid == me
                    if not ours:
                        try:
                            ours = (p.environ().get(MARK) or "").startswith(self.run_id)
                        except (psutil.Error, OSError):
                            ours = False
                    first = used if ct < self.t_start else 0.0
                    self.seen[key] = [first, used, ours]
                else:
                    rec[1] = used

    def total(self):
        """CPU-seconds used by other processes since this object was made."""
        self.sample()
        with self.lock:
            return sum(r[1] - r[0] for r in self.seen.values() if not r[2])

    def stop(self):
        self.stop_ev.set()


def wait_idle(max_wait):
    """Wait (up to max_wait s) until the machine's other load is low: CPU < 15 % over 1 s.
    Returns (last CPU %, seconds waited)."""
    t0 = time.monotonic()
    t_end = t0 + max_wait
    said = False
    while True:
        pct = psutil.cpu_percent(interval=1.0)
        if pct < 15.0 or time.monotonic() >= t_end:
            if said:
                log(f"  ... waited {time.monotonic() - t0:.0f} s (CPU {pct:.0f} % busy)")
            return pct, time.monotonic() - t0
        if not said:
            log(f"  waiting for an idle machine: CPU {pct:.0f} % busy")
            said = True


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Orchestrator:
    def __init__(self, args):
        self.args = args
        self.P = dict(QUICK if args.quick else FULL)
        if args.reps:
            self.P["reps"] = args.reps
        self.systems = [s.strip() for s in args.only.split(",")] if args.only else list(SYSTEMS)
        for s in self.systems:
            if s not in SYSTEMS:
                sys.exit(f"unknown system {s!r}; choose from {','.join(SYSTEMS)}")
        self.workloads = ([w.strip() for w in args.workloads.split(",")] if args.workloads
                          else list(WORKLOAD_NAMES))
        for w in self.workloads:
            if w not in WORKLOAD_NAMES:
                sys.exit(f"unknown workload {w!r}; choose from {','.join(WORKLOAD_NAMES)}")
        self.run_id = f"bench-{uuid.uuid4().hex[:12]}"
        self.commit_start = git_commit()          # pydist is measured first: this is its commit
        self.dirty_start = git_dirty()
        self.date_start = time.strftime("%Y-%m-%d %H:%M:%S %z")
        self.tmp = tempfile.mkdtemp(prefix="pydist-bench-")
        self.results = {s: {} for s in self.systems}   # system -> workload -> {reps, extra}
        self.errors = {s: {} for s in self.systems}
        self.na = {}
        self.versions = {}
        self.stray = []
        self.child_seq = 0
        self.waited = 0.0
        self.child_log = []
        self.timeouts = dict(life=120, main=1500, pending=600, cluster=900, bigmap=600)
        if args.quick:
            self.timeouts = dict(life=60, main=240, pending=120, cluster=240, bigmap=120)

    def env(self, marker):
        env = dict(os.environ)
        pp = [ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(pp)
        env[MARK] = marker
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def child(self, kind, system, workloads):
        self.child_seq += 1
        marker = f"{self.run_id}:{self.child_seq}"
        out = os.path.join(self.tmp, f"{self.child_seq:03d}-{kind}-{system}.json")
        logf = os.path.join(self.tmp, f"{self.child_seq:03d}-{kind}-{system}.log")
        params = dict(self.P, workloads=workloads)
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind, "--system", system,
               "--params", json.dumps(params), "--out", out]
        if self.args.wait_idle:
            self.waited += wait_idle(min(self.args.wait_idle, 120.0))[1]
        c0 = self.load.total()
        t = time.perf_counter()
        with open(logf, "w") as lf:
            proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=self.env(marker),
                                    cwd=ROOT, stdin=subprocess.DEVNULL)
            try:
                rc = proc.wait(timeout=self.timeouts[kind])
            except subprocess.TimeoutExpired:
                rc = None
                self.stray += reap(descendants_of(proc.pid) + [psutil.Process(proc.pid)])
                proc.wait()
            except BaseException:          # Ctrl-C / SIGTERM: take the child down with us
                reap(descendants_of(proc.pid) + [psutil.Process(proc.pid)])
                raise
        # sweep anything the child left behind (re-parented to us: we are a subreaper)
        left = marked_processes(marker)
        if left:
            _, alive = psutil.wait_procs(left, timeout=5.0)
            if alive:
                self.stray += [f"after {kind}/{system}: {d}" for d in reap(alive)]
        reap_zombies()
        data = {}
        try:
            with open(out) as f:
                data = json.load(f)
        except Exception:
            pass
        dt = time.perf_counter() - t
        other = max(0.0, self.load.total() - c0) / (dt * (os.cpu_count() or 1)) if dt > 0 else None
        if other is not None:
            self.child_log.append({"kind": kind, "system": system, "wall_s": dt,
                                   "other_cpu_share": other})
        if rc is None:
            data.setdefault("errors", {})["_child"] = (
                f"timed out after {self.timeouts[kind]} s (killed); log {logf}")
        elif rc != 0:
            with open(logf) as f:
                tail = f.read()[-1500:]
            data.setdefault("errors", {}).setdefault("_child", f"exit code {rc}: {tail}")
        self.stray += data.get("stray", [])
        data["_other_load"] = other
        log(f"  {kind:<8} {system:<7} {dt:6.1f} s"
            + (f"  (other load {100 * other:.0f} %)" if other is not None and other > 0.05 else "") + (f"  n/a: {data['na']}" if data.get("na") else "")
            + ("  errors: " + "; ".join(f"{k}: {v.splitlines()[0][:160]}"
                                        for k, v in data.get("errors", {}).items())
               if data.get("errors") else ""))
        return data

    def merge(self, system, data):
        if data.get("na"):
            self.na[system] = data["na"]
            return False
        if data.get("version"):
            self.versions[system] = data["version"]
        for w, r in data.get("results", {}).items():
            dst = self.results[system].setdefault(w, {"reps": [], "extra": [], "other_load": []})
            dst["reps"] += r["reps"]
            dst["extra"] += r["extra"]
            if data.get("_other_load") is not None:
                dst["other_load"].append(data["_other_load"])
        for w, e in data.get("errors", {}).items():
            self.errors[system].setdefault(w, e)
        return True

    def run(self):
        t_run = time.perf_counter()
        P = self.P
        log(f"pydist benchmark: {'quick' if self.args.quick else 'full'} run, reps={P['reps']}, "
            f"systems={','.join(self.systems)}")
        become_subreaper()
        if self.args.wait_idle:
            self.waited += wait_idle(self.args.wait_idle)[1]
        if "efficiency" in self.workloads:
            P["busy_loops"] = _tasks.calibrate_busy(P["busy_s"])
            samples = []
            for _ in range(5):
                t = time.perf_counter()
                _tasks.busy(P["busy_loops"])
                samples.append(time.perf_counter() - t)
            P["busy_t1_s"] = statistics.median(samples)
            log(f"  busy loop: {P['busy_loops']:,} iterations = {P['busy_t1_s'] * 1e3:.1f} ms serial")
        else:
            P["busy_loops"], P["busy_t1_s"] = 0, 0.0
        self.load_start = os.getloadavg()
        self.load = OtherLoad(self.run_id)
        cpu0 = self.load.total()
        w0 = time.perf_counter()
        try:
            for s in self.systems:
                self.run_system(s)
        finally:
            left = marked_processes(self.run_id)
            if left:
                _, alive = psutil.wait_procs(left, timeout=5.0)
                if alive:
                    self.stray += [f"at exit: {d}" for d in reap(alive)]
            try:
                kids = psutil.Process().children(recursive=True)
            except psutil.Error:
                kids = []
            if kids:
                self.stray += [f"child at exit: {d}" for d in reap(kids)]
        self.elapsed = time.perf_counter() - t_run
        cpu1 = self.load.total()
        self.load.stop()
        wall = time.perf_counter() - w0
        self.load_end = os.getloadavg()
        self.other_cpu = {"cpu_s": cpu1 - cpu0, "share": (cpu1 - cpu0) / (wall * (os.cpu_count() or 1))}
        if self.child_log:
            # while measuring (waits excluded)
            w = sum(c["wall_s"] for c in self.child_log)
            self.other_cpu = {
                "cpu_s": sum(c["wall_s"] * c["other_cpu_share"] for c in self.child_log)
                * (os.cpu_count() or 1),
                "share": sum(c["wall_s"] * c["other_cpu_share"] for c in self.child_log) / w,
                "worst_child": max(self.child_log, key=lambda c: c["other_cpu_share"])}

    def run_system(self, s):
        wl = self.workloads
        P = self.P
        life = [w for w in GROUPS["life"] if w in wl]
        main = [w for w in GROUPS["main"] if w in wl]
        if life:
            for _ in range(P["reps"]):
                if not self.merge(s, self.child("life", s, life)):
                    return
        if main:
            if not self.merge(s, self.child("main", s, main)):
                return
        if "pending" in wl:
            for _ in range(P["reps"]):
                if not self.merge(s, self.child("pending", s, ["pending"])):
                    return
        cl = [w for w in GROUPS["cluster"] if w in wl]
        if cl and s == "pydist":
            self.merge(s, self.child("cluster", s, cl))
        if "bigmap" in wl and s in CHUNKED:
            self.merge(s, self.child("bigmap", s, ["bigmap"]))

    # -- reporting
    def medians(self):
        med = {}
        for s in self.systems:
            for w, r in self.results[s].items():
                med.setdefault(s, {})[w] = median(r["reps"])
        return med

    def table(self):
        P = self.P
        self.any_disturbed = False
        med = self.medians()
        cols = self.systems
        header = ["workload", "unit"] + cols + ["pydist/PPE", "target", "result"]
        rows = []
        verdicts = []
        for key, label, unit, better, target in ROWS:
            if ({"utilisation": "efficiency"}.get(key, "bigmap" if key in BIGMAP_ROWS else key)
                    not in self.workloads):
                continue
            row = [label(P), unit]
            for s in cols:
                if s in self.na:
                    row.append("n/a")
                elif (key in PYDIST_ONLY and s != "pydist") or (key in BIGMAP_ROWS and s not in CHUNKED):
                    row.append("")
                elif key == "mainfn":
                    if key in self.errors[s]:
                        row.append("FAIL")
                    elif med.get(s, {}).get(key) is not None:
                        row.append("ok")
                    else:
                        row.append("err" if self.errors[s] else "-")
                else:
                    v = med.get(s, {}).get(key)
                    if v is None:
                        row.append("err" if (key in self.errors[s] or "_child" in self.errors[s])
                                   else "-")
                    else:
                        ol = median(self.results[s][key].get("other_load", []))
                        busy = ol is not None and ol > DISTURBED
                        self.any_disturbed |= busy
                        row.append(fmt(v, unit) + ("*" if busy else ""))
            pv = med.get("pydist", {}).get(key)
            qv = med.get("ppe", {}).get(key)
            ratio = pv / qv if (isinstance(pv, float) and isinstance(qv, float) and qv
                                and key not in PYDIST_ONLY and key != "mainfn") else None
            row.append(f"{ratio:.2f}x" if ratio is not None else "")
            verdict = ""
            if target:
                mode, op, tv = target
                tunit = "x PPE" if mode == "ratio" else ("" if unit in ("", "x") else " " + unit)
                if mode == "ratio":
                    row.append(f"{op} {tv}x")
                    x = ratio
                else:
                    row.append(f"{op} {tv}{tunit}" if unit not in ("", "x") else f"{op} {tv}")
                    x = pv
                if x is None:
                    verdict = "n/a" if "pydist" in self.na or "pydist" not in cols else "-"
                else:
                    ok = x <= tv if op == "<=" else x >= tv
                    verdict = "PASS" if ok else "MISS"
                verdicts.append({"workload": key, "mode": mode, "op": op, "target": tv,
                                 "value": x, "verdict": verdict})
            else:
                row.append("")
            row.append(verdict)
            rows.append(row)
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        lines = []
        for j, r in enumerate([header] + rows):
            cells = [str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
                     for i, c in enumerate(r)]
            lines.append("| " + " | ".join(cells) + " |")
            if j == 0:
                lines.append("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                                             for i, w in enumerate(widths)) + "|")
        return "\n".join(lines), verdicts

    def notes(self):
        out = []
        if getattr(self, "any_disturbed", False):
            out.append(f"- *: measured while other processes used more than {100 * DISTURBED:.0f} % "
                       "of the machine's CPU (median over its repetitions)")
        for s in self.systems:
            if s in self.na:
                out.append(f"- {s}: n/a ({self.na[s]})")
        for s in self.systems:
            for w, e in self.errors.get(s, {}).items():
                first = e.strip().splitlines()[0] if e.strip() else e
                out.append(f"- {s} / {w}: {first[:400]}")
        oc = getattr(self, "other_cpu", None)
        if oc is not None:
            warn = ("  WARNING: other work ran on this machine during the run; figures are "
                    "disturbed" if oc["share"] > 0.05 else "")
            worst = oc.get("worst_child")
            worst = (f"; worst: {worst['kind']}/{worst['system']} "
                     f"{100 * worst['other_cpu_share']:.0f} %" if worst else "")
            out.append(f"- CPU used by other processes while measuring: {oc['cpu_s']:.1f} CPU-s "
                       f"({100 * oc['share']:.1f} % of the machine{worst}); load average at start "
                       f"{self.load_start[0]:.2f}, at end {self.load_end[0]:.2f}{warn}")
        if self.stray:
            out.append(f"- stray processes terminated: {len(self.stray)}")
            out += [f"  - {d}" for d in self.stray[:20]]
        else:
            out.append("- stray processes at exit: 0")
        return out

    def machine(self):
        return {
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "git_commit": self.commit_start, "git_commit_at_end": git_commit(),
            "pydist_uncommitted": self.dirty_start, "date": self.date_start,
            "argv": sys.argv[1:],
        }


def descendants_of(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def precompile():
    """Byte-compile pydist and the task module once, as ``pip install`` does for an installed package.

    The systems' children import pydist from the work tree.  With ``PYTHONDONTWRITEBYTECODE`` set (as
    on the benchmark machine) nothing would ever be cached, and every pydist process (node, workers,
    client) would compile its sources at start: about 0.1 s of CPU for a node.  The peers, installed
    by pip, never pay that.  Python checks each .pyc against its source, so a stale one is never
    used."""
    import compileall
    try:
        compileall.compile_dir(os.path.join(ROOT, "pydist"), quiet=1)
        compileall.compile_file(os.path.join(HERE, "_tasks.py"), quiet=1)
    except OSError as e:   # a read-only tree: measure as it is
        print(f"note: could not byte-compile pydist ({e}); start-up figures include compiling it")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (1 rep, small sizes)")
    ap.add_argument("--json", metavar="FILE", help="write raw repetitions, medians, machine info")
    ap.add_argument("--only", metavar="SYSTEMS", help=f"comma list of {','.join(SYSTEMS)}")
    ap.add_argument("--workloads", metavar="NAMES", help=f"comma list of {','.join(WORKLOAD_NAMES)}")
    ap.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="first wait up to S seconds for the machine to be idle (CPU < 15 %%)")
    ap.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # SIGTERM runs the finally blocks (systems shut down, processes swept) like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.child:
        Child(args).run()
        return 0

    precompile()
    orch = Orchestrator(args)
    orch.run()
    table, verdicts = orch.table()
    machine = orch.machine()
    print()
    dirty = " (+ uncommitted changes to pydist/)" if machine["pydist_uncommitted"] else ""
    print(f"pydist benchmark ({'quick' if args.quick else 'full'}, reps={orch.P['reps']}, "
          f"median) - commit {(machine['git_commit'] or '?')[:12]}{dirty}, python {machine['python']}, "
          f"{machine['cpu_count']} cpus, {machine['date']}")
    print(table)
    if machine["git_commit_at_end"] != machine["git_commit"]:
        print(f"note: the repo moved to {(machine['git_commit_at_end'] or '?')[:12]} during the run "
              "(figures are for the commit above: each system's children import the work tree "
              "when they start, pydist first)")
    vers = ", ".join(f"{k} {v}" for k, v in orch.versions.items())
    if vers:
        print(f"versions: {vers}")
    for n in orch.notes():
        print(n)
    print(f"total time: {orch.elapsed:.1f} s" + (f" (of which {orch.waited:.0f} s waiting for an idle "
                                                 "machine)" if orch.waited >= 1 else ""))
    if args.json:
        doc = {"machine": machine, "params": orch.P, "systems": orch.systems,
               "workloads": orch.workloads, "versions": orch.versions, "na": orch.na,
               "results": orch.results, "medians": orch.medians(), "errors": orch.errors,
               "targets": verdicts, "stray_processes": orch.stray,
               "other_cpu": orch.other_cpu, "children": orch.child_log, "waited_s": orch.waited, "load_start": orch.load_start, "load_end": orch.load_end, "elapsed_s": orch.elapsed,
               "table": table}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
