"""ONNX files read and written a field at a time, so a model is never held twice in memory.

``onnx.load`` reads the whole file into one bytes object and then parses it;
``onnx.save`` serialises the whole model into one bytes object and then
writes it. Either way the process briefly holds the model twice. A protobuf
message is a sequence of fields, and parsing two serialised pieces one after
the other is the same as parsing their concatenation (repeated fields append,
others merge), so the graph (where the weights are) can be read in chunks of
whole fields, and written one field at a time behind a length prefix patched
in at the end (upb's ``ByteSize()`` would serialise the whole graph to count).

Only the two outer levels (``ModelProto`` and its ``graph``) are split; every
field is handed to protobuf whole, so what is parsed is what ``onnx.load``
parses and what is written is, byte for byte, what ``SerializeToString``
writes (both walk the fields in number order).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import onnx

GRAPH = 7  # ModelProto.graph
CHUNK = 32 << 20  # bytes of whole fields parsed at a time
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class WireError(ValueError):
    """The file is not a protobuf message (truncated, or not ONNX at all)."""


def _encode(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, f, end: int) -> None:
        self.f, self.pos, self.end = f, 0, end

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise WireError("the file is truncated")
        data = bytearray()
        while len(data) < n:
            more = self.f.read(n - len(data))  # an unbuffered read may return less
            if not more:
                raise WireError("the file is truncated")
            data += more
        self.pos += n
        return bytes(data)

    def varint(self) -> tuple[int, bytes]:
        raw = bytearray()
        while True:
            b = self.take(1)[0]
            raw.append(b)
            if not b & 0x80:
                break
            if len(raw) > 10:
                raise WireError("a malformed varint")
        return sum((b & 0x7F) << (7 * i) for i, b in enumerate(raw)), bytes(raw)

    def field(self, limit: int) -> tuple[int, int, bytes, int | None]:
        """(field number, wire type, its raw bytes with the tag, payload length for a
        length-delimited field whose payload is left unread, else None)."""
        tag, raw_tag = self.varint()
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == _VARINT:
            return number, wire, raw_tag + self.varint()[1], None
        if wire == _FIXED64:
            return number, wire, raw_tag + self.take(8), None
        if wire == _FIXED32:
            return number, wire, raw_tag + self.take(4), None
        if wire == _LEN:
            n, raw_n = self.varint()
            if n > limit - self.pos:
                raise WireError("the file is truncated")
            return number, wire, raw_tag + raw_n, n
        raise WireError(f"not an ONNX protobuf (field {number} has wire type {wire})")


def read_model(path: str | os.PathLike, progress: Progress | None = None) -> onnx.ModelProto:
    """``onnx.load(path, load_external_data=False)``, holding at most one chunk of the file besides the model."""
    size = os.path.getsize(path)
    model = onnx.ModelProto()
    with open(path, "rb", buffering=0) as f:
        r = _Reader(f, size)
        while r.pos < size:
            number, wire, head, n = r.field(size)
            if number == GRAPH and wire == _LEN:
                _read_graph(r, r.pos + n, model.graph, progress, size)
            else:
                model.MergeFromString(head + (r.take(n) if n is not None else b""))
    return model


def _read_graph(r: _Reader, end: int, graph: onnx.GraphProto, progress: Progress | None, size: int) -> None:
    """Parse the graph's fields from the file in chunks of whole fields (a field larger than a chunk: alone)."""
    buf, filled = bytearray(min(CHUNK, end - r.pos)), 0
    while r.pos < end:
        if filled == len(buf):  # one field larger than the buffer
            buf.extend(bytes(min(len(buf), end - r.pos)))
        with memoryview(buf) as view:
            n = r.f.readinto(view[filled : filled + end - r.pos])
            if not n:
                raise WireError("the file is truncated")
            r.pos, filled = r.pos + n, filled + n
            cut = _whole_fields(view[:filled])
            if cut:
                graph.MergeFromString(view[:cut])
                buf[: filled - cut] = view[cut:filled].tobytes()
                filled -= cut
        if progress and cut:
            progress(r.pos, size)
    if filled:
        raise WireError("the file is truncated")


def _varint_at(buf, i: int) -> tuple[int, int] | None:
    """(value, index after it) of the varint at ``buf[i]``, or None if it runs past the end."""
    value = shift = 0
    while i < len(buf):
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise WireError("a malformed varint")
    return None


