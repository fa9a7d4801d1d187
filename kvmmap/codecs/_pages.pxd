# Where one side (K or V) of a page lives and how to decode rows of it, for every kernel
# that reads pages in place (codecs/_pages.pyx, _attention.pyx). Header-only: inline,
# noexcept nogil; the row decoders themselves are in _rows.pxd.

from libc.stdint cimport uint8_t

from kvmmap.codecs._rows cimport FMT_FP8_E5M2, channel_grouped, decode_block, side_width


cdef struct Side:
    # Where one side (K or V) of a page lives and how to decode it (codecs/_rows.pxd).
    int fmt
    Py_ssize_t codes_off, scales_off, zeros_off   # byte offsets inside a page
    Py_ssize_t code_row_bytes                      # bytes of one token's codes for one head
    Py_ssize_t group                               # int4: elements per group; 0 keys (per channel)
    Py_ssize_t side_width                          # floats of scales (zeros) per token row
    const float* table                             # fp8: the 256 code values


cdef inline void init_side(Side* s, int fmt, Py_ssize_t codes_off, Py_ssize_t scales_off,
                           Py_ssize_t zeros_off, Py_ssize_t row_bytes, Py_ssize_t group,
                           Py_ssize_t D, const float* e4m3, const float* e5m2) noexcept nogil:
    """``e4m3``, ``e5m2``: the 256 values of each fp8 format (each kernel fills its own)."""
    s.fmt, s.codes_off, s.scales_off, s.zeros_off = fmt, codes_off, scales_off, zeros_off
    s.code_row_bytes, s.group, s.side_width = row_bytes, group, side_width(fmt, group, D)
    s.table = e5m2 if fmt == FMT_FP8_E5M2 else e4m3


cdef inline void decode_rows(const uint8_t* page, const Side* s, Py_ssize_t h, Py_ssize_t a,
                             Py_ssize_t n, Py_ssize_t P, Py_ssize_t D, float* dst,
                             Py_ssize_t ld) noexcept nogil:
    """Decode tokens a .. a+n-1 of head h of one page into rows dst + t * ld (float32 [D]).

    Side data of a page: [H, P, side_width] per token row, or for int4 keys (group 0) one
    row per channel over the whole page, [H, 1, D]."""
    cdef Py_ssize_t row = h * P + a
    cdef const uint8_t* codes = page + s.codes_off + row * s.code_row_bytes
    cdef const float* sc = <const float*>(page + s.scales_off)
    cdef const float* zp = <const float*>(page + s.zeros_off)
    cdef Py_ssize_t stride = s.side_width
    if channel_grouped(s.fmt, s.group):
        sc, zp, stride = sc + h * D, zp + h * D, 0
    else:
        sc, zp = sc + row * stride, zp + row * stride
    decode_block(s.fmt, codes, s.code_row_bytes, sc, zp, stride, s.group, s.table, dst, ld, n, D)
