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
// z_l (l < L; its block moments, in double, merged in block order: ``merge_moments``) or the output (l = L).
// Kept for the backward: z_l, p_l, h_l.
// Backward, phase q = L..0, with g_L = dout and g_q = dz_q: dW_q = g_q^T h_{q-1} and db_q = sum g_q (block
// partials); for q > 0, dh = g_q W_q and Dice_{q-1}'s per-block sums (``dice_backward_sums``), its dz
// completed at the start of the next phase with the merged sums (``dice_backward_dz``; eval: without the
// statistics' terms); for q = 0, dx = g_0 W_0. The Dice pieces are dice_blocks.h's, shared with the
// Dice-training attention op.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu_runtime.h"
#include "dice_blocks.h"

namespace {

using namespace din_kernels_cpu;  // cpu_runtime.h: blocks, helper threads, sigmoid, mm

// Rows per block: a DIN step's 256 rows in 4 blocks (both cores busy, and a descheduled thread holds back at
// most a quarter of a pass), each block's products large enough for BLAS to run near its peak.
constexpr int64_t kBlockRows = 64;

using Tensors = std::vector<at::Tensor>;

struct RowBlocks {
  int64_t rows, count;
  explicit RowBlocks(int64_t n) : rows(n), count((n + kBlockRows - 1) / kBlockRows) {}
  int64_t begin(int64_t k) const { return k * kBlockRows; }
  int64_t size(int64_t k) const { return std::min(rows, (k + 1) * kBlockRows) - k * kBlockRows; }
};

// The network as raw pointers: widths = (F, H_1, .., H_L, O); layer l maps widths[l] -> widths[l + 1] by
// w[l] [widths[l + 1], widths[l]] and b[l]; Dice l (after layer l, l < L) has alpha[l] and stats[l].
template <typename T>
struct Net {
  int64_t hidden = 0;
  std::vector<int64_t> widths;
  std::vector<const T*> w, b, alpha;
  std::vector<LayerStats<T>> stats;  // Dice l's mean and rstd

  Net(const at::Tensor& x, const Tensors& weights, const Tensors& alphas) {
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
    stats.resize(hidden);
  }

