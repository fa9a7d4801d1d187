# One encoder and one decoder per storage format, for one row (one token of one head,
# ``D`` elements), shared by every CPU kernel: kvmmap/codecs/_quant.pyx (quantize /
# dequantize) and kvmmap/_attention.pyx (pages decoded inside the attention loop) cimport
# them, so each format's CPU decoding is written once, here. Inline and branch-light so
# that the loops calling them vectorize; nothing raises: encoders return STATUS_* bits.
#
# Side-data convention of every function below (the pointers address one row's side data):
#   int8, fp8        scales[0]: the row's scale
#   int4, group > 0  scales[g], zeros[g]: group g of ``group`` consecutive elements (values)
#   int4, group == 0 scales[j], zeros[j]: channel j (keys, per channel over a token group)
# Side data is float32 (format 1.0) or float16 (``half``, format 2.0), so its pointers are
# untyped and read with load_side / written with store_side. Encoders writing float16 side
# data round each scale up and each zero point down to a float16 value first, and quantize
# against the rounded values: a decoded element is then within half a step of its input.

from libc.stdint cimport int8_t, int32_t, uint8_t, uint16_t, uint32_t

from kvmmap.codecs._convert cimport (
    abs_bits, bf16_to_f32, bits_f32, f16_down, f16_to_f32, f16_up, f32_to_bf16, f32_to_f16,
    f32_to_fp8, ordered_bits, ordered_float, round_even,
)

# Format ids: the ``format_id`` of kvmmap/formats.py (stored in cache files), the only
# other copy; tests/test_formats.py checks that they agree.
cdef enum:
    FMT_FP32 = 0
    FMT_FP16 = 1
    FMT_BF16 = 2
    FMT_INT8 = 3
    FMT_INT4 = 4
    FMT_FP8_E4M3 = 5
    FMT_FP8_E5M2 = 6
    NUM_FORMATS = 7

cdef enum:
    STATUS_OK = 0
    STATUS_NONFINITE = 1
    STATUS_OVERFLOW = 2
    STATUS_SIDE_OVERFLOW = 4    # a scale or zero point beyond float16 side data
    FINITE_LIMIT = 0x7F800000   # abs_bits() at or above this: inf or NaN
    FP16_LIMIT = 0x477FF000     # abs_bits() at or above this rounds past 65504: inf in fp16
    BF16_LIMIT = 0x7F7F8000     # abs_bits() at or above this rounds to inf in bf16
    INT4_LIMIT = 0x7E800000     # 2**126: a group's max - min could overflow float32 above this
    TINY_BITS = 0x0D800000      # 2**-100: rows (groups) whose absmax (range) is below are zeroed
    MAX_TOKEN_GROUP = 256       # int4 values: the scratch row of encode_row_int4 (formats.py checks)


cdef inline float tiny() noexcept nogil:
    # 2**-100, the flush threshold of the scaled formats: below it, a row's reciprocal
    # scale would overflow float32 and its scale would be subnormal.
    return <float>7.888609052210118e-31


cdef inline float load_side(const void* p, Py_ssize_t i, bint half) noexcept nogil:
    """Element i of side data: float16 (``half``) or float32."""
    if half:
        return f16_to_f32((<const uint16_t*>p)[i])
    return (<const float*>p)[i]


cdef inline void store_side(void* p, Py_ssize_t i, float v, bint half) noexcept nogil:
    """Store element i of side data; with ``half``, v must be a float16 value (exact)."""
    if half:
        (<uint16_t*>p)[i] = f32_to_f16(v)
    else:
        (<float*>p)[i] = v


cdef inline const void* side_at(const void* p, Py_ssize_t i, bint half) noexcept nogil:
    """Address of element i of side data."""
    return <const uint8_t*>p + i * (2 if half else 4)


cdef inline int scale_params(float amax, float fmax, bint half, float* scale,
                             float* inv) noexcept nogil:
    """Scale and its reciprocal of a symmetric row whose (flushed) absmax is amax, mapped
    onto the codes' largest magnitude fmax. float16 side data: the scale rounded up."""
    if not half:
        inv[0] = fmax / amax if amax > 0 else <float>0.0
        scale[0] = amax / fmax
        return STATUS_OK
    scale[0] = f16_up(amax / fmax)
    if scale[0] > <float>65504.0:
        return STATUS_SIDE_OVERFLOW
    inv[0] = <float>1.0 / scale[0] if scale[0] > 0 else <float>0.0
    return STATUS_OK


