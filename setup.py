import re

from setuptools import find_packages, setup

# one place for the release: pydist/__init__.py (the hello sends pydist.__version__)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("pydist/__init__.py", encoding="utf-8").read(), re.M).group(1)

setup(
    name="pydist",
    version=VERSION,
    description="Distribute Python functions and scripts over the computers of a network "
                "through concurrent.futures (Pyro5 remote-object cluster)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pydist", "pydist.*"]),
    # the dashboard's static files, and py.typed: the package ships its type hints (PEP 561)
    package_data={"pydist": ["dashboard_static/*.html", "dashboard_static/*.js", "dashboard_static/*.css",
                             "py.typed"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "Pyro5>=5.17",
        "serpent>=1.41",
        "cloudpickle>=3.0",
        "psutil>=5.9",
        # TOML for pydist.toml and `pydist up cluster.toml` (tomllib is in the standard library from 3.11)
        "tomli>=1.1; python_version < '3.11'",
    ],
    extras_require={
        # cryptography: writes the CA and node certificates of `pydist make-certs`
        "tls": ["cryptography>=41"],
        # tqdm: progress bars of ClusterExecutor.map(..., progress=True) and pydist.progress(futures)
        "progress": ["tqdm>=4.60"],
        # the joblib backend (pydist.joblib) and its scikit-learn test
        "joblib": ["joblib>=1.3", "scikit-learn>=1.2"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "cryptography>=41", "tqdm>=4.60",
                 "selenium>=4.10"],
        # matplotlib: the scale model's plot (benchmarks/simulate.py)
        "bench": ["loky>=3.4", "dask[distributed]>=2024.1", "ray>=2.9", "matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "pydist-node=pydist.cli:node_main",
            "pydist=pydist.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
    ],
)
