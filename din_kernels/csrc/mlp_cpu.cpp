// DIN's head MLP, ``x -> [Linear -> Dice] * L -> Linear`` (``din_kernels.dice_mlp``; the math in mlp.py's
// docstring), on the CPU as one C++ op per forward and one per backward.
//
// Why: as torch modules a DIN step's head ([256, 108] -> 200 -> 80 -> 1) is ~12 autograd nodes and ~40 aten
// calls forward and backward, each paying its dispatch (and the Dice wrapper its Python), all on one thread
// (``din train`` keeps torch's own ops at 1 thread: its parallel regions collapse on a busy machine). Here the
// rows are cut into blocks (fixed by the shape alone) that ``run_blocks`` (cpu_runtime.h) hands to the caller
// and its helpers: one region per layer pass, L + 1 forward and L + 1 backward (the helpers watching for the
// next pass between them: ``HelperPasses``). A block takes its rows through one layer on BLAS
// (single-threaded) and, where the next Dice needs the batch statistics, its moments; statistics, Dice's
// gradient sums and the weight-gradient partials are merged in block order, so the results do not depend on
// the thread count.
//
// Forward, phase l = 0..L: rows of h_{l-1} = Dice_{l-1}(z_{l-1}) (h_{-1} = x) times W_l^T plus b_l give
// z_l (l < L; its block moments, in double, merged as sum_k n_k mean_k / n and
// sum_k (M2_k + n_k (mean_k - mean)^2)) or the output (l = L). Kept for the backward: z_l and h_l.
// Backward, phase q = L..0, with g_L = dout and g_q = dz_q: dW_q = g_q^T h_{q-1} and db_q = sum g_q (block
// partials); for q > 0, dh = g_q W_q, and Dice_{q-1}'s backward as the Dice op's (dice_cpu.cpp):
// dzp = dh z p (1 - p); S0 = sum dzp, S1 = sum dzp xhat, S2 = sum dh z (1 - p) (= dalpha) over all rows;
// dz = dh (a + (1 - a) p) + (1 - a) rstd dzp, completed (training) at the start of the next phase by
// (z - mean) k1 + k0, k0 = -(1 - a) rstd S0 / n, k1 = -(1 - a) rstd^2 S1 / n; for q = 0, dx = g_0 W_0.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu_runtime.h"

namespace {

using namespace din_kernels_cpu;  // cpu_runtime.h: blocks, helper threads, sigmoid, mm

// Rows per block: a DIN step's 256 rows in 4 blocks (both cores busy, and a descheduled thread holds back at
// most a quarter of a pass), each block's products large enough for BLAS to run near its peak.
constexpr int64_t kBlockRows = 64;

struct RowBlocks {
  int64_t rows, count;
  explicit RowBlocks(int64_t n) : rows(n), count((n + kBlockRows - 1) / kBlockRows) {}
  int64_t begin(int64_t k) const { return k * kBlockRows; }
  int64_t size(int64_t k) const { return std::min(rows, (k + 1) * kBlockRows) - k * kBlockRows; }
};

// The network as raw pointers: widths = (F, H_1, .., H_L, O); layer l maps widths[l] -> widths[l + 1] by
// w[l] [widths[l + 1], widths[l]] and b[l]; Dice l (after layer l, l < L) has alpha[l], mean[l], rstd[l].
template <typename T>
struct Net {
  int64_t hidden = 0;
  std::vector<int64_t> widths;
  std::vector<const T*> w, b, alpha;
  std::vector<std::vector<T>> mean, rstd;

