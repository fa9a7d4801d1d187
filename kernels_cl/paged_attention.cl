/* Paged decode attention with fused dequantization, split over the context
 * (flash-decoding), for every kvmmap storage format. Core OpenCL 1.2 only.
 *
 * Work-group (split s, sequence b, kv head h) covers visible tokens
 * [start[b] + s * SPLIT_TOKENS, ...) of one (sequence, kv head) for all GQA query
 * heads of that kv head, so each K/V element is loaded once for the whole group:
 *   1. the block-table entries the split touches are copied to local memory;
 *   2. each work-item takes tokens lid, lid + WG_SIZE, ... and computes their GQA
 *      logits against the queries held in local memory (K rows decoded 4 at a time);
 *   3. max and sum of exp over the split, per query head (tree reductions);
 *   4. work-items own head dimensions and accumulate p * V over the split's tokens
 *      (consecutive work-items read consecutive bytes of a V row);
 * and write an unnormalised partial (o, m, l). merge_splits combines the partials of a
 * (b, query head) by log-sum-exp. exp() is the built-in, which underflows to exactly 0
 * (weights of logits far below the maximum must not count); the build options must not
 * include -cl-fast-relaxed-math or -cl-finite-math-only, since NaN and inf are how an
 * overflowed logit reaches the host (fmax skips a NaN logit, but its exp is NaN).
 *
 * Compile-time constants (-D): K_FORMAT, V_FORMAT (kvmmap format ids), HEAD_DIM,
 * PAGE_SIZE, NUM_KV_HEADS, GQA (query heads per kv head), V_GROUP (int4 values: group
 * size), PAGE_BYTES, K_CODES_OFF, K_SCALES_OFF, K_ZEROS_OFF, V_CODES_OFF, V_SCALES_OFF,
 * V_ZEROS_OFF (byte offsets inside a page, kvmmap/core/layout.py PageLayout), K_SIDE_HALF,
 * V_SIDE_HALF (1: that side's scales and zeros are float16, else float32), WG_SIZE,
 * SPLIT_TOKENS. The pool may be sharded over up to 8 buffers of PAGES_PER_SHARD pages.
 */
#include "kvmmap_formats.h"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef WG_SIZE
#define WG_SIZE 128
#endif
#ifndef SPLIT_TOKENS
#define SPLIT_TOKENS 512
#endif
#ifndef K_SIDE_HALF
#define K_SIDE_HALF 0
#endif
#ifndef V_SIDE_HALF
#define V_SIDE_HALF 0
#endif
#define D HEAD_DIM
#define P PAGE_SIZE
#define G GQA
#define SPLIT_PAGES (SPLIT_TOKENS / P + 1)
#define DSPLIT (WG_SIZE / D > 0 ? WG_SIZE / D : 1)   /* work-items per head dimension in step 4 */

#if !KVMMAP_KNOWN(K_FORMAT) || !KVMMAP_KNOWN(V_FORMAT)
#error "unknown K_FORMAT or V_FORMAT"
#endif
#if (HEAD_DIM % 4) != 0
#error "HEAD_DIM must be a multiple of 4"
#endif

typedef __global const uchar *gptr;

/* A page's address from its shard and byte offset in that shard (computed once per page
 * in step 1: a 64-bit division per token would cost more than the load). */
inline gptr page_base(uchar shard, ulong offset, gptr s0, gptr s1, gptr s2, gptr s3, gptr s4, gptr s5,
                      gptr s6, gptr s7) {
    gptr base = shard == 0 ? s0 : shard == 1 ? s1 : shard == 2 ? s2 : shard == 3 ? s3
              : shard == 4 ? s4 : shard == 5 ? s5 : shard == 6 ? s6 : s7;
    return base + offset;
}

/* Four consecutive K elements d .. d+3 of token a (in its page) of head h. */
inline float4 load_k4(gptr page, int h, int a, int d) {
    size_t row = (size_t)h * P + a;
    float4 code = kvmmap_code4(K_FORMAT, page + K_CODES_OFF + row * KVMMAP_ROW_BYTES(K_FORMAT, D), d);
#if KVMMAP_HAS_ZERO(K_FORMAT)
    /* int4 keys: scale and zero per channel over the page, [H, 1, D] */
    return kvmmap_value4(K_FORMAT, code, kvmmap_side4(page + K_SCALES_OFF, (size_t)h * D + d, K_SIDE_HALF),
                         kvmmap_side4(page + K_ZEROS_OFF, (size_t)h * D + d, K_SIDE_HALF));
#elif KVMMAP_SCALED(K_FORMAT)
    /* a scale per token per head, [H, P] */
    return kvmmap_value4(K_FORMAT, code, (float4)(kvmmap_side(page + K_SCALES_OFF, row, K_SIDE_HALF)), (float4)(0.0f));
#else
    return code;
#endif
}

