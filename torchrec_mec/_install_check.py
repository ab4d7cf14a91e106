"""Raises, on import, an ImportError naming the command that completes an incomplete install.

TorchRec is installed apart (`pip install --no-deps "torchrec>=1.8,<1.9"`, docs/install.md), so
that pip does not put the CUDA fbgemm-gpu over the CPU build; without it, or without FBGEMM,
``import torchrec_mec`` says what to run instead of failing deep inside an import. Since pip
does not pin it, the TorchRec version is checked here too: the sharder uses TorchRec internals
(``_grouped_embedding_configs``) of the tested minor version only.
"""
TESTED_TORCHREC = "1.8"
"""The TorchRec minor version torchrec-mec is tested with (and its internals are read for)."""
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


def check_torchrec_version(found: str) -> None:
    """Raises an ImportError naming the command that installs the tested TorchRec if ``found``
    (a TorchRec version) is of another minor version.

    >>> check_torchrec_version("1.8.0")
    >>> check_torchrec_version("1.9.1")
    Traceback (most recent call last):
    ...
    ImportError: torchrec-mec is tested with torchrec 1.8.*, found 1.9.1: pip install ...
    """
    if found.split(".")[:2] != TESTED_TORCHREC.split("."):
        raise ImportError(f"torchrec-mec is tested with torchrec {TESTED_TORCHREC}.*, found "
                          f"{found}: {_INSTALL['torchrec']}; see docs/install.md")


check_torchrec_version(torchrec.__version__)
