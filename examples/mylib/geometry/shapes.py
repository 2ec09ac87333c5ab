import math

from .._version import VERSION  # a relative import two levels up


def circle_area(r: float) -> float:
    assert VERSION
    return math.pi * r * r
