"""GGUF block-quantized weights as exact sums of 4-bit MatMulNBits terms (method `gguf4`).

Every GGUF type the provisioned models use stores a weight as
    w[n, k] = s[n, k // bs] * (u[n, k] - off) + c[n, k // 32]
with an unsigned integer code u of 4 to 8 bits, a block scale s, a constant offset, and (for
the types with a block minimum) a per-32-block constant c. A code of more than 4 bits splits
into u = 16 h + l, so
    w = s * (l - 0) + 16 s * (h - off / 16) + c
is two 4-bit `MatMulNBits` terms with integer zero points (off is a multiple of 16 for every
type here), and the constant c contributes blocksum(x) @ c^T, a matmul of K/32 columns. The
graph then computes the GGUF's own weights, with float activations (accuracy_level 0): no
activation quantization, so a row of a multi-token pass gets the same numbers as a one-token
pass up to float rounding, which speculative decoding needs to give greedy's tokens.
(ORT's float zero points would express c directly but run ~20x slower on CPU.)
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


@dataclass
class Term:
    codes: np.ndarray        # uint8 [N, K], values 0..15
    scales: np.ndarray       # float32 [N, K // block]
    zero_point: int          # same for every block
    block: int


@dataclass
class Decomposed:
    terms: list[Term]
    consts: np.ndarray | None  # float32 [N, K // 32]: added per 32-block, or None


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, groups: int, width: int) -> np.ndarray:
    # [n, groups*width] bytes -> [n, groups, 2*width]: low nibbles first, then high ones
    n = qs.shape[0]
    q = qs.reshape(n, groups, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, groups, 2 * width)


def codes(t) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray | None]:
    """(u [N, K] uint8, s [N, K/bs] f32, off, bs, c [N, K/32] f32 or None) of a 2-D GGUF tensor."""
    n_rows = int(t.shape[1])
    raw = np.asarray(t.data, dtype=np.uint8)
    bsz, tsz = gguf.GGML_QUANT_SIZES[t.tensor_type]
    b = raw.reshape(-1, tsz)
    nb = b.shape[0]
    if t.tensor_type == Q.Q4_1:
        u = _nibbles(b[:, 4:], 1, 16).reshape(nb, 32)
        s, c, off, bs = _f16(b[:, 0:2]), _f16(b[:, 2:4]), 0, 32
    elif t.tensor_type == Q.Q8_0:
        u = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        s, c, off, bs = _f16(b[:, 0:2]), None, 128, 32
    elif t.tensor_type == Q.Q5_0:
        qh = np.ascontiguousarray(b[:, 2:6]).view(np.uint32).reshape(nb, 1)
        hi = ((qh >> np.arange(32, dtype=np.uint32).reshape(1, 32)) & 1).astype(np.uint8)
        u = _nibbles(b[:, 6:], 1, 16).reshape(nb, 32) | (hi << 4)
        s, c, off, bs = _f16(b[:, 0:2]), None, 16, 32
    elif t.tensor_type == Q.Q4_K:
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
        u = _nibbles(b[:, 16:], 4, 32).reshape(nb, 256)
        s = (d * sc.astype(np.float32)).reshape(nb, 8)
        c = -(dmin * mn.astype(np.float32)).reshape(nb, 8)
        off, bs = 0, 32
    elif t.tensor_type == Q.Q6_K:
        ql = _nibbles(b[:, :128], 2, 64).reshape(nb, 8, 32)
        qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & 0x03).reshape(nb, 8, 32)
        u = (ql | (qh << 4)).reshape(nb, 256)
        s = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
        c, off, bs = None, 32, 16
    else:
        raise ValueError(f"{t.name}: GGUF type {t.tensor_type.name} not supported by gguf4")
    k = nb * bsz // n_rows
    u = u.reshape(n_rows, k)
    s = np.asarray(s, np.float32).reshape(n_rows, k // bs)
    if c is not None:
        c = np.asarray(c, np.float32).reshape(n_rows, k // 32)
    return u, s, off, bs, c


def decompose(t) -> Decomposed:
    u, s, off, bs, c = codes(t)
    if off < 16 and u.max() < 16:
        return Decomposed([Term(u, s, off, bs)], c)
    assert off % 16 == 0, (t.name, off)
    lo = Term(u & 0x0F, s, 0, bs)
    hi = Term(u >> 4, s * 16.0, off // 16, bs)
    return Decomposed([lo, hi], c)


def dequantize(d: Decomposed) -> np.ndarray:
    """The weights the terms compute, [N, K] float32 (for checks)."""
    w = None
    for t in d.terms:
        n, k = t.codes.shape
        part = (t.codes.astype(np.float32).reshape(n, -1, t.block) - t.zero_point) * t.scales[:, :, None]
        w = part.reshape(n, k) if w is None else w + part.reshape(n, k)
    if d.consts is not None:
        n, k = w.shape
        w = (w.reshape(n, -1, 32) + d.consts[:, :, None]).reshape(n, k)
    return w


def check(d: Decomposed, reference: np.ndarray, name: str) -> None:
    """The terms must give gguf's own dequantization (it matched to the last bit when written)."""
    got = dequantize(d)
    err = float(np.abs(got - reference).max())
    if not err <= 1e-6 * float(np.abs(reference).max()):
        raise SystemExit(f"{name}: gguf4 terms differ from the GGUF weights by {err:.3g}")


def permute_rows(d: Decomposed, fn) -> Decomposed:
    """Applies a row permutation (llama's rotary un-permutation of q/k) to every array."""
    terms = [Term(fn(t.codes), fn(t.scales), t.zero_point, t.block) for t in d.terms]
    return Decomposed(terms, None if d.consts is None else fn(d.consts))


def pack(term: Term) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits B [N, K/bs, bs/2], scales [N*K/bs], zero_points [N*ceil(nb/2)] (low nibble first)."""
    n, k = term.codes.shape
    nb = k // term.block
    q = term.codes.reshape(n, nb, term.block // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)
    zp = np.full((n, nb + (nb & 1)), term.zero_point, np.uint8)
    zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    return packed, term.scales.reshape(-1).astype(np.float32), zp.reshape(-1)
