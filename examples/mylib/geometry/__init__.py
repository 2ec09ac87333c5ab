from .shapes import circle_area
from .vectors import distance

__all__ = ["circle_area", "distance"]
