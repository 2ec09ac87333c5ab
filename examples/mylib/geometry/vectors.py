import math


def distance(a, b) -> float:
    return math.dist(a, b)