  Net(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& alphas) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "din_kernels_cpu: x must be [N, F], CPU");
    TORCH_CHECK(weights.size() >= 4 && weights.size() % 2 == 0 && alphas.size() == weights.size() / 2 - 1,
                "din_kernels_cpu: dice_mlp takes (W, b) per layer, at least one hidden layer, one alpha each");
    hidden = static_cast<int64_t>(alphas.size());
    widths.push_back(x.size(1));
    for (int64_t l = 0; l <= hidden; ++l) {
      const at::Tensor &wl = weights[2 * l], &bl = weights[2 * l + 1];
      TORCH_CHECK(wl.dim() == 2 && wl.size(1) == widths.back() && bl.dim() == 1 && bl.size(0) == wl.size(0) &&
                  wl.is_contiguous() && bl.is_contiguous() && wl.scalar_type() == x.scalar_type() &&
                  bl.scalar_type() == x.scalar_type(), "din_kernels_cpu: dice_mlp layer ", l, " shapes or dtype");
      widths.push_back(wl.size(0));
      w.push_back(wl.data_ptr<T>());
      b.push_back(bl.data_ptr<T>());
    }
    for (int64_t l = 0; l < hidden; ++l) {
      TORCH_CHECK(alphas[l].numel() == widths[l + 1] && alphas[l].is_contiguous() &&
                  alphas[l].scalar_type() == x.scalar_type(), "din_kernels_cpu: dice_mlp alpha ", l);
      alpha.push_back(alphas[l].data_ptr<T>());
    }
    mean.resize(hidden);
    rstd.resize(hidden);
  }

  int64_t width(int64_t l) const { return widths[l]; }

  // mean[l] and rstd[l] = (var + eps)^-1/2 from the statistics (the forward's and the backward's rule alike)
  void set_stats(int64_t l, const T* mu, const T* var, double eps) {
    const int64_t c = widths[l + 1];
    mean[l].assign(mu, mu + c);
    rstd[l].resize(c);
    for (int64_t j = 0; j < c; ++j) rstd[l][j] = T(1) / std::sqrt(var[j] + static_cast<T>(eps));
  }
};

// rows [n, out] = bias + in [n, in_w] W^T (W [out, in_w])
template <typename T>
void linear_rows(int64_t n, int64_t in_w, int64_t out_w, const T* in, const T* w, const T* bias, T* out) {
  for (int64_t r = 0; r < n; ++r) std::copy(bias, bias + out_w, out + r * out_w);
  mm<T>(false, true, n, out_w, in_w, T(1), in, in_w, w, in_w, T(1), out, out_w);
}

// p = sigmoid((z - mean) rstd) into ``p``, then h = z (a + (1 - a) p), for rows [n, c]
template <typename T>
void dice_rows(int64_t n, int64_t c, const T* z, const T* mu, const T* rs, const T* a, T* p, T* h) {
  for (int64_t r = 0; r < n; ++r) {
    const T* __restrict__ zr = z + r * c;
    T* __restrict__ pr = p + r * c;
    T* __restrict__ hr = h + r * c;
    for (int64_t j = 0; j < c; ++j) pr[j] = (zr[j] - mu[j]) * rs[j];
    sigmoid_(pr, c);
    for (int64_t j = 0; j < c; ++j) hr[j] = zr[j] * (a[j] + (T(1) - a[j]) * pr[j]);
  }
}

// Block moments of rows [n, c]: mean and centred sum of squares per column, in double.
template <typename T>
void block_moments(int64_t n, int64_t c, const T* z, double* mean, double* m2) {
  std::fill(mean, mean + c, 0.0);
  std::fill(m2, m2 + c, 0.0);
  if (n == 0) return;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < c; ++j) mean[j] += static_cast<double>(z[r * c + j]);
  for (int64_t j = 0; j < c; ++j) mean[j] /= static_cast<double>(n);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < c; ++j) {
      const double d = static_cast<double>(z[r * c + j]) - mean[j];
      m2[j] += d * d;
    }
}

