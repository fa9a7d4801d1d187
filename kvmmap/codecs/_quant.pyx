# Typed quantize / dequantize loops over the row codecs of _rows.pxd. Inputs and outputs
# are 3-D views [A, T, W] whose last axis is contiguous (kvmmap/codecs/quant.py checks it;
# the loops walk rows through pointers) and whose leading axes may have any stride, so the
# same loops write into a pool's pages (head-major) from token-major input without a
# temporary. Codes arrive as byte views whatever their dtype; the format id says how to
# read them. Side data (scales, zeros) is float32 or float16, the latter passed as uint16
# bit patterns (the fused type side_t picks the loop). Rows (a, t) are independent and
# split over threads with prange. Nothing here raises: quantizers return a status
# (STATUS_* of _rows.pxd) and quant.py raises.

from cython.parallel cimport prange
from cython.view cimport array as cvarray
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc

from kvmmap.codecs._rows cimport (
    FMT_BF16, FMT_FP8_E4M3, FMT_FP8_E5M2, FMT_FP16, FMT_FP32, FMT_INT4, FMT_INT8, NUM_FORMATS,
    STATUS_NONFINITE, STATUS_OK, STATUS_OVERFLOW, STATUS_SIDE_OVERFLOW, MAX_TOKEN_GROUP,
    decode_row, encode_row, encode_row_int4_channel, fill_fp8_table, half_side_status, int4_params,
    limit_bits, limit_status, row_absmax_bits, side_width, store_side, tiny,
)

ctypedef fused side_t:
    # side data: float32, or float16 as its uint16 bit patterns
    float
    uint16_t

OK = STATUS_OK
NONFINITE = STATUS_NONFINITE
OVERFLOW = STATUS_OVERFLOW
#: A scale or zero point would overflow float16 side data.
SIDE_OVERFLOW = STATUS_SIDE_OVERFLOW

cdef enum:
    STATUS_NO_MEMORY = 8        # scratch rows could not be allocated
NO_MEMORY = STATUS_NO_MEMORY
#: Rows (int4: groups) of scaled formats whose absmax (range) is below this are zeroed.
TINY = tiny()
#: Largest int4 value group (the encoder's scratch row).
MAX_GROUP = MAX_TOKEN_GROUP
#: The format ids the kernels were compiled with, by enum name (FMT_<NAME>); a test
#: checks them against kvmmap/formats.py.
FORMAT_IDS = {"FP32": FMT_FP32, "FP16": FMT_FP16, "BF16": FMT_BF16, "INT8": FMT_INT8,
              "INT4": FMT_INT4, "FP8_E4M3": FMT_FP8_E4M3, "FP8_E5M2": FMT_FP8_E5M2}

cdef float[2][256] FP8_TABLES
fill_fp8_table(FP8_TABLES[0], FMT_FP8_E4M3)
fill_fp8_table(FP8_TABLES[1], FMT_FP8_E5M2)


cdef inline const float* _table(int fmt) noexcept nogil:
    return &FP8_TABLES[1][0] if fmt == FMT_FP8_E5M2 else &FP8_TABLES[0][0]


cdef inline int _nthreads(Py_ssize_t rows, Py_ssize_t width, int nthreads) noexcept nogil:
    # Below ~64k elements the thread start-up costs more than it saves.
    if nthreads < 1 or rows * width < 65536:
        return 1
    return nthreads


def fp8_table(int fmt):
    """The 256 float32 values of an fp8 format's codes (format id ``fmt``)."""
    cdef const float* t = _table(fmt)
    return [t[i] for i in range(256)]


def refused_abs_bits(int fmt):
    """abs bits of float32 (``view(uint32) & 0x7FFFFFFF``) at or above which ``fmt``
    refuses a value: inf / NaN for every format, overflow for fp16, bf16 and int4."""
    if not 0 <= fmt < NUM_FORMATS:
        raise ValueError(f"unknown format id {fmt}")
    return limit_bits(fmt)


