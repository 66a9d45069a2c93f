/*
 * CPU kernels for the Adasum operator on segmented flat buffers.
 *
 * Plain PyTorch has no fused "dot product in float64 of two float32 vectors": it would convert
 * both operands to float64 first, which costs several times a plain add. These two loops read
 * each operand once per pass, which keeps the operator within about twice the cost of an add.
 *
 * Pointers arrive as integers (tensor.data_ptr()); the Python side checks dtypes, contiguity and
 * sizes, so nothing here validates memory.
 *
 * dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
  return (uint16_t)(u >> 16);
}

/* Sums (a.b, a.a, b.b) in float64 over one segment. LANES independent running sums per quantity
   keep the additions from waiting on each other (one sum per quantity would be bound by the
   latency of a float64 add); the lanes are added in a fixed order at the end, so a result is
   reproducible. */
#define LANES 16
#define DEFINE_PARTIALS(NAME, T, LOAD)                                                  \
  MULTIVERSION static void NAME(const T *a, const T *b, int64_t n, double *out) {       \
    double d[LANES] = {0}, aa[LANES] = {0}, bb[LANES] = {0};                            \
    int64_t i = 0;                                                                      \
    for (; i + LANES <= n; i += LANES) {                                                \
      for (int k = 0; k < LANES; k++) {                                                 \
        double x = (double)LOAD(a[i + k]), y = (double)LOAD(b[i + k]);                  \
        d[k] += x * y;                                                                  \
        aa[k] += x * x;                                                                 \
        bb[k] += y * y;                                                                 \
      }                                                                                 \
    }                                                                                   \
    for (int k = 0; i < n; i++, k++) {                                                  \
      double x = (double)LOAD(a[i]), y = (double)LOAD(b[i]);                            \
      d[k] += x * y;                                                                    \
      aa[k] += x * x;                                                                   \
      bb[k] += y * y;                                                                   \
    }                                                                                   \
    out[0] = out[1] = out[2] = 0.0;                                                     \
    for (int k = 0; k < LANES; k++) {                                                   \
      out[0] += d[k];                                                                   \
      out[1] += aa[k];                                                                  \
      out[2] += bb[k];                                                                  \
    }                                                                                   \
  }

/* out = ca * a + cb * b in the compute type C (float64 for float32 and float64 tensors, float32
   for the 16-bit types), rounded once to the tensor's type; no fused multiply-add, so this is
   exactly what the PyTorch fallback (mul, mul, add, cast) computes. */
#define DEFINE_COMBINE(NAME, T, C, LOAD, STORE)                                          \
  MULTIVERSION static void NAME(const T *a, const T *b, T *out, int64_t n, double ca,    \
                                double cb) {                                            \
    const C fa = (C)ca, fb = (C)cb;                                                     \
    _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {                               \
      C x = fa * (C)LOAD(a[i]);                                                         \
      C y = fb * (C)LOAD(b[i]);                                                         \
      out[i] = STORE(x + y);                                                            \
    }                                                                                   \
  }

#define IDENTITY(x) (x)
#define HALF_LOAD(x) ((float)(x))
#define HALF_STORE(x) ((_Float16)(x))

DEFINE_PARTIALS(partials_f32, float, IDENTITY)
DEFINE_PARTIALS(partials_f64, double, IDENTITY)
DEFINE_PARTIALS(partials_f16, _Float16, HALF_LOAD)
DEFINE_PARTIALS(partials_bf16, uint16_t, bf16_to_float)
DEFINE_COMBINE(combine_f32, float, double, IDENTITY, (float))
DEFINE_COMBINE(combine_f64, double, double, IDENTITY, IDENTITY)
DEFINE_COMBINE(combine_f16, _Float16, float, HALF_LOAD, HALF_STORE)
DEFINE_COMBINE(combine_bf16, uint16_t, float, bf16_to_float, float_to_bf16)

static const size_t ITEMSIZE[4] = {4, 8, 2, 2};

