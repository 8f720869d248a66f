/* Adai's two passes over a list of dense CPU tensors, for float and double (see _native.py).
 *
 * Built at first use by adai_lightning/optim/_native.py with the system C compiler
 * (-O3 -march=native -fopenmp) and called through ctypes: one call per pass and bucket, whatever
 * the number of tensors, so a step costs two library calls instead of one kernel launch per tensor.
 *
 * Work is split into fixed chunks of CHUNK elements (a tensor's tail is a shorter chunk), handed
 * out dynamically (a thread that loses its core to another process does not hold up the rest).
 * The chunking does not depend on the thread count, and partial sums are added in chunk order, so
 * the results are the same for any number of threads and any scheduling. Built without OpenMP
 * (a compiler without -fopenmp), the pragmas are ignored and the loops run on one thread. The arithmetic follows the eager paths of
 * _functional.py operation by operation, in the tensors' own precision (float64 only for the sums); like them
 * it forms the coefficients (1 - beta2, 1 - eps, the decay, the step scale) in double before rounding them to
 * the element type (1 - (float)0.9999 is off by 6e-5 relative; (float)(1 - 0.9999) by at most 6e-8).
 * Pass 1 reads v as well as g (rather than carrying sum(v) from step to step): its result then
 * depends only on the state, so a run resumed from a checkpoint continues bit for bit.
 * Comparisons are written so that a NaN propagates as it does in torch.clamp/minimum.
 */
#include <stdint.h>
#include <stdlib.h>
#include <tgmath.h>

#define CHUNK 32768

/* The hyperparameters of one call, laid out as the ctypes Structure in _native.py. */
typedef struct {
    double sign, l2, beta2, beta0, max_beta1, decay, step_scale, exponent, dampening;
    int32_t use_l2, damped;
} adai_hyper;

typedef struct {
    int64_t tensor, start, stop;
} chunk_t;

/* Chunks of every tensor, in tensor order; *count receives their number; NULL if out of memory. */
static chunk_t *make_chunks(int64_t n, const int64_t *numel, int64_t *count) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; ++t) total += (numel[t] + CHUNK - 1) / CHUNK;
    chunk_t *chunks = malloc((size_t)(total > 0 ? total : 1) * sizeof(chunk_t));
    if (!chunks) return NULL;
    int64_t c = 0;
    for (int64_t t = 0; t < n; ++t)
        for (int64_t start = 0; start < numel[t]; start += CHUNK) {
            chunks[c].tensor = t;
            chunks[c].start = start;
            chunks[c].stop = start + CHUNK < numel[t] ? start + CHUNK : numel[t];
            ++c;
        }
    *count = c;
    return chunks;
}

/* The loop bodies are always-inlined functions whose flags the callers pass as literals, so every
 * combination compiles to its own branch-free, vectorised loop. */
#define INLINE static inline __attribute__((always_inline))

/* DEFINE_PASSES(T, S) defines adai_sums_S and adai_update_S for element type T. */
#define DEFINE_PASSES(T, S)                                                                          \
/* sum over [start, stop) of the new v = beta2 * v + (1 - beta2) * g * g, accumulated in double */   \
INLINE double sums_chunk_##S(const T *restrict g_, const T *restrict p_, const T *restrict v_,     \
                             int64_t start, int64_t stop, const adai_hyper *h, int use_l2) {        \
    const T sign = (T)h->sign, l2 = (T)h->l2, beta2 = (T)h->beta2, weight2 = (T)(1.0 - h->beta2); \
    double acc = 0.0;                                                                              \
    _Pragma("omp simd reduction(+:acc)")                                                           \
    for (int64_t i = start; i < stop; ++i) {                                                       \
        T g = g_[i] * sign;                                                                        \
        if (use_l2) g = g + l2 * p_[i];                                                            \
        acc += (double)(v_[i] * beta2 + weight2 * (g * g));                                        \
    }                                                                                              \
    return acc;                                                                                    \
}                                                                                                  \
                                                                                                   \
/* Pass 1: *total = sum over tensors t of sum(new v of t) / bias2[t], bias2[t] = 1 - beta2**step  \
 * of tensor t. Writes nothing else. Returns 0, or -1 when out of memory. */                      \
int adai_sums_##S(int64_t n, T *const *params, T *const *grads, T *const *exp_avg_sqs,           \
                  const int64_t *numel, const double *bias2, const adai_hyper *h, double *total,  \
                  int threads) {                                                                   \
    int64_t count = 0;                                                                             \
    chunk_t *chunks = make_chunks(n, numel, &count);                                               \
    double *partial = malloc((size_t)(count > 0 ? count : 1) * sizeof(double));                    \
    if (!chunks || !partial) { free(chunks); free(partial); return -1; }                           \
    const int use_l2 = h->use_l2;                                                                  \
    _Pragma("omp parallel for schedule(dynamic) num_threads(threads)")                             \
    for (int64_t c = 0; c < count; ++c) {                                                          \
        const int64_t t = chunks[c].tensor, a = chunks[c].start, b = chunks[c].stop;               \
        partial[c] = use_l2 ? sums_chunk_##S(grads[t], params[t], exp_avg_sqs[t], a, b, h, 1)      \
                            : sums_chunk_##S(grads[t], params[t], exp_avg_sqs[t], a, b, h, 0);     \
    }                                                                                              \
    double sum = 0.0, tensor_sum = 0.0;                                                            \
    for (int64_t c = 0; c < count; ++c) {                                                          \
        tensor_sum += partial[c];                                                                  \
        if (c + 1 == count || chunks[c + 1].tensor != chunks[c].tensor) {                          \
            sum += tensor_sum / bias2[chunks[c].tensor];                                           \
            tensor_sum = 0.0;                                                                      \
        }                                                                                          \
    }                                                                                              \
    *total = sum;                                                                                  \
    free(chunks);                                                                                  \
    free(partial);                                                                                 \
    return 0;                                                                                      \
}                                                                                                  \
                                                                                                   \
