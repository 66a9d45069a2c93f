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

/* Sums (a.b, a.a, b.b) in float64 over one segment. The simd reduction lets the compiler keep
   several accumulators; the order is fixed by the binary, so a result is reproducible. */
#define DEFINE_PARTIALS(NAME, T, LOAD)                                                  \
  MULTIVERSION static void NAME(const T *a, const T *b, int64_t n, double *out) {       \
    double d = 0.0, aa = 0.0, bb = 0.0;                                                 \
    _Pragma("omp simd reduction(+ : d, aa, bb)") for (int64_t i = 0; i < n; i++) {      \
      double x = (double)LOAD(a[i]), y = (double)LOAD(b[i]);                            \
      d += x * y;                                                                       \
      aa += x * x;                                                                      \
      bb += y * y;                                                                      \
    }                                                                                   \
    out[0] = d;                                                                         \
    out[1] = aa;                                                                        \
    out[2] = bb;                                                                        \
  }

/* out = ca * a + cb * b, two roundings in the compute type and no fused multiply-add, which is
   exactly what the PyTorch fallback (mul, mul, add) computes. */
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
DEFINE_COMBINE(combine_f32, float, float, IDENTITY, IDENTITY)
DEFINE_COMBINE(combine_f64, double, double, IDENTITY, IDENTITY)
DEFINE_COMBINE(combine_f16, _Float16, float, HALF_LOAD, HALF_STORE)
DEFINE_COMBINE(combine_bf16, uint16_t, float, bf16_to_float, float_to_bf16)

static const size_t ITEMSIZE[4] = {4, 8, 2, 2};

/* segment_partials(a, b, dtype, offsets, nseg, out): out is float64 [3, nseg] (dots, |a|^2,
   |b|^2); segment s spans elements offsets[s] .. offsets[s+1] of a and b. */
static PyObject *segment_partials(PyObject *self, PyObject *args) {
  unsigned long long pa, pb, poff, pout;
  int dtype;
  Py_ssize_t nseg;
  if (!PyArg_ParseTuple(args, "KKiKnK", &pa, &pb, &dtype, &poff, &nseg, &pout)) return NULL;
  if (dtype < 0 || dtype > 3) {
    PyErr_SetString(PyExc_ValueError, "unknown dtype code");
    return NULL;
  }
  const char *a = (const char *)(uintptr_t)pa, *b = (const char *)(uintptr_t)pb;
  const int64_t *off = (const int64_t *)(uintptr_t)poff;
  double *out = (double *)(uintptr_t)pout;
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t s = 0; s < nseg; s++) {
    const int64_t n = off[s + 1] - off[s];
    const size_t start = (size_t)off[s] * ITEMSIZE[dtype];
    double r[3];
    switch (dtype) {
      case 0: partials_f32((const float *)(a + start), (const float *)(b + start), n, r); break;
      case 1: partials_f64((const double *)(a + start), (const double *)(b + start), n, r); break;
      case 2: partials_f16((const _Float16 *)(a + start), (const _Float16 *)(b + start), n, r); break;
      default: partials_bf16((const uint16_t *)(a + start), (const uint16_t *)(b + start), n, r); break;
    }
    out[s] = r[0];
    out[nseg + s] = r[1];
    out[2 * nseg + s] = r[2];
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

/* segment_combine(a, b, out, dtype, offsets, nseg, ca, cb): out = ca[s] a + cb[s] b per segment;
   out may alias a or b. ca and cb are float64 [nseg]. */
static PyObject *segment_combine(PyObject *self, PyObject *args) {
  unsigned long long pa, pb, po, poff, pca, pcb;
  int dtype;
  Py_ssize_t nseg;
  if (!PyArg_ParseTuple(args, "KKKiKnKK", &pa, &pb, &po, &dtype, &poff, &nseg, &pca, &pcb))
    return NULL;
  if (dtype < 0 || dtype > 3) {
    PyErr_SetString(PyExc_ValueError, "unknown dtype code");
    return NULL;
  }
  const char *a = (const char *)(uintptr_t)pa, *b = (const char *)(uintptr_t)pb;
  char *o = (char *)(uintptr_t)po;
  const int64_t *off = (const int64_t *)(uintptr_t)poff;
  const double *ca = (const double *)(uintptr_t)pca, *cb = (const double *)(uintptr_t)pcb;
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t s = 0; s < nseg; s++) {
    const int64_t n = off[s + 1] - off[s];
    const size_t st = (size_t)off[s] * ITEMSIZE[dtype];
    switch (dtype) {
      case 0:
        combine_f32((const float *)(a + st), (const float *)(b + st), (float *)(o + st), n, ca[s], cb[s]);
        break;
      case 1:
        combine_f64((const double *)(a + st), (const double *)(b + st), (double *)(o + st), n, ca[s], cb[s]);
        break;
      case 2:
        combine_f16((const _Float16 *)(a + st), (const _Float16 *)(b + st), (_Float16 *)(o + st), n, ca[s], cb[s]);
        break;
      default:
        combine_bf16((const uint16_t *)(a + st), (const uint16_t *)(b + st), (uint16_t *)(o + st), n, ca[s], cb[s]);
        break;
    }
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"segment_partials", segment_partials, METH_VARARGS, "Per-segment float64 (a.b, a.a, b.b)."},
    {"segment_combine", segment_combine, METH_VARARGS, "Per-segment out = ca a + cb b."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