/* Work is cut into blocks of BLOCK elements that never straddle two segments. A segment's sums
   are the in-order sum of its blocks' sums, so the result does not depend on how many threads
   computed the blocks. */
#define BLOCK 16384
#define MIN_PARALLEL (1 << 18)
#define MAX_THREADS 64

typedef struct {
  const char *a, *b;
  char *out;
  int dtype;
  const int64_t *off;    /* nseg + 1 element offsets */
  const int64_t *first;  /* nseg + 1: index of each segment's first block */
  Py_ssize_t nseg;
  double *scratch;       /* partials: 3 per block */
  const double *ca, *cb; /* combine: per segment */
  int64_t b0, b1;        /* this job's blocks */
} job_t;

static void partials_block(int dtype, const char *a, const char *b, int64_t n, double *r) {
  switch (dtype) {
    case 0: partials_f32((const float *)a, (const float *)b, n, r); break;
    case 1: partials_f64((const double *)a, (const double *)b, n, r); break;
    case 2: partials_f16((const _Float16 *)a, (const _Float16 *)b, n, r); break;
    default: partials_bf16((const uint16_t *)a, (const uint16_t *)b, n, r); break;
  }
}

static void combine_block(int dtype, const char *a, const char *b, char *o, int64_t n, double ca,
                          double cb) {
  switch (dtype) {
    case 0: combine_f32((const float *)a, (const float *)b, (float *)o, n, ca, cb); break;
    case 1: combine_f64((const double *)a, (const double *)b, (double *)o, n, ca, cb); break;
    case 2: combine_f16((const _Float16 *)a, (const _Float16 *)b, (_Float16 *)o, n, ca, cb); break;
    default: combine_bf16((const uint16_t *)a, (const uint16_t *)b, (uint16_t *)o, n, ca, cb); break;
  }
}

/* Runs the job's blocks: partials into scratch when out is NULL, else the combination. */
static void *run_job(void *arg) {
  const job_t *j = (const job_t *)arg;
  const size_t size = ITEMSIZE[j->dtype];
  Py_ssize_t s = 0;
  while (s < j->nseg && j->first[s + 1] <= j->b0) s++;
  for (int64_t k = j->b0; k < j->b1; k++) {
    while (j->first[s + 1] <= k) s++;
    const int64_t lo = j->off[s] + (k - j->first[s]) * BLOCK;
    const int64_t hi = lo + BLOCK < j->off[s + 1] ? lo + BLOCK : j->off[s + 1];
    const size_t at = (size_t)lo * size;
    if (j->out == NULL)
      partials_block(j->dtype, j->a + at, j->b + at, hi - lo, j->scratch + 3 * k);
    else
      combine_block(j->dtype, j->a + at, j->b + at, j->out + at, hi - lo, j->ca[s], j->cb[s]);
  }
  return NULL;
}

/* Splits the blocks evenly over up to `threads` threads (the caller's thread is one of them). */
static int run_parallel(job_t *base, int64_t nblocks, int64_t numel, int threads) {
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (numel < MIN_PARALLEL || threads < 1) threads = 1;
  if (threads > nblocks) threads = nblocks > 0 ? (int)nblocks : 1;
  job_t jobs[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int t = 0; t < threads; t++) {
    jobs[t] = *base;
    jobs[t].b0 = nblocks * t / threads;
    jobs[t].b1 = nblocks * (t + 1) / threads;
  }
  for (int t = 1; t < threads; t++)
    started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
  run_job(&jobs[0]);
  for (int t = 1; t < threads; t++) {
    if (started[t])
      pthread_join(ids[t], NULL);
    else
      run_job(&jobs[t]); /* no thread to be had: do its share here */
  }
  return 0;
}

/* first[s] = index of segment s's first block; returns the number of blocks. */
static int64_t block_index(const int64_t *off, Py_ssize_t nseg, int64_t *first) {
  first[0] = 0;
  for (Py_ssize_t s = 0; s < nseg; s++)
    first[s + 1] = first[s] + (off[s + 1] - off[s] + BLOCK - 1) / BLOCK;
  return first[nseg];
}

