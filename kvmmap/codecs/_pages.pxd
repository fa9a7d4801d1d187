# Where one side (K or V) of a page lives and how to decode rows of it, for every kernel
# that reads pages in place (codecs/_pages.pyx, _attention.pyx). Header-only: inline,
# noexcept nogil; the row decoders themselves are in _rows.pxd.

from libc.stdint cimport uint8_t

from kvmmap.codecs._rows cimport FMT_FP8_E5M2, channel_grouped, decode_block, side_at, side_width


cdef struct Side:
    # Where one side (K or V) of a page lives and how to decode it (codecs/_rows.pxd).
    int fmt
    Py_ssize_t codes_off, scales_off, zeros_off   # byte offsets inside a page
    Py_ssize_t code_row_bytes                      # bytes of one token's codes for one head
    Py_ssize_t group                               # int4: elements per group; 0 keys (per channel)
    Py_ssize_t side_width                          # elements of scales (zeros) per token row
    bint half                                      # scales and zeros are float16, not float32
    const float* table                             # fp8: the 256 code values


cdef inline void init_side(Side* s, int fmt, Py_ssize_t codes_off, Py_ssize_t scales_off,
                           Py_ssize_t zeros_off, Py_ssize_t row_bytes, bint half, Py_ssize_t group,
                           Py_ssize_t D, const float* e4m3, const float* e5m2) noexcept nogil:
    """The arguments as PageLayout.side_offsets gives them, then the group (PageLayout.
    kernel_group); ``e4m3``, ``e5m2``: the 256 values of each fp8 format (each kernel fills
    its own)."""
    s.fmt, s.codes_off, s.scales_off, s.zeros_off, s.half = fmt, codes_off, scales_off, zeros_off, half
    s.code_row_bytes, s.group, s.side_width = row_bytes, group, side_width(fmt, group, D)
    s.table = e5m2 if fmt == FMT_FP8_E5M2 else e4m3


cdef inline void decode_rows(const uint8_t* page, const Side* s, Py_ssize_t h, Py_ssize_t a,
                             Py_ssize_t n, Py_ssize_t P, Py_ssize_t D, float* dst,
                             Py_ssize_t ld) noexcept nogil:
    """Decode tokens a .. a+n-1 of head h of one page into rows dst + t * ld (float32 [D]).

    Side data of a page: [H, P, side_width] per token row, or for int4 keys (group 0) one
    row per channel over the whole page, [H, 1, D]; float16 or float32 (s.half)."""
    cdef Py_ssize_t row = h * P + a
    cdef const uint8_t* codes = page + s.codes_off + row * s.code_row_bytes
    cdef Py_ssize_t first = h * D if channel_grouped(s.fmt, s.group) else row * s.side_width
    cdef Py_ssize_t stride = 0 if channel_grouped(s.fmt, s.group) else s.side_width
    decode_block(s.fmt, codes, s.code_row_bytes, side_at(page + s.scales_off, first, s.half),
                 side_at(page + s.zeros_off, first, s.half), stride, s.half, s.group, s.table,
                 dst, ld, n, D)
