// Dice in training mode over a call cut into blocks (the Dice-training attention op, attention_cpu.cpp, and
// the head MLP, mlp_cpu.cpp): the batch statistics from the blocks' moments, the elementwise forward, and the
// backward's per-block sums and dz. Everything merged across blocks is merged in block order, in double, so
// that the results do not depend on which thread ran which block. (The standalone Dice op, dice_cpu.cpp,
// keeps its own single-pass variant with a pivot.)
//
//     p = sigmoid((z - mean) rstd),  h = z (a + (1 - a) p)
//     g_xhat = g z (1 - a) p (1 - p),  dalpha = sum g z (1 - p)
//     dz = g (a + (1 - a) p) + rstd (g_xhat - c1 - xhat c2),  c1 = mean(g_xhat), c2 = mean(g_xhat xhat)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_runtime.h"

namespace din_kernels_cpu {

// Batch statistics: each block's per-unit mean and M2 = sum (z - mean)^2 of its rows z [n, width], in double
// (two passes over rows still in cache), into ``moments`` [blocks, 2, width]; ``merge_moments`` merges them in
// block order (Chan et al.'s pairwise rule) into the call's mean and biased variance.
template <typename T>
void block_moments(const T* z, int64_t n, int64_t width, double* mean, double* m2) {
  std::fill(mean, mean + width, 0.0);
  std::fill(m2, m2 + width, 0.0);
  if (n == 0) return;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < width; ++j) mean[j] += z[i * width + j];
  for (int64_t j = 0; j < width; ++j) mean[j] /= static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < width; ++j) {
      const double centred = z[i * width + j] - mean[j];
      m2[j] += centred * centred;
    }
}

// ``counts[b]``: block b's rows; no rows at all gives mean 0 and variance 0 (any finite statistics do then).
inline void merge_moments(const std::vector<int64_t>& counts, const std::vector<double>& moments, int64_t width,
                          std::vector<double>& mean, std::vector<double>& var) {
  mean.assign(width, 0.0);
  std::vector<double> m2(width, 0.0);
  double count = 0;
  for (size_t b = 0; b < counts.size(); ++b) {
    const double n_b = static_cast<double>(counts[b]);
    if (n_b == 0) continue;
    const double* mean_b = moments.data() + b * 2 * width;
    const double* m2_b = mean_b + width;
    const double total = count + n_b;
    for (int64_t j = 0; j < width; ++j) {
      const double delta = mean_b[j] - mean[j];
      mean[j] += delta * n_b / total;
      m2[j] += m2_b[j] + delta * delta * count * n_b / total;
    }
    count = total;
  }
  var.assign(width, 0.0);
  if (count > 0)
    for (int64_t j = 0; j < width; ++j) var[j] = m2[j] / count;
}

// h = z (a + (1 - a) p) on [n, width], from the kept z and p.
template <typename T>
void dice_output(const T* z, const T* p, T* h, int64_t n, int64_t width, const T* a) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < width; ++j)
      h[i * width + j] = z[i * width + j] * (a[j] + (T(1) - a[j]) * p[i * width + j]);
}

// p = sigmoid((z - mean) rstd) into ``p``, h = z (a + (1 - a) p) into ``h``, on [n, width].
template <typename T>
void dice_batch_forward(const T* z, T* p, T* h, int64_t n, int64_t width, const T* mean, const T* rstd,
                        const T* a) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < width; ++j) p[i * width + j] = (z[i * width + j] - mean[j]) * rstd[j];
  sigmoid_(p, n * width);
  dice_output(z, p, h, n, width, a);
}

// The backward's per-block sums of a layer from g = dL/dh [n, width]: dalpha += sum g z (1 - p); in double
// ``s1`` = sum g_xhat and ``s2`` = sum g_xhat xhat [width] each.
template <typename T>
void dice_backward_sums(const T* g, const T* z, const T* p, int64_t n, int64_t width, const T* mean,
                        const T* rstd, const T* a, T* dalpha, double* s1, double* s2) {
  std::fill(s1, s1 + width, 0.0);
  std::fill(s2, s2 + width, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < width; ++j) {
      const int64_t at = i * width + j;
      const T one_minus_p = T(1) - p[at];
      dalpha[j] += g[at] * z[at] * one_minus_p;
      const T g_xhat = g[at] * z[at] * (T(1) - a[j]) * p[at] * one_minus_p;
      s1[j] += g_xhat;
      s2[j] += static_cast<double>(g_xhat) * ((z[at] - mean[j]) * rstd[j]);
    }
}

// dz [n, width] from g: g (a + (1 - a) p) + rstd (g_xhat - c1 - xhat c2), c1 = mean(g_xhat), c2 =
// mean(g_xhat xhat) over the call.
template <typename T>
void dice_backward_dz(const T* g, const T* z, const T* p, T* dz, int64_t n, int64_t width, const T* mean,
                      const T* rstd, const T* a, const T* c1, const T* c2) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < width; ++j) {
      const int64_t at = i * width + j;
      const T g_xhat = g[at] * z[at] * (T(1) - a[j]) * p[at] * (T(1) - p[at]);
      const T xhat = (z[at] - mean[j]) * rstd[j];
      dz[at] = g[at] * (a[j] + (T(1) - a[j]) * p[at]) + rstd[j] * (g_xhat - c1[j] - xhat * c2[j]);
    }
}

// The statistics a layer's Dice uses, in the compute dtype: mean and rstd = (var + eps)^-1/2 [width].
template <typename T>
struct LayerStats {
  Buffer<T> mean, rstd;
  void set(const T* mean_in, const T* var_in, int64_t width, double eps) {
    mean.assign(mean_in, mean_in + width);
    rstd.resize(width);
    for (int64_t j = 0; j < width; ++j) rstd[j] = T(1) / std::sqrt(var_in[j] + static_cast<T>(eps));
  }
};

// c1 = mean(g_xhat) and c2 = mean(g_xhat xhat) of a layer [width] over ``total`` rows from the blocks' sums
// (``sums`` [blocks, 2, width] of ``dice_backward_sums``), summed in block order.
template <typename T>
void merge_backward_sums(const std::vector<double>& sums, int64_t blocks, int64_t width, int64_t total, T* c1,
                         T* c2) {
  std::vector<double> s1(width, 0.0), s2(width, 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t j = 0; j < width; ++j) {
      s1[j] += sums[b * 2 * width + j];
      s2[j] += sums[b * 2 * width + width + j];
    }
  for (int64_t j = 0; j < width; ++j) {
    c1[j] = static_cast<T>(s1[j] / std::max<double>(static_cast<double>(total), 1.0));
    c2[j] = static_cast<T>(s2[j] / std::max<double>(static_cast<double>(total), 1.0));
  }
}

}  // namespace din_kernels_cpu
