/* SRU's element-wise recurrence, forward and backward, for float32 on the CPU.
 *
 * Built on first use by condcomp.layers.sru_native (plain C, no PyTorch headers, so it compiles in
 * well under a second) and called through ctypes; the PyTorch path in sru_recurrence.py is the
 * fallback and the reference it is tested against.
 *
 * Every (batch row, channel) is an independent recurrence over time, so the work is split into
 * tasks of one batch row and BLOCK channels, and threads take contiguous ranges of tasks. A thread
 * walks time in the outer loop and its tasks in the inner one, so at each step it reads and writes
 * one contiguous stretch of every [T, B, ...] tensor (streams the prefetcher follows, rather than
 * one short strided run per task); its recurrent state (cells, or the backward's carry and sums)
 * stays in a small buffer. The channel loop vectorises (the compiler's SIMD sigmoid).
 *
 * Shapes (element strides; the channel stride is 1 everywhere):
 *   u      [T, B, 3, d]  candidate, forget and reset pre-activations  (strides u_t, u_b, u_k);
 *                        float32, or bfloat16 when u_bf16 (the projection's output under autocast:
 *                        read as is, so no float32 copy is made; du is then written in bfloat16 too)
 *   xs     [T, B, d]     highway input                                 (strides x_t, x_b)
 *   v, b   [2, d]        recurrent weights and biases (forget, reset), contiguous
 *   c0     [B, d]        contiguous
 *   real   [T, B, d] uint8 (0 = padded), strides m_t, m_b; may be NULL
 *   h, cells [T, B, d]   contiguous outputs of the forward
 * Backward outputs: du [T, B, 3, d] and d_xs [T, B, d] contiguous; dc0 [B, d]; dv_rows and db_rows
 * [B, 2, d] (per batch row; the caller sums over rows).
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64

typedef struct {
    int64_t T, B, d;
    const void *u; int64_t u_t, u_b, u_k; int u_bf16;
    const float *xs; int64_t x_t, x_b;
    const float *v, *bias, *c0;
    const uint8_t *real; int64_t m_t, m_b;
    float *h, *cells;
    const float *grad_h, *grad_c_last;
    void *du; float *d_xs, *dc0, *dv_rows, *db_rows;
    int64_t task_begin, task_end;
} Job;

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static inline float from_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as PyTorch does; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* The three pre-activations of one task at step t, as float32 pointers (into u, or into buf when
 * u is bfloat16). */
static void load_u(const Job *j, int64_t t, int64_t b, int64_t i0, int64_t n, float buf[3][BLOCK],
                   const float **ux, const float **uf, const float **ur) {
    const int64_t at = t * j->u_t + b * j->u_b + i0;
    if (j->u_bf16) {
        const uint16_t *u = (const uint16_t *)j->u + at;
        for (int k = 0; k < 3; k++)
#pragma omp simd
            for (int64_t i = 0; i < n; i++) buf[k][i] = from_bf16(u[k * j->u_k + i]);
        *ux = buf[0], *uf = buf[1], *ur = buf[2];
    } else {
        const float *u = (const float *)j->u + at;
        *ux = u, *uf = u + j->u_k, *ur = u + 2 * j->u_k;
    }
}

/* One time step of one task; c [n]: the task's cells, updated in place.
 * Each direction has a masked loop and a copy without the mask: the unpadded copy is the hot path
 * (language-model training), and folding both into one loop (an all-ones mask, a keep factor)
 * measured about 2x slower on cached data and ~10% slower per bf16 SRU step. */
static void forward_step(const Job *j, int64_t t, int64_t b, int64_t i0, int64_t n, float *restrict c) {
    const int64_t d = j->d;
    const float *vf = j->v + i0, *vr = j->v + d + i0, *bf = j->bias + i0, *br = j->bias + d + i0;
    {
        float ubuf[3][BLOCK];
        const float *ux, *uf, *ur;
        load_u(j, t, b, i0, n, ubuf, &ux, &uf, &ur);
        const float *xs = j->xs + t * j->x_t + b * j->x_b + i0;
        float *cell = j->cells + (t * j->B + b) * d + i0, *h = j->h + (t * j->B + b) * d + i0;
        if (j->real) {
            const uint8_t *m = j->real + t * j->m_t + b * j->m_b + i0;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                const float cp = c[i];
                const float f = sigmoid(uf[i] + vf[i] * cp + bf[i]);
                const float r = sigmoid(ur[i] + vr[i] * cp + br[i]);
                const float cn = ux[i] + f * (cp - ux[i]);
                const int keep = m[i] != 0;
                c[i] = keep ? cn : cp;
                cell[i] = c[i];
                h[i] = keep ? xs[i] + r * (cn - xs[i]) : 0.0f;
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                const float cp = c[i];
                const float f = sigmoid(uf[i] + vf[i] * cp + bf[i]);
                const float r = sigmoid(ur[i] + vr[i] * cp + br[i]);
                const float cn = ux[i] + f * (cp - ux[i]);
                c[i] = cn;
                cell[i] = cn;
                h[i] = xs[i] + r * (cn - xs[i]);
            }
        }
    }
}