/* V element d of token a (in its page) of head h. */
inline float load_v(gptr page, int h, int a, int d) {
    size_t row = (size_t)h * P + a;
    float code = kvmmap_code(V_FORMAT, page + V_CODES_OFF + row * KVMMAP_ROW_BYTES(V_FORMAT, D), d);
#if KVMMAP_HAS_ZERO(V_FORMAT)
    /* int4 values: scale and zero per token per group of V_GROUP channels, [H, P, D / V_GROUP] */
    size_t g = row * (D / V_GROUP) + d / V_GROUP;
    return kvmmap_value(V_FORMAT, code, kvmmap_side(page + V_SCALES_OFF, g, V_SIDE_HALF),
                        kvmmap_side(page + V_ZEROS_OFF, g, V_SIDE_HALF));
#elif KVMMAP_SCALED(V_FORMAT)
    return kvmmap_value(V_FORMAT, code, kvmmap_side(page + V_SCALES_OFF, row, V_SIDE_HALF), 0.0f);
#else
    return code;
#endif
}

__kernel __attribute__((reqd_work_group_size(WG_SIZE, 1, 1)))
void paged_decode_split(
    gptr s0, gptr s1, gptr s2, gptr s3, gptr s4, gptr s5, gptr s6, gptr s7, const ulong pages_per_shard,
    __global const int *page_indptr, __global const int *page_indices,
    __global const int *start, __global const int *end,
    __global const float *tail_k, __global const float *tail_v,   /* [B, H, P, D] */
    __global const float *q,                                        /* [B, H * G, D] */
    const float scale, const int num_splits,
    __global float *part_o, __global float *part_m, __global float *part_l)  /* [B, H*G, S, (D)] */
{
    __local float q_l[G * D];
    __local float logits[G * SPLIT_TOKENS];
    __local float red[G * WG_SIZE];
    __local float stat_m[G], stat_l[G];
    __local ulong offset_l[SPLIT_PAGES];
    __local uchar shard_l[SPLIT_PAGES];

    const int lid = get_local_id(0);
    const int split = get_group_id(0);
    const int b = get_group_id(1) / NUM_KV_HEADS;
    const int h = get_group_id(1) % NUM_KV_HEADS;
    const int first_page = page_indptr[b];
    const int num_pages = page_indptr[b + 1] - first_page;
    const int t0 = start[b] + split * SPLIT_TOKENS;
    const int t1 = min(end[b], t0 + SPLIT_TOKENS);
    const int n = max(t1 - t0, 0);    /* 0 for the splits past this sequence's end: l = 0 */
    const size_t out_row = ((size_t)b * NUM_KV_HEADS + h) * G;   /* first query head of the group */

    /* 1. queries (pre-scaled) and the block-table entries of this split */
    for (int i = lid; i < G * D; i += WG_SIZE)
        q_l[i] = q[out_row * D + i] * scale;
    const int lp0 = t0 / P;
    const int lp1 = min((t1 - 1) / P, num_pages - 1);
    for (int i = lid; i <= lp1 - lp0; i += WG_SIZE) {
        ulong page = (ulong)page_indices[first_page + lp0 + i];
        ulong shard = page / pages_per_shard;
        shard_l[i] = (uchar)shard;
        offset_l[i] = (page - shard * pages_per_shard) * (ulong)PAGE_BYTES;
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    /* 2. logits: one token per work-item at a time */
    for (int t = lid; t < n; t += WG_SIZE) {
        int pos = t0 + t, lp = pos / P, a = pos % P;
        float acc[G];
        for (int g = 0; g < G; g++) acc[g] = 0.0f;
        if (lp < num_pages) {
            gptr page = page_base(shard_l[lp - lp0], offset_l[lp - lp0], s0, s1, s2, s3, s4, s5, s6, s7);
            for (int d = 0; d < D; d += 4) {
                float4 k = load_k4(page, h, a, d);
                for (int g = 0; g < G; g++)
                    acc[g] += dot(k, vload4(0, q_l + g * D + d));
            }
        } else {
            __global const float *kr = tail_k + (((size_t)b * NUM_KV_HEADS + h) * P + (pos - num_pages * P)) * D;
            for (int d = 0; d < D; d += 4) {
                float4 k = vload4(0, kr + d);
                for (int g = 0; g < G; g++)
                    acc[g] += dot(k, vload4(0, q_l + g * D + d));
            }
        }
        for (int g = 0; g < G; g++) logits[g * SPLIT_TOKENS + t] = acc[g];
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    /* 3. max, then exp and sum, per query head */
    for (int g = 0; g < G; g++) {
        float mx = -INFINITY;
        for (int t = lid; t < n; t += WG_SIZE) mx = fmax(mx, logits[g * SPLIT_TOKENS + t]);
        red[g * WG_SIZE + lid] = mx;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WG_SIZE / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            for (int g = 0; g < G; g++)
                red[g * WG_SIZE + lid] = fmax(red[g * WG_SIZE + lid], red[g * WG_SIZE + lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid < G) stat_m[lid] = red[lid * WG_SIZE];
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int g = 0; g < G; g++) {
        float sum = 0.0f, mx = stat_m[g];
        for (int t = lid; t < n; t += WG_SIZE) {
            float e = exp(logits[g * SPLIT_TOKENS + t] - mx);
            logits[g * SPLIT_TOKENS + t] = e;
            sum += e;
        }
        red[g * WG_SIZE + lid] = sum;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WG_SIZE / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            for (int g = 0; g < G; g++)
                red[g * WG_SIZE + lid] += red[g * WG_SIZE + lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid < G) stat_l[lid] = red[lid * WG_SIZE];
    barrier(CLK_LOCAL_MEM_FENCE);

    /* 4. p @ V: work-item (d, sub) takes tokens sub, sub + DSPLIT, ... */
    for (int d0 = 0; d0 < D; d0 += WG_SIZE / DSPLIT) {
        int d = d0 + lid % (WG_SIZE / DSPLIT), sub = lid / (WG_SIZE / DSPLIT);
        float acc[G];
        for (int g = 0; g < G; g++) acc[g] = 0.0f;
        if (d < D) {
            for (int t = sub; t < n; t += DSPLIT) {
                int pos = t0 + t, lp = pos / P, a = pos % P;
                float v;
                if (lp < num_pages) {
                    gptr page = page_base(shard_l[lp - lp0], offset_l[lp - lp0], s0, s1, s2, s3, s4, s5, s6, s7);
                    v = load_v(page, h, a, d);
                } else {
                    v = tail_v[(((size_t)b * NUM_KV_HEADS + h) * P + (pos - num_pages * P)) * D + d];
                }
                for (int g = 0; g < G; g++) acc[g] += logits[g * SPLIT_TOKENS + t] * v;
            }
        }
        /* sum over the DSPLIT work-items sharing d */
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int g = 0; g < G; g++) red[g * WG_SIZE + lid] = acc[g];
        barrier(CLK_LOCAL_MEM_FENCE);
        if (sub == 0 && d < D) {
            for (int g = 0; g < G; g++) {
                float s = 0.0f;
                for (int k = 0; k < DSPLIT; k++) s += red[g * WG_SIZE + k * (WG_SIZE / DSPLIT) + lid];
                part_o[((out_row + g) * num_splits + split) * D + d] = s;
            }
        }
    }
    if (lid < G) {
        part_m[(out_row + lid) * num_splits + split] = stat_m[lid];
        part_l[(out_row + lid) * num_splits + split] = stat_l[lid];
    }
}

/* out[r, d] for r = b * H * G + query head: log-sum-exp merge of the split partials.
 * Splits past a sequence's end have l == 0 and are skipped. Every other split has
 * l >= 1 unless a logit or sum overflowed float32, which leaves NaN or inf in its m, l or
 * o; that is carried to the output (never a wrong finite value), where the host sees it
 * and recomputes the row exactly. */
__kernel void merge_splits(__global const float *part_o, __global const float *part_m,
                           __global const float *part_l, const int num_splits, const int rows,
                           __global float *out) {
    int d = get_global_id(0), r = get_global_id(1);
    if (d >= D || r >= rows) return;
    float mx = -INFINITY;
    for (int s = 0; s < num_splits; s++)
        if (part_l[r * num_splits + s] != 0.0f) mx = fmax(mx, part_m[r * num_splits + s]);
    float num = 0.0f, den = 0.0f;
    for (int s = 0; s < num_splits; s++) {
        float l = part_l[r * num_splits + s];
        if (l != 0.0f) {
            float w = exp(part_m[r * num_splits + s] - mx);
            num += w * part_o[((size_t)r * num_splits + s) * D + d];
            den += w * l;
        }
    }
    out[(size_t)r * D + d] = num / den;
}

/* Paged attention of several query tokens per sequence (prefill, chunked prefill).
 *
 * Work-group (split s, query block qb, sequence b * NUM_KV_HEADS + kv head h) takes
 * QUERY_TOKENS query tokens of sequence b with every query head of kv head h (QR rows,
 * token-major: row r is token r / G, query head h * G + r % G) and the split's part of
 * the keys those tokens see, [lo of its first token, hi of its last + 1), a tile of
 * TILE_TOKENS positions at a time:
 *   1. the tile's K rows are decoded into local memory;
 *   2. work-items compute scores of (row, token) pairs, masked to -inf outside the
 *      positions the row's token sees (lo[b, i] .. hi[b, i]);
 *   3. one work-item per row runs the online softmax step (new max, weights, sum, and
 *      the factor alpha that rescales the row's accumulator);
 *   4. the tile's V rows replace K in local memory, and each work-item updates the
 *      accumulator elements (row, d) it owns, held in registers over all tiles.
 * The partials (o unnormalised, m, l) of row (b, token i, query head j) go to
 * [(b * q_tokens + i) * H * G + j, split] and merge_splits combines them. A row that saw
 * no position in its split leaves l = 0, which merge_splits skips.
 *
 * Compile-time constants (-D) besides those of paged_decode_split: QUERY_TOKENS (query
 * tokens per work-group), TILE_TOKENS (key positions per tile). */
#ifndef QUERY_TOKENS
#define QUERY_TOKENS 16
#endif
#ifndef TILE_TOKENS
#define TILE_TOKENS 32
#endif
#define QR (QUERY_TOKENS * G)
#define ACC_PER ((QR * D + WG_SIZE - 1) / WG_SIZE)

__kernel __attribute__((reqd_work_group_size(WG_SIZE, 1, 1)))
void paged_prefill_split(
    gptr s0, gptr s1, gptr s2, gptr s3, gptr s4, gptr s5, gptr s6, gptr s7, const ulong pages_per_shard,
    __global const int *page_indptr, __global const int *page_indices,
    __global const float *tail_k, __global const float *tail_v,   /* [B, H, P, D] */
    __global const float *q,                                        /* [B, T, H * G, D] */
    __global const int *lo, __global const int *hi,                /* [B, T] */
    const int q_tokens, const float scale, const int num_splits, const int split_tokens,
    __global float *part_o, __global float *part_m, __global float *part_l)
{
    __local float q_l[QR * D];
    __local float kv_l[TILE_TOKENS * D];
    __local float s_l[QR * TILE_TOKENS];
    __local float m_l[QR], l_l[QR], alpha_l[QR];
    __local int lo_l[QUERY_TOKENS], hi_l[QUERY_TOKENS];

    const int lid = get_local_id(0);
    const int split = get_group_id(0);
    const int i0 = get_group_id(1) * QUERY_TOKENS;
    const int b = get_group_id(2) / NUM_KV_HEADS;
    const int h = get_group_id(2) % NUM_KV_HEADS;
    const int nq = min(QUERY_TOKENS, q_tokens - i0);
    const int first_page = page_indptr[b];
    const int num_pages = page_indptr[b + 1] - first_page;
    const size_t qrow0 = (size_t)b * q_tokens + i0;        /* first query token of the block */
    const int t0 = lo[qrow0] + split * split_tokens;
    const int t1 = min(hi[qrow0 + nq - 1] + 1, t0 + split_tokens);

    for (int e = lid; e < QR * D; e += WG_SIZE) {
        int r = e / D, i = r / G;
        q_l[e] = i < nq ? q[((qrow0 + i) * NUM_KV_HEADS * G + h * G + r % G) * D + e % D] * scale : 0.0f;
    }
    for (int i = lid; i < QUERY_TOKENS; i += WG_SIZE) {
        lo_l[i] = i < nq ? lo[qrow0 + i] : INT_MAX;      /* tokens past the end see nothing */
        hi_l[i] = i < nq ? hi[qrow0 + i] : -1;
    }
    for (int r = lid; r < QR; r += WG_SIZE) {
        m_l[r] = -INFINITY;
        l_l[r] = 0.0f;
    }
    float acc[ACC_PER];
    for (int k = 0; k < ACC_PER; k++) acc[k] = 0.0f;
    barrier(CLK_LOCAL_MEM_FENCE);

    for (int tile = t0; tile < t1; tile += TILE_TOKENS) {
        const int n = min(TILE_TOKENS, t1 - tile);
        /* 1. K of the tile */
        for (int e = lid; e < n * (D / 4); e += WG_SIZE) {
            int t = e / (D / 4), d = (e % (D / 4)) * 4, pos = tile + t, lp = pos / P, a = pos % P;
            float4 k;
            if (lp < num_pages) {
                ulong page = (ulong)page_indices[first_page + lp], shard = page / pages_per_shard;
                gptr base = page_base((uchar)shard, (page - shard * pages_per_shard) * (ulong)PAGE_BYTES,
                                      s0, s1, s2, s3, s4, s5, s6, s7);
                k = load_k4(base, h, a, d);
            } else {
                k = vload4(0, tail_k + (((size_t)b * NUM_KV_HEADS + h) * P + (pos - num_pages * P)) * D + d);
            }
            vstore4(k, 0, kv_l + t * D + d);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        /* 2. masked scores */
        for (int e = lid; e < QR * TILE_TOKENS; e += WG_SIZE) {
            int r = e / TILE_TOKENS, t = e % TILE_TOKENS, i = r / G, pos = tile + t;
            float x = -INFINITY;
            if (t < n && pos >= lo_l[i] && pos <= hi_l[i]) {
                x = 0.0f;
                for (int d = 0; d < D; d += 4)
                    x += dot(vload4(0, q_l + r * D + d), vload4(0, kv_l + t * D + d));
            }
            s_l[e] = x;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        /* 3. online softmax step per row */
        for (int r = lid; r < QR; r += WG_SIZE) {
            float mx = m_l[r];
            for (int t = 0; t < n; t++) mx = fmax(mx, s_l[r * TILE_TOKENS + t]);
            float alpha = 1.0f, sum = 0.0f;
            if (mx == -INFINITY) {          /* nothing seen yet */
                for (int t = 0; t < n; t++) s_l[r * TILE_TOKENS + t] = 0.0f;
            } else {
                alpha = exp(m_l[r] - mx);
                for (int t = 0; t < n; t++) {
                    float w = exp(s_l[r * TILE_TOKENS + t] - mx);
                    s_l[r * TILE_TOKENS + t] = w;
                    sum += w;
                }
            }
            l_l[r] = l_l[r] * alpha + sum;
            m_l[r] = mx;
            alpha_l[r] = alpha;
        }
        /* 4. V of the tile (K is no longer read), then acc = acc * alpha + p V */
        for (int e = lid; e < n * D; e += WG_SIZE) {
            int t = e / D, d = e % D, pos = tile + t, lp = pos / P, a = pos % P;
            if (lp < num_pages) {
                ulong page = (ulong)page_indices[first_page + lp], shard = page / pages_per_shard;
                gptr base = page_base((uchar)shard, (page - shard * pages_per_shard) * (ulong)PAGE_BYTES,
                                      s0, s1, s2, s3, s4, s5, s6, s7);
                kv_l[e] = load_v(base, h, a, d);
            } else {
                kv_l[e] = tail_v[(((size_t)b * NUM_KV_HEADS + h) * P + (pos - num_pages * P)) * D + d];
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int k = 0; k < ACC_PER; k++) {
            int e = lid + k * WG_SIZE;
            if (e < QR * D) {
                int r = e / D, d = e % D;
                float a = acc[k] * alpha_l[r];
                for (int t = 0; t < n; t++) a += s_l[r * TILE_TOKENS + t] * kv_l[t * D + d];
                acc[k] = a;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);     /* before the next tile overwrites kv_l and s_l */
    }

    for (int k = 0; k < ACC_PER; k++) {
        int e = lid + k * WG_SIZE;
        if (e < QR * D && e / D / G < nq) {
            int r = e / D;
            size_t row = (qrow0 + r / G) * NUM_KV_HEADS * G + h * G + r % G;
            part_o[(row * num_splits + split) * D + e % D] = acc[k];
        }
    }
    for (int r = lid; r < QR; r += WG_SIZE) {
        if (r / G < nq) {
            size_t row = (qrow0 + r / G) * NUM_KV_HEADS * G + h * G + r % G;
            part_m[row * num_splits + split] = m_l[r];
            part_l[row * num_splits + split] = l_l[r];
        }
    }
}