def quantize_rows(int fmt, const float[:, :, :] x, uint8_t[:, :, :] codes,
                  side_t[:, :, :] scales, side_t[:, :, :] zeros, Py_ssize_t group, int nthreads,
                  bint check_only=False):
    """Encode every row x[a, t] (formats grouped along the row: all but int4 keys).

    codes: byte view of the codes [A, T, row bytes]; scales, zeros [A, T, side width],
    float32 or float16 bits (any [1, 1, 1] array when the format has none). Returns
    STATUS_* bits. ``check_only`` (float16 side data): only the status, nothing written."""
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i
    cdef Py_ssize_t w = side_width(fmt, group, D)
    cdef bint has_zeros = fmt == FMT_INT4
    cdef bint half = side_t is uint16_t
    cdef int status = 0
    cdef void* sc
    cdef void* zp
    if check_only:
        for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
            status |= half_side_status(fmt, &x[i // T, i % T, 0], group, D) if half and w > 0 \
                else limit_status(row_absmax_bits(&x[i // T, i % T, 0], D), fmt)
        return status
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        sc = &scales[i // T, i % T, 0] if w > 0 else NULL
        zp = &zeros[i // T, i % T, 0] if has_zeros else NULL
        status |= encode_row(fmt, &x[i // T, i % T, 0], &codes[i // T, i % T, 0], sc, zp, half, group, D)
    return status


def quantize_int4_channel(const float[:, :, :] x, uint8_t[:, :, :] codes,
                          side_t[:, :, :] scales, side_t[:, :, :] zeros, Py_ssize_t G,
                          int nthreads, bint check_only=False):
    """int4 keys (KIVI): a scale and zero per channel over each group of G rows of axis 1;
    scales, zeros [A, ceil(T / G), D], float32 or float16 bits. Returns STATUS_* bits.
    ``check_only`` (float16 side data): only the status, nothing written."""
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2]
    cdef Py_ssize_t ngroups = (T + G - 1) // G, i, j, t, t0, t1
    cdef bint half = side_t is uint16_t
    cdef int status = 0, st
    cdef const float* src
    cdef float* lo
    cdef float* hi
    cdef float v, inv
    cdef uint32_t worst
    for i in prange(A * ngroups, nogil=True, schedule="static",
                    num_threads=_nthreads(A * T, D, nthreads)):
        t0 = (i % ngroups) * G
        t1 = t0 + G if t0 + G < T else T
        # Running min / max while scanning: float32 side rows double as them; float16
        # side data needs float32 scratch, which then holds the rounded zeros and scales.
        if half:
            lo = <float*>malloc(2 * D * sizeof(float))
            if lo == NULL:
                status |= STATUS_NO_MEMORY
                continue
            hi = lo + D
        else:
            lo = <float*>&zeros[i // ngroups, i % ngroups, 0]
            hi = <float*>&scales[i // ngroups, i % ngroups, 0]
        worst = 0
        for t in range(t0, t1):
            src = &x[i // ngroups, t, 0]
            worst = worst if worst > row_absmax_bits(src, D) else row_absmax_bits(src, D)
            if t == t0:
                for j in range(D):
                    lo[j] = src[j]
                    hi[j] = src[j]
            else:
                for j in range(D):
                    v = src[j]
                    lo[j] = v if v < lo[j] else lo[j]
                    hi[j] = v if v > hi[j] else hi[j]
        st = limit_status(worst, FMT_INT4)
        if st == STATUS_OK and half:
            for j in range(D):                     # rounded zero and scale in place of min, max
                st = st | int4_params(lo[j], hi[j], True, &hi[j], &lo[j], &inv)
        elif st == STATUS_OK:
            for j in range(D):                     # the max row becomes the scale row
                hi[j] = (hi[j] - lo[j]) / <float>15.0 if hi[j] - lo[j] >= tiny() else <float>0.0
        if st == STATUS_OK and not check_only:
            for t in range(t0, t1):
                encode_row_int4_channel(&x[i // ngroups, t, 0], hi, lo, &codes[i // ngroups, t, 0], D)
            if half:
                for j in range(D):
                    store_side(&scales[i // ngroups, i % ngroups, 0], j, hi[j], True)
                    store_side(&zeros[i // ngroups, i % ngroups, 0], j, lo[j], True)
        status |= st
        if half:
            free(lo)
    return status


def dequantize_rows(int fmt, const uint8_t[:, :, :] codes, const side_t[:, :, :] scales,
                    const side_t[:, :, :] zeros, Py_ssize_t group, Py_ssize_t side_rows,
                    float[:, :, :] out, int nthreads):
    """Decode every row into out [A, T, D] float32.

    Row t's side data is scales[a, t // side_rows] (zeros alike; float32 or float16 bits):
    side_rows is 1 for per-row side data, the group length for int4 keys (then ``group``
    is 0: per channel)."""
    cdef Py_ssize_t A = out.shape[0], T = out.shape[1], D = out.shape[2], i
    cdef Py_ssize_t w = side_width(fmt, group, D)
    cdef bint has_zeros = fmt == FMT_INT4
    cdef bint half = side_t is uint16_t
    cdef const float* table = _table(fmt)
    cdef const void* sc
    cdef const void* zp
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        sc = &scales[i // T, (i % T) // side_rows, 0] if w > 0 else NULL
        zp = &zeros[i // T, (i % T) // side_rows, 0] if has_zeros else NULL
        decode_row(fmt, &codes[i // T, i % T, 0], sc, zp, half, group, table, &out[i // T, i % T, 0], D)


def max_abs_bits(const float[:, :, :] x, int nthreads):
    """Largest abs bits over the array: one pass that tells NaN / inf / overflow apart."""
    cdef Py_ssize_t A = x.shape[0], T = x.shape[1], D = x.shape[2], i
    cdef uint32_t[::1] rows = cvarray(shape=(max(A * T, 1),), itemsize=4, format="I")
    cdef uint32_t worst = 0
    for i in prange(A * T, nogil=True, schedule="static", num_threads=_nthreads(A * T, D, nthreads)):
        rows[i] = row_absmax_bits(&x[i // T, i % T, 0], D)
    for i in range(A * T):
        worst = rows[i] if rows[i] > worst else worst
    return worst
