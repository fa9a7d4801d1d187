/* Dequantize rows of codes (kvmmap.dequantize on the device), one work-item per element:
 *   out[row, j] = kvmmap_value(fmt, kvmmap_code(fmt, row's codes, j), scale, zero)
 * with the decoders of kvmmap_formats.h, the ones paged_attention.cl uses.
 *
 * Compile-time constants (-D): KVMMAP_FORMAT (format id), HEAD_DIM (row length D);
 * for int4, GROUP_SIZE and CHANNEL_GROUPS: 0 for groups of GROUP_SIZE elements along a
 * row (side arrays [rows, D / GROUP_SIZE]), 1 for groups of GROUP_SIZE rows per channel
 * (the KIVI key layout: rows are [A, TOKENS] and side arrays [A, ceil(TOKENS / GROUP_SIZE), D]).
 * SIDE_HALF: 1 if the side arrays are float16, 0 (default) if float32. */
#include "kvmmap_formats.h"

#ifndef KVMMAP_FORMAT
#define KVMMAP_FORMAT KVMMAP_INT8
#endif
#if !KVMMAP_KNOWN(KVMMAP_FORMAT)
#error "dequantize_rows: unknown KVMMAP_FORMAT"
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GROUP_SIZE
#define GROUP_SIZE 32
#endif
#ifndef CHANNEL_GROUPS
#define CHANNEL_GROUPS 0
#endif
#ifndef TOKENS
#define TOKENS 1
#endif
#ifndef SIDE_HALF
#define SIDE_HALF 0
#endif

/* index of the scale (and zero) of element j of a row */
inline size_t side_index(size_t row, size_t j) {
#if !KVMMAP_HAS_ZERO(KVMMAP_FORMAT)
    return row;
#elif CHANNEL_GROUPS
    size_t a = row / TOKENS, t = row % TOKENS;
    return (a * ((TOKENS + GROUP_SIZE - 1) / GROUP_SIZE) + t / GROUP_SIZE) * HEAD_DIM + j;
#else
    return row * (HEAD_DIM / GROUP_SIZE) + j / GROUP_SIZE;
#endif
}

__kernel void dequantize_rows(__global const uchar *codes, __global const uchar *scales,
                              __global const uchar *zeros, __global float *out, const uint rows) {
    size_t i = get_global_id(0);
    if (i >= (size_t)rows * HEAD_DIM) return;
    size_t row = i / HEAD_DIM, j = i % HEAD_DIM;
    float code = kvmmap_code(KVMMAP_FORMAT, codes + row * KVMMAP_ROW_BYTES(KVMMAP_FORMAT, HEAD_DIM), (int)j);
#if KVMMAP_SCALED(KVMMAP_FORMAT)
    size_t s = side_index(row, j);
    out[i] = kvmmap_value(KVMMAP_FORMAT, code, kvmmap_side(scales, s, SIDE_HALF),
                          KVMMAP_HAS_ZERO(KVMMAP_FORMAT) ? kvmmap_side(zeros, s, SIDE_HALF) : 0.0f);
#else
    out[i] = code;
#endif
}