/* One time step (walking backwards) of one task; state [5][BLOCK]: dL/dc carried to the previous
 * step, then the running sums for dv_f, dv_r, db_f, db_r. */
static void backward_step(const Job *j, int64_t t, int64_t b, int64_t i0, int64_t n, float *restrict state) {
    const int64_t d = j->d;
    const float *vf = j->v + i0, *vr = j->v + d + i0, *bf = j->bias + i0, *br = j->bias + d + i0;
    float *restrict carry = state, *restrict acc_vf = state + BLOCK, *restrict acc_vr = state + 2 * BLOCK;
    float *restrict acc_bf = state + 3 * BLOCK, *restrict acc_br = state + 4 * BLOCK;
    {
        float ubuf[3][BLOCK], dbuf[3][BLOCK];
        const float *ux, *uf, *ur;
        load_u(j, t, b, i0, n, ubuf, &ux, &uf, &ur);
        const float *xs = j->xs + t * j->x_t + b * j->x_b + i0;
        const int64_t row = (t * j->B + b) * d + i0;
        const float *cn_ = j->cells + row, *gh_ = j->grad_h + row;
        const float *cp_ = t > 0 ? j->cells + row - j->B * d : j->c0 + b * d + i0;
        const int64_t du_at = (t * j->B + b) * 3 * d + i0;
        float *dux = j->u_bf16 ? dbuf[0] : (float *)j->du + du_at;
        float *dfp = j->u_bf16 ? dbuf[1] : dux + d, *drp = j->u_bf16 ? dbuf[2] : dux + 2 * d;
        float *dxs = j->d_xs + row;
        if (j->real) {
            const uint8_t *m = j->real + t * j->m_t + b * j->m_b + i0;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                const float cp = cp_[i], cn = cn_[i];
                const float f = sigmoid(uf[i] + vf[i] * cp + bf[i]);
                const float r = sigmoid(ur[i] + vr[i] * cp + br[i]);
                const float keep = m[i] != 0 ? 1.0f : 0.0f;
                const float gh = gh_[i] * keep;
                const float dc = carry[i] + gh * r;
                const float g_r = gh * (cn - xs[i]) * r * (1.0f - r);
                const float g_f = keep * dc * (cp - ux[i]) * f * (1.0f - f);
                /* A padded step left the cell unchanged: its gradient passes straight through. */
                carry[i] = keep * (dc * f + g_f * vf[i] + g_r * vr[i]) + (1.0f - keep) * carry[i];
                dux[i] = keep * dc * (1.0f - f);
                dfp[i] = g_f;
                drp[i] = g_r;
                dxs[i] = gh * (1.0f - r);
                acc_vf[i] += g_f * cp;
                acc_vr[i] += g_r * cp;
                acc_bf[i] += g_f;
                acc_br[i] += g_r;
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                const float cp = cp_[i], cn = cn_[i];
                const float f = sigmoid(uf[i] + vf[i] * cp + bf[i]);
                const float r = sigmoid(ur[i] + vr[i] * cp + br[i]);
                const float gh = gh_[i];
                const float dc = carry[i] + gh * r;
                const float g_r = gh * (cn - xs[i]) * r * (1.0f - r);
                const float g_f = dc * (cp - ux[i]) * f * (1.0f - f);
                carry[i] = dc * f + g_f * vf[i] + g_r * vr[i];
                dux[i] = dc * (1.0f - f);
                dfp[i] = g_f;
                drp[i] = g_r;
                dxs[i] = gh * (1.0f - r);
                acc_vf[i] += g_f * cp;
                acc_vr[i] += g_r * cp;
                acc_bf[i] += g_f;
                acc_br[i] += g_r;
            }
        }
        if (j->u_bf16) {
            uint16_t *du = (uint16_t *)j->du + du_at;
            for (int k = 0; k < 3; k++)
#pragma omp simd
                for (int64_t i = 0; i < n; i++) du[k * d + i] = to_bf16(dbuf[k][i]);
        }
    }
}

static void task_of(const Job *j, int64_t k, int64_t *b, int64_t *i0, int64_t *n) {
    const int64_t blocks = (j->d + BLOCK - 1) / BLOCK;
    *b = k / blocks;
    *i0 = (k % blocks) * BLOCK;
    *n = j->d - *i0 < BLOCK ? j->d - *i0 : BLOCK;
}

