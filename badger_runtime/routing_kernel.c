/* Sparse top-k routing for the deployment runtime (issue 16), the math of routing._route_sparse:
 *
 *   inbox[b, m] = sum over the k best-scoring listed senders j of softmax_j(q[b, m] . key[b, j] / sqrt(Dk)) value[b, j]
 *
 * one receiver at a time, with no temporaries: the C scores (with AVX, eight at a time for keys 8 wide), a
 * branch-free rank of each score (ties broken by position, NaN ranked last as numpy's argpartition does; with
 * AVX-512 and C <= 64, sixteen ranks per register and the kept read off a bit mask), the softmax over the kept k
 * and the mix (sixteen message entries at a time where the message width is a multiple of 16; with the vector rank,
 * 0.85 -> 0.51 ms per 4,096 receivers at N = 10^5: python demos/route_kernel_probe.py, docs/benchmarks.md).
 * The listed senders' keys and values are prefetched PF receivers ahead: with 10^5 senders the routing waits on random
 * reads of keys and values. Built at first use by badger_runtime/native.py; routing.py calls it.
 * Strides are in elements. Returns 0, or 1 when some listed sender lies outside [0, N) (nothing read there). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "native_math.h"  /* exp_clamped: for the softmax's x <= 0, a weight that would underflow to 0 is ~1e-38 */

#define MAXC 1024
#define PF 8

static inline __attribute__((always_inline)) long route_rows(
    long M, long N, long C, long Dk, long Dm, long k,
    const float *query, long qs, const float *key, const float *value, const int64_t *idx, long is,
    float *out, long os)
{
    float s[MAXC] __attribute__((aligned(64))), sr[MAXC] __attribute__((aligned(64)));
    int r[MAXC] __attribute__((aligned(64)));
    long keep[MAXC];
    float w[MAXC], acc[MAXC] __attribute__((aligned(64)));
    const float scale = 1.0f / sqrtf((float)Dk);
    for (long m = 0; m < M; m++) {
        const int64_t *ix = idx + m * is;
        int bad = 0;
        for (long c = 0; c < C; c++) bad |= (uint64_t)ix[c] >= (uint64_t)N;  /* also catches ix < 0 */
        if (bad) return 1;
        if (m + PF < M) {  /* a prefetch never faults: the row ahead is checked when its turn comes */
            const int64_t *ip = idx + (m + PF) * is;
            for (long c = 0; c < C; c++) {
                __builtin_prefetch(key + ip[c] * Dk);
                __builtin_prefetch(value + ip[c] * Dm);
            }
        }
        const float *q = query + m * qs;
        long c0 = 0;
#if defined(__AVX__)
        if (Dk == 8) {  /* eight listed senders at a time: eight products, then a tree of horizontal adds */
            const __m256 qv = _mm256_loadu_ps(q), sc = _mm256_set1_ps(scale);
            for (; c0 + 8 <= C; c0 += 8) {
                const int64_t *j = ix + c0;
                __m256 p0 = _mm256_mul_ps(_mm256_loadu_ps(key + j[0] * 8), qv);
                __m256 p1 = _mm256_mul_ps(_mm256_loadu_ps(key + j[1] * 8), qv);
                __m256 p2 = _mm256_mul_ps(_mm256_loadu_ps(key + j[2] * 8), qv);
                __m256 p3 = _mm256_mul_ps(_mm256_loadu_ps(key + j[3] * 8), qv);
                __m256 p4 = _mm256_mul_ps(_mm256_loadu_ps(key + j[4] * 8), qv);
                __m256 p5 = _mm256_mul_ps(_mm256_loadu_ps(key + j[5] * 8), qv);
                __m256 p6 = _mm256_mul_ps(_mm256_loadu_ps(key + j[6] * 8), qv);
                __m256 p7 = _mm256_mul_ps(_mm256_loadu_ps(key + j[7] * 8), qv);
                __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(p0, p1), _mm256_hadd_ps(p2, p3));
                __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(p4, p5), _mm256_hadd_ps(p6, p7));
                __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
                _mm256_storeu_ps(s + c0, _mm256_mul_ps(sum, sc));
            }
            for (long c = 0; c < c0; c++) sr[c] = s[c] == s[c] ? s[c] : -INFINITY;
        }
