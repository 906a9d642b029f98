"""Build otherview and its compiled ops.

The CPU extension is built wherever torch is installed; the CUDA one where torch was built with
CUDA and nvcc is found (architectures from TORCH_CUDA_ARCH_LIST, else the visible device, else
sm_90). Install with ``pip install --no-build-isolation -e .`` so pip uses the torch already in the
environment instead of resolving (and downloading) one of its own.
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a setup-time message, not a code path
    raise SystemExit(
        "otherview builds against the torch already installed: install torch first, then "
        "`pip install --no-build-isolation -e .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("OTHERVIEW_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    sources = [os.path.join("csrc", "otherview.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    define = []
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "otherview._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define + [("OTHERVIEW_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "otherview._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="otherview",
    version="0.1.0",
    description="Paired-prompt probes of diffusion-transformer attention heads, from a TOML spec",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["otherview", "otherview.*"]),
    package_data={"otherview": ["configs/*.jinja", "configs/*/*.json"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42,<0.43",
        "transformers>=4.56",
        "accelerate>=1.0",
        "numpy>=1.26",
        "pydantic>=2.7,<3",
        "click>=8.1",
        "safetensors>=0.4",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "pillow>=10",
        "scipy>=1.11",
        "pandas>=2.0",
    ],
    extras_require={"test": ["pytest>=8", "scipy>=1.11", "ninja", "pybind11", "jsonschema>=4.18"]},
    entry_points={"console_scripts": ["otherview=otherview.cli:run"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    zip_safe=False,
)
