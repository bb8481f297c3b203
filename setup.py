"""cryoposeml: deep-learning particle pose estimation for cryo-EM, as a Scipion plugin and a CLI."""
import re
from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "cryoposeml" / "__init__.py").read_text()).group(1)

setup(
    name="scipion-em-cryoposeml",
    version=VERSION,
    description="Amortized particle pose estimation for cryo-EM (Scipion plugin + CLI)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["cryoposeml", "cryoposeml.*"]),
    include_package_data=True,
    package_data={
        "cryoposeml": [
            "protocols.conf",
            "resources/maps/*.mrc",
            "resources/maps/*.md",
            "templates/*.json.template",
        ],
    },
    # What the Scipion side needs (STAR/MRC files, poses, plots): light, so that Scipion's own
    # environment holds no torch; the engine (the `cryoposeml` command) needs the [engine] extra,
    # which Plugin.defineBinaries installs into its own environment.
    install_requires=[
        "numpy>=1.26,<2",
        "scipy>=1.10,<1.11",  # scipion-em pins scipy<=1.10.0
        "mrcfile>=1.4",
        "starfile>=0.5",
        "pandas>=2",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={
        "engine": [
            "torch>=2.2",
            "healpy>=1.16",
            "e3nn>=0.5",
            "escnn>=1.0.11",
            "roma>=1.4",
            "safetensors>=0.4",
            "scikit-learn>=1.3",  # isotonic calibration of the matched uncertainty
        ],
        "scipion": ["scipion-pyworkflow>=3.11", "scipion-em>=3.11", "scipion-em-relion>=5.0"],
        "test": ["pytest>=8", "pytest-xdist>=3.6", "psutil", "scipion-app>=3.8"],  # scipion-app: the real installer Environment
    },
    entry_points={
        "pyworkflow.plugin": ["cryoposeml = cryoposeml"],
        "console_scripts": ["cryoposeml = cryoposeml.cli:console_main"],
    },
)
