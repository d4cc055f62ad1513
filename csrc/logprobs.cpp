// Fused linear -> per-token log-prob (and logsumexp / entropy) on CPU, and its backward.
// Same math and signature as dpo_fast/kernels/logprobs_torch.py (the twin); see its docstring.
//
// Layout of the work (both passes): the valid rows are gathered (as fp32; fp32 input with no
// skipped row is used in place) in token blocks of TB rows. Inside a block the vocabulary is cut into tiles of Vc columns and the tiles into P
// contiguous groups, one per OpenMP thread; each thread walks its tiles, and for each tile the
// block's rows in chunks of T, so a [T, Vc] fp32 logits tile and the [Vc, D] weight tile stay
// in that core's cache. Each thread calls single-threaded MKL GEMMs (inside an OpenMP region
// MKL does not spawn threads) on its own tiles, so GEMMs and the vectorized row passes of the
// two cores overlap with no barrier per tile.
//   forward : per row and group an online (max, sum e, sum e*(z-max)) state, merged at the end;
//             the row max m and log_s = log(sum exp(z - m)) are returned (lse = m + log_s is
//             formed by the caller; keeping the two parts exact is what the backward needs).
//             With with_sum_sq the state also holds q = sum e^2 (rescaled by a^2 when the max
//             moves) and log sum p^2 = log q - 2 log_s is returned (forward only).
//   backward: dW tiles belong to one group (written in place, K = T per chunk); dh is summed
//             over groups from per-group [TB, D] partials in a fixed order.
// Every reduction order depends only on the shapes and the group count (the thread count
// unless pinned, see plan_groups): bitwise deterministic run to run. Extra memory: the [TB, D]
// partials and tiles, never [N, V]; TB keeps it near 1.2% of the [N, V] fp32 logits (fp16/bf16
// may use a single block instead, see below).
// need_dh / need_dw = false (a frozen input) skip that gradient's GEMM and buffers.
//
// The chunk ops (chunk_fwd / chunk_bwd / store_plan, driven by dpo_fast/kernels/dpo_scratch.py
// for the preference loss) are the same two passes over one chunk of whole pairs, with a
// caller's buffer (the "store") that keeps the first tiles' logits from the forward so the
// backward skips their GEMM, and with dh / dW / db written into the caller's fp32 buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <Python.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace dpo_fast_cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t env_int(const char* name, int64_t dflt) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return dflt;
  int64_t v = std::atoll(s);
  return v > 0 ? v : dflt;
}

