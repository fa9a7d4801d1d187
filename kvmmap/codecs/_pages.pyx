# Decoding rows of sealed pages in place, the read path of a cache, and encoding a decode
# step's rows straight into a page (kvmmap.core.arena calls read_pages and write_rows).
# Nothing here raises or allocates Python objects.

from cython.parallel cimport prange
from libc.stdint cimport int32_t, uint8_t

from kvmmap.codecs._pages cimport Side, decode_rows, init_side
from kvmmap.codecs._rows cimport FMT_FP8_E4M3, FMT_FP8_E5M2, FMT_INT4, encode_row, fill_fp8_table, side_width

cdef float[2][256] FP8_TABLES
fill_fp8_table(FP8_TABLES[0], FMT_FP8_E4M3)
fill_fp8_table(FP8_TABLES[1], FMT_FP8_E5M2)


def read_pages(
    const uint8_t[::1] arena, Py_ssize_t page_bytes, Py_ssize_t P,
    int fmt, Py_ssize_t codes_off, Py_ssize_t scales_off, Py_ssize_t zeros_off, Py_ssize_t row_bytes,
    bint side_half, Py_ssize_t group, const int32_t[::1] pages, Py_ssize_t pos,
    float[:, :, ::1] out, int nthreads,
):
    """Decode positions pos .. pos + n - 1 (all in the sealed pages listed) into out [n, H, D].

    ``fmt`` .. ``side_half``: one side's ``PageLayout.side_offsets``; ``side_half``: its
    scales and zeros are float16 (else float32).

    Logical page i of ``pages`` holds positions i * P .. i * P + P - 1. Pages are decoded
    in parallel, each straight into its token-major rows.
    """
    cdef Py_ssize_t n = out.shape[0], H = out.shape[1], D = out.shape[2]
    cdef Py_ssize_t first = pos // P, last, i, a, b, h, done
    cdef Side s
    if n == 0:
        return
    last = (pos + n - 1) // P
    init_side(&s, fmt, codes_off, scales_off, zeros_off, row_bytes, side_half, group, D,
              &FP8_TABLES[0][0], &FP8_TABLES[1][0])
    for i in prange(first, last + 1, nogil=True, schedule="static",
                    num_threads=max(1, min(nthreads, (last - first + 1) // 8))):
        a = pos - i * P if i == first else 0
        b = min(P, pos + n - i * P)
        done = i * P + a - pos
        for h in range(H):
            decode_rows(&arena[0] + <Py_ssize_t>pages[i] * page_bytes, &s, h, a, b - a, P, D,
                        &out[done, h, 0], H * D)


def write_rows(
    uint8_t[::1] arena, Py_ssize_t page_at, Py_ssize_t P,
    int fmt, Py_ssize_t codes_off, Py_ssize_t scales_off, Py_ssize_t zeros_off, Py_ssize_t row_bytes,
    bint side_half, Py_ssize_t group, Py_ssize_t a, const float[:, :, :] x,
):
    """Encode x [H, n, D] (last axis contiguous) into rows a .. a + n - 1 of every head of
    the page at byte ``page_at`` of the arena; returns STATUS_* bits (codecs/_rows.pxd).

    ``fmt`` .. ``side_half``: one side's ``PageLayout.side_offsets``; ``group``: its
    ``kernel_group`` (formats grouped along the row only: not int4 keys). One thread: this
    is a decode step's handful of rows, where starting threads costs more than the rows.
    """
    cdef Py_ssize_t H = x.shape[0], n = x.shape[1], D = x.shape[2], h, t, r
    cdef Py_ssize_t w = side_width(fmt, group, D), es = 2 if side_half else 4
    cdef int status = 0
    cdef uint8_t* page
    if H == 0 or n == 0:
        return 0
    page = &arena[0] + page_at
    with nogil:
        for h in range(H):
            for t in range(n):
                r = h * P + a + t
                status |= encode_row(fmt, &x[h, t, 0], page + codes_off + r * row_bytes,
                                     page + scales_off + r * w * es if w > 0 else NULL,
                                     page + zeros_off + r * w * es if fmt == FMT_INT4 else NULL,
                                     side_half, group, D)
    return status
