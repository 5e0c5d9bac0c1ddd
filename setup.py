"""Build lcdd-kernels: the Python package plus the native extension lcdd_kernels._C via CMake.

Environment switches:
  LCDD_SKIP_NATIVE=1      do not build lcdd_kernels._C at all (pure Python: Triton and PyTorch paths)
  LCDD_SKIP_CUDA_BUILD=1  build the C++ CPU kernels only, even when nvcc is present
  LCDD_CUDA_ARCHS=90      CUDA architectures (CMake list, e.g. "80;90")
  LCDD_NATIVE_ARCH=0      compile the C++ kernels for any x86-64 CPU (default: -march=native)
  LCDD_BUILD_JOBS=N       parallel compile jobs (default: all cores)
  LCDD_BUILD_DIR=path     where CMake builds (default build/cmake); ctest runs there
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        if os.environ.get("LCDD_SKIP_NATIVE") == "1":
            print("LCDD_SKIP_NATIVE=1: not building lcdd_kernels._C")
            # An editable install into a second venv (the vLLM one: same torch and Python) reuses
            # the extension already built in the source tree instead of building it again.
            built = ROOT / "lcdd_kernels" / target.name
            if built.exists() and built != target:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(built, target)
            return
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building lcdd_kernels._C needs cmake (pip install cmake), "
                               "or set LCDD_SKIP_NATIVE=1 to install without it")
        out = target.parent
        # An editable install builds into a temporary build-lib that setuptools copies back into
        # the source tree; CMake writes into the source package instead, so that a later
        # incremental `cmake --build` (make native) refreshes lcdd_kernels/_C in place.
        inplace = getattr(self, "editable_mode", False) or self.inplace
        if inplace:
            out = ROOT / "lcdd_kernels"
        build = Path(os.environ.get("LCDD_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build.mkdir(parents=True, exist_ok=True)
        import pybind11

        cuda = "OFF" if os.environ.get("LCDD_SKIP_CUDA_BUILD") == "1" else "ON"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLCDD_BUILD_CUDA={cuda}",
            f"-DLCDD_CUDA_ARCHS={os.environ.get('LCDD_CUDA_ARCHS', '90')}",
            f"-DLCDD_NATIVE_ARCH={'OFF' if os.environ.get('LCDD_NATIVE_ARCH') == '0' else 'ON'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build)] + args)
        jobs = os.environ.get("LCDD_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call([cmake, "--build", str(build), "--parallel", jobs])
        if inplace and out / target.name != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out / target.name, target)


setup(
    name="lcdd-kernels",
    version="0.1.0",
    description="Fused kernels for LCDD sparse SFT carriers: training, carrier inference, SFT-Eraser",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lcdd_kernels", "lcdd_kernels.*"]),
    # The demo's shipped base model (phase 0): weights and the metadata that says how they were made.
    package_data={"lcdd_kernels.demo": ["data/*.safetensors", "data/*.json"]},
    ext_modules=[CMakeExtension("lcdd_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    # torch is deliberately a range that the local CPU build satisfies: an unpinned torch
    # would let pip pull a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        "triton>=3.5; platform_system == 'Linux'",  # 3.5 (torch 2.9) to 3.9: docs/dev/kernel-check.md
        "transformers>=4.56",
        "safetensors>=0.4",
        "numpy",
        "tqdm>=4.60",       # progress bars for training, eraser and demo
        "matplotlib>=3.7",  # curve and heatmap plots for training logs, benchmarks and the demo
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "psutil>=5",
                 "accelerate>=1.1",  # transformers.Trainer needs it: the LCDDCallback test runs a Trainer
                 # tests/carriers/test_export_peft.py loads exported carriers with the real PEFT. >=0.17: the
                 # first with SHiRA; <0.22: the newest release tested with the transformers this
                 # package installs (5.x; PEFT follows transformers closely, so a new minor is tried first)
                 "peft>=0.17,<0.22",
                 # tests/carriers/test_signing.py signs and verifies carriers (the `sign` extra)
                 "model-signing>=1.1,<2", "pyopenssl>=24"],
        # signed carriers (lcdd sign, load_carrier(verify=...)): OpenSSF model-signing, key based and
        # offline; its 1.1 release imports pyOpenSSL without declaring it
        "sign": ["model-signing>=1.1,<2", "pyopenssl>=24"],
        "build": ["pybind11>=2.12", "cmake>=3.24", "ninja"],
        # make docs: mkdocs build --strict of mkdocs.yml; the versions its options were tested with
        "docs": ["mkdocs>=1.6.1,<1.7", "mkdocs-material>=9.6,<10", "mkdocstrings>=1.0,<2",
                 "mkdocstrings-python>=2.0,<3"],
    },
    # vLLM loads general plugins in each of its processes: the carrier plugin (a no-op on
    # unsupported vLLM versions; never imported by `import lcdd_kernels`)
    entry_points={"console_scripts": ["lcdd=lcdd_kernels.cli:main"],
                  "vllm.general_plugins": ["lcdd = lcdd_kernels.integrations.vllm:register"]},
    zip_safe=False,
)
