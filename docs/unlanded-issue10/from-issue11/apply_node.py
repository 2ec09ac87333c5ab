import re, sys
root = sys.argv[1]
def edit(path, pairs):
    p = f"{root}/{path}"; s = open(p).read()
    for old, new in pairs:
        if old not in s:
            print("MISSING in", path, ":", old[:80]); continue
        s = s.replace(old, new)
    open(p, "w").write(s)
edit("pydist/node.py", [
    ("self.store = CodeStore(config.code_cache, config.code_cache_max)", "self.store = CodeStore.for_node(config)"),
    ("daemon = security.SecureDaemon(config.host, config.port, secret=config.secret, name=config.name,\n",
     "daemon = security.SecureDaemon(config.host, config.port, secret=config.secret, name=config.name,\n"
     "                                   **security.daemon_options(config),\n"),
    ("        node.start(daemon)\n", "        daemon.on_disconnect(node.store.abort_owner)   # uploads a connection left unfinished\n        node.start(daemon)\n"),
])
edit("pydist/codeserve.py", [
    ("        self.store.begin(digest, size)\n", "        self.store.begin(digest, size, owner=security.connection_id())\n"),
    ("        data = self.store.read(digest)\n        return data[offset:offset + min(size, 16 << 20)]\n",
     "        return self.store.read_chunk(digest, offset, min(size, 16 << 20))   # only these bytes are read\n"),
    ("        return len(self.store.read(digest)) if self.store.has(digest) else -1\n",
     "        return self.store.size(digest) if self.store.has(digest) else -1\n"),
])