template <typename T>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
forward_impl(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& alphas,
             const std::vector<at::Tensor>& running_means, const std::vector<at::Tensor>& running_vars,
             bool training, double eps, int64_t threads) {
  const HelperPasses passes;  // L + 1 passes
  Net<T> net(x, weights, alphas);
  const int64_t n = x.size(0), hidden = net.hidden;
  TORCH_CHECK(training || (static_cast<int64_t>(running_means.size()) == hidden &&
                           static_cast<int64_t>(running_vars.size()) == hidden),
              "din_kernels_cpu: dice_mlp in eval mode needs every layer's running statistics");
  const RowBlocks blocks(n);
  std::vector<at::Tensor> zs, hs, means, vars;
  for (int64_t l = 0; l < hidden; ++l) {
    zs.push_back(at::empty({n, net.width(l + 1)}, x.options()));
    hs.push_back(at::empty({n, net.width(l + 1)}, x.options()));
  }
  at::Tensor out = at::empty({n, net.width(hidden + 1)}, x.options());
  at::Tensor p_scratch = at::empty({n, *std::max_element(net.widths.begin() + 1, net.widths.end() - 1)},
                                   x.options());  // Dice's gate, per pass (recomputed by the backward)
  std::vector<double> moment_mean, moment_m2;
  for (int64_t l = 0; l <= hidden; ++l) {
    const int64_t in_w = net.width(l), out_w = net.width(l + 1);
    const T* in = l == 0 ? x.data_ptr<T>() : hs[l - 1].data_ptr<T>();
    T* dst = l < hidden ? zs[l].data_ptr<T>() : out.data_ptr<T>();
    const bool moments = training && l < hidden;
    if (moments) {
      moment_mean.assign(blocks.count * out_w, 0.0);
      moment_m2.assign(blocks.count * out_w, 0.0);
    }
    run_blocks(blocks.count, threads, [&](int64_t k) {
      const int64_t r0 = blocks.begin(k), rows = blocks.size(k);
      if (l > 0) {  // this block's h_{l-1} from z_{l-1}, with the statistics merged after the last pass
        const int64_t c = in_w;
        dice_rows<T>(rows, c, zs[l - 1].data_ptr<T>() + r0 * c, net.mean[l - 1].data(), net.rstd[l - 1].data(),
                     net.alpha[l - 1], p_scratch.data_ptr<T>() + r0 * c, hs[l - 1].data_ptr<T>() + r0 * c);
      }
      linear_rows<T>(rows, in_w, out_w, in + r0 * in_w, net.w[l], net.b[l], dst + r0 * out_w);
      if (moments)
        block_moments<T>(rows, out_w, dst + r0 * out_w, moment_mean.data() + k * out_w,
                         moment_m2.data() + k * out_w);
    });
    if (l == hidden) break;
    at::Tensor mean = at::zeros({out_w}, x.options()), var = at::zeros({out_w}, x.options());
    if (training) {
      std::vector<double> total_mean(out_w, 0.0), total_m2(out_w, 0.0);
      if (n > 0) {  // (no rows: any finite statistics do, as the Dice op's)
        for (int64_t k = 0; k < blocks.count; ++k)
          for (int64_t j = 0; j < out_w; ++j) total_mean[j] += blocks.size(k) * moment_mean[k * out_w + j];
        for (int64_t j = 0; j < out_w; ++j) total_mean[j] /= static_cast<double>(n);
        for (int64_t k = 0; k < blocks.count; ++k)
          for (int64_t j = 0; j < out_w; ++j) {
            const double delta = moment_mean[k * out_w + j] - total_mean[j];
            total_m2[j] += moment_m2[k * out_w + j] + blocks.size(k) * delta * delta;
          }
      }
      T* mu = mean.data_ptr<T>();
      T* va = var.data_ptr<T>();
      for (int64_t j = 0; j < out_w; ++j) {
        mu[j] = static_cast<T>(total_mean[j]);
        va[j] = n > 0 ? static_cast<T>(total_m2[j] / static_cast<double>(n)) : T(0);
      }
    } else {
      mean.copy_(running_means[l]);
      var.copy_(running_vars[l]);
    }
    net.set_stats(l, mean.data_ptr<T>(), var.data_ptr<T>(), eps);
    means.push_back(mean);
    vars.push_back(var);
  }
  return {out, zs, hs, means, vars};
}

