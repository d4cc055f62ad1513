// Row kernels for the fused linear -> log-prob op: branch-free exp / tanh on 16-lane GCC
// vector types, compiled once per ISA (AVX-512, AVX2+FMA, baseline) with target_clones so
// one portable binary runs the widest code the CPU has.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// The 64-byte vector helpers are always inlined into their callers, so the ABI note GCC gives
// for passing them by value in baseline code does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dpo_fast_cpu {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(DPO_FAST_NO_CLONES)
#define DPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DPO_CLONES
#endif
#define DPO_INLINE inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

DPO_INLINE vf vbcast(float x) { return vf{} + x; }
DPO_INLINE vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
DPO_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// Tail of n < 16 floats; the missing lanes read as `pad`.
DPO_INLINE vf vload_tail(const float* p, int64_t n, float pad) {
  vf v = vbcast(pad);
  float tmp[kLanes];
  std::memcpy(tmp, &v, sizeof(v));
  std::memcpy(tmp, p, n * sizeof(float));
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}
DPO_INLINE void vstore_tail(float* p, vf v, int64_t n) {
  float tmp[kLanes];
  std::memcpy(tmp, &v, sizeof(v));
  std::memcpy(p, tmp, n * sizeof(float));
}
DPO_INLINE vi lane_ids() { return vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
DPO_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
DPO_INLINE float hmax(vf v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof(v));
  float m = t[0];
  for (int i = 1; i < kLanes; ++i) m = t[i] > m ? t[i] : m;
  return m;
}
// Fixed pairwise order, so the sum is the same whatever ISA clone runs.
DPO_INLINE float hsum(vf v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof(v));
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// exp(x) (Cephes expf polynomial, ~1 ulp); exactly 0 below -87.3 (also for -inf).
DPO_INLINE vf vexp(vf x) {
  const vf lo = vbcast(-87.33654475f), hi = vbcast(88.0f);
  vf xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // Round to nearest with the 1.5 * 2^23 trick (no -ffast-math, so it is not folded away).
  const vf magic = vbcast(12582912.0f);
  vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf r2 = r * r;
  vf y = vbcast(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  vf res = y * scale;
  return x < lo ? vbcast(0.0f) : res;
}

// tanh(x): odd polynomial below |x| = 0.625 (Cephes tanhf), 1 - 2 / (exp(2|x|) + 1) above.
DPO_INLINE vf vtanh(vf x) {
  vf ax = x < 0.0f ? -x : x;
  vf s = x * x;
  vf p = vbcast(-5.70498872745e-3f);
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  p = p * s * x + x;
  vf big = 1.0f - 2.0f / (vexp(ax + ax) + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? p : big;
}

struct RowMap {
  const float* bias;  // already offset to the tile's first column, or nullptr
  float cap;          // softcap c (used when softcap is set)
  float inv_cap;      // 1 / c
  float inv_temp;
  bool softcap;
  float t_of_z;       // tanh(z0 / c) = z * t_of_z for a mapped logit z (= 1 / (c * inv_temp))
};

// Raw GEMM output z0 -> z = (c * tanh((z0 + b) / c)) * inv_temp.
DPO_INLINE vf map_logits(vf z, const RowMap& mp, const float* bias_at, int64_t n_tail) {
  if (mp.bias) z += n_tail < 0 ? vload(bias_at) : vload_tail(bias_at, n_tail, 0.0f);
  if (mp.softcap) z = vtanh(z * mp.inv_cap) * mp.cap;
  return z * mp.inv_temp;
}

// In place: z <- mapped logits; returns the row max.
DPO_CLONES float map_row_max(float* z, int64_t w, RowMap mp) {
  vf m = vbcast(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= w; i += kLanes) {
    vf v = map_logits(vload(z + i), mp, mp.bias ? mp.bias + i : nullptr, -1);
    vstore(z + i, v);
    m = vmax(m, v);
  }
  if (i < w) {
    int64_t n = w - i;
    vf v = map_logits(vload_tail(z + i, n, 0.0f), mp, mp.bias ? mp.bias + i : nullptr, n);
    vstore_tail(z + i, v, n);
    vi live = lane_ids() < (int32_t)n;
    m = live ? vmax(m, v) : m;
  }
  return hmax(m);
}

// Sums over one row of e = exp(z - ref), of e * (z - ref) (if want_u) and of e^2 =
// exp(2 (z - ref)) (kWantQ: log sum p^2). One body for both entry points below; the one
// without q compiles to the loop it always was.
template <bool kWantQ>
__attribute__((always_inline)) inline void exp_sums_body(const float* z, int64_t w, float ref,
                                                         bool want_u, float* s_out,
                                                         float* u_out, float* q_out) {
  vf s = vbcast(0.0f), u = vbcast(0.0f), q = vbcast(0.0f);
  const vf r = vbcast(ref);
  int64_t i = 0;
  for (; i + kLanes <= w; i += kLanes) {
    vf d = vload(z + i) - r;
    vf e = vexp(d);
    s += e;
    if (kWantQ) q += e * e;
    if (want_u) u += e * d;
  }
  if (i < w) {
    int64_t n = w - i;
    vi live = lane_ids() < (int32_t)n;
    vf d = vload_tail(z + i, n, 0.0f) - r;
    vf e = vexp(d);
    e = live ? e : vbcast(0.0f);
    d = live ? d : vbcast(0.0f);
    s += e;
    if (kWantQ) q += e * e;
    if (want_u) u += e * d;
  }
  *s_out = hsum(s);
  *u_out = want_u ? hsum(u) : 0.0f;
  if (kWantQ) *q_out = hsum(q);
}

DPO_CLONES void exp_sums(const float* z, int64_t w, float ref, bool want_u, float* s_out,
                         float* u_out) {
  exp_sums_body<false>(z, w, ref, want_u, s_out, u_out, nullptr);
}

// As exp_sums, plus q = sum exp(2 (z - ref)).
DPO_CLONES void exp_sums_sq(const float* z, int64_t w, float ref, bool want_u, float* s_out,
                            float* u_out, float* q_out) {
  exp_sums_body<true>(z, w, ref, want_u, s_out, u_out, q_out);
}

struct RowGrad {
  float row_max, log_sum, ent, coef, g_ent;  // coef = g_logp - g_lse
  bool with_ent;
};

// In place: raw GEMM output z0 -> dz0 without the one-hot term:
//   log p = (z - row_max) - log_sum;  dz0 = -p * (coef + g_ent * (log p + H)) * inv_temp * (1 - tanh^2)
DPO_INLINE vf grad_vec(vf z0, const RowMap& mp, const RowGrad& g, const float* bias_at,
                       int64_t n_tail) {
  if (mp.bias) z0 += n_tail < 0 ? vload(bias_at) : vload_tail(bias_at, n_tail, 0.0f);
  vf t = vbcast(0.0f), z = z0;
  if (mp.softcap) {
    t = vtanh(z0 * mp.inv_cap);
    z = t * mp.cap;
  }
  z = z * mp.inv_temp;
  vf d = (z - g.row_max) - g.log_sum;
  vf p = vexp(d);
  vf q = vbcast(g.coef);
  if (g.with_ent) q += g.g_ent * (d + g.ent);
  vf dz = -(p * q) * mp.inv_temp;
  if (mp.softcap) dz = dz * (1.0f - t * t);
  return dz;
}

DPO_CLONES void grad_row(float* z, int64_t w, RowMap mp, RowGrad g) {
  int64_t i = 0;
  for (; i + kLanes <= w; i += kLanes)
    vstore(z + i, grad_vec(vload(z + i), mp, g, mp.bias ? mp.bias + i : nullptr, -1));
  if (i < w) {
    int64_t n = w - i;
    vstore_tail(z + i, grad_vec(vload_tail(z + i, n, 0.0f), mp, g, mp.bias ? mp.bias + i : nullptr, n), n);
  }
}

// As grad_vec for a stored, already mapped logit z: tanh(z0 / c) is recovered as
// z * t_of_z instead of being recomputed (no bias, no tanh of z0).
DPO_INLINE vf grad_vec_mapped(vf z, const RowMap& mp, const RowGrad& g) {
  vf d = (z - g.row_max) - g.log_sum;
  vf p = vexp(d);
  vf q = vbcast(g.coef);
  if (g.with_ent) q += g.g_ent * (d + g.ent);
  vf dz = -(p * q) * mp.inv_temp;
  if (mp.softcap) {
    vf t = z * mp.t_of_z;
    dz = dz * (1.0f - t * t);
  }
  return dz;
}

// dst <- dz0 of the stored row src (dst is the cache-resident tile, so the store itself is
// only read: no write-back of dirty lines to memory).
DPO_CLONES void grad_row_mapped(const float* src, float* dst, int64_t w, RowMap mp, RowGrad g) {
  int64_t i = 0;
  for (; i + kLanes <= w; i += kLanes) vstore(dst + i, grad_vec_mapped(vload(src + i), mp, g));
  if (i < w) {
    int64_t n = w - i;
    vstore_tail(dst + i, grad_vec_mapped(vload_tail(src + i, n, 0.0f), mp, g), n);
  }
}

// acc[0:w] += x[0:w]
DPO_CLONES void add_row(float* acc, const float* x, int64_t w) {
  for (int64_t i = 0; i < w; ++i) acc[i] += x[i];
}

}  // namespace dpo_fast_cpu
