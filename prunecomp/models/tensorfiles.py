"""Safetensors files read and written one tensor at a time, for records too large to hold at once.

Why: block reconstruction on a layer-streamed model fits whole decoder layers; a recipe records every fitted
layer (2 per removal), which for a 70B model is tens of GiB. The streamed model keeps each fit in a file of its
spill folder, the recipe refers to it through :class:`LazyTensors` (a ``Mapping`` that reads a tensor when asked),
renaming goes through :class:`Renamed` (still lazy), and :func:`write_safetensors` writes any such mapping
holding one tensor in memory at a time. Plain ``dict`` s work everywhere the lazy mappings do.
"""

from __future__ import annotations

import json
import struct
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prunecomp.errors import PrunecompError

__all__ = ["DTYPES", "LazyTensors", "Renamed", "SafetensorsWeights", "read_safetensors_header", "tensor_digest",
           "tensor_meta", "write_safetensors"]

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_CODES = {v: k for k, v in DTYPES.items()}


_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                      "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def _tensor_extent(name: str, entry: Any) -> int:
    """Where tensor ``name``'s bytes end, after checking that its offsets hold exactly ``shape`` x dtype size: a
    header that disagrees with itself would otherwise fail deep inside torch or safetensors on first read."""
    begin, end = (int(x) for x in entry["data_offsets"])
    width = _SAFETENSORS_BYTES.get(str(entry["dtype"]))
    if width is None:
        raise ValueError(f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
    count = 1
    for dim in entry["shape"]:
        if int(dim) < 0:
            raise ValueError(f"tensor {name!r} has a negative dimension")
        count *= int(dim)
    if begin < 0 or end - begin != count * width:
        raise ValueError(f"tensor {name!r}: offsets [{begin}, {end}] hold {end - begin} bytes, its shape "
                         f"{list(entry['shape'])} x {entry['dtype']} needs {count * width}")
    return end


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts; a clear error when the file is truncated
    or not safetensors (checked from the header alone: no tensor is read)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, entry in header.items():
            if name != "__metadata__":
                end = max(end, _tensor_extent(name, entry))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise PrunecompError(f"weights file {str(path)!r} is not a readable safetensors file ({exc}); expected a "
                             "complete safetensors file (re-download or re-save it)") from exc
    if 8 + n + end > size:
        raise PrunecompError(f"weights file {str(path)!r} is truncated: {size} bytes, its header describes "
                             f"{8 + n + end}; re-download or re-save it")
    return header, 8 + n


class LazyTensors(Mapping[str, Tensor]):
    """The tensors of one safetensors file, each read when asked for with one positioned read (not memory-mapped:
    pages of a mapped file count as resident once touched, so a pass over a model larger than RAM would look like
    holding all of it; here a tensor's bytes live exactly as long as the tensor). Keys get ``prefix`` in front."""

    def __init__(self, path: str | Path, *, prefix: str = "", keep: object = None) -> None:
        """``keep``: an object to keep alive while this mapping is (the temporary folder holding ``path``).
        A file that is not safetensors, is truncated or holds an unsupported dtype is refused here, before any
        tensor is read."""
        self.path, self.prefix, self._keep = Path(path), prefix, keep
        header, data_start = read_safetensors_header(self.path)
        self._where: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        self._digests: dict[str, str] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise PrunecompError(f"{self.path.name}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            self._where[prefix + name] = (name, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + start,
                                          end - start)

    def __getitem__(self, key: str) -> Tensor:
        name, dtype, shape, offset, length = self._where[key]
        buf = bytearray(length)
        with self.path.open("rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf) != length:
                raise PrunecompError(f"{self.path.name} is truncated (tensor {name!r})")
        if length == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of ``key`` without reading it."""
        _name, dtype, shape, _offset, _length = self._where[key]
        return dtype, shape

    def digest(self, key: str, fn: Callable[[Tensor], str]) -> str:
        """``fn(tensor)`` for ``key``, computed once (a recipe's digest reads every tensor; a run asks often)."""
        if key not in self._digests:
            self._digests[key] = fn(self[key])
        return self._digests[key]


class Renamed(Mapping[str, Tensor]):
    """``source`` under other names (``names``: new -> old), read through, so a lazy source stays lazy."""

    def __init__(self, source: Mapping[str, Tensor], names: Mapping[str, str]) -> None:
        missing = sorted(old for old in names.values() if old not in source)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise KeyError(f"no tensor {missing[0]!r}{more}")
        self.source, self.names = source, dict(names)

    def __getitem__(self, key: str) -> Tensor:
        return self.source[self.names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def __len__(self) -> int:
        return len(self.names)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return tensor_meta(self.source, self.names[key])

    def digest(self, key: str, fn: Callable[[Tensor], str]) -> str:
        return tensor_digest(self.source, self.names[key], fn)


def tensor_meta(tensors: Mapping[str, Tensor], key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of ``tensors[key]``, without reading it when the mapping can tell."""
    if isinstance(tensors, ChainMap):
        return tensor_meta(next(m for m in tensors.maps if key in m), key)
    meta = getattr(tensors, "meta", None)
    if meta is not None:
        return meta(key)
    t = tensors[key]
    return t.dtype, tuple(t.shape)


def tensor_digest(tensors: Mapping[str, Tensor], key: str, fn: Callable[[Tensor], str]) -> str:
    """``fn(tensors[key])``, cached by a lazy mapping (see :meth:`LazyTensors.digest`)."""
    if isinstance(tensors, ChainMap):
        return tensor_digest(next(m for m in tensors.maps if key in m), key, fn)
    cached = getattr(tensors, "digest", None)
    return cached(key, fn) if cached is not None else fn(tensors[key])


def write_safetensors(tensors: Mapping[str, Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, reading (and holding) one tensor at a time. The file is what
    ``safetensors.torch.save_file`` would accept back: a little-endian u64 header length, the JSON header
    (padded with spaces to 8 bytes), then the tensors' bytes back to back in header order."""
    names = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        dtype, shape = tensor_meta(tensors, name)
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


class SafetensorsWeights:
    """Tensors of a safetensors folder (one file or index-sharded), each read on demand with one positioned read
    (:class:`~prunecomp.models.tensorfiles.LazyTensors` per file)."""

    def __init__(self, folder: Path) -> None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise PrunecompError(f"layer streaming reads safetensors weights; {folder} has none (convert GGUF/pickle "
                                 "checkpoints with save_pretrained first)")
        self._file_of: dict[str, LazyTensors] = {}
        for f in files:
            lazy = LazyTensors(f)
            self._file_of |= dict.fromkeys(lazy, lazy)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def get(self, name: str) -> Tensor:
        return self._file_of[name][name]

    def with_prefix(self, prefix: str) -> dict[str, Tensor]:
        return {n[len(prefix):]: self.get(n) for n in self._file_of if n.startswith(prefix)}