cdef inline int int4_params(float lo, float hi, bint half, float* scale, float* zero,
                            float* inv) noexcept nogil:
    """Scale, zero point and reciprocal scale of an int4 group spanning [lo, hi]: zero = lo,
    scale = (hi - lo) / 15, a span below tiny() flushed to scale 0. float16 side data: the
    zero point rounded down, then the scale of what it leaves rounded up."""
    cdef float span
    if half:
        lo = f16_down(lo)
        if lo < <float>-65504.0:
            return STATUS_SIDE_OVERFLOW
    span = hi - lo
    span = span if span >= tiny() else <float>0.0
    zero[0] = lo
    if not half:
        inv[0] = <float>15.0 / span if span > 0 else <float>0.0
        scale[0] = span / <float>15.0
        return STATUS_OK
    scale[0] = f16_up(span / <float>15.0)
    if scale[0] > <float>65504.0:
        return STATUS_SIDE_OVERFLOW
    inv[0] = <float>1.0 / scale[0] if scale[0] > 0 else <float>0.0
    return STATUS_OK


cdef inline uint32_t limit_bits(int fmt) noexcept nogil:
    """abs_bits() of the smallest input magnitude ``fmt`` refuses (inf and NaN for all)."""
    if fmt == FMT_FP16:
        return FP16_LIMIT
    if fmt == FMT_BF16:
        return BF16_LIMIT
    if fmt == FMT_INT4:
        return INT4_LIMIT
    return FINITE_LIMIT


cdef inline int limit_status(uint32_t worst, int fmt) noexcept nogil:
    """STATUS_* of a row whose largest abs_bits() is ``worst``."""
    if worst >= FINITE_LIMIT:
        return STATUS_NONFINITE
    return STATUS_OVERFLOW if worst >= limit_bits(fmt) else STATUS_OK


cdef inline uint32_t row_absmax_bits(const float* src, Py_ssize_t D) noexcept nogil:
    cdef uint32_t worst = 0, b
    cdef Py_ssize_t j
    for j in range(D):
        b = abs_bits(src[j])
        worst = worst if worst > b else b
    return worst


cdef inline Py_ssize_t side_width(int fmt, Py_ssize_t group, Py_ssize_t D) noexcept nogil:
    """Floats of side data (scales; zeros alike) per row: 0 unscaled, 1 per-row scale,
    D / group int4 values, D int4 keys (group 0: one row per token group)."""
    if fmt == FMT_INT4:
        return D // group if group > 0 else D
    if fmt == FMT_INT8 or fmt == FMT_FP8_E4M3 or fmt == FMT_FP8_E5M2:
        return 1
    return 0


cdef inline bint channel_grouped(int fmt, Py_ssize_t group) noexcept nogil:
    """Side data per channel over a group of tokens (int4 keys), not per token row."""
    return fmt == FMT_INT4 and group == 0


# ---- fp8 value tables ------------------------------------------------------------
# e4m3 ("fn"): bias 7, 3 mantissa bits, no inf, max 448 = code 0x7E, NaN = 0x7F.
# e5m2: bias 15, 2 mantissa bits, max 57344 = code 0x7B, inf = 0x7C.
# Decoding is a lookup in a 256-entry table that each kernel module fills once at import.

cdef inline void fill_fp8_table(float* table, int fmt) noexcept nogil:
    cdef int mant_bits = 3 if fmt == FMT_FP8_E4M3 else 2
    cdef int bias = 7 if fmt == FMT_FP8_E4M3 else 15
    cdef bint has_inf = fmt == FMT_FP8_E5M2
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


# ---- decoders ---------------------------------------------------------------------

