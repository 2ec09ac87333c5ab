from importlib.resources import files


def greeting() -> str:
    """The first line of the packaged data file ``mylib/data/greeting.txt``."""
    return files(__package__).joinpath("data", "greeting.txt").read_text(encoding="utf-8").strip()
