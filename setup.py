"""Builds the optional C++ lookup operator (torchrec_mec._C) through torch's extension API.

The build needs torch importable at build time (`pip install --no-build-isolation -e .`, as dev.sh
does). When torch is absent or the compiler fails, the package still installs without the
operator and torchrec_mec falls back to its FBGEMM / pure-PyTorch lookups, with a warning.
"""
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    print("torchrec-mec: torch is not importable at build time; skipping the C++ lookup "
          "operator (install with --no-build-isolation to build it)", file=sys.stderr)
else:

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that reports a failed compile instead of failing the install."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as error:  # noqa: BLE001  (any compiler or linker failure)
                print(f"torchrec-mec: building torchrec_mec._C failed ({error}); the package "
                      "falls back to its slower FBGEMM / pure-PyTorch lookups", file=sys.stderr)
                self.extensions = []  # nothing was built, so there is nothing to install

    ext_modules = [
        CppExtension(
            "torchrec_mec._C",
            ["torchrec_mec/ops/csrc/pq_lookup.cpp"],
            extra_compile_args=["-O3", "-g0", "-fopenmp", "-Wno-psabi"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