/* pass 2 on [start, stop) of one tensor; bias2 = 1 - beta2**step, mean = vbar */                 \
INLINE void update_chunk_##S(T *restrict p_, const T *restrict g_, T *restrict m_,                 \
                             T *restrict v_, T *restrict P_, int64_t start, int64_t stop,           \
                             T bias2, T mean, const adai_hyper *h, int use_l2, int damped) {        \
    const T sign = (T)h->sign, l2 = (T)h->l2, beta2 = (T)h->beta2, beta0 = (T)h->beta0;           \
    const T weight2 = (T)(1.0 - h->beta2);                                                         \
    const T max_beta1 = (T)h->max_beta1, decay = (T)h->decay, scale = -(T)h->step_scale;          \
    const T exponent = (T)h->exponent, dampening = (T)h->dampening, one = (T)1, zero = (T)0;      \
    _Pragma("omp simd")                                                                            \
    for (int64_t i = start; i < stop; ++i) {                                                       \
        T g = g_[i] * sign;                                                                        \
        if (use_l2) g = g + l2 * p_[i];                                                            \
        const T v = v_[i] * beta2 + weight2 * (g * g);                                             \
        T ratio = v / bias2 / mean;                                                                \
        if (damped) ratio = pow(ratio, exponent);                                                  \
        T beta1 = one - beta0 * ratio;                                                             \
        beta1 = beta1 < zero ? zero : beta1;                                                       \
        beta1 = beta1 > max_beta1 ? max_beta1 : beta1;                                             \
        const T prod = P_[i] * beta1;                                                              \
        T weight = one - beta1;                                                                    \
        if (damped) weight = pow(weight, dampening);                                               \
        const T m = beta1 * m_[i] + weight * g;                                                    \
        v_[i] = v;                                                                                 \
        m_[i] = m;                                                                                 \
        P_[i] = prod;                                                                              \
        p_[i] = p_[i] * decay + m / (one - prod) * scale;                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* Pass 2: second moment, inertia, momentum, its product and the parameter, in one sweep.        \
 * bias2[t] = 1 - beta2**step of tensor t; vbar points at the (float64) mean of vhat; found_inf  \
 * is NULL or points at a float that is nonzero when this step must change nothing. */           \
int adai_update_##S(int64_t n, T *const *params, T *const *grads, T *const *exp_avgs,            \
                    T *const *exp_avg_sqs, T *const *beta1_prods, const int64_t *numel,            \
                    const double *bias2, const double *vbar, const float *found_inf,               \
                    const adai_hyper *h, int threads) {                                            \
    if (found_inf && *found_inf != 0.0f) return 0;                                                 \
    int64_t count = 0;                                                                             \
    chunk_t *chunks = make_chunks(n, numel, &count);                                               \
    if (!chunks) return -1;                                                                        \
    const int use_l2 = h->use_l2, damped = h->damped;                                              \
    const T mean = (T)*vbar;                                                                       \
    _Pragma("omp parallel for schedule(dynamic) num_threads(threads)")                              \
    for (int64_t c = 0; c < count; ++c) {                                                          \
        const int64_t t = chunks[c].tensor, a = chunks[c].start, b = chunks[c].stop;               \
        T *p_ = params[t], *m_ = exp_avgs[t], *v_ = exp_avg_sqs[t], *P_ = beta1_prods[t];          \
        const T *g_ = grads[t];                                                                    \
        const T b2 = (T)bias2[t];                                                                  \
        if (damped) {                                                                              \
            if (use_l2) update_chunk_##S(p_, g_, m_, v_, P_, a, b, b2, mean, h, 1, 1);            \
            else update_chunk_##S(p_, g_, m_, v_, P_, a, b, b2, mean, h, 0, 1);                   \
        } else {                                                                                   \
            if (use_l2) update_chunk_##S(p_, g_, m_, v_, P_, a, b, b2, mean, h, 1, 0);            \
            else update_chunk_##S(p_, g_, m_, v_, P_, a, b, b2, mean, h, 0, 0);                   \
        }                                                                                          \
    }                                                                                              \
    free(chunks);                                                                                  \
    return 0;                                                                                      \
}

DEFINE_PASSES(float, f32)
DEFINE_PASSES(double, f64)
