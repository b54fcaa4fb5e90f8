"""The Open Inference Protocol's datatypes and their numpy dtypes: the one table the client, the server and the optimizer read.

numpy only, so that the optimizer may import it without pulling in gRPC or the generated protos.
"""

from __future__ import annotations

import numpy as np

# Each datatype's little-endian numpy equivalent. BYTES travel as object arrays.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
# The reverse, in native byte order (what numpy arrays built here carry); BYTES is found by dtype kind instead.
NUMPY_TO_DATATYPE: dict[np.dtype, str] = {v.newbyteorder("="): k for k, v in DATATYPE_TO_NUMPY.items() if k != "BYTES"}
