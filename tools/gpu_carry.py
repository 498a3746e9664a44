"""Pack an onnxruntime-gpu wheel small enough to carry to a lent GPU machine (64 MiB a call).

    pip download onnxruntime-gpu==1.31.1 --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl-gpu
    python tools/gpu_carry.py .whl-gpu/onnxruntime_gpu-*.whl .gpu-carry --keep-sm 90 --part-mib 40

The wheel is ~250 MB, most of it the CUDA provider's fatbin: one cubin per kernel and GPU
architecture (sm_75 ... sm_120). Only the cubins of the target architecture are loaded there, so
the payloads of the others are zeroed (headers kept, so the fatbin still parses); the C API
library (libonnxruntime.so, which the Python module does not load) is left out. The package tree
is then xz-compressed and split into parts. On the machine:

    cat .gpu-carry/ort.tar.xz.* | tar -xJ -C /tmp/site      # then PYTHONPATH=/tmp/site

Prints what it kept and the sizes. Nothing here is needed by onnxlr itself.
"""

from __future__ import annotations

import argparse
import io
import lzma
import struct
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
DROP = ("libonnxruntime.so",)  # the C API; onnxruntime_pybind11_state.so does not need it


def elf_section(data: bytes | bytearray, name: bytes) -> tuple[int, int] | None:
    """(file offset, size) of an ELF64 section, or None."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    str_off, = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)
    for i in range(shnum):
        sh = shoff + i * shentsize
        name_off, = struct.unpack_from("<I", data, sh)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off:end] == name:
            off, size = struct.unpack_from("<QQ", data, sh + 0x18)
            return off, size
    return None


def trim_fatbin(data: bytearray, keep_sm: set[int]) -> Counter:
    """Zero the payload of every fatbin entry whose architecture is not in ``keep_sm``."""
    seen: Counter = Counter()
    where = elf_section(data, b".nv_fatbin")
    if where is None:
        return seen
    start, size = where
    pos, end_all = start, start + size
    while pos + 16 <= end_all:
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # alignment padding between fatbins
            continue
        e, end = pos + hsize, pos + hsize + fsize
        while e < end:
            kind, _ev, ehsize, psize = struct.unpack_from("<HHIQ", data, e)
            sm, = struct.unpack_from("<I", data, e + 28)
            kept = sm in keep_sm
            seen[("kept" if kept else "zeroed", {1: "ptx", 2: "cubin"}.get(kind, kind), sm)] += psize
            if not kept:
                data[e + ehsize:e + ehsize + psize] = bytes(psize)
            e += ehsize + psize
        pos = end
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel")
    ap.add_argument("out_dir")
    ap.add_argument("--keep-sm", default="90", help="architectures to keep, comma-separated (default: 90)")
    ap.add_argument("--part-mib", type=float, default=40, help="size of each part (default: 40 MiB)")
    ap.add_argument("--preset", type=int, default=9)
    args = ap.parse_args()
    keep = {int(x) for x in args.keep_sm.split(",")}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ort.tar.xz.*"):
        old.unlink()
    buf = io.BytesIO()
    with zipfile.ZipFile(args.wheel) as whl, tarfile.open(fileobj=buf, mode="w") as tar:
        for info in whl.infolist():
            if info.is_dir() or any(Path(info.filename).name.startswith(d) for d in DROP):
                continue
            data = bytearray(whl.read(info))
            if info.filename.endswith(".so") and data[:4] == b"\x7fELF":
                seen = trim_fatbin(data, keep)
                for key, n in sorted(seen.items(), key=str):
                    print(f"{Path(info.filename).name}: {key[0]} {key[1]} sm_{key[2]}: {n / 2**20:.1f} MiB")
            ti = tarfile.TarInfo(info.filename)
            ti.size, ti.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
            tar.addfile(ti, io.BytesIO(bytes(data)))
    packed = lzma.compress(buf.getvalue(), preset=args.preset | lzma.PRESET_EXTREME)
    step = int(args.part_mib * 2**20)
    for i in range(0, len(packed), step):
        (out / f"ort.tar.xz.{i // step:02d}").write_bytes(packed[i:i + step])
    print(f"tar {len(buf.getvalue()) / 2**20:.1f} MiB -> xz {len(packed) / 2**20:.1f} MiB in "
          f"{-(-len(packed) // step)} part(s) of at most {args.part_mib:g} MiB, in {out}")


if __name__ == "__main__":
    main()
