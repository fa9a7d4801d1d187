/* The storage formats of kvmmap, decoded once for every OpenCL kernel (dequant.cl,
 * paged_attention.cl). Core OpenCL 1.2 only: fp16 goes through vload_half (no
 * cl_khr_fp16 needed); everything decodes to float.
 *
 * Format ids are those of kvmmap/formats.py (tests/test_opencl_dequant.py parses this
 * file and compares). A row is the code bytes of one token of one head (docs/FORMAT.md,
 * "Pages"); element j of a row decodes in two steps:
 *   code  = kvmmap_code(fmt, row, j)      the stored value before its side data
 *   value = kvmmap_value(fmt, code, scale, zero)
 *         = code (fp32, fp16, bf16), code * scale (int8, fp8), code * scale + zero (int4).
 * Where a row's scale and zero live is the page layout's business, not the format's.
 * fmt is a compile-time constant in every caller, so each switch folds away. */
#ifndef KVMMAP_FORMATS_H
#define KVMMAP_FORMATS_H

#define KVMMAP_FP32 0
#define KVMMAP_FP16 1
#define KVMMAP_BF16 2
#define KVMMAP_INT8 3
#define KVMMAP_INT4 4
#define KVMMAP_FP8_E4M3 5
#define KVMMAP_FP8_E5M2 6
#define KVMMAP_NUM_FORMATS 7
#define KVMMAP_KNOWN(fmt) ((fmt) >= 0 && (fmt) < KVMMAP_NUM_FORMATS)

/* bytes of codes of a row of d elements */
#define KVMMAP_ROW_BYTES(fmt, d) ((fmt) == KVMMAP_FP32 ? 4 * (d) \
                                  : ((fmt) == KVMMAP_FP16 || (fmt) == KVMMAP_BF16) ? 2 * (d) \
                                  : (fmt) == KVMMAP_INT4 ? (d) / 2 : (d))
/* the format keeps a scale (and, int4, a zero point) beside its codes */
#define KVMMAP_SCALED(fmt) ((fmt) >= KVMMAP_INT8)
#define KVMMAP_HAS_ZERO(fmt) ((fmt) == KVMMAP_INT4)

typedef __global const uchar *kvmmap_row;

/* Element i (elements i .. i+3) of side data (scales or zeros) starting at byte address p:
 * float16 if side_half (format 2.0 pages; vload_half, core OpenCL), else float32 (1.0).
 * side_half is a compile-time constant in every caller. */
inline float kvmmap_side(__global const uchar *p, size_t i, const int side_half) {
    return side_half ? vload_half(i, (__global const half *)p) : ((__global const float *)p)[i];
}
inline float4 kvmmap_side4(__global const uchar *p, size_t i, const int side_half) {
    return side_half ? vload_half4(0, (__global const half *)p + i) : vload4(0, (__global const float *)p + i);
}

inline float kvmmap_bf16(ushort h) { return as_float(((uint)h) << 16); }

/* OCP fp8 (OFP8): e4m3fn has bias 7, no infinity, and NaN at S.1111.111 (0x7F, 0xFF);
 * e5m2 has bias 15 and IEEE specials (exponent 31: infinity if the mantissa is 0, else
 * NaN). kvmmap's quantizer saturates at the largest finite value (448, 57344), so these
 * codes appear only in damaged or foreign data; they decode as on the CPU. */
inline float kvmmap_fp8(uchar c, int mant_bits, int bias) {
    uint e = (c & 0x7F) >> mant_bits;
    uint m = c & ((1u << mant_bits) - 1u);
    float v = e == 0 ? (float)m * ldexp(1.0f, 1 - bias - mant_bits)
                     : ldexp(1.0f + (float)m / (float)(1u << mant_bits), (int)e - bias);
    return (c & 0x80) ? -v : v;
}
inline float kvmmap_fp8_e4m3(uchar c) { return (c & 0x7F) == 0x7F ? NAN : kvmmap_fp8(c, 3, 7); }
inline float kvmmap_fp8_e5m2(uchar c) {
    if ((c & 0x7C) == 0x7C)
        return (c & 3) ? NAN : ((c & 0x80) ? -INFINITY : INFINITY);
    return kvmmap_fp8(c, 2, 15);
}

/* int4: two codes a byte, element 2k in the low nibble */
inline float kvmmap_nibble(uchar c, int j) { return (float)((j & 1) ? c >> 4 : c & 15); }

/* Element j of a row, before scale and zero. */
inline float kvmmap_code(const int fmt, kvmmap_row row, int j) {
    switch (fmt) {
    case KVMMAP_FP32: return ((__global const float *)row)[j];
    case KVMMAP_FP16: return vload_half(j, (__global const half *)row);
    case KVMMAP_BF16: return kvmmap_bf16(((__global const ushort *)row)[j]);
    case KVMMAP_INT8: return (float)((__global const char *)row)[j];
    case KVMMAP_INT4: return kvmmap_nibble(row[j / 2], j);
    case KVMMAP_FP8_E4M3: return kvmmap_fp8_e4m3(row[j]);
    default: return kvmmap_fp8_e5m2(row[j]);
    }
}

/* Elements j .. j+3 of a row (j a multiple of 4), before scale and zero: the same values
 * as four kvmmap_code calls, with vector loads. */
inline float4 kvmmap_code4(const int fmt, kvmmap_row row, int j) {
    switch (fmt) {
    case KVMMAP_FP32: return vload4(0, (__global const float *)row + j);
    case KVMMAP_FP16: return vload_half4(0, (__global const half *)row + j);
    case KVMMAP_BF16: return as_float4(convert_uint4(vload4(0, (__global const ushort *)row + j)) << 16);
    case KVMMAP_INT8: return convert_float4(vload4(0, (__global const char *)row + j));
    case KVMMAP_INT4: {
        uchar2 c = vload2(0, row + j / 2);
        return (float4)(c.x & 15, c.x >> 4, c.y & 15, c.y >> 4);
    }
    case KVMMAP_FP8_E4M3: {
        uchar4 c = vload4(0, row + j);
        return (float4)(kvmmap_fp8_e4m3(c.x), kvmmap_fp8_e4m3(c.y), kvmmap_fp8_e4m3(c.z), kvmmap_fp8_e4m3(c.w));
    }
    default: {
        uchar4 c = vload4(0, row + j);
        return (float4)(kvmmap_fp8_e5m2(c.x), kvmmap_fp8_e5m2(c.y), kvmmap_fp8_e5m2(c.z), kvmmap_fp8_e5m2(c.w));
    }
    }
}

/* A decoded code with its side data applied (scale and zero are ignored where the
 * format has none). */
inline float kvmmap_value(const int fmt, float code, float scale, float zero) {
    return KVMMAP_HAS_ZERO(fmt) ? code * scale + zero : KVMMAP_SCALED(fmt) ? code * scale : code;
}
inline float4 kvmmap_value4(const int fmt, float4 code, float4 scale, float4 zero) {
    return KVMMAP_HAS_ZERO(fmt) ? code * scale + zero : KVMMAP_SCALED(fmt) ? code * scale : code;
}

#endif
