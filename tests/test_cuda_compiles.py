"""Every CUDA source compiles for sm_90 with nvcc, on machines without a GPU too.

CI has no GPU and a CPU torch wheel, so the CUDA kernels are otherwise never compiled there. This
compiles each ``csrc/cuda/*.cu`` to an object file (no link) with the flags torch's own extension
build passes, against the CPU wheel's headers (which include ATen/cuda and c10/cuda). Without nvcc
the test skips, except under CI (the ``CI`` environment variable set), where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCH = "-gencode=arch=compute_90,code=sm_90"


def _find_nvcc() -> str | None:
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _include_dirs() -> list[str]:
    dirs = [str(ROOT / "csrc"), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    # cuBLAS / cuSPARSE / cuSOLVER headers (needed by ATen/cuda/CUDAContext.h) ship in the nvidia-*
    # wheels, not in every CUDA toolkit install.
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(str(p) for p in Path(site).glob("nvidia/**/include") if p.is_dir())
    return dirs


def _flags() -> list[str]:
    """Return the nvcc flags of setup.py's CUDAExtension as torch's BuildExtension passes them."""
    flags = [
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DOTHERVIEW_WITH_CUDA",
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "-lineinfo",
        "-Xcompiler",
        "-fPIC",
        ARCH,
    ]
    # A CPU wheel lacks the CMake-generated c10/cuda/impl/cuda_cmake_macros.h; it only matters for
    # Windows DLL exports, and c10 provides this switch for builds without it.
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _compile(nvcc: str, source: Path, out_dir: Path) -> tuple[int, str]:
    cmd = [nvcc, "-c", str(source), "-o", str(out_dir / (source.stem + ".o")), *_flags()]
    cmd += [f"-I{d}" for d in _include_dirs()]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return proc.returncode, " ".join(cmd) + "\n" + proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[Path, tuple[int, str]]:
    """Compile every CUDA source in parallel once; map each source to (return code, log)."""
    nvcc = _find_nvcc()
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found (CI is set, so the CUDA sources must be compiled)")
        pytest.skip("nvcc not found")
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    workers = max(1, min(len(CUDA_SOURCES), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda src: _compile(nvcc, src, out_dir), CUDA_SOURCES)
    return dict(zip(CUDA_SOURCES, results))


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90(source, compiled):
    returncode, log = compiled[source]
    if returncode != 0:
        sys.stderr.write(log)
    assert returncode == 0, f"nvcc failed on {source.name}:\n{log[-6000:]}"
