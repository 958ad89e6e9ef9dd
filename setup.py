"""Builds the alltoall package and its extension alltoall._C from csrc/.

C++ only when the installed torch has no CUDA; C++ and CUDA when it has, or
when ALLTOALL_CUDA=1 (ALLTOALL_CUDA=0 forces a CPU build). Install with
``pip install --no-build-isolation -e .`` so the build uses the torch that is
already installed instead of downloading another.
"""

from __future__ import annotations

import glob
import os
import sysconfig

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def build_with_cuda() -> bool:
    forced = os.environ.get("ALLTOALL_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def nvidia_wheel_dirs(sub: str) -> list[str]:
    """Include or library folders of the nvidia-* wheels torch depends on."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", sub)))


def sources(pattern: str) -> list[str]:
    found = glob.glob(os.path.join(CSRC, "**", pattern), recursive=True)
    return sorted(os.path.relpath(path, ROOT) for path in found)


def extension():
    # at::parallel_for is inline OpenMP in torch's headers: without -fopenmp
    # the CPU kernels' loops compile to a single thread. Linking -fopenmp
    # resolves to the libgomp.so.1 torch has already loaded, so there is one
    # OpenMP runtime and torch.set_num_threads applies to our loops too.
    # -g0 overrides the -g that Python's own CFLAGS add: debug info for
    # pybind11's and torch's templates made the binding files take 40% longer
    # to compile (68 s against 42 s for one file), which CI's budget feels.
    cxx_flags = ["-O3", "-g0", "-fvisibility=hidden", "-fopenmp"]
    if not build_with_cuda():
        return CppExtension(
            "alltoall._C",
            sources("*.cpp"),
            include_dirs=[CSRC],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    if CUDA_HOME is None:
        raise RuntimeError("ALLTOALL_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
    nccl_lib = [d for d in nvidia_wheel_dirs("lib") if os.sep + "nccl" + os.sep in d + os.sep]
    return CUDAExtension(
        "alltoall._C",
        sources("*.cpp") + sources("*.cu"),
        include_dirs=[CSRC, *nvidia_wheel_dirs("include")],
        library_dirs=nccl_lib,
        extra_link_args=[f"-Wl,-rpath,{d}" for d in nccl_lib] + ["-l:libnccl.so.2", "-fopenmp"],
        define_macros=[("ALLTOALL_WITH_CUDA", "1")],
        extra_compile_args={"cxx": [*cxx_flags, "-DALLTOALL_WITH_CUDA=1"], "nvcc": ["-O3", "-DALLTOALL_WITH_CUDA=1"]},
    )


setup(
    name="alltoall",
    version="0.1.0",
    description="All-to-all collectives for Mixture-of-Experts expert parallelism",
    packages=find_packages(include=["alltoall", "alltoall.*"]),
    package_data={"alltoall.plan.profiles": ["*.json"]},
    python_requires=">=3.11",
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "pytest-benchmark", "ruff", "jsonschema"],
        "bench": ["matplotlib"],
        "mpi": ["mpi4py", "mpich"],
        # Real clients of the "alltoall" torch.distributed backend, for its
        # tests (tests/backend/test_clients.py). DeepSpeed builds no ops with
        # DS_BUILD_OPS=0 (the Makefile sets it); megatron-core 0.16.1 is the
        # newest release for Python 3.11.
        "clients": ["deepspeed==0.19.8", "megatron-core==0.16.1"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={
        "console_scripts": [
            "alltoall-info=alltoall.cli.info:main",
            "alltoall-bench=alltoall.cli.bench:main",
            "alltoall-model=alltoall.cli.model:main",
        ]
    },
)
