import sys
root = sys.argv[1]
p = f"{root}/pydist/executor.py"; s = open(p).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, ("changed:", old[:80], s.count(old))
    s = s.replace(old, new)
rep("""        for target, name in ((self._sender, "sender"), (self._collector, "collector")):
            t = threading.Thread(target=target, name=f"pydist-client-{name}", daemon=True)
            t.start()
            self._threads.append(t)
""", """        # The threads see the executor through a weak proxy: an executor dropped without shutdown() is
        # collected once nothing is pending (a pending future keeps it alive, as ProcessPoolExecutor's
        # do), and its finalizer wakes the threads, which end and close their connections.
        me = weakref.proxy(self)
        for method, name in ((ClusterExecutor._sender, "sender"), (ClusterExecutor._collector, "collector")):
            t = threading.Thread(target=_run_weakly, args=(method, me), name=f"pydist-client-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        weakref.finalize(self, _dropped, self._cond, self._closed, self._entry, self._cid, self._threads)
""")
rep("""            fut._pydist_tid = tid
""", """            fut._pydist_tid = tid
            fut._pydist_owner = self          # until it is done: the executor lives while work is pending
""")
rep("""    _pydist_tid: str = ""
    _pydist_exec: Any = None
""", """    _pydist_tid: str = ""
    _pydist_exec: Any = None
    _pydist_owner: Any = None

    def set_result(self, result):
        self._pydist_owner = None
        super().set_result(result)

    def set_exception(self, exception):
        self._pydist_owner = None
        super().set_exception(exception)
""")
rep("""def _add_code_path(""", """def _run_weakly(method, me) -> None:
    \"\"\"Run a client thread's loop on a weak proxy of its executor; end quietly once it is collected.\"\"\"
    try:
        method(me)
    except ReferenceError:
        pass


def _dropped(cond, closed, entry, cid, threads) -> None:
    \"\"\"Finalizer of an executor dropped without shutdown(): wake its threads (they end) and tell the node.\"\"\"
    if closed.is_set():
        return
    closed.set()
    with cond:
        cond.notify_all()

    def close():
        try:
            p = entry.connect(1.0)
            p._pyroTimeout = 2.0
            p.close_client(cid)
            p._pyroRelease()
        except Exception:
            pass
    threading.Thread(target=close, daemon=True, name="pydist-client-dropped").start()


def _add_code_path(""")
open(p, "w").write(s)
