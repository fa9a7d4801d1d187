# Typed quantize / dequantize loops. Inputs and outputs are 3-D views [A, T, D] whose last
# axis is contiguous (kvmmap/quant.py checks it; the loops walk rows through pointers) and
# whose leading axes may have any stride, so the same loops write
# into a pool's pages (head-major) from token-major input without a temporary.
# Rows (a, t) are independent and split over threads with prange. Nothing here raises:
# quantizers return a status (STATUS_* below) and kvmmap/quant.py raises.

from cython.parallel cimport prange
from cython.view cimport array as cvarray
from libc.math cimport fabsf
from libc.stdint cimport int8_t, int32_t, uint8_t, uint16_t, uint32_t

from kvmmap._convert cimport (
    abs_bits, bf16_to_f32, bits_f32, f16_to_f32, f32_to_bf16, f32_to_f16, f32_to_fp8,
    ordered_bits, ordered_float, round_even,
)

cdef enum:
    STATUS_OK = 0
    STATUS_NONFINITE = 1
    STATUS_OVERFLOW = 2
    FINITE_LIMIT = 0x7F800000   # abs_bits() at or above this: inf or NaN
    BF16_LIMIT = 0x7F7F8000     # abs_bits() at or above this rounds to inf in bf16
    INT4_LIMIT = 0x7E800000     # 2**126: a group's max - min could overflow float32 above this
    TINY_BITS = 0x0D800000      # 2**-100: rows (groups) whose absmax (range) is below are zeroed

# 2**-100, the flush threshold of the scaled formats: below it, a row's reciprocal scale
# would overflow float32 and its scale would be subnormal.
cdef float TINY_F = 7.888609052210118e-31
TINY = TINY_F

OK = STATUS_OK
NONFINITE = STATUS_NONFINITE
OVERFLOW = STATUS_OVERFLOW

FP8_E4M3 = 0
FP8_E5M2 = 1
cdef float[256] FP8_E4M3_TABLE
cdef float[256] FP8_E5M2_TABLE


cdef void _fill_fp8_table(float* table, int mant_bits, int bias, bint has_inf) noexcept:
    cdef int c, e, m, emax = (1 << (7 - mant_bits)) - 1
    cdef float v
    for c in range(256):
        e = (c >> mant_bits) & emax
        m = c & ((1 << mant_bits) - 1)
        if e == 0:
            v = m * bits_f32(<uint32_t>(127 + 1 - bias - mant_bits) << 23)
        else:
            v = (1.0 + m / <float>(1 << mant_bits)) * bits_f32(<uint32_t>(127 + e - bias) << 23)
        if has_inf and e == emax:
            v = bits_f32(0x7F800000) if m == 0 else bits_f32(0x7FC00000)
        elif not has_inf and e == emax and m == (1 << mant_bits) - 1:
            v = bits_f32(0x7FC00000)
        table[c] = -v if c & 0x80 else v


_fill_fp8_table(FP8_E4M3_TABLE, 3, 7, False)
_fill_fp8_table(FP8_E5M2_TABLE, 2, 15, True)


def fp8_table(int kind):
    """The 256 float32 values of an fp8 format's codes (for tests and the OpenCL path)."""
    cdef float* t = &FP8_E4M3_TABLE[0]
    if kind == FP8_E5M2:
        t = &FP8_E5M2_TABLE[0]
    return [t[i] for i in range(256)]


cdef inline int _nthreads(Py_ssize_t rows, Py_ssize_t width, int nthreads) noexcept nogil:
    # Below ~64k elements the thread start-up costs more than it saves.
    if nthreads < 1 or rows * width < 65536:
        return 1
    return nthreads


# ---------------------------------------------------------------------------------
# Unscaled formats

