"""Counter-based random numbers: pure functions of (key, counter).

The synthetic generator and the split assignment draw every number as a hash of a stream key
and a counter (a row index or an id), so a value never depends on how the work was chunked and
per-id quantities of a 50M-id table need no memory at all.
"""
from typing import Union

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TWO_PI = 2.0 * np.pi


def _splitmix64_int(x: int) -> int:
    z = (x + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def stream_key(*parts: Union[int, str]) -> int:
    """A 64-bit key for one named stream of random numbers, e.g. ``stream_key(seed, "zipf", f)``."""
    key = 0
    for part in parts:
        if isinstance(part, str):
            for byte in part.encode():
                key = _splitmix64_int(key ^ byte)
        else:
            key = _splitmix64_int(key ^ (int(part) & _MASK))
        key = _splitmix64_int(key)
    return key


def hash64(counter: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 of ``counter + key * golden``, elementwise, as uint64."""
    z = counter.astype(np.uint64, copy=True)
    z += np.uint64((key * _GOLDEN + _GOLDEN) & _MASK)
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def uniform(counter: np.ndarray, key: int) -> np.ndarray:
    """Uniform float64 in the open interval (0, 1), one per counter."""
    return ((hash64(counter, key) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def normal(counter: np.ndarray, key: int) -> np.ndarray:
    """Standard normal float64, one per counter (Box-Muller on two hashed uniforms)."""
    u1 = uniform(counter, key)
    u2 = uniform(counter, _splitmix64_int(key ^ 0x5DEECE66D))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(_TWO_PI * u2)