template <typename T>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> backward_impl(
    const at::Tensor& dout, const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& alphas, const std::vector<at::Tensor>& zs, const std::vector<at::Tensor>& hs,
    const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& vars, bool training, double eps,
    bool need_dx, int64_t threads) {
  const HelperPasses passes;  // L + 1 passes
  Net<T> net(x, weights, alphas);
  const int64_t n = x.size(0), hidden = net.hidden;
  TORCH_CHECK(dout.dim() == 2 && dout.size(0) == n && dout.size(1) == net.width(hidden + 1) &&
              dout.is_contiguous() && dout.scalar_type() == x.scalar_type(), "din_kernels_cpu: dice_mlp dout shape");
  TORCH_CHECK(static_cast<int64_t>(zs.size()) == hidden && static_cast<int64_t>(hs.size()) == hidden &&
              static_cast<int64_t>(means.size()) == hidden && static_cast<int64_t>(vars.size()) == hidden,
              "din_kernels_cpu: dice_mlp_bwd needs what its forward returned");
  for (int64_t l = 0; l < hidden; ++l) net.set_stats(l, means[l].data_ptr<T>(), vars[l].data_ptr<T>(), eps);
  const RowBlocks blocks(n);
  std::vector<at::Tensor> dzs;
  for (int64_t l = 0; l < hidden; ++l) dzs.push_back(at::empty({n, net.width(l + 1)}, x.options()));
  at::Tensor dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  std::vector<at::Tensor> grads(2 * (hidden + 1)), dalphas(hidden);
  // k0, k1 of the Dice whose dz the current pass completes (training)
  std::vector<T> k0, k1;
  for (int64_t q = hidden; q >= 0; --q) {
    const int64_t in_w = net.width(q), out_w = net.width(q + 1);
    const T* g = q == hidden ? dout.data_ptr<T>() : dzs[q].data_ptr<T>();
    const T* in = q == 0 ? x.data_ptr<T>() : hs[q - 1].data_ptr<T>();
    const bool finish = q < hidden && training && n > 0;
    std::vector<T> dw_partial(blocks.count * out_w * in_w), db_partial(blocks.count * out_w, T(0));
    std::vector<T> sums_partial(q > 0 ? blocks.count * 3 * in_w : 0, T(0));  // per block: S0, S1, S2
    run_blocks(blocks.count, threads, [&](int64_t k) {
      const int64_t r0 = blocks.begin(k), rows = blocks.size(k);
      if (finish) {  // dz_q of this block completed by the statistics' terms
        T* dz = dzs[q].data_ptr<T>() + r0 * out_w;
        const T* z = zs[q].data_ptr<T>() + r0 * out_w;
        const T* mu = net.mean[q].data();
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < out_w; ++j)
            dz[r * out_w + j] += (z[r * out_w + j] - mu[j]) * k1[j] + k0[j];
      }
      const T* gk = g + r0 * out_w;
      T* dbk = db_partial.data() + k * out_w;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < out_w; ++j) dbk[j] += gk[r * out_w + j];
      mm<T>(true, false, out_w, in_w, rows, T(1), gk, out_w, in + r0 * in_w, in_w, T(0),
            dw_partial.data() + k * out_w * in_w, in_w);  // g^T h_{q-1} [out, in]
      if (q == 0) {
        if (need_dx) mm<T>(false, false, rows, in_w, out_w, T(1), gk, out_w, net.w[0], in_w, T(0),
                           dx.data_ptr<T>() + r0 * in_w, in_w);
        return;
      }
      // dh = g W_q into dz_{q-1}'s rows, then Dice_{q-1}'s backward in place
      const int64_t c = in_w;
      T* __restrict__ dz = dzs[q - 1].data_ptr<T>() + r0 * c;
      mm<T>(false, false, rows, c, out_w, T(1), gk, out_w, net.w[q], c, T(0), dz, c);
      const T* __restrict__ z = zs[q - 1].data_ptr<T>() + r0 * c;
      const T* __restrict__ mu = net.mean[q - 1].data();
      const T* __restrict__ rs = net.rstd[q - 1].data();
      const T* __restrict__ a = net.alpha[q - 1];
      T* __restrict__ s0 = sums_partial.data() + k * 3 * c;
      T* __restrict__ s1 = s0 + c;
      T* __restrict__ s2 = s1 + c;
      Buffer<T> xhat_buf(c), p_buf(c);
      T* __restrict__ xhat = xhat_buf.data();
      T* __restrict__ p = p_buf.data();
      for (int64_t r = 0; r < rows; ++r) {
        const T* __restrict__ zr = z + r * c;
        T* __restrict__ dr = dz + r * c;
        for (int64_t j = 0; j < c; ++j) xhat[j] = (zr[j] - mu[j]) * rs[j];
        std::copy(xhat, xhat + c, p);
        sigmoid_(p, c);
        for (int64_t j = 0; j < c; ++j) {
          const T t = dr[j] * zr[j];
          const T dzp = t * p[j] * (T(1) - p[j]);
          s0[j] += dzp;
          s1[j] += dzp * xhat[j];
          s2[j] += t * (T(1) - p[j]);
          dr[j] = dr[j] * (a[j] + (T(1) - a[j]) * p[j]) + dzp * (T(1) - a[j]) * rs[j];
        }
      }
    });
    at::Tensor dw = at::zeros({out_w, in_w}, x.options()), db = at::zeros({out_w}, x.options());
    T* dws = dw.data_ptr<T>();
    T* dbs = db.data_ptr<T>();
    for (int64_t k = 0; k < blocks.count; ++k) {
      const T* part = dw_partial.data() + k * out_w * in_w;
      for (int64_t i = 0; i < out_w * in_w; ++i) dws[i] += part[i];
      for (int64_t j = 0; j < out_w; ++j) dbs[j] += db_partial[k * out_w + j];
    }
    grads[2 * q] = dw;
    grads[2 * q + 1] = db;
    if (q == 0) break;
    const int64_t c = in_w;
    std::vector<T> s(3 * c, T(0));
    for (int64_t k = 0; k < blocks.count; ++k)
      for (int64_t i = 0; i < 3 * c; ++i) s[i] += sums_partial[k * 3 * c + i];
    at::Tensor dalpha = at::empty({c}, x.options());
    std::copy(s.begin() + 2 * c, s.end(), dalpha.data_ptr<T>());
    dalphas[q - 1] = dalpha;
    k0.assign(c, T(0));
    k1.assign(c, T(0));
    const T* a = net.alpha[q - 1];
    const T* rs = net.rstd[q - 1].data();
    for (int64_t j = 0; j < c && n > 0; ++j) {
      const T scale = (T(1) - a[j]) * rs[j];
      k0[j] = -scale * s[j] / static_cast<T>(n);
      k1[j] = -scale * rs[j] * s[c + j] / static_cast<T>(n);
    }
  }
  return {dx, grads, dalphas};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