def _whole_fields(buf) -> int:
    """How many bytes at the start of ``buf`` are whole fields."""
    i = 0
    while True:
        tag = _varint_at(buf, i)
        if tag is None:
            return i
        wire, j = tag[0] & 7, tag[1]
        if tag[0] >> 3 == 0:
            raise WireError("field number 0")
        if wire == _VARINT:
            nxt = _varint_at(buf, j)
            j = None if nxt is None else nxt[1]
        elif wire in (_FIXED64, _FIXED32):
            j += 8 if wire == _FIXED64 else 4
        elif wire == _LEN:
            n = _varint_at(buf, j)
            j = None if n is None else n[1] + n[0]
        else:
            raise WireError(f"not an ONNX protobuf (field {tag[0] >> 3} has wire type {wire})")
        if j is None or j > len(buf):
            return i
        i = j


def _alone(message, fd, value):
    """A message of ``message``'s type holding only field ``fd`` (small fields: copied)."""
    one = type(message)()
    target = getattr(one, fd.name)
    if fd.is_repeated:
        target.extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(one, fd.name, value)
    return one


def _has_unknown_fields(*messages) -> bool:
    from google.protobuf.unknown_fields import UnknownFieldSet

    return any(len(UnknownFieldSet(m)) for m in messages)


def write_model(model: onnx.ModelProto, path: str | os.PathLike, progress: Progress | None = None) -> None:
    """``onnx.save(model, path)``, byte for byte, serialising one field of the graph at a time.

    The graph's length prefix comes first in the file but is known only at
    the end (upb's ``ByteSize()`` serialises the whole message to count it), so
    five bytes are reserved and patched; a shorter prefix moves the graph back.
    """
    g = model.graph
    if any(left_out(t) for t in g.initializer):
        raise ValueError("tensors left out of the proto must be loaded (load_left_out) or written out first")
    if _has_unknown_fields(model, g):  # fields this onnx does not know: only protobuf can write them back
        onnx.save(model, os.fspath(path))
        return
    with open(path, "w+b") as f:
        for fd, value in model.ListFields():
            if fd.number != GRAPH:
                f.write(_alone(model, fd, value).SerializeToString())
                continue
            f.write(_encode(GRAPH << 3 | _LEN))
            at = f.tell()
            f.write(bytes(_RESERVED))
            for gfd, gvalue in g.ListFields():
                if not (gfd.is_repeated and gfd.type == gfd.TYPE_MESSAGE):
                    f.write(_alone(g, gfd, gvalue).SerializeToString())
                    continue
                tag = _encode(gfd.number << 3 | _LEN)
                for item in gvalue:
                    data = item.SerializeToString()
                    f.write(tag + _encode(len(data)))
                    f.write(data)
                    if progress and len(data) > 1 << 20:
                        progress(f.tell(), 0)
            _patch_length(f, at, f.tell() - at - _RESERVED)
        if f.tell() > 2**31 - 1:
            raise ValueError("the model is over 2 GB: it needs external data")


_RESERVED = 5  # bytes of varint: lengths below 2**35


def _patch_length(f, at: int, n: int) -> None:
    """Write the varint ``n`` at ``at`` before ``n`` bytes that start ``_RESERVED`` bytes later; leave ``f`` at the end."""
    head = _encode(n)
    f.seek(at)
    f.write(head)
    gap = _RESERVED - len(head)
    if gap:  # move the body back over the unused bytes, a chunk at a time
        src, dst = at + _RESERVED, at + len(head)
        for start in range(0, n, CHUNK):
            f.seek(src + start)
            chunk = f.read(min(CHUNK, n - start))
            f.seek(dst + start)
            f.write(chunk)
        f.truncate(dst + n)
    f.seek(0, os.SEEK_END)


# --- weights left out of the model proto ----------------------------------------------------
#
# A model over 2 GB keeps its weights in files beside it. Loading them all (``load_external_data_
# for_model``) costs the whole size in memory and time, though a fold reads only the layers it
# changes. Instead, ``anchor_external_data`` points each large external tensor at its file by
# absolute path (read when a fold asks: ``read_external``), and ``write_with_external_data``
# copies the bytes of the tensors the fold kept from file to file. The new weights a fold makes
# can stay out of the proto too (``mark_pending``): they are written from their arrays, never
# copied into protobuf and out again. Either kind is marked by a key in ``external_data`` and
# must go through ``write_with_external_data`` or ``load_left_out`` before the model is written.

ANCHORED = "repfold:anchored"  # the tensor's bytes are in a file, at an absolute location
PENDING = "repfold:pending"  # the tensor's values are an array the caller holds, by tensor name
_ALIGN = 4096  # large tensors start on a page boundary in the data file written (onnxruntime can map them)
_LARGE = 1 << 20
_INLINE = 1024  # tensors smaller than this are stored in the model file (onnx.save's default threshold)
# the float types a fold reads as NumPy views of raw bytes
PLAIN_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.FLOAT16: "float16"}


