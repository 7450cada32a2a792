"""pip install -e .          installs us_jepa.py (the method) and its command line
pip install -e ".[test]"  adds pytest for the test suite
Install torch first (`pip install torch==2.13.0` takes the CPU wheel); an unpinned torch may pull a CUDA build."""
from setuptools import find_packages, setup

setup(
    name="us-jepa",
    version="0.1.0",
    description="Reference implementation of US-JEPA: SALT-style JEPA pretraining for ultrasound with a frozen teacher",
    py_modules=["us_jepa"],
    packages=find_packages(include=["kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pillow"],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["us-jepa=us_jepa:main"]},
)