#endif
        for (long c = c0; c < C; c++) {
            const float *kr = key + ix[c] * Dk;
            float a = 0.f;
            if (Dk == 8) {  /* one vector product and a fixed-order sum */
                typedef float v8 __attribute__((vector_size(32)));
                v8 x, y;
                memcpy(&x, kr, sizeof x);
                memcpy(&y, q, sizeof y);
                x *= y;
                a = ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
            } else {
                for (long d = 0; d < Dk; d++) a += kr[d] * q[d];
            }
            s[c] = a * scale;
            sr[c] = s[c] == s[c] ? s[c] : -INFINITY;
        }
        long n = 0;
        if (k >= C) {
            for (long c = 0; c < C; c++) keep[n++] = c;
        } else {
            int ranked = 0;
#if defined(__AVX512F__)
            if (C <= 64) {  /* the same ranks, 16 listed senders per register and a bit mask of the kept */
                const int nv = (int)((C + 15) / 16);
                __m512 sv[4];
                __m512i rv[4];
                __mmask16 lane[4];
                for (int v = 0; v < nv; v++) {
                    const long left = C - 16 * v;
                    lane[v] = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                    sv[v] = _mm512_maskz_loadu_ps(lane[v], sr + 16 * v);
                    rv[v] = _mm512_setzero_si512();
                }
                const __m512i one = _mm512_set1_epi32(1), kv = _mm512_set1_epi32((int)k);
                for (long c2 = 0; c2 < C; c2++) {
                    const __m512 b = _mm512_set1_ps(sr[c2]);
                    for (int v = 0; v < nv; v++)
                        rv[v] = _mm512_mask_add_epi32(rv[v], _mm512_cmp_ps_mask(b, sv[v], _CMP_GT_OQ), rv[v], one);
                }
                uint64_t kept = 0;
                for (int v = 0; v < nv; v++)
                    kept |= (uint64_t)(_mm512_cmplt_epi32_mask(rv[v], kv) & lane[v]) << (16 * v);
                if (__builtin_popcountll(kept) == k) {  /* no tie at the k-th score: the kept in listed order */
                    for (; kept; kept &= kept - 1) keep[n++] = __builtin_ctzll(kept);
                    ranked = 2;
                } else {
                    for (int v = 0; v < nv; v++) _mm512_mask_storeu_epi32(r + 16 * v, lane[v], rv[v]);
                    ranked = 1;
                }
            }
#endif
            if (ranked == 0) {
                for (int c = 0; c < C; c++) r[c] = 0;
                for (int c2 = 0; c2 < C; c2++) {  /* r[c]: how many listed senders score above c */
                    const float v = sr[c2];
                    for (int c = 0; c < C; c++) r[c] += (v > sr[c]);
                }
            }
            if (ranked < 2)
                for (long c = 0; c < C; c++) { keep[n] = c; n += (r[c] < k); }
            if (n > k) {  /* ties at the k-th score: the earlier listed sender first */
                for (int c2 = 0; c2 < C; c2++) {
                    const float v = sr[c2];
                    for (int c = 0; c < C; c++) r[c] += (v == sr[c]) & (c2 < c);
                }
                n = 0;
                for (long c = 0; c < C; c++) { keep[n] = c; n += (r[c] < k); }
                if (n > k) n = k;
            }
        }
        float mx = s[keep[0]];
        int nan = 0;
        for (long t = 0; t < n; t++) {
            nan |= s[keep[t]] != s[keep[t]];
            mx = s[keep[t]] > mx ? s[keep[t]] : mx;
        }
        if (nan) mx = NAN;  /* a NaN score kept: every weight NaN, as numpy's softmax gives */
        float z = 0.f;
        for (long t = 0; t < n; t++) w[t] = exp_clamped(s[keep[t]] - mx);
        for (long t = 0; t < n; t++) z += w[t];
        float *o = out + m * os;
        if (Dm % 16 == 0) {  /* sixteen message entries at a time, the kept senders in listed order */
            typedef float v16 __attribute__((vector_size(64)));
            for (long d = 0; d < Dm; d += 16) {
                v16 a = {0}, x;
                for (long t = 0; t < n; t++) {
                    memcpy(&x, value + ix[keep[t]] * Dm + d, sizeof x);
                    a += (w[t] / z) * x;
                }
                memcpy(o + d, &a, sizeof a);
            }
            continue;
        }
        for (long d = 0; d < Dm; d++) acc[d] = 0.f;
        for (long t = 0; t < n; t++) {
            const float *vr = value + ix[keep[t]] * Dm;
            const float wt = w[t] / z;
            for (long d = 0; d < Dm; d++) acc[d] += wt * vr[d];
        }
        for (long d = 0; d < Dm; d++) o[d] = acc[d];
    }
    return 0;
}

/* B agents (batch strides qb, kb = N Dk, vb = N Dm, ib, ob); C <= 1024, Dm <= 1024. */
long route_topk(long B, long M, long N, long C, long Dk, long Dm, long k,
                const float *query, long qb, long qs, const float *key, const float *value,
                const int64_t *idx, long ib, long is, float *out, long ob, long os)
{
    for (long b = 0; b < B; b++) {
        const float *q = query + b * qb, *ky = key + b * N * Dk, *vl = value + b * N * Dm;
        const int64_t *ix = idx + b * ib;
        float *o = out + b * ob;
        long bad;
        if (C == 32 && Dk == 8 && Dm == 16 && k == 8)  /* the runtime's default: constants let gcc unroll */
            bad = route_rows(M, N, 32, 8, 16, 8, q, qs, ky, vl, ix, is, o, os);
        else
            bad = route_rows(M, N, C, Dk, Dm, k, q, qs, ky, vl, ix, is, o, os);
        if (bad) return bad;
    }
    return 0;
}
