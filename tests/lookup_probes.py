"""Bad-input probes of the QEBC lookup (docs/reliability.md, "Lookups and the QEBC"), run in a
subprocess by tests/test_lookup_input_checks.py: each prints one line, ``probe path error``.

Each probe is run on every CPU path: ``fused`` (the compiled operator), ``fallback`` (FBGEMM TBE,
taken when the operator is not built) and ``device`` (the CUDA path's Python layer, run on CPU).

    python -m tests.lookup_probes
"""
import sys
from typing import Callable, Dict, List, Tuple

import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.modules import quantized_embedding_bag_collection as qebc_module

KEYS = ["f0", "f1", "f2"]


def configs() -> List[QuantizedEmbeddingBagConfig]:
    return [
        QuantizedEmbeddingBagConfig(name="t0", num_embeddings=50, embedding_dim=8,
                                    feature_names=["f0"], num_subspaces=4, codebook_size=6),
        QuantizedEmbeddingBagConfig(name="t1", num_embeddings=7, embedding_dim=4,
                                    feature_names=["f1"]),
        QuantizedEmbeddingBagConfig(name="t2", num_embeddings=300, embedding_dim=6,
                                    feature_names=["f2"], num_subspaces=2, codebook_size=300,
                                    pooling=PoolingType.MEAN),
    ]


def kjt(lengths: List[int], values: List[int], keys: List[str] = KEYS,
        dtype: torch.dtype = torch.int64) -> KeyedJaggedTensor:
    # As a data loader builds it: lengths only; TorchRec computes the offsets.
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=dtype),
                             lengths=torch.tensor(lengths))


# probe name -> (input, the message it must raise as a ValueError: a regular expression)
PROBES: Dict[str, Tuple[Callable[[], KeyedJaggedTensor], str]] = {
    # The probes: 2 values, lengths 100000 and -99998 (they sum to 2).
    "huge_then_negative_length": (lambda: kjt([100000, -99998, 0, 0, 0, 0], [1, 1]),
                                  r"feature 'f0': bag 1 has a negative length \(-99998\)"),
    "negative_length": (lambda: kjt([6, -2, 0, 0, 0, 0], [1, 2, 3, 4]),
                        r"feature 'f0': bag 1 has a negative length \(-2\)"),
    "lengths_sum_past_values": (lambda: kjt([1, 1, 1, 1, 2, 0], [1, 2, 3, 4, 5]),
                                r"feature 'f2': its bags end at value 6 but there are only 5 "
                                r"values \(the lengths sum to more"),
    "lengths_sum_short_of_values": (lambda: kjt([1, 1, 1, 0, 0, 0], [1, 2, 3, 4]),
                                    r"feature 'f2': the bags end at value 3 but there are 4 "
                                    r"values \(the lengths sum to less"),
    "negative_id": (lambda: kjt([1, 0, 1, 0, 1, 0], [1, -1, 3]),
                    r"feature 'f1': id -1 is out of range for table 't1' with 7 rows"),
    "id_past_the_table": (lambda: kjt([1, 0, 1, 0, 1, 0], [1, 2, 300]),
                          r"feature 'f2': id 300 is out of range for table 't2' with 300 rows"),
    "int64_extreme_id": (lambda: kjt([1, 0, 0, 0, 0, 0], [2**63 - 1]),
                         rf"feature 'f0': id {2**63 - 1} is out of range for table 't0'"),
    "int32_extreme_id": (lambda: kjt([1, 0, 0, 0, 0, 0], [-(2**31)], dtype=torch.int32),
                         rf"feature 'f0': id {-(2**31)} is out of range for table 't0'"),
    "keys_in_another_order_bad_id": (lambda: kjt([1, 0, 1, 0, 1, 0], [1, 7, 2], ["f2", "f1", "f0"]),
                                     r"feature 'f1': id 7 is out of range for table 't1'"),
    "code_past_the_codebook": (lambda: kjt([0, 0, 0, 0, 1, 0], [5]),
                               r"table 't2': codes hold a value >= codebook_size 300"),
    "missing_feature": (lambda: kjt([1, 1, 1, 1], [1, 2, 3, 4], ["f0", "f1"]),
                        r"missing configured feature\(s\) \['f2'\]"),
    "unknown_feature": (lambda: kjt([0] * 8, [], KEYS + ["zz"]),
                        r"feature\(s\) \['zz'\] that no table reads"),
    "repeated_feature": (lambda: kjt([0] * 8, [], KEYS + ["f0"]),
                         r"repeats a feature"),
    "float_ids": (lambda: KeyedJaggedTensor(keys=KEYS, values=torch.tensor([1.0, 2.0, 3.0]),
                                            lengths=torch.tensor([1, 0, 1, 0, 1, 0])),
                  r"feature ids must be int32 or int64, got torch.float32"),
}
PATHS = ("fused", "fallback", "device")


def run(path: str, make_input: Callable[[], KeyedJaggedTensor]) -> str:
    qebc = QuantizedEmbeddingBagCollection(configs())
    with torch.no_grad():
        qebc.embedding_bags["t2"].codes[5, 1] = 300  # a uint16 holds it; K = 300 does not
    features = make_input()
    try:
        if path == "device":
            qebc._device_forward(qebc._split(features))
        else:
            qebc(features)
    except Exception as error:  # noqa: BLE001  (the probe reports whatever was raised)
        return f"{type(error).__name__}: {error}".replace("\n", " ")
    return "no error"


def main() -> int:
    for path in PATHS:
        if path == "fallback":
            qebc_module.cpu_operator_available = lambda: False  # type: ignore[assignment]
        for name, (make_input, _) in PROBES.items():
            print(f"{name} {path} {run(path, make_input)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
