/* The GRU cell's elementwise work, forward and backward, one pass each (badger_runtime/training/fused_gru.py).
 *
 * PyTorch's gate order (r, z, n) and formulas:
 *   r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r gh_n), h' = (1 - z) n + z h
 * gi = x W_ih^T and gh = h W_hh^T are the matmuls, done by the caller (torch / BLAS); the kernel adds the biases.
 * Every array is row-major and contiguous; M rows, H hidden units. Built by kernels.py with the C compiler
 * at first use (no Python headers: it is called through ctypes).
 */
#include <math.h>
#include <stdint.h>

#include "native_math.h"  /* exp_clamped */

static inline float sigm(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }

/* gi = x W_ih^T, gh = h W_hh^T [M, 3H] (without their biases b_ih, b_hh [3H]); h [M, H] -> out [M, H]; saves
 * rz [M, 2H], n [M, H] and hn [M, H] (gh's n columns plus their bias) for the backward pass, so that gi and gh
 * are not kept. */
void gru_forward(long M, long H, const float *restrict gi, const float *restrict gh, const float *restrict h,
                 const float *restrict b_ih, const float *restrict b_hh, float *restrict out, float *restrict rz,
                 float *restrict n, float *restrict hn_out) {
    const float *cr = b_ih, *cz = b_ih + H, *cn = b_ih + 2 * H, *dr = b_hh, *dz = b_hh + H, *dn = b_hh + 2 * H;
    for (long i = 0; i < M; i++) {
        const float *ar = gi + i * 3 * H, *az = ar + H, *an = ar + 2 * H;
        const float *br = gh + i * 3 * H, *bz = br + H, *bn = br + 2 * H, *hi = h + i * H;
        float *o = out + i * H, *ri = rz + i * 2 * H, *zi = ri + H, *ni = n + i * H, *hni = hn_out + i * H;
#pragma omp simd
        for (long j = 0; j < H; j++) {
            float r = sigm(ar[j] + cr[j] + br[j] + dr[j]);
            float z = sigm(az[j] + cz[j] + bz[j] + dz[j]);
            float hn = bn[j] + dn[j];
            float nn = 2.0f * sigm(2.0f * (an[j] + cn[j] + r * hn)) - 1.0f; /* tanh */
            hni[j] = hn;
            ri[j] = r;
            zi[j] = z;
            ni[j] = nn;
            o[j] = nn + z * (hi[j] - nn);
        }
    }
}

/* g = dL/dh' [M, H]; h, n, hn [M, H], rz [M, 2H] (as gru_forward saved them) ->
 * gates_i = dL/d(gi) [M, 3H], gates_h = dL/d(gh) [M, 3H] (the same r, z columns; n columns times r),
 * gz = g z [M, H] (dL/dh without the matmul), and the column sums of gates_i and gates_h (the biases'
 * gradients, bias_i and bias_h [3H], overwritten). */
void gru_backward(long M, long H, const float *restrict g, const float *restrict h, const float *restrict rz,
                  const float *restrict n, const float *restrict hn_in, float *restrict gates_i,
                  float *restrict gates_h, float *restrict gz, float *restrict bias_i, float *restrict bias_h) {
    for (long c = 0; c < 3 * H; c++) {
        bias_i[c] = 0.0f;
        bias_h[c] = 0.0f;
    }
    for (long i = 0; i < M; i++) {
        const float *gi_ = g + i * H, *hi = h + i * H, *rzi = rz + i * 2 * H, *ni = n + i * H;
        const float *hn = hn_in + i * H;
        float *di = gates_i + i * 3 * H, *dh = gates_h + i * 3 * H, *gzi = gz + i * H;
#pragma omp simd
        for (long j = 0; j < H; j++) {
            float r = rzi[j], z = rzi[H + j], nn = ni[j], gg = gi_[j];
            float gzz = gg * z;
            float dn = (gg - gzz) * (1.0f - nn * nn);
            float dz = gg * (hi[j] - nn) * z * (1.0f - z);
            float dr = dn * hn[j] * r * (1.0f - r);
            di[j] = dr;
            di[H + j] = dz;
            di[2 * H + j] = dn;
            dh[j] = dr;
            dh[H + j] = dz;
            dh[2 * H + j] = dn * r;
            gzi[j] = gzz;
        }
#pragma omp simd
        for (long c = 0; c < 3 * H; c++) {
            bias_i[c] += di[c];
            bias_h[c] += dh[c];
        }
    }
}