static void *run_forward(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t count = j->task_end - j->task_begin;
    float *c = malloc(sizeof(float) * BLOCK * (count > 0 ? count : 1));
    if (!c) return (void *)1;
    for (int64_t k = 0; k < count; k++) {
        int64_t b, i0, n;
        task_of(j, j->task_begin + k, &b, &i0, &n);
        for (int64_t i = 0; i < n; i++) c[k * BLOCK + i] = j->c0[b * j->d + i0 + i];
    }
    for (int64_t t = 0; t < j->T; t++)
        for (int64_t k = 0; k < count; k++) {
            int64_t b, i0, n;
            task_of(j, j->task_begin + k, &b, &i0, &n);
            forward_step(j, t, b, i0, n, c + k * BLOCK);
        }
    free(c);
    return NULL;
}

static void *run_backward(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t count = j->task_end - j->task_begin, d = j->d;
    float *state = calloc((size_t)5 * BLOCK * (count > 0 ? count : 1), sizeof(float));
    if (!state) return (void *)1;
    for (int64_t k = 0; k < count; k++) {
        int64_t b, i0, n;
        task_of(j, j->task_begin + k, &b, &i0, &n);
        if (j->grad_c_last)
            for (int64_t i = 0; i < n; i++) state[k * 5 * BLOCK + i] = j->grad_c_last[b * d + i0 + i];
    }
    for (int64_t t = j->T - 1; t >= 0; t--)
        for (int64_t k = 0; k < count; k++) {
            int64_t b, i0, n;
            task_of(j, j->task_begin + k, &b, &i0, &n);
            backward_step(j, t, b, i0, n, state + k * 5 * BLOCK);
        }
    for (int64_t k = 0; k < count; k++) {
        int64_t b, i0, n;
        task_of(j, j->task_begin + k, &b, &i0, &n);
        const float *st = state + k * 5 * BLOCK;
        for (int64_t i = 0; i < n; i++) {
            j->dc0[b * d + i0 + i] = st[i];
            j->dv_rows[b * 2 * d + i0 + i] = st[BLOCK + i];
            j->dv_rows[b * 2 * d + d + i0 + i] = st[2 * BLOCK + i];
            j->db_rows[b * 2 * d + i0 + i] = st[3 * BLOCK + i];
            j->db_rows[b * 2 * d + d + i0 + i] = st[4 * BLOCK + i];
        }
    }
    free(state);
    return NULL;
}

/* Split the (row, block) tasks over n_threads OpenMP threads. The kernel links libgomp by its
 * soname, so inside a PyTorch process it shares PyTorch's (already loaded) OpenMP runtime and its
 * worker threads: no second pool competing for the cores with PyTorch's spinning workers. */
static int run_parallel(Job *job, int n_threads, void *(*fn)(void *)) {
    const int64_t tasks = job->B * ((job->d + BLOCK - 1) / BLOCK);
    if (n_threads < 1) n_threads = 1;
    if (n_threads > tasks) n_threads = (int)tasks;
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        const int k = omp_get_thread_num(), n = omp_get_num_threads();
        Job mine = *job;
        mine.task_begin = tasks * k / n;
        mine.task_end = tasks * (k + 1) / n;
        failed |= fn(&mine) != NULL;
    }
    return failed;
}

int sru_forward(int64_t T, int64_t B, int64_t d,
                const void *u, int64_t u_t, int64_t u_b, int64_t u_k, int u_bf16,
                const float *xs, int64_t x_t, int64_t x_b,
                const float *v, const float *bias, const float *c0,
                const uint8_t *real, int64_t m_t, int64_t m_b,
                float *h, float *cells, int n_threads) {
    Job job = {T, B, d, u, u_t, u_b, u_k, u_bf16, xs, x_t, x_b, v, bias, c0, real, m_t, m_b,
               h, cells, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, 0};
    return run_parallel(&job, n_threads, run_forward);
}

int sru_backward(int64_t T, int64_t B, int64_t d,
                 const void *u, int64_t u_t, int64_t u_b, int64_t u_k, int u_bf16,
                 const float *xs, int64_t x_t, int64_t x_b,
                 const float *v, const float *bias, const float *c0,
                 const uint8_t *real, int64_t m_t, int64_t m_b,
                 const float *cells, const float *grad_h, const float *grad_c_last,
                 void *du, float *d_xs, float *dc0, float *dv_rows, float *db_rows, int n_threads) {
    Job job = {T, B, d, u, u_t, u_b, u_k, u_bf16, xs, x_t, x_b, v, bias, c0, real, m_t, m_b,
               NULL, (float *)cells, grad_h, grad_c_last, du, d_xs, dc0, dv_rows, db_rows, 0, 0};
    return run_parallel(&job, n_threads, run_backward);
}
