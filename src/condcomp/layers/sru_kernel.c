/* SRU's element-wise recurrence, forward and backward, for float32 on the CPU.
 *
 * Built on first use by condcomp.layers.sru_native (plain C, no PyTorch headers, so it compiles in
 * well under a second) and called through ctypes; the PyTorch path in sru_recurrence.py is the
 * fallback and the reference it is tested against.
 *
 * Every (batch row, channel) is an independent recurrence over time, so the work is split into
 * tasks of one batch row and BLOCK channels; each task runs all time steps with its cells held in a
 * small local array, and the channel loop vectorises (the compiler's SIMD sigmoid). Threads take
 * contiguous ranges of tasks.
 *
 * Shapes (element strides; the channel stride is 1 everywhere):
 *   u      [T, B, 3, d]  candidate, forget and reset pre-activations  (strides u_t, u_b, u_k)
 *   xs     [T, B, d]     highway input                                 (strides x_t, x_b)
 *   v, b   [2, d]        recurrent weights and biases (forget, reset), contiguous
 *   c0     [B, d]        contiguous
 *   real   [T, B, d] uint8 (0 = padded), strides m_t, m_b; may be NULL
 *   h, cells [T, B, d]   contiguous outputs of the forward
 * Backward outputs: du [T, B, 3, d] and d_xs [T, B, d] contiguous; dc0 [B, d]; dv_rows and db_rows
 * [B, 2, d] (per batch row; the caller sums over rows).
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define BLOCK 64

typedef struct {
    int64_t T, B, d;
    const float *u; int64_t u_t, u_b, u_k;
    const float *xs; int64_t x_t, x_b;
    const float *v, *bias, *c0;
    const uint8_t *real; int64_t m_t, m_b;
    float *h, *cells;
    const float *grad_h, *grad_c_last;
    float *du, *d_xs, *dc0, *dv_rows, *db_rows;
    int64_t task_begin, task_end;
} Job;

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static void forward_task(const Job *j, int64_t b, int64_t i0, int64_t n) {
    const int64_t d = j->d;
    const float *vf = j->v + i0, *vr = j->v + d + i0, *bf = j->bias + i0, *br = j->bias + d + i0;
    float c[BLOCK];
    for (int64_t i = 0; i < n; i++) c[i] = j->c0[b * d + i0 + i];
    for (int64_t t = 0; t < j->T; t++) {
        const float *u = j->u + t * j->u_t + b * j->u_b + i0;
        const float *ux = u, *uf = u + j->u_k, *ur = u + 2 * j->u_k;
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

static void backward_task(const Job *j, int64_t b, int64_t i0, int64_t n) {
    const int64_t d = j->d;
    const float *vf = j->v + i0, *vr = j->v + d + i0, *bf = j->bias + i0, *br = j->bias + d + i0;
    float carry[BLOCK], acc_vf[BLOCK], acc_vr[BLOCK], acc_bf[BLOCK], acc_br[BLOCK];
    for (int64_t i = 0; i < n; i++) {
        carry[i] = j->grad_c_last ? j->grad_c_last[b * d + i0 + i] : 0.0f;
        acc_vf[i] = acc_vr[i] = acc_bf[i] = acc_br[i] = 0.0f;
    }
    for (int64_t t = j->T - 1; t >= 0; t--) {
        const float *u = j->u + t * j->u_t + b * j->u_b + i0;
        const float *ux = u, *uf = u + j->u_k, *ur = u + 2 * j->u_k;
        const float *xs = j->xs + t * j->x_t + b * j->x_b + i0;
        const int64_t row = (t * j->B + b) * d + i0;
        const float *cn_ = j->cells + row, *gh_ = j->grad_h + row;
        const float *cp_ = t > 0 ? j->cells + row - j->B * d : j->c0 + b * d + i0;
        float *dux = j->du + (t * j->B + b) * 3 * d + i0, *dfp = dux + d, *drp = dux + 2 * d;
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
    }
    for (int64_t i = 0; i < n; i++) {
        j->dc0[b * d + i0 + i] = carry[i];
        j->dv_rows[b * 2 * d + i0 + i] = acc_vf[i];
        j->dv_rows[b * 2 * d + d + i0 + i] = acc_vr[i];
        j->db_rows[b * 2 * d + i0 + i] = acc_bf[i];
        j->db_rows[b * 2 * d + d + i0 + i] = acc_br[i];
    }
}

static void *run_forward(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t blocks = (j->d + BLOCK - 1) / BLOCK;
    for (int64_t k = j->task_begin; k < j->task_end; k++) {
        const int64_t b = k / blocks, i0 = (k % blocks) * BLOCK;
        forward_task(j, b, i0, j->d - i0 < BLOCK ? j->d - i0 : BLOCK);
    }
    return NULL;
}

static void *run_backward(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t blocks = (j->d + BLOCK - 1) / BLOCK;
    for (int64_t k = j->task_begin; k < j->task_end; k++) {
        const int64_t b = k / blocks, i0 = (k % blocks) * BLOCK;
        backward_task(j, b, i0, j->d - i0 < BLOCK ? j->d - i0 : BLOCK);
    }
    return NULL;
}

#define MAX_THREADS 64

/* Split the (row, block) tasks over n_threads threads (the caller's thread is one of them). */
static int run_parallel(Job *job, int n_threads, void *(*fn)(void *)) {
    const int64_t tasks = job->B * ((job->d + BLOCK - 1) / BLOCK);
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > tasks) n_threads = (int)tasks;
    Job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 0; k < n_threads; k++) {
        jobs[k] = *job;
        jobs[k].task_begin = tasks * k / n_threads;
        jobs[k].task_end = tasks * (k + 1) / n_threads;
    }
    for (int k = 1; k < n_threads; k++)
        started[k] = pthread_create(&threads[k], NULL, fn, &jobs[k]) == 0;
    fn(&jobs[0]);
    for (int k = 1; k < n_threads; k++) {
        if (started[k]) pthread_join(threads[k], NULL);
        else fn(&jobs[k]);  /* no thread to be had: do its share here */
    }
    return 0;
}

int sru_forward(int64_t T, int64_t B, int64_t d,
                const float *u, int64_t u_t, int64_t u_b, int64_t u_k,
                const float *xs, int64_t x_t, int64_t x_b,
                const float *v, const float *bias, const float *c0,
                const uint8_t *real, int64_t m_t, int64_t m_b,
                float *h, float *cells, int n_threads) {
    Job job = {T, B, d, u, u_t, u_b, u_k, xs, x_t, x_b, v, bias, c0, real, m_t, m_b,
               h, cells, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, 0};
    return run_parallel(&job, n_threads, run_forward);
}

int sru_backward(int64_t T, int64_t B, int64_t d,
                 const float *u, int64_t u_t, int64_t u_b, int64_t u_k,
                 const float *xs, int64_t x_t, int64_t x_b,
                 const float *v, const float *bias, const float *c0,
                 const uint8_t *real, int64_t m_t, int64_t m_b,
                 const float *cells, const float *grad_h, const float *grad_c_last,
                 float *du, float *d_xs, float *dc0, float *dv_rows, float *db_rows, int n_threads) {
    Job job = {T, B, d, u, u_t, u_b, u_k, xs, x_t, x_b, v, bias, c0, real, m_t, m_b,
               NULL, (float *)cells, grad_h, grad_c_last, du, d_xs, dc0, dv_rows, db_rows, 0, 0};
    return run_parallel(&job, n_threads, run_backward);
}
