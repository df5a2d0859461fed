// Dice (paper Eq. 7) on the CPU as one C++ op per forward and per backward (the math: dice.py's docstring).
//
// Why: the torch composite path runs ~15 torch ops forward and ~25 backward per chunk of rows, each with its
// dispatch cost (~4 us) and its own parallel region: DIN's head ([256, 200] and [256, 80] per step) spent
// 0.8 ms a step there, more than the arithmetic by far. Here each pass is a loop over a chunk of rows;
// chunks (fixed by the shape alone) go to ``run_blocks`` (cpu_runtime.h), and the per-chunk statistics and
// gradient sums are merged in chunk order, so the results do not depend on the thread count.
//
// Forward (training): per chunk, over its valid rows, the mean and the centred sum of squares of
// ``x - pivot`` (pivot: the first valid row: sums stay small whatever the offset, a constant channel gives
// exactly 0); merged as sum_k n_k mean_k / n and sum_k (M2_k + n_k (mean_k - mean)^2) (the torch path's
// rule); then y = x (a + (1 - a) p), p = sigmoid(w (x - mean) rstd + b). Eval: the running statistics given.
// Backward: S0 = sum dzp, S1 = sum dzp xhat, S2 = sum dy x (1 - p) over every row (dzp = dy x p (1 - p));
// dx = dy (a + (1 - a) p) + dzp (1 - a) rstd w, and in training on the valid rows
// + (x - mean) k1 + k0 with k0 = -(1 - a) rstd w S0 / n, k1 = -rstd (1 - a) rstd w S1 / n.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu_runtime.h"

