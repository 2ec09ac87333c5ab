"""mylib: a tiny package shipped to the cluster by examples/use_mylib.py.

It has a subpackage (``geometry``), relative imports and a data file read with importlib.resources,
the three things that break when code is only copied as loose files.
"""
from ._version import VERSION
from .geometry import circle_area, distance
from .text import greeting

__all__ = ["VERSION", "circle_area", "distance", "greeting", "describe"]


def describe(x: float) -> dict:
    """One task: uses the subpackage, the data file, and reports where it ran."""
    from pydist import task_context

    ctx = task_context()
    return {"x": x, "area": round(circle_area(x), 3), "greeting": greeting(), "version": VERSION,
            "node": ctx.node}
