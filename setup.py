"""pip install -e .          installs us_jepa.py (the method), us_data.py (its images), us_util.py (plumbing), the
                          command line, kernels/
pip install -e ".[test]"  adds pytest, Triton 3.7.1 for the kernel tests under the interpreter, pydicom + decoders
pip install -e ".[dicom]" adds pydicom + pylibjpeg decoders: `--data` then also reads .dcm files (frames, cines)
Install torch first (`pip install torch==2.13.0` takes the CPU wheel); an unpinned torch may pull a CUDA build.

kernels/csrc (the C++/CUDA extension) is built with ninja on first use (torch.utils.cpp_extension.load), not
here: this file then needs no torch at install time (no --no-build-isolation), the README's commands stay
plain, and the CUDA part is built exactly when torch is a CUDA build and nvcc is found (kernels/ext.py)."""
from setuptools import find_packages, setup

DICOM = ["pydicom>=3", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"]

setup(
    name="us-jepa",
    version="0.1.0",
    description="Reference implementation of US-JEPA: SALT-style JEPA pretraining for ultrasound with a frozen teacher",
    py_modules=["us_jepa", "us_data", "us_util"],
    packages=find_packages(include=["kernels", "kernels.*"]),
    python_requires=">=3.10",
    package_data={"kernels": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.cuh", "csrc/*.h"]},
    install_requires=["torch>=2.4", "numpy", "pillow", "ninja"],
    # pydicom >= 3 reads one frame of a cine at a time (2.x decodes them all and leaves YBR unconverted). Pillow
    # decodes JPEG baseline/extended and JPEG 2000 only; archives also hold JPEG Lossless (process 14, .57/.70),
    # JPEG-LS and JPEG 2000 that pydicom decodes through pylibjpeg's plugins. Triton: CUDA torch 2.13's pin; on
    # CPU only the interpreter runs.
    extras_require={"dicom": DICOM, "test": ["pytest", "triton==3.7.1", *DICOM]},
    entry_points={"console_scripts": ["us-jepa=us_jepa:main"]},
)
