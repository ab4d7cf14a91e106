"""Raises, on import, an ImportError naming the command that completes an incomplete install.

TorchRec is installed apart (`pip install --no-deps "torchrec>=1.8,<1.9"`, docs/install.md), so
that pip does not put the CUDA fbgemm-gpu over the CPU build; without it, or without FBGEMM,
``import torchrec_mec`` says what to run instead of failing deep inside an import.
"""
_INSTALL = {"fbgemm_gpu": 'pip install "torchrec-mec[cpu]" (or [cuda])',
            "torchrec": 'pip install --no-deps "torchrec>=1.8,<1.9"'}
try:
    import fbgemm_gpu  # noqa: F401
    import torchrec  # noqa: F401
except ModuleNotFoundError as error:
    if error.name not in _INSTALL:
        raise
    raise ImportError(f"torchrec-mec needs {error.name}, which is not installed: "
                      f"{_INSTALL[error.name]}; see docs/install.md") from error