def _external_fields(t: onnx.TensorProto) -> dict[str, str]:
    return {kv.key: kv.value for kv in t.external_data}


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int, mark: str | None = None) -> None:
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        kv = t.external_data.add()
        kv.key, kv.value = key, value
    if mark:
        kv = t.external_data.add()
        kv.key, kv.value = mark, "1"
    t.data_location = onnx.TensorProto.EXTERNAL


def _set_inline(t: onnx.TensorProto, data: bytes) -> None:
    t.raw_data = data
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT


def left_out(t: onnx.TensorProto) -> str | None:
    """``ANCHORED``, ``PENDING``, or None for a tensor stored the usual way."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((kv.key for kv in t.external_data if kv.key in (ANCHORED, PENDING)), None)


def nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes of ``t``'s values as raw data, or None for types without a fixed item size (strings, 4-bit)."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    n = 1
    for d in t.dims:
        n *= d
    return n * itemsize


def anchor_external_data(model: onnx.ModelProto, folder: str | os.PathLike) -> set[str]:
    """Check every external tensor's bytes are in their file; point large ones there, load the rest.

    Large float initializers (the weights) are left on disk with absolute
    locations; smaller or other tensors, and those in subgraphs or node
    attributes, are read into the model. Returns the data files.
    Raises ``ValueError`` with a one-line reason.
    """
    folder = os.path.abspath(folder)
    sizes: dict[str, int] = {}  # data file -> its size

    def where(t: onnx.TensorProto) -> tuple[str, int, int] | None:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return None
        info = _external_fields(t)
        location = info.get("location", "")
        path = os.path.normpath(os.path.join(folder, location))
        if not location or os.path.isabs(location) or not path.startswith(folder + os.sep):
            raise ValueError(f"tensor {t.name!r} has its data at {location!r}, outside the model's folder")
        if path not in sizes:
            if not os.path.isfile(path):
                raise ValueError(f"its external data file {path} is missing")
            sizes[path] = os.path.getsize(path)
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ValueError(f"tensor {t.name!r} has a malformed offset or length") from None
        need = nbytes(t)
        length = need if length is None else length
        if length is None or offset < 0 or (need is not None and length != need):
            raise ValueError(f"tensor {t.name!r}: its external data length does not match its shape")
        if offset + length > sizes[path]:
            raise ValueError(f"tensor {t.name!r} lies past the end of {path} (a cut data file?)")
        return path, offset, length

    for t in model.graph.initializer:
        found = where(t)
        if found is not None and t.data_type in PLAIN_DTYPES and found[2] >= _LARGE:
            _set_external(t, *found, ANCHORED)
        elif found is not None:
            _set_inline(t, _read_bytes(*found))
    for t in _nested_tensors(model.graph):
        found = where(t)
        if found is not None:
            _set_inline(t, _read_bytes(*found))
    return set(sizes)


def _nested_tensors(g: onnx.GraphProto):
    """Tensors in node attributes (Constant values) and the initializers of subgraphs, at any depth."""
    for node in g.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from sub.initializer
                yield from _nested_tensors(sub)


def read_external(t: onnx.TensorProto):
    """An anchored tensor's values, read from its file (a read-only array of a copy)."""
    import numpy as np

    info = _external_fields(t)
    dtype = np.dtype(PLAIN_DTYPES[t.data_type])
    a = np.fromfile(info["location"], dtype=dtype, count=int(info["length"]) // dtype.itemsize,
                    offset=int(info["offset"]))
    a.flags.writeable = False
    return a.reshape(tuple(t.dims))


class Later:
    """A pending tensor made when it is written: its shape and dtype are known now, its values (a fold's
    product, read from the layer it replaces) are computed then, while the tensors before it are written."""

    def __init__(self, shape: tuple[int, ...], dtype, make: Callable[[], object]) -> None:
        import numpy as np

        self.shape, self.dtype, self.make = tuple(int(n) for n in shape), np.dtype(dtype), make
        self.nbytes = self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))

    def __call__(self):
        import numpy as np

        values = np.ascontiguousarray(self.make(), dtype=self.dtype)
        if values.shape != self.shape:
            raise AssertionError(f"a new weight came out {values.shape}, not {self.shape}")
        return values


def _made(values):
    """A pending tensor's array (a :class:`Later` made now)."""
    return values() if isinstance(values, Later) else values


def mark_pending(t: onnx.TensorProto, name: str, values) -> None:
    """Make ``t`` the tensor ``name`` holding ``values`` (an array the caller keeps, by name, until writing)."""
    t.name, t.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    t.dims.extend(values.shape)
    _set_external(t, "", 0, values.nbytes, PENDING)


