"""Type stubs for the knnmem C++ core (pybind11 module knnmem._core)."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

PLACEMENT_BLOCK: int

_F32 = npt.NDArray[np.float32]
_I64 = npt.NDArray[np.int64]
# (scores, indices, keys, values, mask); a field not asked for is None. Key and value
# rows are float32, float16, or uint16 holding bfloat16 bits (key_dtype / value_dtype).
_Out = tuple[
    _F32 | None, _I64 | None, np.ndarray | None, np.ndarray | None, npt.NDArray[np.bool_] | None
]

class Memory:
    def __init__(
        self,
        grid: int,
        capacity: int,
        key_dim: int,
        value_dim: int,
        metric: str = "ip",
        dtype: str = "float32",
    ) -> None: ...
    @property
    def grid(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def key_dim(self) -> int: ...
    @property
    def value_dim(self) -> int: ...
    @property
    def metric(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def written(self) -> _I64: ...
    @property
    def count(self) -> _I64: ...
    def add(self, keys: _F32, values: _F32, which: _I64 | None = None) -> None: ...
    def search(
        self,
        queries: _F32,
        k: int,
        recall_target: float,
        out: _Out | None = None,
        fields: Sequence[str] | None = None,
        which: _I64 | None = None,
        key_dtype: str = "float32",
        value_dtype: str = "float32",
    ) -> _Out: ...
    def clear(self, mask: npt.NDArray[np.bool_] | None = None) -> None: ...
    # Private, for save / load: (keys, key_scale or None, values, written), rows oldest
    # first; keys float32, uint16 (bfloat16 bits) or int8 (docs/format.md).
    def _export_state(self) -> tuple[np.ndarray, _F32 | None, _F32, _I64]: ...
    def _import_state(
        self, keys: np.ndarray, key_scale: _F32 | None, values: _F32, written: _I64
    ) -> None: ...

def search(
    keys: _F32,
    values: _F32,
    written: _I64,
    queries: _F32,
    k: int,
    recall_target: float,
    metric: str,
    precision: str = "float32",
    out: _Out | None = None,
    fields: Sequence[str] | None = None,
    which: _I64 | None = None,
    key_dtype: str = "float32",
    value_dtype: str = "float32",
) -> _Out: ...
def add(
    keys: _F32,
    values: _F32,
    written: _I64,
    new_keys: _F32,
    new_values: _F32,
    which: _I64 | None = None,
) -> None: ...
def placement(capacity: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
def check_search_options(k: int, recall_target: float, capacity: int) -> None: ...
def expected_recall(num_bins: int, k: int) -> float: ...
def bins_for_recall(k: int, recall_target: float) -> int: ...
def bins_for_search(k: int, recall_target: float, dtype: str = "float32") -> int: ...
def set_num_threads(num_threads: int) -> None: ...
def set_kernel(name: str) -> None: ...
def get_kernel() -> str: ...
def supported_kernels() -> list[str]: ...
def get_num_threads() -> int: ...
