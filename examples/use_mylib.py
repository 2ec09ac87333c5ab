"""Ship a local package to the cluster and use it from tasks.

    python examples/use_mylib.py              # from the repository root

``examples/mylib`` is not installed anywhere: ``ex.upload_code(...)`` packs it (a deterministic tar,
content addressed by its sha256), sends it to every node, and the workers put it first on
``sys.path`` before running a task.  Functions from it are pickled by reference (``mylib.describe``)
and imported on the node from the shipped copy, subpackages, relative imports and data files included.
Uploading unchanged code again sends nothing.
"""
import os
import sys
import time

from pydist import ClusterExecutor

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    with ClusterExecutor(max_workers=2) as ex:   # an embedded local cluster; or ClusterExecutor(address="host:port")
        # Only now make mylib importable here (the embedded cluster's processes, started above, cannot
        # see it: on the nodes it comes from the upload alone).
        sys.path.insert(0, HERE)
        import mylib

        t0 = time.perf_counter()
        info = ex.upload_code(os.path.join(HERE, "mylib"))
        print(f"uploaded {info} in {time.perf_counter() - t0:.2f} s  digest {info.digest[:16]}...")
        t0 = time.perf_counter()
        again = ex.upload_code(os.path.join(HERE, "mylib"))
        print(f"uploaded again in {time.perf_counter() - t0:.3f} s (unchanged: same digest, nothing sent): "
              f"{again.digest == info.digest}")

        results = list(ex.map(mylib.describe, [1, 2, 3, 4]))
        for r in results:
            print(f"  r={r['x']}  area={r['area']:8.3f}  {r['greeting']!r}  mylib {r['version']} on {r['node']}")
        d = ex.submit(mylib.distance, (0, 0), (3, 4)).result()
        print(f"mylib.distance((0, 0), (3, 4)) on the cluster = {d}")

    expected = [round(mylib.circle_area(x), 3) for x in [1, 2, 3, 4]]
    ok = ([r["area"] for r in results] == expected and d == 5.0
          and all(r["greeting"] == mylib.greeting() for r in results))
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