namespace {

using namespace din_kernels_cpu;

// Elements per chunk: one chunk (no helper woken) for a DIN head's [256, 200]; many for Dice over
// attention positions ([B * T, H]).
constexpr int64_t kChunkElements = 1 << 16;

struct Chunks {
  int64_t rows, per_chunk, count;
  Chunks(int64_t n_rows, int64_t channels)
      : rows(n_rows), per_chunk(std::max<int64_t>(1, kChunkElements / std::max<int64_t>(channels, 1))),
        count((n_rows + per_chunk - 1) / per_chunk) {}
  int64_t begin(int64_t k) const { return k * per_chunk; }
  int64_t end(int64_t k) const { return std::min(rows, (k + 1) * per_chunk); }
};

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check(const at::Tensor& x, const std::vector<std::optional<at::Tensor>>& others) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.is_contiguous(), "din_kernels_cpu: x must be [N, C], CPU");
  for (const auto& t : others) {
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "din_kernels_cpu: dice inputs must be contiguous CPU");
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> forward_impl(
    const at::Tensor& x, const at::Tensor& alpha, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& var_in, bool training, double eps,
    int64_t threads) {
  const int64_t n = x.size(0), c = x.size(1);
  const T* xs = x.data_ptr<T>();
  const T* a = alpha.data_ptr<T>();
  const T* w = ptr_or_null<T>(weight);
  const T* b = ptr_or_null<T>(bias);
  const bool* valid = mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;
  at::Tensor mean = at::zeros({c}, x.options());
  at::Tensor var = at::zeros({c}, x.options());
  T* mu = mean.data_ptr<T>();
  T* va = var.data_ptr<T>();
  const Chunks chunks(n, c);
  int64_t count = 0;
  if (training) {
    int64_t first = -1;
    for (int64_t r = 0; r < n && first < 0; ++r)
      if (valid == nullptr || valid[r]) first = r;
    if (first >= 0) {
      const T* pivot = xs + first * c;
      std::vector<int64_t> counts(chunks.count, 0);
      std::vector<T> means(chunks.count * c, T(0)), m2s(chunks.count * c, T(0));
      run_blocks(chunks.count, threads, [&](int64_t k) {
        T* cm = means.data() + k * c;
        T* cm2 = m2s.data() + k * c;
        int64_t rows = 0;
        for (int64_t r = chunks.begin(k); r < chunks.end(k); ++r) {
          if (valid != nullptr && !valid[r]) continue;
          const T* xr = xs + r * c;
          for (int64_t j = 0; j < c; ++j) cm[j] += xr[j] - pivot[j];
          ++rows;
        }
        counts[k] = rows;
        if (rows == 0) return;
        for (int64_t j = 0; j < c; ++j) cm[j] /= static_cast<T>(rows);
        for (int64_t r = chunks.begin(k); r < chunks.end(k); ++r) {
          if (valid != nullptr && !valid[r]) continue;
          const T* xr = xs + r * c;
          for (int64_t j = 0; j < c; ++j) {
            const T centred = xr[j] - pivot[j] - cm[j];
            cm2[j] += centred * centred;
          }
        }
      });
      for (int64_t k = 0; k < chunks.count; ++k) count += counts[k];
      std::vector<T> shifted(c, T(0));
      for (int64_t k = 0; k < chunks.count; ++k)
        for (int64_t j = 0; j < c; ++j) shifted[j] += static_cast<T>(counts[k]) * means[k * c + j];
      for (int64_t j = 0; j < c; ++j) shifted[j] /= static_cast<T>(count);
      for (int64_t k = 0; k < chunks.count; ++k) {
        if (counts[k] == 0) continue;
        for (int64_t j = 0; j < c; ++j) {
          const T delta = means[k * c + j] - shifted[j];
          va[j] += m2s[k * c + j] + static_cast<T>(counts[k]) * delta * delta;
        }
      }
      for (int64_t j = 0; j < c; ++j) {
        mu[j] = shifted[j] + pivot[j];
        va[j] /= static_cast<T>(count);
      }
    }
  } else {
    TORCH_CHECK(mean_in.has_value() && var_in.has_value(), "din_kernels_cpu: dice eval needs the running statistics");
    mean.copy_(*mean_in);
    var.copy_(*var_in);
  }
  at::Tensor rstd = at::empty({c}, x.options());
  T* rs = rstd.data_ptr<T>();
  for (int64_t j = 0; j < c; ++j) rs[j] = T(1) / std::sqrt(va[j] + static_cast<T>(eps));
  at::Tensor y = at::empty_like(x);
  T* ys = y.data_ptr<T>();
  run_blocks(chunks.count, threads, [&](int64_t k) {
    for (int64_t r = chunks.begin(k); r < chunks.end(k); ++r) {
      const T* xr = xs + r * c;
      T* yr = ys + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const T xhat = (xr[j] - mu[j]) * rs[j];
        yr[j] = w == nullptr ? xhat : w[j] * xhat + b[j];
      }
      sigmoid_(yr, c);  // yr = p
      for (int64_t j = 0; j < c; ++j) yr[j] = xr[j] * (a[j] + (T(1) - a[j]) * yr[j]);
    }
  });
  return {y, mean, var, rstd, count};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                                                 const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& mask, const at::Tensor& mean,
                                                 const at::Tensor& rstd, int64_t count, bool training, bool need_dx,
                                                 int64_t threads) {
  const int64_t n = x.size(0), c = x.size(1);
  const T* xs = x.data_ptr<T>();
  const T* g = dy.data_ptr<T>();
  const T* a = alpha.data_ptr<T>();
  const T* w = ptr_or_null<T>(weight);
  const T* b = ptr_or_null<T>(bias);
  const T* mu = mean.data_ptr<T>();
  const T* rs = rstd.data_ptr<T>();
  const bool* valid = mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;
  const Chunks chunks(n, c);
  std::vector<T> dxhat_scale(c);  // (1 - a) rstd w
  for (int64_t j = 0; j < c; ++j) dxhat_scale[j] = (T(1) - a[j]) * rs[j] * (w == nullptr ? T(1) : w[j]);
  at::Tensor dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  T* dxs = need_dx ? dx.data_ptr<T>() : nullptr;
  std::vector<T> partial(chunks.count * 3 * c, T(0));  // per chunk: S0, S1, S2
  run_blocks(chunks.count, threads, [&](int64_t k) {
    // restrict-qualified, branch-free inner loops: they vectorise
    T* __restrict__ s0 = partial.data() + k * 3 * c;
    T* __restrict__ s1 = s0 + c;
    T* __restrict__ s2 = s1 + c;
    std::vector<T> p_buf(c), xhat_buf(c), dzp_buf(c);
    T* __restrict__ p = p_buf.data();
    T* __restrict__ xhat = xhat_buf.data();
    T* __restrict__ dzp = dzp_buf.data();
    const T* __restrict__ scale = dxhat_scale.data();
    for (int64_t r = chunks.begin(k); r < chunks.end(k); ++r) {
      const T* __restrict__ xr = xs + r * c;
      const T* __restrict__ gr = g + r * c;
      for (int64_t j = 0; j < c; ++j) xhat[j] = (xr[j] - mu[j]) * rs[j];
      if (w == nullptr) {
        std::copy(xhat, xhat + c, p);
      } else {
        for (int64_t j = 0; j < c; ++j) p[j] = w[j] * xhat[j] + b[j];
      }
      sigmoid_(p, c);
      for (int64_t j = 0; j < c; ++j) {
        const T t = gr[j] * xr[j];
        dzp[j] = t * p[j] * (T(1) - p[j]);
        s0[j] += dzp[j];
        s1[j] += dzp[j] * xhat[j];
        s2[j] += t * (T(1) - p[j]);
      }
      if (dxs != nullptr) {
        T* __restrict__ dr = dxs + r * c;
        for (int64_t j = 0; j < c; ++j) dr[j] = gr[j] * (a[j] + (T(1) - a[j]) * p[j]) + dzp[j] * scale[j];
      }
    }
  });
  at::Tensor sums = at::zeros({3, c}, x.options());
  T* out = sums.data_ptr<T>();
  for (int64_t k = 0; k < chunks.count; ++k)
    for (int64_t i = 0; i < 3 * c; ++i) out[i] += partial[k * 3 * c + i];
  if (dxs != nullptr && training && count > 0) {
    std::vector<T> k0(c), k1(c);
    for (int64_t j = 0; j < c; ++j) {
      k0[j] = -dxhat_scale[j] * out[j] / static_cast<T>(count);
      k1[j] = -rs[j] * dxhat_scale[j] * out[c + j] / static_cast<T>(count);
    }
    run_blocks(chunks.count, threads, [&](int64_t k) {
      for (int64_t r = chunks.begin(k); r < chunks.end(k); ++r) {
        if (valid != nullptr && !valid[r]) continue;
        const T* xr = xs + r * c;
        T* dr = dxs + r * c;
        for (int64_t j = 0; j < c; ++j) dr[j] += (xr[j] - mu[j]) * k1[j] + k0[j];
      }
    });
  }
  for (int64_t j = 0; j < c; ++j) {  // the returned sums: (1 - a) S0, (1 - a) S1, S2
    out[j] *= T(1) - a[j];
    out[c + j] *= T(1) - a[j];
  }
  return {dx, sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> dice_fwd(
    const at::Tensor& x, const at::Tensor& alpha, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, bool training, double eps,
    int64_t threads) {
  check(x, {alpha, weight, bias, mask, mean, var});
  TORCH_CHECK(alpha.numel() == x.size(1), "din_kernels_cpu: alpha must have C entries");
  TORCH_CHECK(!mask.has_value() || !mask->defined() || (mask->scalar_type() == at::kBool && mask->numel() == x.size(0)),
              "din_kernels_cpu: mask must be bool [N]");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "din_kernels_cpu::dice_fwd", [&] {
    result = forward_impl<scalar_t>(x, alpha, weight, bias, mask, mean, var, training, eps, threads);
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor> dice_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& mask, const at::Tensor& mean,
                                            const at::Tensor& rstd, int64_t count, bool training, bool need_dx,
                                            int64_t threads) {
  check(x, {dy, alpha, weight, bias, mask, mean, rstd});
  TORCH_CHECK(dy.sizes() == x.sizes() && alpha.numel() == x.size(1), "din_kernels_cpu: dice_bwd shapes");
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "din_kernels_cpu::dice_bwd", [&] {
    result = backward_impl<scalar_t>(dy, x, alpha, weight, bias, mask, mean, rstd, count, training, need_dx,
                                     threads);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(din_kernels_cpu, m) {
  m.def(
      "dice_fwd(Tensor x, Tensor alpha, Tensor? weight, Tensor? bias, Tensor? mask, Tensor? mean, Tensor? var, "
      "bool training, float eps, int threads) -> (Tensor, Tensor, Tensor, Tensor, int)");
  m.def(
      "dice_bwd(Tensor dy, Tensor x, Tensor alpha, Tensor? weight, Tensor? bias, Tensor? mask, Tensor mean, "
      "Tensor rstd, int count, bool training, bool need_dx, int threads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(din_kernels_cpu, CPU, m) {
  m.impl("dice_fwd", &dice_fwd);
  m.impl("dice_bwd", &dice_bwd);
}
