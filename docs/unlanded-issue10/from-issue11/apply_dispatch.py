import sys
root = sys.argv[1]
def edit(path, pairs):
    p = f"{root}/{path}"; s = open(p).read()
    for old, new in pairs:
        if s.count(old) != 1:
            print("NOT UNIQUE/MISSING in", path, s.count(old), ":", old[:90]); continue
        s = s.replace(old, new)
    open(p, "w").write(s)
edit("pydist/dispatch.py", [
    ("        self.fns: Dict[str, list] = {}            # key -> [blob, refcount]\n",
     "        self.fns: Dict[str, list] = {}            # key -> [blob, refcount]\n"
     "        cfg = self.cfg\n"
     "        self.quota = Quota(cfg.max_client_tasks, cfg.max_client_bytes, cfg.max_queued_tasks, cfg.max_queued_bytes,\n"
     "                           f\"node {self.name}\")\n"),
    ("""        for k, blob in fns.items():
            if k not in self.fns:
                self.fns[k] = [blob, 0]
        lg = self.ledger
""", """        added = [k for k in fns if k not in self.fns]
        for k in added:
            self.fns[k] = [fns[k], 0]
        owner = origin[1] if origin[0] == "c" else None
        lg = self.ledger
"""),
    ("""            if verdict == "new":
                self.fns[rec[wire.T_FN]][1] += 1
                if rec[wire.T_BUNDLE] is not None:
                    self.store.pin(rec[wire.T_BUNDLE])   # never evicted while a task needs it
""", """            if verdict == "new":
                self.fns[rec[wire.T_FN]][1] += 1
                self.quota.add(tid, owner, wire.payload_size(rec[wire.T_PAYLOAD]))
                if rec[wire.T_BUNDLE] is not None:
                    self.store.pin(rec[wire.T_BUNDLE])   # never evicted while a task needs it
"""),
    ("""        for t in fresh:   # after every reference is counted: a task failing here frees only its own
""", """        for k in added:   # a blob no task took (re-sent ids, collisions, names no task uses) is not kept
            if self.fns[k][1] <= 0:
                del self.fns[k]
        for t in fresh:   # after every reference is counted: a task failing here frees only its own
"""),
    ("""    def _on_leave(self, t: Task) -> None:
""", """    def _on_leave(self, t: Task) -> None:
        self.quota.remove(t.id)
"""),
    ("from .ledger import", "from .quota import Quota\nfrom .ledger import"),
])
edit("pydist/node.py", [
    ("from . import diagnose, security\n", "from . import diagnose, security, wire\n"),
    ("""            self.sessions.touch(client_id)
            n = self.accept_tasks(fns, tasks, ("c", client_id))
""", """            self.sessions.touch(client_id)
            fit, err = self.quota.admit(client_id, [wire.payload_size(t[wire.T_PAYLOAD]) for t in tasks])
            n = self.accept_tasks(fns, tasks[:fit], ("c", client_id))
            if err is not None:   # over a limit: those tasks fail at once, naming it; the client goes on
                self.counts["refused_limit"] += len(tasks) - fit
                self._deliver(("c", client_id), [self.error_result(t[wire.T_ID], err) for t in tasks[fit:]])
"""),
])
edit("pydist/node.py", [
    ('''                "held": len(lg), "stale_results": lg.stale, "ledger": dict(lg.counts),''',
     '''                "held": len(lg), "stale_results": lg.stale, "ledger": dict(lg.counts),
                "held_bytes": self.quota.bytes, "fns": len(self.fns), "refused_limit": self.counts["refused_limit"],'''),
])
