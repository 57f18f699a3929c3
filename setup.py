"""Builds native/ (libllava_vision, see CMakeLists.txt) during `pip install`; everything else is in
pyproject.toml.

The library goes into llava_local/_native/ (the source tree for `pip install -e .`, the wheel
otherwise), built against the llama-cpp-python that the build environment has (pinned in
[build-system] requires, the same version the package depends on). A failed native build warns and
the install goes on: the `native` vision backend then reports itself unavailable and the engine
falls back. LLAVA_LOCAL_SKIP_NATIVE=1 skips it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIB_NAME = {"darwin": "libllava_vision.dylib", "win32": "llava_vision.dll"}.get(sys.platform, "libllava_vision.so")


def llama_cpp_dir() -> Path | None:
    """The installed llama_cpp package: the target environment's if it has one, else the build env's."""
    target = Path(sysconfig.get_paths()["platlib"]) / "llama_cpp"
    if (target / "lib").is_dir():
        return target
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin).parent if spec and spec.origin else None


class BuildNative(build_ext):
    """Runs CMake for the one "extension": a plain shared library that ctypes loads."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")[:-1], LIB_NAME)

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("LLAVA_LOCAL_SKIP_NATIVE"):
            self.warn("LLAVA_LOCAL_SKIP_NATIVE set: not building the native vision encoder")
            return
        try:
            self._cmake(Path(self.get_ext_fullpath(ext.name)).resolve().parent)
        except Exception as exc:  # never fail the install: the engine falls back to another backend
            self.warn(f"native vision encoder NOT built ({exc}); the `native` backend will be unavailable")

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy the library into the source tree, whose folder is not a package.
        # Unlink first: rewriting the old file in place would corrupt it under a running process.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            folder = Path(build_py.get_package_dir(ext.name.rpartition(".")[0]))
            folder.mkdir(parents=True, exist_ok=True)
            if (Path(self.build_lib) / self.get_ext_filename(ext.name)).is_file():
                (folder / LIB_NAME).unlink(missing_ok=True)
        super().copy_extensions_to_source()

    def _cmake(self, out_dir: Path) -> None:
        cmake = shutil.which("cmake")
        if not cmake:
            raise RuntimeError("cmake not found on PATH")
        llama = llama_cpp_dir()
        if llama is None:
            raise RuntimeError("llama_cpp (llama-cpp-python) is not installed in the build environment")
        build_dir = Path(self.build_temp).resolve() / "native"
        out_dir.mkdir(parents=True, exist_ok=True)
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DLLAMA_CPP_DIR={llama}", f"-DLLAVA_VISION_OUTPUT_DIR={out_dir}"]
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)], check=True)


setup(
    ext_modules=[Extension("llava_local._native.llava_vision", sources=[], optional=True)],
    cmdclass={"build_ext": BuildNative},
)