def quantize_fp32(const float[:, :, :] x, float[:, :, :] out, int nthreads):
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i, j
    cdef int status = 0
    cdef const float* src
    cdef float* dst
    cdef uint32_t worst
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &x[i // T, i % T, 0]
        dst = &out[i // T, i % T, 0]
        worst = 0
        for j in range(D):
            dst[j] = src[j]
            worst = worst if worst > abs_bits(src[j]) else abs_bits(src[j])
        if worst >= FINITE_LIMIT:
            status |= STATUS_NONFINITE
    return status


def quantize_fp16(const float[:, :, :] x, uint16_t[:, :, :] out, int nthreads):
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i, j
    cdef int status = 0
    cdef const float* src
    cdef uint16_t* dst
    cdef uint32_t worst
    cdef uint16_t code_or
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &x[i // T, i % T, 0]
        dst = &out[i // T, i % T, 0]
        worst = 0
        for j in range(D):
            dst[j] = f32_to_f16(src[j])
            worst = worst if worst > abs_bits(src[j]) else abs_bits(src[j])
        if worst >= FINITE_LIMIT:
            status |= STATUS_NONFINITE
        elif worst >= 0x477FF000:       # rounds past 65504: inf in fp16
            status |= STATUS_OVERFLOW
    return status


def quantize_bf16(const float[:, :, :] x, uint16_t[:, :, :] out, int nthreads):
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i, j
    cdef int status = 0
    cdef const float* src
    cdef uint16_t* dst
    cdef uint32_t worst
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &x[i // T, i % T, 0]
        dst = &out[i // T, i % T, 0]
        worst = 0
        for j in range(D):
            dst[j] = f32_to_bf16(src[j])
            worst = worst if worst > abs_bits(src[j]) else abs_bits(src[j])
        if worst >= FINITE_LIMIT:
            status |= STATUS_NONFINITE
        elif worst >= BF16_LIMIT:
            status |= STATUS_OVERFLOW
    return status


def dequantize_fp16(const uint16_t[:, :, :] codes, float[:, :, :] out, int nthreads):
    cdef Py_ssize_t A = codes.shape[0], T = codes.shape[1], D = codes.shape[2], i, j
    cdef const uint16_t* src
    cdef float* dst
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &codes[i // T, i % T, 0]
        dst = &out[i // T, i % T, 0]
        for j in range(D):
            dst[j] = f16_to_f32(src[j])


def dequantize_bf16(const uint16_t[:, :, :] codes, float[:, :, :] out, int nthreads):
    cdef Py_ssize_t A = codes.shape[0], T = codes.shape[1], D = codes.shape[2], i, j
    cdef const uint16_t* src
    cdef float* dst
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &codes[i // T, i % T, 0]
        dst = &out[i // T, i % T, 0]
        for j in range(D):
            dst[j] = bf16_to_f32(src[j])


# ---------------------------------------------------------------------------------
# int8 and fp8: one float32 scale per row (per token per head), symmetric

cdef inline uint32_t _row_absmax_bits(const float* src, Py_ssize_t D) noexcept nogil:
    cdef uint32_t worst = 0, b
    cdef Py_ssize_t j
    for j in range(D):
        b = abs_bits(src[j])
        worst = worst if worst > b else b
    return worst


def quantize_int8(const float[:, :, :] x, int8_t[:, :, :] codes, float[:, :] scales,
                  int nthreads):
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i, j
    cdef int status = 0
    cdef const float* src
    cdef int8_t* dst
    cdef uint32_t worst
    cdef float amax, inv
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &x[i // T, i % T, 0]
        dst = &codes[i // T, i % T, 0]
        worst = _row_absmax_bits(src, D)
        if worst >= FINITE_LIMIT:
            status |= STATUS_NONFINITE
            continue
        amax = bits_f32(worst) if worst >= TINY_BITS else 0.0
        inv = 127.0 / amax if amax > 0 else 0.0
        scales[i // T, i % T] = amax / 127.0
        for j in range(D):
            dst[j] = <int8_t>round_even(src[j] * inv)
    return status


def dequantize_int8(const int8_t[:, :, :] codes, const float[:, :] scales,
                    float[:, :, :] out, int nthreads):
    cdef Py_ssize_t A = codes.shape[0], T = codes.shape[1], D = codes.shape[2], i, j
    cdef const int8_t* src
    cdef float* dst
    cdef float s
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &codes[i // T, i % T, 0]
        dst = &out[i // T, i % T, 0]
        s = scales[i // T, i % T]
        for j in range(D):
            dst[j] = src[j] * s


def quantize_fp8(const float[:, :, :] x, uint8_t[:, :, :] codes, float[:, :] scales,
                 int kind, int nthreads):
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i, j
    cdef int status = 0
    cdef const float* src
    cdef uint8_t* dst
    cdef uint32_t worst
    cdef float amax, inv, y
    # (mantissa bits, exponent bias, largest finite code, its value)
    cdef int mant = 3, bias = 7
    cdef uint32_t maxcode = 0x7E
    cdef float fmax = 448.0
    if kind == FP8_E5M2:
        mant, bias, maxcode, fmax = 2, 15, 0x7B, 57344.0
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &x[i // T, i % T, 0]
        dst = &codes[i // T, i % T, 0]
        worst = _row_absmax_bits(src, D)
        if worst >= FINITE_LIMIT:
            status |= STATUS_NONFINITE
            continue
        amax = bits_f32(worst) if worst >= TINY_BITS else 0.0
        inv = fmax / amax if amax > 0 else 0.0
        scales[i // T, i % T] = amax / fmax
        for j in range(D):
            y = src[j] * inv
            # saturate: the scaled row max may round a hair past the format's max
            y = fmax if y > fmax else (-fmax if y < -fmax else y)
            dst[j] = f32_to_fp8(y, mant, bias, maxcode)
    return status


def dequantize_fp8(const uint8_t[:, :, :] codes, const float[:, :] scales,
                   float[:, :, :] out, int kind, int nthreads):
    cdef Py_ssize_t A = codes.shape[0], T = codes.shape[1], D = codes.shape[2], i, j
    cdef const uint8_t* src
    cdef float* dst
    cdef float s
    cdef const float* table = &FP8_E4M3_TABLE[0]
    if kind == FP8_E5M2:
        table = &FP8_E5M2_TABLE[0]
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &codes[i // T, i % T, 0]
        dst = &out[i // T, i % T, 0]
        s = scales[i // T, i % T]
        for j in range(D):
            dst[j] = table[src[j]] * s


# ---------------------------------------------------------------------------------
# int4: asymmetric, x ~= code * scale + zero with code in 0..15, two codes a byte
# (element 2k in the low nibble, 2k+1 in the high nibble).
#   token grouping:   groups of G consecutive elements along D, per row
#   channel grouping: groups of G consecutive rows (tokens) along T, per channel (KIVI keys)

cdef inline uint8_t _nibble(float x, float zero, float inv) noexcept nogil:
    cdef int32_t c = round_even((x - zero) * inv)
    return <uint8_t>(0 if c < 0 else (15 if c > 15 else c))


cdef inline void _pack_group(const float* src, uint8_t* dst, Py_ssize_t G, float zero,
                             float inv) noexcept nogil:
    # Codes first into a contiguous scratch row, then paired into bytes: two simple loops
    # that gcc vectorizes, where one interleaved loop does not. G <= 256 (checked in Python).
    cdef uint8_t tmp[256]
    cdef Py_ssize_t j
    for j in range(G):
        tmp[j] = _nibble(src[j], zero, inv)
    for j in range(G // 2):
        dst[j] = tmp[2 * j] | (tmp[2 * j + 1] << 4)


cdef inline uint8_t _nibble_div(float x, float zero, float scale) noexcept nogil:
    return _nibble(x - zero, 0.0, 1.0 / scale) if scale > 0 else 0


def quantize_int4_token(const float[:, :, :] x, uint8_t[:, :, :] codes,
                        float[:, :, :] scales, float[:, :, :] zeros, Py_ssize_t G,
                        int nthreads):
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i, j, g
    cdef int status = 0
    cdef const float* src
    cdef uint8_t* dst
    cdef int32_t lo, hi, b
    cdef float flo, inv, span
    cdef uint32_t worst
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &x[i // T, i % T, 0]
        dst = &codes[i // T, i % T, 0]
        worst = _row_absmax_bits(src, D)
        if worst >= INT4_LIMIT:
            status |= STATUS_NONFINITE if worst >= FINITE_LIMIT else STATUS_OVERFLOW
            continue
        for g in range(0, D // G):
            lo = ordered_bits(src[g * G])
            hi = lo
            for j in range(g * G, g * G + G):
                b = ordered_bits(src[j])
                lo = b if b < lo else lo
                hi = b if b > hi else hi
            flo = ordered_float(lo)
            span = ordered_float(hi) - flo
            span = span if span >= TINY_F else <float>0.0
            inv = 15.0 / span if span > 0 else 0.0
            scales[i // T, i % T, g] = span / 15.0
            zeros[i // T, i % T, g] = flo
            _pack_group(src + g * G, dst + g * G // 2, G, flo, inv)
    return status


def dequantize_int4_token(const uint8_t[:, :, :] codes, const float[:, :, :] scales,
                          const float[:, :, :] zeros, float[:, :, :] out, Py_ssize_t G,
                          int nthreads):
    cdef Py_ssize_t A = out.shape[0], T = out.shape[1], D = out.shape[2], i, j, g
    cdef const uint8_t* src
    cdef float* dst
    cdef float s, z
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &codes[i // T, i % T, 0]
        dst = &out[i // T, i % T, 0]
        for g in range(0, D // G):
            s = scales[i // T, i % T, g]
            z = zeros[i // T, i % T, g]
            for j in range(g * G // 2, (g + 1) * G // 2):
                dst[2 * j] = (src[j] & 15) * s + z
                dst[2 * j + 1] = (src[j] >> 4) * s + z


def quantize_int4_channel(const float[:, :, :] x, uint8_t[:, :, :] codes,
                          float[:, :, :] scales, float[:, :, :] zeros, Py_ssize_t G,
                          int nthreads):
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2]
    cdef Py_ssize_t ngroups = (T + G - 1) // G, i, j, t, t0, t1
    cdef int status = 0
    cdef const float* src
    cdef uint8_t* dst
    cdef float* lo
    cdef float* hi
    cdef float v
    cdef uint32_t worst
    for i in prange(A * ngroups, nogil=True, schedule="static",
                    num_threads=_nthreads(A * T, D, nthreads)):
        t0 = (i % ngroups) * G
        t1 = t0 + G if t0 + G < T else T
        # The zero-point and scale rows double as running min / max while scanning.
        lo = &zeros[i // ngroups, i % ngroups, 0]
        hi = &scales[i // ngroups, i % ngroups, 0]
        worst = 0
        for t in range(t0, t1):
            src = &x[i // ngroups, t, 0]
            worst = worst if worst > _row_absmax_bits(src, D) else _row_absmax_bits(src, D)
            if t == t0:
                for j in range(D):
                    lo[j] = src[j]
                    hi[j] = src[j]
            else:
                for j in range(D):
                    v = src[j]
                    lo[j] = v if v < lo[j] else lo[j]
                    hi[j] = v if v > hi[j] else hi[j]
        if worst >= INT4_LIMIT:
            status |= STATUS_NONFINITE if worst >= FINITE_LIMIT else STATUS_OVERFLOW
            continue
        for j in range(D):                         # the max row becomes the scale row
            hi[j] = (hi[j] - lo[j]) / <float>15.0 if hi[j] - lo[j] >= TINY_F else <float>0.0
        for t in range(t0, t1):
            src = &x[i // ngroups, t, 0]
            dst = &codes[i // ngroups, t, 0]
            for j in range(D // 2):
                dst[j] = _nibble_div(src[2 * j], lo[2 * j], hi[2 * j]) \
                    | (_nibble_div(src[2 * j + 1], lo[2 * j + 1], hi[2 * j + 1]) << 4)
    return status


def dequantize_int4_channel(const uint8_t[:, :, :] codes, const float[:, :, :] scales,
                            const float[:, :, :] zeros, float[:, :, :] out, Py_ssize_t G,
                            int nthreads):
    cdef Py_ssize_t A = out.shape[0], T = out.shape[1], D = out.shape[2], i, j
    cdef const uint8_t* src
    cdef const float* sc
    cdef const float* zp
    cdef float* dst
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        src = &codes[i // T, i % T, 0]
        sc = &scales[i // T, (i % T) // G, 0]
        zp = &zeros[i // T, (i % T) // G, 0]
        dst = &out[i // T, i % T, 0]
        for j in range(D // 2):
            dst[2 * j] = (src[j] & 15) * sc[2 * j] + zp[2 * j]
            dst[2 * j + 1] = (src[j] >> 4) * sc[2 * j + 1] + zp[2 * j + 1]


def max_abs_bits(const float[:, :, :] x, int nthreads):
    """Largest abs_bits() over the array: one pass that tells NaN / inf / overflow apart."""
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i
    cdef uint32_t[::1] rows = cvarray(shape=(max(A * T, 1),), itemsize=4, format="I")
    cdef uint32_t worst = 0
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        rows[i] = _row_absmax_bits(&x[i // T, i % T, 0], D)
    for i in range(A * T):
        worst = rows[i] if rows[i] > worst else worst
    return worst