def _read_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ValueError(f"{path} is shorter than its tensors say")
    return data


def _length(t: onnx.TensorProto) -> int:
    """Bytes of ``t``'s values, without reading ``raw_data`` (which upb copies out on every access)."""
    if left_out(t):
        return int(_external_fields(t)["length"])
    if not t.HasField("raw_data"):
        return 0
    n = nbytes(t)
    return len(t.raw_data) if n is None else n


def load_left_out(model: onnx.ModelProto, pending: dict | None = None, below: int | None = None) -> None:
    """Put the values of left-out tensors (all, or those under ``below`` bytes) into the model."""
    for t in model.graph.initializer:
        kind = left_out(t)
        if kind is None or (below is not None and _length(t) >= below):
            continue
        if kind == PENDING:
            _set_inline(t, _made(pending.pop(t.name)).tobytes())
        else:
            info = _external_fields(t)
            _set_inline(t, _read_bytes(info["location"], int(info["offset"]), int(info["length"])))


def write_with_external_data(
    model: onnx.ModelProto, path: str | os.PathLike, data: str | os.PathLike, progress: Progress | None = None,
    pending: dict | None = None,
) -> None:
    """Write ``model`` to ``path`` with its tensors of 1 KB or more in ``data`` (in the same folder).

    Anchored tensors are copied from their files by the kernel, never through
    this process's memory; pending ones are written from their arrays (and
    dropped from ``pending``); the others' raw data moves from the model to
    the file. Tensors of 1 MB or more start on a 4 KB boundary. The model is
    changed: it ends up as written.
    """
    load_left_out(model, pending, below=_INLINE)  # small ones go into the model file
    name = os.path.basename(data)
    tensors = [(t, n) for t in model.graph.initializer if (n := _length(t)) >= _INLINE]
    total = sum(n for _, n in tensors)
    sources: dict[str, int] = {}
    done = 0
    made = _Ahead([t.name for t, _ in tensors if left_out(t) == PENDING], pending)
    try:
        with open(data, "wb") as out:
            for t, length in tensors:
                at = out.tell()
                if length >= _LARGE and at % _ALIGN:
                    out.write(bytes(_ALIGN - at % _ALIGN))
                    at = out.tell()
                kind = left_out(t)
                if kind == ANCHORED:
                    info = _external_fields(t)
                    out.flush()
                    src = sources.get(info["location"])
                    if src is None:
                        src = sources[info["location"]] = os.open(info["location"], os.O_RDONLY)
                    _copy_range(src, int(info["offset"]), length, out)
                elif kind == PENDING:
                    out.write(memoryview(made.take(t.name)).cast("B"))
                else:
                    out.write(t.raw_data)
                    t.ClearField("raw_data")
                _set_external(t, name, at, length)
                done += length
                if progress and length >= _LARGE:
                    progress(done, total)
    finally:
        made.close()
        for fd in sources.values():
            os.close(fd)
    write_model(model, path)


class _Ahead:
    """The pending tensors' arrays in writing order, the next few :class:`Later` ones made in threads while
    the writer writes (NumPy's products and file reads release the GIL); at most ``_AHEAD`` are held."""

    def __init__(self, names: list[str], pending: dict | None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.names, self.pending, self.next = names, pending, 0
        self.pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        self.futures: dict[str, object] = {}

    def take(self, name: str):
        while len(self.futures) < _AHEAD and self.next < len(self.names):
            ahead = self.names[self.next]
            self.next += 1
            self.futures[ahead] = self.pool.submit(_made, self.pending.pop(ahead))
        return self.futures.pop(name).result()

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)


_AHEAD = 4  # new weights made ahead of the writer (ViT-g's fc1 in float32: 4 x 37 MB)


def _copy_range(src: int, offset: int, length: int, out) -> None:
    """Append ``length`` bytes of the file ``src`` from ``offset`` to ``out`` (kernel copy where there is one)."""
    dst = out.fileno()
    at = out.tell()
    copied = 0
    try:
        while copied < length:
            n = os.copy_file_range(src, dst, length - copied, offset + copied, at + copied)
            if n == 0:
                raise ValueError("a data file ended early")
            copied += n
    except (AttributeError, OSError):  # no copy_file_range here (or across these file systems): read and write
        while copied < length:
            chunk = os.pread(src, min(CHUNK, length - copied), offset + copied)
            if not chunk:
                raise ValueError("a data file ended early") from None
            os.pwrite(dst, chunk, at + copied)
            copied += len(chunk)
    out.seek(at + length)