/* segment_partials(a, b, dtype, offsets, nseg, out, threads): out is float64 [3, nseg] (dots,
   |a|^2, |b|^2); segment s spans elements offsets[s] .. offsets[s+1] of a and b. */
static PyObject *segment_partials(PyObject *self, PyObject *args) {
  unsigned long long pa, pb, poff, pout;
  int dtype, threads;
  Py_ssize_t nseg;
  if (!PyArg_ParseTuple(args, "KKiKnKi", &pa, &pb, &dtype, &poff, &nseg, &pout, &threads))
    return NULL;
  if (dtype < 0 || dtype > 3) return PyErr_Format(PyExc_ValueError, "unknown dtype code %d", dtype);
  const int64_t *off = (const int64_t *)(uintptr_t)poff;
  double *out = (double *)(uintptr_t)pout;
  int64_t *first = PyMem_RawMalloc(sizeof(int64_t) * (nseg + 1));
  if (first == NULL) return PyErr_NoMemory();
  const int64_t nblocks = block_index(off, nseg, first);
  double *scratch = PyMem_RawMalloc(sizeof(double) * 3 * (nblocks > 0 ? nblocks : 1));
  if (scratch == NULL) {
    PyMem_RawFree(first);
    return PyErr_NoMemory();
  }
  job_t job = {(const char *)(uintptr_t)pa, (const char *)(uintptr_t)pb, NULL, dtype, off, first,
               nseg, scratch, NULL, NULL, 0, 0};
  Py_BEGIN_ALLOW_THREADS
  run_parallel(&job, nblocks, off[nseg] - off[0], threads);
  for (Py_ssize_t s = 0; s < nseg; s++) {
    double r[3] = {0.0, 0.0, 0.0};
    for (int64_t k = first[s]; k < first[s + 1]; k++)
      for (int q = 0; q < 3; q++) r[q] += scratch[3 * k + q];
    out[s] = r[0];
    out[nseg + s] = r[1];
    out[2 * nseg + s] = r[2];
  }
  Py_END_ALLOW_THREADS
  PyMem_RawFree(scratch);
  PyMem_RawFree(first);
  Py_RETURN_NONE;
}

/* segment_combine(a, b, out, dtype, offsets, nseg, ca, cb, threads): out = ca[s] a + cb[s] b
   per segment; out may alias a or b. ca and cb are float64 [nseg]. */
static PyObject *segment_combine(PyObject *self, PyObject *args) {
  unsigned long long pa, pb, po, poff, pca, pcb;
  int dtype, threads;
  Py_ssize_t nseg;
  if (!PyArg_ParseTuple(args, "KKKiKnKKi", &pa, &pb, &po, &dtype, &poff, &nseg, &pca, &pcb, &threads))
    return NULL;
  if (dtype < 0 || dtype > 3) return PyErr_Format(PyExc_ValueError, "unknown dtype code %d", dtype);
  const int64_t *off = (const int64_t *)(uintptr_t)poff;
  int64_t *first = PyMem_RawMalloc(sizeof(int64_t) * (nseg + 1));
  if (first == NULL) return PyErr_NoMemory();
  const int64_t nblocks = block_index(off, nseg, first);
  job_t job = {(const char *)(uintptr_t)pa, (const char *)(uintptr_t)pb, (char *)(uintptr_t)po,
               dtype, off, first, nseg, NULL, (const double *)(uintptr_t)pca,
               (const double *)(uintptr_t)pcb, 0, 0};
  Py_BEGIN_ALLOW_THREADS
  run_parallel(&job, nblocks, off[nseg] - off[0], threads);
  Py_END_ALLOW_THREADS
  PyMem_RawFree(first);
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"segment_partials", segment_partials, METH_VARARGS, "Per-segment float64 (a.b, a.a, b.b)."},
    {"segment_combine", segment_combine, METH_VARARGS, "Per-segment out = ca a + cb b."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