cdef inline void decode_row_fp32(const float* src, float* out, Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(D):
        out[j] = src[j]


cdef inline void decode_row_fp16(const uint16_t* src, float* out, Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(D):
        out[j] = f16_to_f32(src[j])


cdef inline void decode_row_bf16(const uint16_t* src, float* out, Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(D):
        out[j] = bf16_to_f32(src[j])


cdef inline void decode_row_int8(const int8_t* src, float scale, float* out,
                                 Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(D):
        out[j] = src[j] * scale


cdef inline void decode_row_fp8(const uint8_t* src, const float* table, float scale, float* out,
                                Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(D):
        out[j] = table[src[j]] * scale


cdef inline void decode_row_int4(const uint8_t* src, const void* scales, const void* zeros,
                                 bint half, Py_ssize_t group, float* out, Py_ssize_t D) noexcept nogil:
    """x = code * scale + zero; element 2k in the low nibble of byte k, 2k+1 in the high."""
    cdef Py_ssize_t j, g
    cdef float scale, zero
    cdef const float* sc = <const float*>scales
    cdef const float* zp = <const float*>zeros
    cdef const uint16_t* sc16 = <const uint16_t*>scales
    cdef const uint16_t* zp16 = <const uint16_t*>zeros
    if group == 0 and half:          # one loop per side dtype: a test inside would not vectorize
        for j in range(D // 2):
            out[2 * j] = (src[j] & 15) * f16_to_f32(sc16[2 * j]) + f16_to_f32(zp16[2 * j])
            out[2 * j + 1] = (src[j] >> 4) * f16_to_f32(sc16[2 * j + 1]) + f16_to_f32(zp16[2 * j + 1])
        return
    if group == 0:
        for j in range(D // 2):
            out[2 * j] = (src[j] & 15) * sc[2 * j] + zp[2 * j]
            out[2 * j + 1] = (src[j] >> 4) * sc[2 * j + 1] + zp[2 * j + 1]
        return
    # unpack the row, then scale each group: two simple loops vectorize where one nested
    # loop does not
    for j in range(D // 2):
        out[2 * j] = src[j] & 15
        out[2 * j + 1] = src[j] >> 4
    for g in range(D // group):
        scale = load_side(scales, g, half)
        zero = load_side(zeros, g, half)
        for j in range(g * group, (g + 1) * group):
            out[j] = out[j] * scale + zero


cdef inline void decode_row(int fmt, const uint8_t* codes, const void* scales,
                            const void* zeros, bint half, Py_ssize_t group, const float* table,
                            float* out, Py_ssize_t D) noexcept nogil:
    """Decode one row of ``fmt`` (codes, side data as in the header; float16 if ``half``)
    into out [D] float32.

    ``table``: the fp8 format's 256 values (fill_fp8_table); unused by other formats."""
    if fmt == FMT_FP32:
        decode_row_fp32(<const float*>codes, out, D)
    elif fmt == FMT_FP16:
        decode_row_fp16(<const uint16_t*>codes, out, D)
    elif fmt == FMT_BF16:
        decode_row_bf16(<const uint16_t*>codes, out, D)
    elif fmt == FMT_INT8:
        decode_row_int8(<const int8_t*>codes, load_side(scales, 0, half), out, D)
    elif fmt == FMT_FP8_E4M3 or fmt == FMT_FP8_E5M2:
        decode_row_fp8(codes, table, load_side(scales, 0, half), out, D)
    else:
        decode_row_int4(codes, scales, zeros, half, group, out, D)


cdef inline void decode_block_int4_shared(const uint8_t* codes, Py_ssize_t code_stride, const void* scales,
                                          const void* zeros, Py_ssize_t group, float* out, Py_ssize_t ld,
                                          Py_ssize_t n, Py_ssize_t D) noexcept nogil:
    """int4 rows sharing one row of float16 side data (keys, per channel over a page): the
    side data is converted to float32 once for the block, not once per row."""
    cdef float sc[1024]
    cdef float zp[1024]
    cdef Py_ssize_t t, j
    for j in range(D):
        sc[j] = load_side(scales, j, True)
        zp[j] = load_side(zeros, j, True)
    for t in range(n):
        decode_row_int4(codes + t * code_stride, sc, zp, False, group, out + t * ld, D)


cdef inline void decode_block(int fmt, const uint8_t* codes, Py_ssize_t code_stride,
                              const void* scales, const void* zeros, Py_ssize_t side_stride,
                              bint half, Py_ssize_t group, const float* table, float* out,
                              Py_ssize_t ld, Py_ssize_t n, Py_ssize_t D) noexcept nogil:
    """decode_row for n rows: codes + t * code_stride (bytes), side data + t * side_stride
    (elements, float16 if ``half`` else float32; 0 when rows share it, as int4 keys of one
    group do), into out + t * ld.

    The format is dispatched once per block, so each format's row loop runs on its own."""
    cdef Py_ssize_t t
    if fmt == FMT_FP32:
        for t in range(n):
            decode_row_fp32(<const float*>(codes + t * code_stride), out + t * ld, D)
    elif fmt == FMT_FP16:
        for t in range(n):
            decode_row_fp16(<const uint16_t*>(codes + t * code_stride), out + t * ld, D)
    elif fmt == FMT_BF16:
        for t in range(n):
            decode_row_bf16(<const uint16_t*>(codes + t * code_stride), out + t * ld, D)
    elif fmt == FMT_INT8:
        for t in range(n):
            decode_row_int8(<const int8_t*>(codes + t * code_stride), load_side(scales, t * side_stride, half),
                            out + t * ld, D)
    elif fmt == FMT_FP8_E4M3 or fmt == FMT_FP8_E5M2:
        for t in range(n):
            decode_row_fp8(codes + t * code_stride, table, load_side(scales, t * side_stride, half),
                           out + t * ld, D)
    elif half and side_stride == 0 and D <= 1024:
        decode_block_int4_shared(codes, code_stride, scales, zeros, group, out, ld, n, D)
    else:
        for t in range(n):
            decode_row_int4(codes + t * code_stride, side_at(scales, t * side_stride, half),
                            side_at(zeros, t * side_stride, half), half, group, out + t * ld, D)



# ---- encoders ---------------------------------------------------------------------
# Each writes one row's codes (and side data) and returns STATUS_* bits; a row that is
# refused may be left partly written (the Python layer raises and promises nothing).

cdef inline int encode_row_fp32(const float* src, float* dst, Py_ssize_t D) noexcept nogil:
    cdef uint32_t worst = 0
    cdef Py_ssize_t j
    for j in range(D):
        dst[j] = src[j]
        worst = worst if worst > abs_bits(src[j]) else abs_bits(src[j])
    return limit_status(worst, FMT_FP32)


cdef inline int encode_row_fp16(const float* src, uint16_t* dst, Py_ssize_t D) noexcept nogil:
    cdef uint32_t worst = 0
    cdef Py_ssize_t j
    for j in range(D):
        dst[j] = f32_to_f16(src[j])
        worst = worst if worst > abs_bits(src[j]) else abs_bits(src[j])
    return limit_status(worst, FMT_FP16)


cdef inline int encode_row_bf16(const float* src, uint16_t* dst, Py_ssize_t D) noexcept nogil:
    cdef uint32_t worst = 0
    cdef Py_ssize_t j
    for j in range(D):
        dst[j] = f32_to_bf16(src[j])
        worst = worst if worst > abs_bits(src[j]) else abs_bits(src[j])
    return limit_status(worst, FMT_BF16)


cdef inline int encode_row_int8(const float* src, int8_t* dst, void* scale, bint half,
                                Py_ssize_t D) noexcept nogil:
    """Symmetric: scale = row absmax / 127."""
    cdef uint32_t worst = row_absmax_bits(src, D)
    cdef float amax, inv, s
    cdef Py_ssize_t j
    if worst >= FINITE_LIMIT:
        return STATUS_NONFINITE
    amax = bits_f32(worst) if worst >= TINY_BITS else 0.0
    if scale_params(amax, 127.0, half, &s, &inv) != STATUS_OK:
        return STATUS_SIDE_OVERFLOW
    store_side(scale, 0, s, half)
    for j in range(D):
        dst[j] = <int8_t>round_even(src[j] * inv)
    return STATUS_OK


cdef inline int encode_row_fp8(int fmt, const float* src, uint8_t* dst, void* scale, bint half,
                               Py_ssize_t D) noexcept nogil:
    """Symmetric: scale = row absmax / the format's largest value; saturating."""
    # (mantissa bits, exponent bias, largest finite code, its value)
    cdef int mant = 3, bias = 7
    cdef uint32_t maxcode = 0x7E
    cdef float fmax = 448.0
    cdef uint32_t worst = row_absmax_bits(src, D)
    cdef float amax, inv, y, s
    cdef Py_ssize_t j
    if fmt == FMT_FP8_E5M2:
        mant, bias, maxcode, fmax = 2, 15, 0x7B, 57344.0
    if worst >= FINITE_LIMIT:
        return STATUS_NONFINITE
    amax = bits_f32(worst) if worst >= TINY_BITS else 0.0
    if scale_params(amax, fmax, half, &s, &inv) != STATUS_OK:
        return STATUS_SIDE_OVERFLOW
    store_side(scale, 0, s, half)
    for j in range(D):
        y = src[j] * inv
        # saturate: the scaled row max may round a hair past the format's max
        y = fmax if y > fmax else (-fmax if y < -fmax else y)
        dst[j] = f32_to_fp8(y, mant, bias, maxcode)
    return STATUS_OK


cdef inline uint8_t nibble(float x, float zero, float inv) noexcept nogil:
    cdef int32_t c = round_even((x - zero) * inv)
    return <uint8_t>(0 if c < 0 else (15 if c > 15 else c))


cdef inline uint8_t nibble_div(float x, float zero, float scale) noexcept nogil:
    return nibble(x - zero, 0.0, 1.0 / scale) if scale > 0 else 0


cdef inline void pack_group(const float* src, uint8_t* dst, Py_ssize_t G, float zero,
                            float inv) noexcept nogil:
    # Codes first into a contiguous scratch row, then paired into bytes: two simple loops
    # that gcc vectorizes, where one interleaved loop does not. G <= MAX_TOKEN_GROUP.
    cdef uint8_t tmp[MAX_TOKEN_GROUP]
    cdef Py_ssize_t j
    for j in range(G):
        tmp[j] = nibble(src[j], zero, inv)
    for j in range(G // 2):
        dst[j] = tmp[2 * j] | (tmp[2 * j + 1] << 4)


cdef inline void group_range(const float* src, Py_ssize_t n, float* lo, float* hi) noexcept nogil:
    """Smallest and largest of n finite floats (integer compares: they vectorize)."""
    cdef int32_t a = ordered_bits(src[0]), z = a, b
    cdef Py_ssize_t j
    for j in range(n):
        b = ordered_bits(src[j])
        a = b if b < a else a
        z = b if b > z else z
    lo[0], hi[0] = ordered_float(a), ordered_float(z)


cdef inline int encode_row_int4(const float* src, uint8_t* dst, void* scales, void* zeros,
                                bint half, Py_ssize_t group, Py_ssize_t D) noexcept nogil:
    """Asymmetric, per group of ``group`` elements (even, <= MAX_TOKEN_GROUP, dividing D):
    zero = group min, scale = (max - min) / 15 (see int4_params)."""
    cdef uint32_t worst = row_absmax_bits(src, D)
    cdef float lo, hi, scale, zero, inv
    cdef Py_ssize_t g
    if worst >= INT4_LIMIT:
        return limit_status(worst, FMT_INT4)
    for g in range(D // group):
        group_range(src + g * group, group, &lo, &hi)
        if int4_params(lo, hi, half, &scale, &zero, &inv) != STATUS_OK:
            return STATUS_SIDE_OVERFLOW
        store_side(scales, g, scale, half)
        store_side(zeros, g, zero, half)
        pack_group(src + g * group, dst + g * group // 2, group, zero, inv)
    return STATUS_OK


cdef inline int half_side_status(int fmt, const float* src, Py_ssize_t group,
                                 Py_ssize_t D) noexcept nogil:
    """STATUS_* that encode_row would return for one row with float16 side data, with
    nothing written: callers check every row before writing any."""
    cdef uint32_t worst = row_absmax_bits(src, D)
    cdef float amax, lo, hi, scale, zero, inv
    cdef Py_ssize_t g
    if fmt == FMT_INT4:
        if worst >= INT4_LIMIT:
            return limit_status(worst, FMT_INT4)
        for g in range(D // group):
            group_range(src + g * group, group, &lo, &hi)
            if int4_params(lo, hi, True, &scale, &zero, &inv) != STATUS_OK:
                return STATUS_SIDE_OVERFLOW
        return STATUS_OK
    if worst >= FINITE_LIMIT:
        return STATUS_NONFINITE
    amax = bits_f32(worst) if worst >= TINY_BITS else 0.0
    return scale_params(amax, 448.0 if fmt == FMT_FP8_E4M3 else (57344.0 if fmt == FMT_FP8_E5M2 else 127.0),
                        True, &scale, &inv)


cdef inline void encode_row_int4_channel(const float* src, const float* scales,
                                         const float* zeros, uint8_t* dst,
                                         Py_ssize_t D) noexcept nogil:
    """Codes of one row of an int4 key group whose per-channel scales / zeros are known."""
    cdef Py_ssize_t j
    for j in range(D // 2):
        dst[j] = nibble_div(src[2 * j], zeros[2 * j], scales[2 * j]) \
            | (nibble_div(src[2 * j + 1], zeros[2 * j + 1], scales[2 * j + 1]) << 4)


cdef inline int encode_row(int fmt, const float* src, uint8_t* codes, void* scales,
                           void* zeros, bint half, Py_ssize_t group, Py_ssize_t D) noexcept nogil:
    """Encode one row of every format grouped along the row (all but int4 keys, whose
    groups span tokens: see encode_row_int4_channel); side data float16 if ``half``."""
    if fmt == FMT_FP32:
        return encode_row_fp32(src, <float*>codes, D)
    if fmt == FMT_FP16:
        return encode_row_fp16(src, <uint16_t*>codes, D)
    if fmt == FMT_BF16:
        return encode_row_bf16(src, <uint16_t*>codes, D)
    if fmt == FMT_INT8:
        return encode_row_int8(src, <int8_t*>codes, scales, half, D)
    if fmt == FMT_FP8_E4M3 or fmt == FMT_FP8_E5M2:
        return encode_row_fp8(fmt, src, codes, scales, half, D)
    return encode_row_int4(src, codes, scales, zeros, half, group, D)