dice_mlp_fwd(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& alphas,
             const std::vector<at::Tensor>& running_means, const std::vector<at::Tensor>& running_vars,
             bool training, double eps, int64_t threads) {
  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
             std::vector<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "din_kernels_cpu::dice_mlp_fwd", [&] {
    result = forward_impl<scalar_t>(x, weights, alphas, running_means, running_vars, training, eps, threads);
  });
  return result;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> dice_mlp_bwd(
    const at::Tensor& dout, const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& alphas, const std::vector<at::Tensor>& zs, const std::vector<at::Tensor>& hs,
    const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& vars, bool training, double eps,
    bool need_dx, int64_t threads) {
  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "din_kernels_cpu::dice_mlp_bwd", [&] {
    result = backward_impl<scalar_t>(dout, x, weights, alphas, zs, hs, means, vars, training, eps, need_dx,
                                     threads);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(din_kernels_cpu, m) {
  m.def(
      "dice_mlp_fwd(Tensor x, Tensor[] weights, Tensor[] alphas, Tensor[] running_means, Tensor[] running_vars, "
      "bool training, float eps, int threads) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "dice_mlp_bwd(Tensor dout, Tensor x, Tensor[] weights, Tensor[] alphas, Tensor[] z, Tensor[] h, "
      "Tensor[] means, Tensor[] vars, bool training, float eps, bool need_dx, int threads) "
      "-> (Tensor, Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(din_kernels_cpu, CPU, m) {
  m.impl("dice_mlp_fwd", &dice_mlp_fwd);
  m.impl("dice_mlp_bwd", &dice_mlp_bwd);
}