  int64_t width(int64_t l) const { return widths[l]; }
  const T* mean(int64_t l) const { return stats[l].mean.data(); }
  const T* rstd(int64_t l) const { return stats[l].rstd.data(); }
};

// rows [n, out] = bias + in [n, in_w] W^T (W [out, in_w])
template <typename T>
void linear_rows(int64_t n, int64_t in_w, int64_t out_w, const T* in, const T* w, const T* bias, T* out) {
  for (int64_t r = 0; r < n; ++r) std::copy(bias, bias + out_w, out + r * out_w);
  mm<T>(false, true, n, out_w, in_w, T(1), in, in_w, w, in_w, T(1), out, out_w);
}

// (out [N, O], z, p, h [N, H_l] per layer, mean, var [H_l] per layer: the batch's in training, copies of the
// running statistics in eval)
template <typename T>
std::tuple<at::Tensor, Tensors, Tensors, Tensors, Tensors, Tensors> forward_impl(
    const at::Tensor& x, const Tensors& weights, const Tensors& alphas, const Tensors& running_means,
    const Tensors& running_vars, bool training, double eps, int64_t threads) {
  const HelperPasses passes;  // L + 1 passes
  Net<T> net(x, weights, alphas);
  const int64_t n = x.size(0), hidden = net.hidden;
  TORCH_CHECK(training || (static_cast<int64_t>(running_means.size()) == hidden &&
                           static_cast<int64_t>(running_vars.size()) == hidden),
              "din_kernels_cpu: dice_mlp in eval mode needs every layer's running statistics");
  const RowBlocks blocks(n);
  Tensors zs, ps, hs, means, vars;
  for (int64_t l = 0; l < hidden; ++l)
    for (Tensors* kept : {&zs, &ps, &hs}) kept->push_back(at::empty({n, net.width(l + 1)}, x.options()));
  at::Tensor out = at::empty({n, net.width(hidden + 1)}, x.options());
  std::vector<int64_t> counts(blocks.count);
  for (int64_t k = 0; k < blocks.count; ++k) counts[k] = blocks.size(k);
  std::vector<double> moments;
  for (int64_t l = 0; l <= hidden; ++l) {
    const int64_t in_w = net.width(l), out_w = net.width(l + 1);
    const T* in = l == 0 ? x.data_ptr<T>() : hs[l - 1].data_ptr<T>();
    T* dst = l < hidden ? zs[l].data_ptr<T>() : out.data_ptr<T>();
    const bool with_moments = training && l < hidden;
    if (with_moments) moments.assign(blocks.count * 2 * out_w, 0.0);
    run_blocks(blocks.count, threads, [&](int64_t k) {
      const int64_t r0 = blocks.begin(k), rows = blocks.size(k);
      if (l > 0)  // this block's h_{l-1} from z_{l-1}, with the statistics merged after the last pass
        dice_batch_forward(zs[l - 1].data_ptr<T>() + r0 * in_w, ps[l - 1].data_ptr<T>() + r0 * in_w,
                           hs[l - 1].data_ptr<T>() + r0 * in_w, rows, in_w, net.mean(l - 1), net.rstd(l - 1),
                           net.alpha[l - 1]);
      linear_rows<T>(rows, in_w, out_w, in + r0 * in_w, net.w[l], net.b[l], dst + r0 * out_w);
      if (with_moments)
        block_moments(dst + r0 * out_w, rows, out_w, moments.data() + k * 2 * out_w,
                      moments.data() + k * 2 * out_w + out_w);
    });
    if (l == hidden) break;
    at::Tensor mean = at::empty({out_w}, x.options()), var = at::empty({out_w}, x.options());
    if (training) {
      std::vector<double> batch_mean, batch_var;
      merge_moments(counts, moments, out_w, batch_mean, batch_var);
      std::copy(batch_mean.begin(), batch_mean.end(), mean.data_ptr<T>());
      std::copy(batch_var.begin(), batch_var.end(), var.data_ptr<T>());
    } else {
      mean.copy_(running_means[l]);
      var.copy_(running_vars[l]);
    }
    net.stats[l].set(mean.data_ptr<T>(), var.data_ptr<T>(), out_w, eps);
    means.push_back(mean);
    vars.push_back(var);
  }
  return {out, zs, ps, hs, means, vars};
}

// (dx [N, F] or empty, (dW, db) per layer, dalpha [H_l] per hidden layer)
template <typename T>
std::tuple<at::Tensor, Tensors, Tensors> backward_impl(
    const at::Tensor& dout, const at::Tensor& x, const Tensors& weights, const Tensors& alphas, const Tensors& zs,
    const Tensors& ps, const Tensors& hs, const Tensors& means, const Tensors& vars, bool training, double eps,
    bool need_dx, int64_t threads) {
  const HelperPasses passes;  // L + 1 passes
  Net<T> net(x, weights, alphas);
  const int64_t n = x.size(0), hidden = net.hidden;
  TORCH_CHECK(dout.dim() == 2 && dout.size(0) == n && dout.size(1) == net.width(hidden + 1) &&
              dout.is_contiguous() && dout.scalar_type() == x.scalar_type(), "din_kernels_cpu: dice_mlp dout shape");
  for (const Tensors* kept : {&zs, &ps, &hs, &means, &vars})
    TORCH_CHECK(static_cast<int64_t>(kept->size()) == hidden, "din_kernels_cpu: dice_mlp_bwd needs what its "
                "forward returned");
  for (int64_t l = 0; l < hidden; ++l)
    net.stats[l].set(means[l].data_ptr<T>(), vars[l].data_ptr<T>(), net.width(l + 1), eps);
  const RowBlocks blocks(n);
  Tensors dzs;
  for (int64_t l = 0; l < hidden; ++l) dzs.push_back(at::empty({n, net.width(l + 1)}, x.options()));
  at::Tensor dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  Tensors grads(2 * (hidden + 1)), dalphas(hidden);
  Buffer<T> c1, c2;  // the Dice whose dz the next pass completes: mean(g_xhat), mean(g_xhat xhat) (eval: 0)
  for (int64_t q = hidden; q >= 0; --q) {
    const int64_t in_w = net.width(q), out_w = net.width(q + 1);
    const T* g = q == hidden ? dout.data_ptr<T>() : dzs[q].data_ptr<T>();
    const T* in = q == 0 ? x.data_ptr<T>() : hs[q - 1].data_ptr<T>();
    std::vector<T> dw_partial(blocks.count * out_w * in_w), db_partial(blocks.count * out_w, T(0));
    std::vector<T> dalpha_partial(q > 0 ? blocks.count * in_w : 0, T(0));
    std::vector<double> sums(q > 0 ? blocks.count * 2 * in_w : 0, 0.0);
    run_blocks(blocks.count, threads, [&](int64_t k) {
      const int64_t r0 = blocks.begin(k), rows = blocks.size(k);
      if (q < hidden) {  // dz_q of this block from dh (in place) with the merged sums
        T* dz = dzs[q].data_ptr<T>() + r0 * out_w;
        dice_backward_dz(dz, zs[q].data_ptr<T>() + r0 * out_w, ps[q].data_ptr<T>() + r0 * out_w, dz, rows, out_w,
                         net.mean(q), net.rstd(q), net.alpha[q], c1.data(), c2.data());
      }
      const T* gk = g + r0 * out_w;
      T* dbk = db_partial.data() + k * out_w;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < out_w; ++j) dbk[j] += gk[r * out_w + j];
      mm<T>(true, false, out_w, in_w, rows, T(1), gk, out_w, in + r0 * in_w, in_w, T(0),
            dw_partial.data() + k * out_w * in_w, in_w);  // g^T h_{q-1} [out, in]
      if (q == 0) {
        if (need_dx)
          mm<T>(false, false, rows, in_w, out_w, T(1), gk, out_w, net.w[0], in_w, T(0), dx.data_ptr<T>() + r0 * in_w,
                in_w);
        return;
      }
      T* dh = dzs[q - 1].data_ptr<T>() + r0 * in_w;  // dh = g W_q, completed into dz_{q-1} by the next pass
      mm<T>(false, false, rows, in_w, out_w, T(1), gk, out_w, net.w[q], in_w, T(0), dh, in_w);
      dice_backward_sums(dh, zs[q - 1].data_ptr<T>() + r0 * in_w, ps[q - 1].data_ptr<T>() + r0 * in_w, rows, in_w,
                         net.mean(q - 1), net.rstd(q - 1), net.alpha[q - 1], dalpha_partial.data() + k * in_w,
                         sums.data() + k * 2 * in_w, sums.data() + k * 2 * in_w + in_w);
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
    at::Tensor dalpha = at::zeros({in_w}, x.options());
    T* da = dalpha.data_ptr<T>();
    for (int64_t k = 0; k < blocks.count; ++k)
      for (int64_t j = 0; j < in_w; ++j) da[j] += dalpha_partial[k * in_w + j];
    dalphas[q - 1] = dalpha;
    c1.assign(in_w, T(0));
    c2.assign(in_w, T(0));
    if (training) merge_backward_sums(sums, blocks.count, in_w, n, c1.data(), c2.data());
  }
  return {dx, grads, dalphas};
}

std::tuple<at::Tensor, Tensors, Tensors, Tensors, Tensors, Tensors> dice_mlp_fwd(
    const at::Tensor& x, const Tensors& weights, const Tensors& alphas, const Tensors& running_means,
    const Tensors& running_vars, bool training, double eps, int64_t threads) {
  std::tuple<at::Tensor, Tensors, Tensors, Tensors, Tensors, Tensors> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "din_kernels_cpu::dice_mlp_fwd", [&] {
    result = forward_impl<scalar_t>(x, weights, alphas, running_means, running_vars, training, eps, threads);
  });
  return result;
}

std::tuple<at::Tensor, Tensors, Tensors> dice_mlp_bwd(const at::Tensor& dout, const at::Tensor& x,
                                                      const Tensors& weights, const Tensors& alphas, const Tensors& zs,
                                                      const Tensors& ps, const Tensors& hs, const Tensors& means,
                                                      const Tensors& vars, bool training, double eps, bool need_dx,
                                                      int64_t threads) {
  std::tuple<at::Tensor, Tensors, Tensors> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "din_kernels_cpu::dice_mlp_bwd", [&] {
    result = backward_impl<scalar_t>(dout, x, weights, alphas, zs, ps, hs, means, vars, training, eps, need_dx,
                                     threads);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(din_kernels_cpu, m) {
  m.def(
      "dice_mlp_fwd(Tensor x, Tensor[] weights, Tensor[] alphas, Tensor[] running_means, Tensor[] running_vars, "
      "bool training, float eps, int threads) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "dice_mlp_bwd(Tensor dout, Tensor x, Tensor[] weights, Tensor[] alphas, Tensor[] z, Tensor[] p, Tensor[] h, "
      "Tensor[] means, Tensor[] vars, bool training, float eps, bool need_dx, int threads) "
      "-> (Tensor, Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(din_kernels_cpu, CPU, m) {
  m.impl("dice_mlp_fwd", &dice_mlp_fwd);
  m.impl("dice_mlp_bwd", &dice_mlp_bwd);
}