// Tile sizes (tuning knobs, read once): a [512, 512] fp32 logits tile is 1 MiB and a [512, D]
// weight tile 1.2 MiB at D = 576, about one core's 2 MiB L2. Timings on the 2-core Zen4 dev
// box were flat (within noise) from [256, 1024] to [1024, 512].
struct TileSizes {
  int64_t tokens, vocab;
};
const TileSizes& tile_sizes() {
  static const TileSizes t{env_int("DPO_FAST_CPU_TOKEN_TILE", 512),
                           env_int("DPO_FAST_CPU_VOCAB_TILE", 512)};
  return t;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct VocabPlan {
  int64_t vc;      // tile width
  int64_t ntiles;  // non-empty tiles
  int groups;      // = threads; group g owns tiles [g * ntiles / groups, (g+1) * ntiles / groups)
  int64_t tile_begin(int g) const { return g * ntiles / groups; }
  int64_t tile_end(int g) const { return (g + 1) * ntiles / groups; }
};

// Vocabulary groups of the tile plan: pinned by set_vocab_groups, else the thread count. A
// pinned count keeps every tile and reduction order (so the results, bit for bit) the same when
// the thread count changes; the parallel regions then run min(groups, threads) threads, each
// walking groups g = tid, tid + nth, ...
std::atomic<int> g_pinned_groups{0};

int plan_groups() {
  const int g = g_pinned_groups.load();
  return g > 0 ? g : std::max(1, at::get_num_threads());
}

int team_size(int groups) { return std::max(1, std::min(groups, at::get_num_threads())); }

VocabPlan plan_vocab(int64_t vocab, int64_t vc_target, int groups) {
  // A multiple of `groups` tiles so that every core gets the same number of columns.
  int64_t nt = ceil_div(std::max<int64_t>(ceil_div(vocab, vc_target), 1), groups) * groups;
  int64_t vc = ceil_div(ceil_div(vocab, nt), kLanes) * kLanes;
  return VocabPlan{vc, ceil_div(vocab, vc), groups};
}

// Rows per token block: bounded so the per-block scratch stays ~1.2% of an [n, V] fp32 logits
// tensor (the memory a full-logits head would use).
int64_t plan_block(int64_t n, int64_t vocab, int64_t bytes_per_row, int64_t chunk) {
  double budget = std::max(0.012 * double(n) * double(vocab) * 4.0, double(4 << 20));
  int64_t tb = int64_t(budget / double(std::max<int64_t>(bytes_per_row, 1)));
  tb = std::max(chunk, tb / chunk * chunk);
  return std::min(tb, n);
}

at::Tensor fview(const float* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// c = a @ b, or c += a @ b (single-threaded BLAS when called inside the OpenMP region).
void gemm(at::Tensor c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    at::addmm_out(c, c, a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

template <typename scalar_t>
void gather_rows_impl(float* dst, const scalar_t* src, const int64_t* rows, int64_t i0, int64_t i1,
                      int64_t d) {
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t* s = src + rows[i] * d;
    float* o = dst + (i - i0) * d;
    for (int64_t k = 0; k < d; ++k) o[k] = static_cast<float>(s[k]);
  }
}

// dst[i - i0, :] = float(hidden[rows[i], :]) for i in [i0, i1); call inside an OpenMP region.
void gather_rows(float* dst, const at::Tensor& hidden, const int64_t* rows, int64_t i0, int64_t i1) {
  const int64_t d = hidden.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "gather_rows", [&] {
    const scalar_t* src = hidden.const_data_ptr<scalar_t>();
    _Pragma("omp for schedule(static)")
    for (int64_t i = i0; i < i1; ++i) gather_rows_impl(dst + (i - i0) * d, src, rows, i, i + 1, d);
  });
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "dpo_fast_cpu: CPU tensors expected");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "dpo_fast_cpu: hidden [N, D] and weight [V, D] expected, got ", hidden.sizes(),
              " and ", weight.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "dpo_fast_cpu: fp32, fp16 or bf16 expected, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, "dpo_fast_cpu: hidden and weight dtypes differ");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.scalar_type() == at::kLong,
              "dpo_fast_cpu: targets must be int64 [N]");
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == weight.size(0),
                "dpo_fast_cpu: bias must be [V]");
  }
}

// Indices of rows with targets != ignore_index (and, when keep is given, keep(i) true).
template <typename Keep>
std::vector<int64_t> select_rows(const at::Tensor& targets, int64_t ignore_index, int64_t vocab,
                                 Keep keep) {
  const int64_t* t = targets.const_data_ptr<int64_t>();
  std::vector<int64_t> rows;
  rows.reserve(targets.size(0));
  for (int64_t i = 0; i < targets.size(0); ++i) {
    if (t[i] == ignore_index) continue;
    TORCH_CHECK(t[i] >= 0 && t[i] < vocab, "dpo_fast_cpu: target ", t[i], " at position ", i,
                " is outside [0, ", vocab, ")");
    if (keep(i)) rows.push_back(i);
  }
  return rows;
}

RowMap make_map(const float* bias, std::optional<double> softcap, double inv_temperature) {
  RowMap mp{};
  mp.bias = bias;
  mp.softcap = softcap.has_value();
  mp.cap = mp.softcap ? float(*softcap) : 1.0f;
  mp.inv_cap = mp.softcap ? float(1.0 / *softcap) : 1.0f;
  mp.inv_temp = float(inv_temperature);
  mp.t_of_z = mp.softcap ? float(1.0 / (*softcap * inv_temperature)) : 0.0f;
  return mp;
}

// Stored logits (the chunk ops used by the pair-chunked preference loss): the forward writes
// the mapped logits of the first `per_group` vocabulary tiles of every group into a caller's
// fp32 buffer instead of the per-thread tile, and the backward reads them back instead of
// recomputing them (one GEMM saved per stored tile). Slot s = g * per_group + k holds tile
// (tile_begin(g) + k) as [nv, w] rows (w = that tile's width), nv = the call's valid rows.
struct StorePlan {
  float* data = nullptr;
  int64_t per_group = 0;
  int64_t nv = 0, vc = 0;
  // Rows [r0, r0 + m) of tile j (group g), or nullptr when that tile is not stored.
  float* rows_of(const VocabPlan& vp, int g, int64_t j, int64_t r0, int64_t w) const {
    const int64_t k = j - vp.tile_begin(g);
    if (data == nullptr || k >= per_group) return nullptr;
    return data + (int64_t(g) * per_group + k) * nv * vc + r0 * w;
  }
};

