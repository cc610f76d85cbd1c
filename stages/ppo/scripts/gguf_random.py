#!/usr/bin/env python3
"""SmolLM2-shaped GGUF files with seeded random weights, for benchmarks on machines that
cannot receive the real 98 MB model (the GPU machine takes 64 MiB per call).

  gguf_random.py skeleton REAL.gguf SKELETON     # here: metadata (tokenizer, shapes) only
  gguf_random.py fill SKELETON OUT.gguf --seed 7  # there: every tensor F32, seeded N(0, 0.02)
  gguf_random.py tensors GGUF                     # list the tensors (name, type, shape)

A skeleton is the real file's header, metadata and tensor table with no tensor data: the
tokenizer and chat template stay real, so prompts tokenise exactly as with the real model.
`fill` writes every tensor as F32 (norm weights N(1, 0.02), everything else N(0, 0.02),
from torch's generator seeded with --seed), so the Rust engine and the PyTorch reference
load identical weights. Needs only the standard library and torch.
"""
import argparse
import ctypes
import struct
import sys

GGUF_TYPES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
F32 = 0
ALIGN = 32


class Reader:
    def __init__(self, raw):
        self.raw, self.pos = raw, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.raw, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.take("Q")
        s = self.raw[self.pos : self.pos + n]
        self.pos += n
        return s

    def value(self, t):
        if t == STRING:
            return self.string()
        if t == ARRAY:
            et, n = self.take("I"), self.take("Q")
            return (et, [self.value(et) for _ in range(n)])
        return self.take(GGUF_TYPES[t])


def parse(raw):
    """(version, metadata [(key, type, value)], tensors [(name, dims, type, offset)], data_start)"""
    r = Reader(raw)
    if r.raw[:4] != b"GGUF":
        sys.exit("not a GGUF file")
    r.pos = 4
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    meta, alignment = [], ALIGN
    for _ in range(n_kv):
        key = r.string()
        t = r.take("I")
        v = r.value(t)
        if key == b"general.alignment":
            alignment = v
        meta.append((key, t, v))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.take("I")
        dims = [r.take("Q") for _ in range(nd)]
        tensors.append((name, dims, r.take("I"), r.take("Q")))
    data_start = (r.pos + alignment - 1) // alignment * alignment
    return version, meta, tensors, data_start, alignment


def put_string(out, s):
    out += struct.pack("<Q", len(s)) + s


def put_value(out, t, v):
    if t == STRING:
        put_string(out, v)
    elif t == ARRAY:
        et, items = v
        out += struct.pack("<IQ", et, len(items))
        for x in items:
            put_value(out, et, x)
    else:
        out += struct.pack("<" + GGUF_TYPES[t], v)


def skeleton(src, dst):
    with open(src, "rb") as f:
        raw = f.read()
    _, _, tensors, data_start, _ = parse(raw)
    with open(dst, "wb") as f:
        f.write(raw[:data_start])
    print(f"{dst}: {data_start} bytes of header, metadata and {len(tensors)} tensor entries")


def fill(src, dst, seed):
    import torch

    with open(src, "rb") as f:
        raw = f.read()
    version, meta, tensors, _, alignment = parse(raw)
    head = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta)))
    for key, t, v in meta:
        put_string(head, key)
        head += struct.pack("<I", t)
        put_value(head, t, v)
    offset, layout = 0, []
    for name, dims, _, _ in tensors:
        n = 1
        for d in dims:
            n *= d
        layout.append((name, dims, n, offset))
        put_string(head, name)
        head += struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", F32, offset)
        offset = (offset + 4 * n + alignment - 1) // alignment * alignment
    head += b"\0" * ((-len(head)) % alignment)
    gen = torch.Generator().manual_seed(seed)
    with open(dst, "wb") as f:
        f.write(head)
        written = 0
        for name, dims, n, off in layout:
            f.write(b"\0" * (off - written))
            w = torch.randn(n, generator=gen, dtype=torch.float32) * 0.02
            if b"norm" in name:
                w += 1.0
            # Raw little-endian f32 bytes without numpy (not installed everywhere).
            f.write(ctypes.string_at(w.data_ptr(), 4 * n))
            written = off + 4 * n
    print(f"{dst}: {len(tensors)} F32 tensors, seed {seed}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("skeleton")
    a.add_argument("src")
    a.add_argument("dst")
    a = sub.add_parser("fill")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--seed", type=int, default=7)
    a = sub.add_parser("tensors")
    a.add_argument("src")
    args = ap.parse_args()
    if args.cmd == "skeleton":
        skeleton(args.src, args.dst)
    elif args.cmd == "fill":
        fill(args.src, args.dst, args.seed)
    else:
        with open(args.src, "rb") as f:
            raw = f.read()
        for name, dims, t, off in parse(raw)[2]:
            print(name.decode(), t, dims, off)


if __name__ == "__main__":
    main()