int64_t max_group_tiles(const VocabPlan& vp) {
  int64_t m = 0;
  for (int g = 0; g < vp.groups; ++g) m = std::max(m, vp.tile_end(g) - vp.tile_begin(g));
  return m;
}

// As many whole tiles per group as the buffer holds (0 for an undefined or empty buffer).
StorePlan plan_store(const std::optional<at::Tensor>& store, const VocabPlan& vp, int64_t nv) {
  StorePlan sp;
  if (!store || !store->defined() || store->numel() == 0 || nv == 0) return sp;
  TORCH_CHECK(store->device().is_cpu() && store->scalar_type() == at::kFloat &&
                  store->is_contiguous(),
              "dpo_fast_cpu: the logits store must be a contiguous fp32 CPU tensor");
  sp.per_group = std::min(max_group_tiles(vp), store->numel() / (vp.groups * nv * vp.vc));
  sp.data = sp.per_group > 0 ? store->data_ptr<float>() : nullptr;
  sp.nv = nv;
  sp.vc = vp.vc;
  return sp;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_core(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets_in, int64_t ignore_index, std::optional<double> softcap,
    double inv_temperature, bool with_entropy, bool with_sum_sq,
    const std::optional<at::Tensor>& store) {
  check_inputs(hidden_in, weight_in, bias, targets_in);
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::zeros({n}, f32);
  at::Tensor row_max = at::zeros({n}, f32);
  at::Tensor ent = at::zeros({with_entropy ? n : 0}, f32);
  at::Tensor log_sum = at::zeros({n}, f32);
  at::Tensor log_sum_sq = at::zeros({with_sum_sq ? n : 0}, f32);

  const std::vector<int64_t> rows =
      select_rows(targets, ignore_index, vocab, [](int64_t) { return true; });
  const int64_t nv = int64_t(rows.size());
  if (nv == 0 || vocab == 0) return {logp, row_max, ent, log_sum, log_sum_sq};

  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_p = bias ? bias32.const_data_ptr<float>() : nullptr;
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const bool w_f32 = weight.scalar_type() == at::kFloat;

  const int groups = plan_groups();
  const TileSizes& ts = tile_sizes();
  const int64_t chunk = ts.tokens;
  const VocabPlan vp = plan_vocab(vocab, ts.vocab, groups);
  const bool direct = hidden.scalar_type() == at::kFloat && nv == n;  // use hidden in place
  const int64_t tb = direct ? nv : plan_block(nv, vocab, d * 4, chunk);

  at::Tensor hbuf = at::empty({direct ? 0 : tb * d}, f32);
  at::Tensor zbuf = at::empty({groups * chunk * vp.vc}, f32);
  at::Tensor wbuf = at::empty({w_f32 ? 0 : groups * vp.vc * d}, f32);
  // Per group and row: running max, sum exp(z - max), sum exp(z - max) * (z - max), and with
  // with_sum_sq sum exp(2 (z - max)).
  const int nstate = with_sum_sq ? 4 : 3;
  at::Tensor state = at::empty({nstate * groups * tb}, f32);
  at::Tensor ztgt = at::empty({tb}, f32);
  const StorePlan sp = plan_store(store, vp, nv);

  float* logp_p = logp.data_ptr<float>();
  float* max_p = row_max.data_ptr<float>();
  float* ent_p = with_entropy ? ent.data_ptr<float>() : nullptr;
  float* logs_p = log_sum.data_ptr<float>();
  float* lsq_p = with_sum_sq ? log_sum_sq.data_ptr<float>() : nullptr;
  float* st_m = state.data_ptr<float>();
  float* st_s = st_m + groups * tb;
  float* st_u = st_s + groups * tb;
  float* st_q = with_sum_sq ? st_u + groups * tb : nullptr;
  float* zt = ztgt.data_ptr<float>();

  for (int64_t b0 = 0; b0 < nv; b0 += tb) {
    const int64_t nb = std::min(tb, nv - b0);
    const float* hb = direct ? hidden.const_data_ptr<float>() + b0 * d : hbuf.data_ptr<float>();
    std::fill(st_m, st_m + groups * tb, kNegInf);
    std::fill(st_s, st_s + (nstate - 1) * groups * tb, 0.0f);
#pragma omp parallel num_threads(team_size(groups))
    {
      at::AutoDispatchBelowADInplaceOrView no_autograd;
      if (!direct) gather_rows(hbuf.data_ptr<float>(), hidden, rows.data(), b0, b0 + nb);
      const int nth = omp_get_num_threads();
      for (int g = omp_get_thread_num(); g < groups; g += nth) {
        float* z = zbuf.data_ptr<float>() + int64_t(g) * chunk * vp.vc;
        float* m_g = st_m + int64_t(g) * tb;
        float* s_g = st_s + int64_t(g) * tb;
        float* u_g = st_u + int64_t(g) * tb;
        float* q_g = with_sum_sq ? st_q + int64_t(g) * tb : nullptr;
        for (int64_t j = vp.tile_begin(g); j < vp.tile_end(g); ++j) {
          const int64_t v0 = j * vp.vc, w = std::min(vp.vc, vocab - v0);
          const float* wt;
          if (w_f32) {
            wt = weight.const_data_ptr<float>() + v0 * d;
          } else {
            float* wb = wbuf.data_ptr<float>() + int64_t(g) * vp.vc * d;
            fview(wb, w, d).copy_(weight.narrow(0, v0, w));
            wt = wb;
          }
          const at::Tensor wt_t = fview(wt, w, d).t();
          const RowMap mp = make_map(bias_p ? bias_p + v0 : nullptr, softcap, inv_temperature);
          for (int64_t c0 = 0; c0 < nb; c0 += chunk) {
            const int64_t m = std::min(chunk, nb - c0);
            float* zs = sp.rows_of(vp, g, j, b0 + c0, w);  // kept tile: mapped rows copied out
            gemm(fview(z, m, w), fview(hb + c0 * d, m, d), wt_t, false);
            for (int64_t r = 0; r < m; ++r) {
              const int64_t i = c0 + r;
              float* zr = z + r * w;
              const float tile_max = map_row_max(zr, w, mp);
              if (zs != nullptr) std::memcpy(zs + r * w, zr, w * sizeof(float));
              const int64_t tl = tgt[rows[b0 + i]] - v0;
              if (tl >= 0 && tl < w) zt[i] = zr[tl];
              const float m_old = m_g[i];
              const float m_new = std::max(m_old, tile_max);
              float s_t, u_t, q_t = 0.0f;
              if (q_g != nullptr) {
                exp_sums_sq(zr, w, m_new, with_entropy, &s_t, &u_t, &q_t);
              } else {
                exp_sums(zr, w, m_new, with_entropy, &s_t, &u_t);
              }
              if (m_old == kNegInf) {
                s_g[i] = s_t;
                u_g[i] = u_t;
                if (q_g != nullptr) q_g[i] = q_t;
              } else {
                // Re-reference the running sums from m_old to m_new.
                const float a = std::exp(m_old - m_new);
                u_g[i] = a * (u_g[i] + (m_old - m_new) * s_g[i]) + u_t;
                s_g[i] = a * s_g[i] + s_t;
                if (q_g != nullptr) q_g[i] = (a * a) * q_g[i] + q_t;  // exp(2 (m_old - m_new))
              }
              m_g[i] = m_new;
            }
          }
        }
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t i = 0; i < nb; ++i) {
        float big = kNegInf;
        for (int g = 0; g < groups; ++g)
          if (st_s[int64_t(g) * tb + i] > 0.0f) big = std::max(big, st_m[int64_t(g) * tb + i]);
        float s = 0.0f, u = 0.0f, q = 0.0f;
        for (int g = 0; g < groups; ++g) {
          const int64_t k = int64_t(g) * tb + i;
          if (!(st_s[k] > 0.0f)) continue;
          const float a = std::exp(st_m[k] - big);
          s += a * st_s[k];
          u += a * (st_u[k] + (st_m[k] - big) * st_s[k]);
          if (st_q != nullptr) q += (a * a) * st_q[k];
        }
        const float log_s = std::log(s);
        const int64_t row = rows[b0 + i];
        max_p[row] = big;
        logs_p[row] = log_s;
        logp_p[row] = (zt[i] - big) - log_s;
        if (ent_p) ent_p[row] = log_s - u / s;  // H = lse - E[z], referenced to the max
        // log sum p^2 = log sum exp(2 (z - m)) - 2 log_s; q >= 1 (the max term), no underflow.
        if (lsq_p) lsq_p[row] = std::log(q) - 2.0f * log_s;
      }
    }
  }
  return {logp, row_max, ent, log_sum, log_sum_sq};
}

// Accumulate mode (`acc`, the chunk op): dh_out [N, D] fp32 gets the valid rows written,
// dw_out [V, D] and db_out [V] fp32 are added to (overwritten when `overwrite`: their old
// contents are ignored); otherwise fresh dh / dW / db are returned. Without need_dh /
// need_dw (a frozen input) that gradient's GEMM is not run and an empty tensor stands for it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_core(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets_in, const at::Tensor& row_max_in, const at::Tensor& log_sum_in,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logp,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_entropy,
    int64_t ignore_index, std::optional<double> softcap, double inv_temperature,
    const std::optional<at::Tensor>& store, bool acc_mode, const at::Tensor& dh_out,
    const at::Tensor& dw_out, const at::Tensor& db_out, bool overwrite, bool need_dh,
    bool need_dw) {
  check_inputs(hidden_in, weight_in, bias, targets_in);
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  auto f32 = hidden.options().dtype(at::kFloat);
  auto as_f32 = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->numel() == n, "dpo_fast_cpu: ", name, " must have N = ", n, " elements");
    return t->to(at::kFloat).contiguous().view({n});
  };
  const at::Tensor g_lp = as_f32(grad_logp, "grad_logp");
  const at::Tensor g_lse = as_f32(grad_lse, "grad_lse");
  const at::Tensor g_ent = as_f32(grad_entropy, "grad_entropy");
  const bool use_ent = g_ent.defined();
  const at::Tensor row_max = as_f32(row_max_in, "row_max");
  const at::Tensor log_sum = as_f32(log_sum_in, "log_sum");
  const at::Tensor ent = use_ent ? as_f32(entropy, "entropy") : at::Tensor();
  TORCH_CHECK(!use_ent || ent.defined(), "dpo_fast_cpu: grad_entropy needs the forward entropy");

  const float* glp_p = g_lp.defined() ? g_lp.const_data_ptr<float>() : nullptr;
  const float* glse_p = g_lse.defined() ? g_lse.const_data_ptr<float>() : nullptr;
  const float* gent_p = use_ent ? g_ent.const_data_ptr<float>() : nullptr;
  // With stored tiles the row set must be the forward's (the store is indexed by it), so
  // rows whose grads are all zero are kept; otherwise they are skipped.
  const bool keep_all = store && store->defined() && store->numel() > 0;
  const std::vector<int64_t> rows = select_rows(targets, ignore_index, vocab, [&](int64_t i) {
    return keep_all || (glp_p && glp_p[i] != 0.0f) || (glse_p && glse_p[i] != 0.0f) ||
           (gent_p && gent_p[i] != 0.0f);
  });
  const int64_t nv = int64_t(rows.size());

  if (acc_mode) {
    auto ok = [&](const at::Tensor& t, at::IntArrayRef shape) {
      return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
             t.is_contiguous() && t.sizes() == shape;
    };
    TORCH_CHECK((!need_dh || ok(dh_out, {n, d})) && (!need_dw || ok(dw_out, {vocab, d})) &&
                    (!bias || ok(db_out, {vocab})),
                "dpo_fast_cpu: accumulate mode needs contiguous fp32 dh [N, D], dW [V, D] "
                "(and db [V] with a bias)");
  }
  const at::Tensor none = at::empty({0}, f32);
  at::Tensor dh = !need_dh ? none : acc_mode ? dh_out : at::zeros_like(hidden);
  at::Tensor db32 = !bias ? at::Tensor() : acc_mode ? db_out : at::zeros({vocab}, f32);
  auto finish_db = [&]() {
    return bias && !acc_mode ? db32.to(bias->scalar_type()) : at::empty({0}, f32);
  };
  if (acc_mode && overwrite) {
    if (nv == 0 && need_dw) dw_out.zero_();
    if (bias) db_out.zero_();  // add_row accumulates into it
  }
  if (nv == 0 || vocab == 0)
    return {dh, !need_dw ? none : acc_mode ? dw_out : at::zeros_like(weight), finish_db()};

  // Per live row: target, row max, log-sum, entropy, coef = g_lp - g_lse, g_ent, g_lp.
  const int64_t* tgt_all = targets.const_data_ptr<int64_t>();
  const float* max_all = row_max.const_data_ptr<float>();
  const float* logs_all = log_sum.const_data_ptr<float>();
  const float* ent_all = use_ent ? ent.const_data_ptr<float>() : nullptr;
  std::vector<int64_t> tgt(nv);
  std::vector<float> r_max(nv), r_logs(nv), r_ent(nv), r_coef(nv), r_gent(nv), r_glp(nv);
  for (int64_t i = 0; i < nv; ++i) {
    const int64_t row = rows[i];
    tgt[i] = tgt_all[row];
    r_max[i] = max_all[row];
    r_logs[i] = logs_all[row];
    r_ent[i] = use_ent ? ent_all[row] : 0.0f;
    r_glp[i] = glp_p ? glp_p[row] : 0.0f;
    r_coef[i] = r_glp[i] - (glse_p ? glse_p[row] : 0.0f);
    r_gent[i] = use_ent ? gent_p[row] : 0.0f;
  }

  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_p = bias ? bias32.const_data_ptr<float>() : nullptr;
  float* db_p = bias ? db32.data_ptr<float>() : nullptr;
  const bool w_f32 = weight.scalar_type() == at::kFloat;

  const int groups = plan_groups();
  const TileSizes& ts = tile_sizes();
  const int64_t chunk = ts.tokens;
  const VocabPlan vp = plan_vocab(vocab, ts.vocab, groups);
  const bool direct = hidden.scalar_type() == at::kFloat && nv == n;
  const int64_t row_bytes = d * 4 * (groups + (direct ? 0 : 1));
  int64_t tb = plan_block(nv, vocab, row_bytes, chunk);
  // fp16/bf16: dW must accumulate in fp32 across token blocks. Either one block (each group
  // finishes its dW tiles in a [Vc, D] fp32 buffer; scratch grows with nv) or an fp32 [V, D]
  // accumulator, as the twin has: whichever needs less memory.
  if (need_dw && !acc_mode && !w_f32 && tb < nv &&
      double(nv) * row_bytes <= double(vocab) * d * 4.0)
    tb = nv;
  const bool dw_full_f32 = need_dw && (acc_mode || (!w_f32 && tb < nv));

  at::Tensor dw = !need_dw ? none
                  : acc_mode ? dw_out
                  : w_f32    ? at::empty({vocab, d}, f32)
                             : at::empty_like(weight);
  at::Tensor dw_acc = acc_mode ? dw_out : dw_full_f32 ? at::empty({vocab, d}, f32) : at::Tensor();
  at::Tensor hbuf = at::empty({direct ? 0 : tb * d}, f32);
  at::Tensor zbuf = at::empty({groups * chunk * vp.vc}, f32);
  at::Tensor wbuf = at::empty({w_f32 ? 0 : groups * vp.vc * d}, f32);
  at::Tensor dwbuf = at::empty({(!need_dw || w_f32 || dw_full_f32) ? 0 : groups * vp.vc * d}, f32);
  const StorePlan sp = plan_store(store, vp, nv);
  at::Tensor dhbuf = at::empty({need_dh ? groups * tb * d : 0}, f32);
  std::vector<char> group_used(groups);
  for (int g = 0; g < groups; ++g) group_used[g] = vp.tile_end(g) > vp.tile_begin(g);

  for (int64_t b0 = 0; b0 < nv; b0 += tb) {
    const int64_t nb = std::min(tb, nv - b0);
    const float* hb = direct ? hidden.const_data_ptr<float>() + b0 * d : hbuf.data_ptr<float>();
#pragma omp parallel num_threads(team_size(groups))
    {
      at::AutoDispatchBelowADInplaceOrView no_autograd;
      if (!direct) gather_rows(hbuf.data_ptr<float>(), hidden, rows.data(), b0, b0 + nb);
      const int nth = omp_get_num_threads();
      for (int g = omp_get_thread_num(); g < groups; g += nth) {
        float* z = zbuf.data_ptr<float>() + int64_t(g) * chunk * vp.vc;
        float* dh_g = need_dh ? dhbuf.data_ptr<float>() + int64_t(g) * tb * d : nullptr;
        for (int64_t j = vp.tile_begin(g); j < vp.tile_end(g); ++j) {
          const int64_t v0 = j * vp.vc, w = std::min(vp.vc, vocab - v0);
          const float* wt;
          if (w_f32) {
            wt = weight.const_data_ptr<float>() + v0 * d;
          } else {
            float* wb = wbuf.data_ptr<float>() + int64_t(g) * vp.vc * d;
            fview(wb, w, d).copy_(weight.narrow(0, v0, w));
            wt = wb;
          }
          float* dwt = nullptr;  // fp32 [w, D] accumulator of this tile's dW
          bool dw_fresh = false;
          if (!need_dw) {
          } else if (acc_mode) {
            dwt = dw_acc.data_ptr<float>() + v0 * d;
            dw_fresh = overwrite && b0 == 0;
          } else if (w_f32) {
            dwt = dw.data_ptr<float>() + v0 * d;
            dw_fresh = b0 == 0;
          } else if (dw_full_f32) {
            dwt = dw_acc.data_ptr<float>() + v0 * d;
            dw_fresh = b0 == 0;
          } else {
            dwt = dwbuf.data_ptr<float>() + int64_t(g) * vp.vc * d;
            dw_fresh = true;
          }
          const at::Tensor wt_t = fview(wt, w, d);
          const RowMap mp = make_map(bias_p ? bias_p + v0 : nullptr, softcap, inv_temperature);
          const float inv_t = float(inv_temperature);
          for (int64_t c0 = 0; c0 < nb; c0 += chunk) {
            const int64_t m = std::min(chunk, nb - c0);
            const float* zs = sp.rows_of(vp, g, j, b0 + c0, w);  // mapped logits, forward
            const at::Tensor z_t = fview(z, m, w);
            const at::Tensor h_t = fview(hb + c0 * d, m, d);
            if (zs == nullptr) gemm(z_t, h_t, wt_t.t(), false);
            for (int64_t r = 0; r < m; ++r) {
              const int64_t i = b0 + c0 + r;
              float* zr = z + r * w;
              const int64_t tl = tgt[i] - v0;
              const bool hit = tl >= 0 && tl < w && r_glp[i] != 0.0f;
              // raw z0 (recomputed) or mapped z (kept)
              const float z_tgt = !hit ? 0.0f : zs == nullptr ? zr[tl] : zs[r * w + tl];
              const RowGrad rg{r_max[i], r_logs[i], r_ent[i], r_coef[i], r_gent[i], use_ent};
              if (zs == nullptr) {
                grad_row(zr, w, mp, rg);
              } else {
                grad_row_mapped(zs + r * w, zr, w, mp, rg);
              }
              if (hit) {  // + g_lp * onehot(y), through temperature and softcap
                float fac = inv_t;
                if (softcap) {
                  const float tt =
                      zs == nullptr ? std::tanh((z_tgt + (bias_p ? bias_p[v0 + tl] : 0.0f)) * mp.inv_cap)
                                    : z_tgt * mp.t_of_z;
                  fac *= 1.0f - tt * tt;
                }
                zr[tl] += r_glp[i] * fac;
              }
            }
            if (db_p)
              for (int64_t r = 0; r < m; ++r) add_row(db_p + v0, z + r * w, w);
            // dh partial (first tile of the group overwrites), then this tile's dW.
            if (need_dh) gemm(fview(dh_g + c0 * d, m, d), z_t, wt_t, j != vp.tile_begin(g));
            if (need_dw) gemm(fview(dwt, w, d), z_t.t(), h_t, !(dw_fresh && c0 == 0));
          }
          if (need_dw && !w_f32 && !dw_full_f32) dw.narrow(0, v0, w).copy_(fview(dwt, w, d));
        }
      }
#pragma omp barrier
      if (need_dh) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dh.scalar_type(), "dh_reduce", [&] {
        scalar_t* dh_p = dh.data_ptr<scalar_t>();
        const float* part = dhbuf.const_data_ptr<float>();
        _Pragma("omp for schedule(static)")
        for (int64_t i = 0; i < nb; ++i) {
          scalar_t* out = dh_p + rows[b0 + i] * d;
          for (int64_t k = 0; k < d; ++k) {
            float acc = 0.0f;
            for (int g = 0; g < groups; ++g)
              if (group_used[g]) acc += part[(int64_t(g) * tb + i) * d + k];
            out[k] = static_cast<scalar_t>(acc);
          }
        }
      });
    }
  }
  if (dw_full_f32 && !acc_mode) dw.copy_(dw_acc);
  return {dh, dw, finish_db()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, std::optional<double> softcap,
    double inv_temperature, bool with_entropy, bool with_sum_sq) {
  return fwd_core(hidden, weight, bias, targets, ignore_index, softcap, inv_temperature,
                  with_entropy, with_sum_sq, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& row_max, const at::Tensor& log_sum,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logp,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_entropy,
    int64_t ignore_index, std::optional<double> softcap, double inv_temperature, bool need_dh,
    bool need_dw) {
  return bwd_core(hidden, weight, bias, targets, row_max, log_sum, entropy, grad_logp, grad_lse,
                  grad_entropy, ignore_index, softcap, inv_temperature, std::nullopt, false,
                  at::Tensor(), at::Tensor(), at::Tensor(), false, need_dh, need_dw);
}

// The chunk ops: forward with the first tiles' logits kept in `store` (entropy always), and
// the matching backward from grad_logp that writes dh rows and adds into dw / db (dh or dw
// None: not computed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, std::optional<double> softcap,
    double inv_temperature, at::Tensor store) {
  auto out = fwd_core(hidden, weight, bias, targets, ignore_index, softcap, inv_temperature, true,
                      false, store);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

void chunk_bwd(const at::Tensor& hidden, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& targets,
               const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& grad_logp,
               int64_t ignore_index, std::optional<double> softcap, double inv_temperature,
               const at::Tensor& store, const std::optional<at::Tensor>& dh,
               const std::optional<at::Tensor>& dw, const std::optional<at::Tensor>& db,
               bool overwrite) {
  TORCH_CHECK(!bias || (db && db->defined()), "dpo_fast_cpu: chunk_bwd with a bias needs db");
  const bool need_dh = dh && dh->defined(), need_dw = dw && dw->defined();
  bwd_core(hidden, weight, bias, targets, row_max, log_sum, std::nullopt, grad_logp,
           std::nullopt, std::nullopt, ignore_index, softcap, inv_temperature, store, true,
           need_dh ? *dh : at::Tensor(), need_dw ? *dw : at::Tensor(), db ? *db : at::Tensor(),
           overwrite, need_dh, need_dw);
}

// What a store of `budget_floats` floats keeps for an [n_rows] chunk at vocabulary size
// `vocab` with the current plan_groups(): [floats used, logit columns kept, floats that would
// keep every column]. The chunk ops use exactly the first "floats used" of a larger buffer.
std::vector<int64_t> store_plan(int64_t n_rows, int64_t vocab, int64_t budget_floats) {
  const VocabPlan vp = plan_vocab(vocab, tile_sizes().vocab, plan_groups());
  const int64_t per_tile = std::max<int64_t>(n_rows, 1) * vp.vc;
  const int64_t per_group =
      std::min(max_group_tiles(vp), std::max<int64_t>(budget_floats, 0) / (vp.groups * per_tile));
  int64_t cols = 0;
  for (int g = 0; g < vp.groups; ++g)
    for (int64_t j = vp.tile_begin(g); j < std::min(vp.tile_end(g), vp.tile_begin(g) + per_group); ++j)
      cols += std::min(vp.vc, vocab - j * vp.vc);
  return {per_group * vp.groups * per_tile, cols, max_group_tiles(vp) * vp.groups * per_tile};
}

// Pins the tile plan's vocabulary groups (0: follow the thread count, the default); returns the
// previous setting.
int64_t set_vocab_groups(int64_t groups) {
  TORCH_CHECK(groups >= 0 && groups <= 4096, "dpo_fast_cpu: set_vocab_groups needs 0..4096, got ",
              groups);
  return g_pinned_groups.exchange(int(groups));
}

TORCH_LIBRARY(dpo_fast_cpu, m) {
  m.def(
      "logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
      "float? softcap, float inv_temperature, bool with_entropy, bool with_sum_sq=False) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor row_max, "
      "Tensor log_sum, Tensor? entropy, Tensor? grad_logp, Tensor? grad_lse, Tensor? grad_entropy, "
      "int ignore_index, float? softcap, float inv_temperature, bool need_dh=True, "
      "bool need_dw=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "chunk_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
      "float? softcap, float inv_temperature, Tensor(a!) store) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "chunk_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor row_max, "
      "Tensor log_sum, Tensor grad_logp, int ignore_index, float? softcap, float inv_temperature, "
      "Tensor store, Tensor(a!)? dh, Tensor(b!)? dw, Tensor(c!)? db, bool overwrite) -> ()");
  m.def("store_plan(int n_rows, int vocab, int budget_floats) -> int[]", &store_plan);
  m.def("set_vocab_groups(int groups) -> int", &set_vocab_groups);
}

TORCH_LIBRARY_IMPL(dpo_fast_cpu, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd);
  m.impl("logprobs_bwd", &logprobs_bwd);
  m.impl("chunk_fwd", &chunk_fwd);
  m.impl("chunk_bwd", &chunk_bwd);
}

}  // namespace dpo_fast_cpu

// `import dpo_fast._C` only has to load the library: the ops register themselves above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
