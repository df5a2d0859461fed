// The local activation unit on the CPU as one C++ op: one parallel region per forward and one per backward.
//
// Why: the torch composite path (attention/composite.py) runs ~15 torch ops per chunk of rows forward and ~30
// backward; each is its own OpenMP parallel region with a barrier at its end. When another process holds a
// core, the thread the OS descheduled makes every one of those barriers wait (measured: 3-84x slower under
// load at torch's default threads, against 1.2-4x for the eager reference). Here the work is cut into
// blocks of batch rows (fixed by the lengths alone) that the calling thread and up to threads - 1 helper
// threads pull from an atomic counter (``run_blocks``): a helper that the OS does not
// schedule takes no block and is never waited for (an OpenMP region would wait for it at its barrier), a
// thread that loses its core mid-call takes fewer blocks, and the caller waits only for blocks in flight.
// Every per-block product is a direct BLAS call on one thread.
//
// Algebra (DESIGN.md, "Kernel design"; the same split as attention/first_layer.py's FirstLayer):
//     z1[b, t] = u_b + k[b, t] @ M_b,   u_b = W_u q_b + b1,
//     concat: M_b = base + diag(q_b) mq    (base = (Wb - Wc)^T, mq = Wd^T, both [D, H1])
//     outer:  M_b = base + q_b @ mq        (base = Wk^T [D, H1], mq [D, D * H1])
//     z_l = h_{l-1} W_l^T + b_l,  h_l = act(z_l),  s = h_L w_out + b_out,  w = softmax(scale * s) or scale * s
//     out_b = sum_t w[b, t] k[b, t]                                   (valid positions t < lengths[b] only)
// Backward: dw = k g_out; ds = w (dw - sum_t w dw) (softmax) or dw, times scale; back through the layers
// (dz_l = act'(z_l) dh_l, dW_l = dz_l^T h_{l-1}, dh_{l-1} = dz_l W_l); then per row
//     du = sum_t dz1,  dM = k^T dz1,  dk = dz1 M^T + w g_out,
//     dq = W_u^T du + (concat: sum_h dM * mq | outer: mq dM_flat),  dW_u += du q^T,  d_base += dM,
//     d_mq += (concat: q * dM | outer: q dM_flat^T).
// Several candidate rows per history: query [B * C, D] and lengths [B * C], row r against keys[r / C]; the
// backward sums a history's keys gradient over its rows (one block holds them all).
// Only valid positions are scored (padding costs nothing). The forward may keep the activations of its
// leading blocks in a caller-given buffer (``saved``, bounded by the caller); the backward reads those and
// recomputes the others. Weight gradients are summed per block, then over blocks in block
// order, so results do not depend on the number of threads or on which thread took which block.
//
// Activations (codes: ActivationSpec.code in din_kernels/activations.py): 0 identity, 1 sigmoid, 2 relu, 3 prelu,
// 4 dice (eval: running statistics, f(z) = z (a + (1 - a) p), p = sigmoid((z - mean) rstd)). Dice in training
// mode, whose statistics span the whole call, has ops of its own (``attention_dice_train_fwd`` / ``_bwd``, the
// section "Dice in training mode" below) built from the same pieces.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_runtime.h"
#include "dice_blocks.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

using namespace din_kernels_cpu;  // cpu_runtime.h: blocks, helper threads, aligned buffers, sigmoid, mm

enum Activation : int64_t { kIdentity = 0, kSigmoid = 1, kRelu = 2, kPrelu = 3, kDice = 4 };

// The first layer's per-row products (a row's length x D x H1, e.g. 50 x 36 x 80): z += k M_b, dM = k^T dz1,
// dk += dz1 M_b^T. Why not BLAS: M_b differs per row, and MKL spent about half of each such call packing it
// (5.0 us for 50 x 36 x 80 on one core, 52% of its FMA peak; the large products of the other layers run at
// 80-90% there). Here C[m, n] (+)= A[m, k] B[k, n] is a loop over blocks of 4 rows x 64 columns of C held in
// 16 vector registers, B read in place row by row, A read through strides (``a_row``, ``a_col``: k^T needs
// no copy). AVX-512 only (32 vector registers; with -march=native the build knows); elsewhere, and in fp64,
// ``mm`` (BLAS). Deterministic like BLAS on one thread: each C entry sums over k in order.
#if defined(__AVX512F__)
#include <immintrin.h>

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16_unaligned __attribute__((vector_size(64), aligned(4)));

inline vec16 load16(const float* p) { return *reinterpret_cast<const vec16_unaligned*>(p); }
inline void store16(float* p, vec16 v) { *reinterpret_cast<vec16_unaligned*>(p) = v; }

template <int R, int V>
inline void small_mm_block(int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                           float* c, int64_t ldc, bool accumulate) {
  vec16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? load16(c + r * ldc + 16 * v) : vec16{};
  for (int64_t p = 0; p < k; ++p) {
    vec16 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = load16(b + p * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float av = a[r * a_row + p * a_col];
      for (int v = 0; v < V; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store16(c + r * ldc + 16 * v, acc[r][v]);
}

template <int R>
inline void small_mm_rows(int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) small_mm_block<R, 4>(k, a, a_row, a_col, b + j, ldb, c + j, ldc, accumulate);
  for (; j + 16 <= n; j += 16) small_mm_block<R, 1>(k, a, a_row, a_col, b + j, ldb, c + j, ldc, accumulate);
  if (j == n) return;
  // the last n % 16 columns (D = 36: 4 of them) with masked loads and stores
  const __mmask16 mask = static_cast<__mmask16>((1u << (n - j)) - 1u);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = accumulate ? _mm512_maskz_loadu_ps(mask, c + r * ldc + j) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const __m512 bv = _mm512_maskz_loadu_ps(mask, b + p * ldb + j);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * a_row + p * a_col]), bv, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(c + r * ldc + j, mask, acc[r]);
}
#endif

// C[m, n] (+)= A[m, k] B[k, n], A(i, p) = a[i * a_row + p * a_col], B and C row-major.
template <typename T>
void small_mm(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
              T* c, int64_t ldc, bool accumulate) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
      small_mm_rows<4>(n, k, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, accumulate);
    const int64_t rest = m - i;
    const float* ai = a + i * a_row;
    float* ci = c + i * ldc;
    if (rest == 3) small_mm_rows<3>(n, k, ai, a_row, a_col, b, ldb, ci, ldc, accumulate);
    if (rest == 2) small_mm_rows<2>(n, k, ai, a_row, a_col, b, ldb, ci, ldc, accumulate);
    if (rest == 1) small_mm_rows<1>(n, k, ai, a_row, a_col, b, ldb, ci, ldc, accumulate);
    return;
  }
#endif
  // BLAS: A as stored (a_col == 1: row-major, lda = a_row; a_row == 1: A^T row-major, lda = a_col)
  const bool trans_a = a_col != 1;
  mm<T>(trans_a, false, m, n, k, T(1), a, trans_a ? a_col : a_row, b, ldb, accumulate ? T(1) : T(0), c, ldc);
}

// The network's parameters as raw pointers (all contiguous, in the compute dtype T).
template <typename T>
struct Net {
  int64_t dim, seq_len;
  bool outer;
  std::vector<int64_t> widths;  // H_1 .. H_L
  const T* w_u;                 // [H1, D]
  const T* b1;                  // [H1]
  const T* base;                // [D, H1]
  const T* mq;                  // [D, H1] (concat) or [D, D * H1] (outer)
  std::vector<const T*> w, b;   // layers 2..L: w[l - 1] [H_l, H_{l-1}], b[l - 1] [H_l] (index 0 unused)
  const T* w_out;               // [H_L]
  T b_out;
  int64_t act;
  std::vector<const T*> alpha, mean, rstd;  // per layer [H_l] (prelu, dice)
  bool softmax;
  T scale;
  bool has_scale;
  int64_t threads = 0;  // threads for the blocks; 0: torch's intra-op setting
  int64_t candidates = 1;  // query rows per history: row r scores keys[r / candidates]

  int64_t layers() const { return static_cast<int64_t>(widths.size()); }
  int64_t h1() const { return widths[0]; }
  int64_t mq_cols() const { return outer ? dim * widths[0] : widths[0]; }
  bool saves_z() const { return act == kPrelu || act == kDice; }
};

// Gradient partial of one block: offsets into a flat vector, in the order the op returns the gradients.
struct GradLayout {
  std::vector<int64_t> offset, size;  // d_wu, d_b1, d_base, d_mq, (dW_l, db_l) for l >= 2, d_wout, d_bout, dalpha_l
  int64_t total = 0;
  template <typename T>
  explicit GradLayout(const Net<T>& net) {
    const int64_t d = net.dim, h1 = net.h1();
    add(h1 * d);
    add(h1);
    add(d * h1);
    add(d * net.mq_cols());
    for (int64_t l = 1; l < net.layers(); ++l) {
      add(net.widths[l] * net.widths[l - 1]);
      add(net.widths[l]);
    }
    add(net.widths.back());
    add(1);
    if (net.act == kPrelu || net.act == kDice)
      for (int64_t width : net.widths) add(width);
  }
  void add(int64_t n) {
    offset.push_back(total);
    size.push_back(n);
    total += n;
  }
};

// Rows [row_begin, row_end), all their valid positions; or, for a segment (t_end >= 0), positions
// [t_begin, t_end) of the single row row_begin.
struct Block {
  int64_t row_begin, row_end, positions;
  int64_t t_begin = 0, t_end = -1;
  bool segment() const { return t_end >= 0; }
};

// Blocks of consecutive rows of about ``target`` valid positions each: they depend on the lengths only, never
// on the thread count, so the results do not either. With ``group`` > 1 a block ends only after a multiple
// of ``group`` rows (the candidate rows of one history stay in one block, whose keys gradient they sum) and
// a row is never split; with ``group`` = 1 a row longer than ``target`` becomes segments of ``target``
// positions, so that no block's workspace grows with T (a lifelong history: its softmax and pooling are
// finished per row after the blocks, ``finish_segmented_rows``).
std::vector<Block> make_blocks(const int64_t* lengths, int64_t batch, int64_t target, int64_t group) {
  std::vector<Block> blocks;
  int64_t start = 0, positions = 0;
  for (int64_t i = 0; i < batch; ++i) {
    if (group == 1 && lengths[i] > target) {
      if (start < i) blocks.push_back({start, i, positions});
      for (int64_t t0 = 0; t0 < lengths[i]; t0 += target) {
        const int64_t t1 = std::min(lengths[i], t0 + target);
        blocks.push_back({i, i + 1, t1 - t0, t0, t1});
      }
      start = i + 1;
      positions = 0;
      continue;
    }
    positions += lengths[i];
    if ((positions >= target && (i + 1) % group == 0) || i == batch - 1) {
      blocks.push_back({start, i + 1, positions});
      start = i + 1;
      positions = 0;
    }
  }
  return blocks;
}


// Per-thread scratch, kept between calls (``thread_workspace``): grown to the largest block seen, never
// shrunk, so that its pages are faulted in once (a fresh multi-MB buffer per call costs page faults).
template <typename T>
struct Workspace {
  std::vector<Buffer<T>> h, z, p;  // per layer [P, H_l]: activations, pre-activations, Dice gates
  Buffer<T> s, ds, dh_a, dh_b, u, du, m, dm, m_t;
  void reserve(const Net<T>& net, int64_t positions, int64_t rows, bool backward) {
    const int64_t layers = net.layers(), h1 = net.h1(), d = net.dim;
    int64_t widest = 0;
    if (static_cast<int64_t>(h.size()) < layers) {
      h.resize(layers);
      z.resize(layers);
      p.resize(layers);
    }
    for (int64_t l = 0; l < layers; ++l) {
      widest = std::max(widest, net.widths[l]);
      grow(h[l], positions * net.widths[l]);
      if (net.saves_z()) grow(z[l], positions * net.widths[l]);
      if (net.act == kDice) grow(p[l], positions * net.widths[l]);
    }
    grow(s, positions);
    grow(u, rows * h1);
    grow(m, d * h1);
    if (backward) {
      grow(ds, positions);
      grow(dh_a, positions * widest);
      grow(dh_b, positions * widest);
      grow(du, rows * h1);
      grow(dm, d * h1);
      grow(m_t, d * h1);
    }
  }
};

template <typename T>
Workspace<T>& thread_workspace() {
  thread_local Workspace<T> workspace;
  return workspace;
}

// Where one block's activations live: the thread's workspace, or the caller's ``saved`` buffer.
template <typename T>
struct Acts {
  std::vector<T*> h, z, p;  // per layer [P, H_l]; z for prelu/dice, p for dice (else null)
};

// Floats one block's kept activations take in ``saved``: every layer's activations, plus z (prelu, dice)
// and p (dice), each array starting on a 64-byte boundary.
template <typename T>
int64_t saved_block_floats(const Net<T>& net, int64_t positions) {
  const int64_t arrays = 1 + (net.saves_z() ? 1 : 0) + (net.act == kDice ? 1 : 0);
  int64_t floats = 0;
  for (int64_t width : net.widths) floats += arrays * aligned_size<T>(positions * width);
  return floats;
}

template <typename T>
Acts<T> workspace_acts(const Net<T>& net, Workspace<T>& ws) {
  Acts<T> acts;
  for (int64_t l = 0; l < net.layers(); ++l) {
    acts.h.push_back(ws.h[l].data());
    acts.z.push_back(net.saves_z() ? ws.z[l].data() : nullptr);
    acts.p.push_back(net.act == kDice ? ws.p[l].data() : nullptr);
  }
  return acts;
}

template <typename T>
Acts<T> saved_acts(const Net<T>& net, T* base, int64_t positions) {
  Acts<T> acts;
  for (int64_t l = 0; l < net.layers(); ++l) {
    const int64_t size = aligned_size<T>(positions * net.widths[l]);
    acts.h.push_back(base);
    base += size;
    acts.z.push_back(net.saves_z() ? base : nullptr);
    base += net.saves_z() ? size : 0;
    acts.p.push_back(net.act == kDice ? base : nullptr);
    base += net.act == kDice ? size : 0;
  }
  return acts;
}

// Offsets into ``saved`` of the leading blocks whose activations fit in ``capacity`` floats (the others are
// recomputed by the backward); the forward and the backward derive the same list from the same inputs.
template <typename T>
std::vector<int64_t> saved_offsets(const Net<T>& net, const std::vector<Block>& blocks, int64_t capacity) {
  std::vector<int64_t> offsets;
  int64_t used = 0;
  for (const auto& blk : blocks) {
    const int64_t floats = saved_block_floats(net, blk.positions);
    if (used + floats > capacity) break;
    offsets.push_back(used);
    used += floats;
  }
  return offsets;
}


// h = act(z) in place on [n, width]; keeps z (and the Dice gate p) when the backward needs them.
template <typename T>
void activate(const Net<T>& net, int64_t layer, T* x, int64_t n, int64_t width, T* z_saved, T* p_saved) {
  const int64_t count = n * width;
  switch (net.act) {
    case kIdentity:
      return;
    case kSigmoid:
      sigmoid_(x, count);
      return;
    case kRelu:
      for (int64_t i = 0; i < count; ++i) x[i] = x[i] > T(0) ? x[i] : T(0);
      return;
    case kPrelu: {
      const T* a = net.alpha[layer];
      std::copy(x, x + count, z_saved);
      for (int64_t r = 0; r < n; ++r) {
        T* row = x + r * width;
        for (int64_t j = 0; j < width; ++j) row[j] = row[j] >= T(0) ? row[j] : row[j] * a[j];
      }
      return;
    }
    case kDice: {
      const T *a = net.alpha[layer], *mean = net.mean[layer], *rstd = net.rstd[layer];
      T* z = z_saved;  // always given for Dice
      std::copy(x, x + count, z);
      for (int64_t r = 0; r < n; ++r) {
        T* row = x + r * width;
        for (int64_t j = 0; j < width; ++j) row[j] = (row[j] - mean[j]) * rstd[j];
      }
      sigmoid_(x, count);  // x = p
      if (p_saved) std::copy(x, x + count, p_saved);
      for (int64_t r = 0; r < n; ++r) {
        T* row = x + r * width;
        const T* zr = z + r * width;
        for (int64_t j = 0; j < width; ++j) row[j] = zr[j] * (a[j] + (T(1) - a[j]) * row[j]);
      }
      return;
    }
  }
}

// dh -> dz in place on [n, width]; accumulates dalpha [width] (prelu, dice).
template <typename T>
void activate_backward(const Net<T>& net, int64_t layer, T* dh, const T* h, const T* z, const T* p, int64_t n,
                       int64_t width, T* dalpha) {
  const int64_t count = n * width;
  switch (net.act) {
    case kIdentity:
      return;
    case kSigmoid:
      for (int64_t i = 0; i < count; ++i) dh[i] *= h[i] * (T(1) - h[i]);
      return;
    case kRelu:
      for (int64_t i = 0; i < count; ++i) dh[i] = h[i] > T(0) ? dh[i] : T(0);
      return;
    case kPrelu: {
      const T* a = net.alpha[layer];
      for (int64_t r = 0; r < n; ++r) {
        T* g = dh + r * width;
        const T* zr = z + r * width;
        for (int64_t j = 0; j < width; ++j) {
          const bool negative = zr[j] < T(0);
          dalpha[j] += negative ? g[j] * zr[j] : T(0);
          g[j] = negative ? g[j] * a[j] : g[j];
        }
      }
      return;
    }
    case kDice: {
      const T *a = net.alpha[layer], *rstd = net.rstd[layer];
      for (int64_t r = 0; r < n; ++r) {
        T* g = dh + r * width;
        const T *zr = z + r * width, *pr = p + r * width;
        for (int64_t j = 0; j < width; ++j) {
          const T one_minus_p = T(1) - pr[j];
          dalpha[j] += g[j] * zr[j] * one_minus_p;
          g[j] *= a[j] + (T(1) - a[j]) * pr[j] * (T(1) + zr[j] * one_minus_p * rstd[j]);
        }
      }
      return;
    }
  }
}

// M_b [D, H1] of one row.
template <typename T>
void build_m(const Net<T>& net, const T* q, T* m) {
  const int64_t d = net.dim, h1 = net.h1();
  if (net.outer) {
    std::copy(net.base, net.base + d * h1, m);
    mm<T>(false, false, 1, d * h1, d, T(1), q, d, net.mq, d * h1, T(1), m, d * h1);
    return;
  }
  for (int64_t i = 0; i < d; ++i) {
    const T *base = net.base + i * h1, *mq = net.mq + i * h1;
    T* row = m + i * h1;
    for (int64_t j = 0; j < h1; ++j) row[j] = base[j] + q[i] * mq[j];
  }
}

// First-layer pre-activations z1 = u_b + k M_b of a block's valid positions into ``z1`` [P, H1], packed row
// after row.
template <typename T>
void first_layer_z(const Net<T>& net, const T* query, const T* keys, const int64_t* lengths, const Block& blk,
                   Workspace<T>& ws, T* z1) {
  const int64_t d = net.dim, h1 = net.h1(), rows = blk.row_end - blk.row_begin;
  // u for every row of the block at once: U = Q W_u^T  [rows, H1]
  mm<T>(false, true, rows, h1, d, T(1), query + blk.row_begin * d, d, net.w_u, d, T(0), ws.u.data(), h1);
  int64_t offset = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = blk.row_begin + r, length = blk.segment() ? blk.positions : lengths[row];
    if (length == 0) continue;
    build_m(net, query + row * d, ws.m.data());
    T* z = z1 + offset * h1;
    // z = (u + b1) first, then the product accumulated into it (beta = 1): one pass over z fewer than
    // writing the product (BLAS zeroes C first when beta = 0) and adding the bias after
    T* u = ws.u.data() + r * h1;
    for (int64_t j = 0; j < h1; ++j) u[j] += net.b1[j];
    for (int64_t t = 0; t < length; ++t) std::copy(u, u + h1, z + t * h1);
    small_mm<T>(length, h1, d, keys + ((row / net.candidates) * net.seq_len + blk.t_begin) * d, d, 1, ws.m.data(),
                h1, z, h1, true);
    offset += length;
  }
}

// s = (h_L w_out + b_out) * scale over n positions.
template <typename T>
void output_scores(const Net<T>& net, const T* h_last, int64_t n, T* s) {
  const int64_t last = net.widths.back();
  mm<T>(false, false, n, 1, last, T(1), h_last, last, net.w_out, 1, T(0), s, 1);
  for (int64_t i = 0; i < n; ++i) s[i] = (s[i] + net.b_out) * (net.has_scale ? net.scale : T(1));
}

// Scores of a block's valid positions into ws.s [P], packed row after row; every layer's activations
// (and z, p where the activation needs them) into ``acts``.
template <typename T>
void block_scores(const Net<T>& net, const T* query, const T* keys, const int64_t* lengths, const Block& blk,
                  Workspace<T>& ws, const Acts<T>& acts) {
  const int64_t n = blk.positions;
  first_layer_z(net, query, keys, lengths, blk, ws, acts.h[0]);
  for (int64_t l = 0; l < net.layers(); ++l) {
    const int64_t width = net.widths[l];
    T* x = acts.h[l];
    if (l > 0) {
      const int64_t prev = net.widths[l - 1];
      const T* bias = net.b[l];
      for (int64_t i = 0; i < n; ++i) std::copy(bias, bias + width, x + i * width);  // then beta = 1, as above
      mm<T>(false, true, n, width, prev, T(1), acts.h[l - 1], prev, net.w[l], prev, T(1), x, width);
    }
    activate(net, l, x, n, width, acts.z[l], acts.p[l]);
  }
  output_scores(net, acts.h.back(), n, ws.s.data());
}

template <typename T>
Net<T> make_net(const at::Tensor& keys, const at::Tensor& w_u, const at::Tensor& b1, const at::Tensor& base,
                const at::Tensor& mq, bool outer, at::TensorList layer_w, at::TensorList layer_b,
                const at::Tensor& w_out, const at::Tensor& b_out, int64_t act, at::TensorList alphas,
                at::TensorList means, at::TensorList rstds, bool softmax, std::optional<double> scale) {
  Net<T> net;
  net.dim = keys.size(2);
  net.seq_len = keys.size(1);
  net.outer = outer;
  net.widths.push_back(w_u.size(0));
  net.w.push_back(nullptr);
  net.b.push_back(nullptr);
  for (size_t l = 0; l < layer_w.size(); ++l) {
    net.widths.push_back(layer_w[l].size(0));
    net.w.push_back(layer_w[l].data_ptr<T>());
    net.b.push_back(layer_b[l].data_ptr<T>());
  }
  net.w_u = w_u.data_ptr<T>();
  net.b1 = b1.data_ptr<T>();
  net.base = base.data_ptr<T>();
  net.mq = mq.data_ptr<T>();
  net.w_out = w_out.data_ptr<T>();
  net.b_out = b_out.item<T>();
  net.act = act;
  for (const auto& a : alphas) net.alpha.push_back(a.data_ptr<T>());
  for (const auto& m : means) net.mean.push_back(m.data_ptr<T>());
  for (const auto& r : rstds) net.rstd.push_back(r.data_ptr<T>());
  net.softmax = softmax;
  net.has_scale = scale.has_value();
  net.scale = static_cast<T>(scale.value_or(1.0));
  return net;
}

int64_t act_code_check(int64_t act) {
  TORCH_CHECK(act >= kIdentity && act <= kDice, "din_kernels_cpu: unknown activation code ", act);
  return act;
}

void check_inputs(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& lengths,
                  std::vector<at::Tensor> params, int64_t act, at::TensorList alphas, at::TensorList means,
                  int64_t layers) {
  TORCH_CHECK(keys.dim() == 3 && query.dim() == 2 && lengths.dim() == 1, "din_kernels_cpu: bad ranks");
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "din_kernels_cpu: lengths must be int64");
  TORCH_CHECK(keys.size(1) * keys.size(2) < std::numeric_limits<int>::max() / 4, "din_kernels_cpu: T * D too large");
  params.push_back(query);
  params.push_back(keys);
  params.push_back(lengths);
  for (const auto& t : params) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "din_kernels_cpu: inputs must be contiguous CPU tensors");
  }
  // query [R, D] and lengths [R]: R = B * C rows, C candidates per history (C = 1 but in the forward)
  const int64_t rows = query.size(0), batch = keys.size(0);
  TORCH_CHECK(lengths.size(0) == rows && query.size(1) == keys.size(2) &&
              (batch ? rows % batch == 0 : rows == 0),
              "din_kernels_cpu: query [B * C, D], keys [B, T, D] and lengths [B * C] disagree");
  const int64_t candidates = batch ? rows / batch : 1;
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(len[i] >= 0 && len[i] <= keys.size(1), "din_kernels_cpu: lengths must lie in [0, T]");
    TORCH_CHECK(len[i] == len[i - i % candidates], "din_kernels_cpu: the rows of one history must share its length");
  }
  act_code_check(act);
  if (act == kPrelu || act == kDice) TORCH_CHECK(static_cast<int64_t>(alphas.size()) == layers, "din_kernels_cpu: alphas");
  if (act == kDice) TORCH_CHECK(static_cast<int64_t>(means.size()) == layers, "din_kernels_cpu: dice statistics");
}

std::vector<at::Tensor> all_params(const at::Tensor& w_u, const at::Tensor& b1, const at::Tensor& base,
                                   const at::Tensor& mq, at::TensorList layer_w, at::TensorList layer_b,
                                   const at::Tensor& w_out, const at::Tensor& b_out, at::TensorList alphas,
                                   at::TensorList means, at::TensorList rstds) {
  std::vector<at::Tensor> params{w_u, b1, base, mq, w_out, b_out};
  for (auto list : {layer_w, layer_b, alphas, means, rstds})
    for (const auto& t : list) params.push_back(t);
  return params;
}

// Positions per block: large enough that the BLAS calls run efficiently, small enough that a block's
// activations stay in L2 (2048 x (80 + 40) fp32 = ~1 MB), and at least ~16 blocks per call where the problem
// allows, so that a thread that loses its core holds back little work. A function of the problem only.
int64_t block_target(int64_t total_positions, int64_t grad_floats) {
  int64_t target = std::clamp<int64_t>((total_positions + 11) / 12, 768, 4096);
  // bound the per-block gradient partials to ~8 M floats in all
  const int64_t max_blocks = std::max<int64_t>(1, (8 << 20) / std::max<int64_t>(grad_floats, 1));
  return std::max(target, (total_positions + max_blocks - 1) / max_blocks);
}

// The call's blocks (the same for the forward and the backward of one problem) and their largest sizes.
struct Plan {
  std::vector<Block> blocks;
  int64_t max_positions = 0, max_rows = 0;
};

// ``group``: rows a block may not split (``make_blocks``); the forward that keeps activations for a backward
// must cut the backward's blocks.
// ``whole_rows``: no row is cut into segments (the target is raised to the longest row).
template <typename T>
Plan make_plan(const Net<T>& net, const int64_t* lengths, int64_t batch, int64_t group, bool whole_rows = false) {
  Plan plan;
  int64_t total = 0, longest = 0;
  for (int64_t i = 0; i < batch; ++i) {
    total += lengths[i];
    longest = std::max(longest, lengths[i]);
  }
  if (batch == 0) return plan;
  const int64_t target = block_target(total, GradLayout(net).total);
  plan.blocks = make_blocks(lengths, batch, whole_rows ? std::max(target, longest) : target, group);
  for (const auto& blk : plan.blocks) {
    plan.max_positions = std::max(plan.max_positions, blk.positions);
    plan.max_rows = std::max(plan.max_rows, blk.row_end - blk.row_begin);
  }
  return plan;
}

// A row's final weights from its scores s [length] (in place) into attn [R, T] (zeros over the padding), its
// pooled output sum_t w_t k_t into out [R, D] and, with softmax, its log-sum-exp into lse [R].
template <typename T>
void finish_row(const Net<T>& net, int64_t row, int64_t length, T* s, const T* keys, T* attn, T* lse, T* out) {
  const int64_t d = net.dim, seq_len = net.seq_len;
  T* wr = attn + row * seq_len;
  std::fill(wr + length, wr + seq_len, T(0));
  if (net.softmax) lse[row] = 0;
  if (length == 0) {
    std::fill(out + row * d, out + (row + 1) * d, T(0));
    return;
  }
  if (net.softmax) {
    const T top = *std::max_element(s, s + length);
    T sum = 0;
    for (int64_t t = 0; t < length; ++t) sum += (s[t] = std::exp(s[t] - top));
    for (int64_t t = 0; t < length; ++t) s[t] /= sum;
    lse[row] = top + std::log(sum);
  }
  if (s != wr) std::copy(s, s + length, wr);
  mm<T>(false, false, 1, d, length, T(1), s, length, keys + (row / net.candidates) * seq_len * d, d, T(0),
        out + row * d, d);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Net<T>& net, const at::Tensor& query,
                                                           const at::Tensor& keys, const at::Tensor& lengths,
                                                           at::Tensor& saved) {
  const int64_t batch = query.size(0), seq_len = keys.size(1), d = keys.size(2);  // batch: query rows
  // every entry is written by the block that owns its row (no separate zero-filling pass)
  at::Tensor out = at::empty({batch, d}, keys.options());
  at::Tensor attn = at::empty({batch, seq_len}, keys.options());
  const int64_t lse_size = net.softmax ? batch : 0;
  at::Tensor lse = at::empty({lse_size}, keys.options());
  const int64_t* len = lengths.data_ptr<int64_t>();
  // serving (nothing kept) spreads a history's candidates over blocks; training cuts the backward's blocks
  const Plan plan = make_plan(net, len, batch, saved.numel() ? net.candidates : 1);
  const auto kept = saved_offsets(net, plan.blocks, saved.numel());
  const T* q = query.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  T* o = out.data_ptr<T>();
  T* w = attn.data_ptr<T>();
  T* l = lse.data_ptr<T>();
  T* saved_base = saved.numel() ? saved.data_ptr<T>() : nullptr;
  auto finish = [&](int64_t row, T* s) { finish_row(net, row, len[row], s, k, w, l, o); };
  std::vector<int64_t> segmented;  // rows cut into segments: finished after every block has scored them
  for (const auto& blk : plan.blocks)
    if (blk.segment() && blk.t_begin == 0) segmented.push_back(blk.row_begin);
  run_blocks(static_cast<int64_t>(plan.blocks.size()), net.threads, [&](int64_t index) {
    const Block& blk = plan.blocks[index];
    Workspace<T>& ws = thread_workspace<T>();
    ws.reserve(net, plan.max_positions, plan.max_rows, false);
    const bool keep = index < static_cast<int64_t>(kept.size());
    const Acts<T> acts = keep ? saved_acts(net, saved_base + kept[index], blk.positions) : workspace_acts(net, ws);
    if (blk.positions) block_scores(net, q, k, len, blk, ws, acts);
    if (blk.segment()) {  // its raw scores into the row's weights; the row is finished below
      std::copy(ws.s.data(), ws.s.data() + blk.positions, w + blk.row_begin * seq_len + blk.t_begin);
      return;
    }
    int64_t offset = 0;
    for (int64_t row = blk.row_begin; row < blk.row_end; ++row) {
      finish(row, ws.s.data() + offset);
      offset += len[row];
    }
  });
  run_blocks(static_cast<int64_t>(segmented.size()), net.threads, [&](int64_t index) {
    const int64_t row = segmented[index];
    finish(row, w + row * seq_len);
  });
  return {out, attn, lse};
}

// The scores' gradient ds [P] of a block's rows, packed row after row: dw = k g_out, then with softmax
// ds = w (dw - sum_t w dw) (``row_delta`` holds that sum for a segmented row), times the scale.
template <typename T>
void score_grads(const Net<T>& net, const Block& blk, const int64_t* len, const T* k, const T* g_out, const T* w,
                 const std::vector<T>& row_delta, T* ds_all) {
  const int64_t d = net.dim, seq_len = net.seq_len, candidates = net.candidates, t_begin = blk.t_begin;
  int64_t offset = 0;
  for (int64_t row = blk.row_begin; row < blk.row_end; ++row) {
    const int64_t length = blk.segment() ? blk.positions : len[row];
    if (length == 0) continue;
    T* ds = ds_all + offset;
    const T* wr = w + row * seq_len + t_begin;
    mm<T>(false, false, length, 1, d, T(1), k + ((row / candidates) * seq_len + t_begin) * d, d, g_out + row * d, 1,
          T(0), ds, 1);
    if (net.softmax) {
      T dot = 0;
      if (blk.segment()) {
        dot = row_delta[row];
      } else {
        for (int64_t t = 0; t < length; ++t) dot += wr[t] * ds[t];
      }
      for (int64_t t = 0; t < length; ++t) ds[t] = wr[t] * (ds[t] - dot);
    }
    if (net.has_scale)
      for (int64_t t = 0; t < length; ++t) ds[t] *= net.scale;
    offset += length;
  }
}

// The first layer's backward over a block's rows from dz1 [P, H1] (packed row after row): per row
// du = sum_t dz1, dM = k^T dz1, dk = dz1 M^T + w g_out, d_base += dM, d_mq, dq; then the block's rows at once
// dQ += DU W_u, dW_u += DU^T Q, db1 += sum DU. dq_block [rows, D] must be zeroed by the caller.
template <typename T>
void first_layer_backward(const Net<T>& net, const Block& blk, const int64_t* len, const T* q, const T* k,
                          const T* w, const T* g_out, const T* dz1, Workspace<T>& ws, T* dq_block, T* dk_all,
                          T* d_wu, T* d_b1, T* d_base, T* d_mq) {
  const int64_t d = net.dim, h1 = net.h1(), seq_len = net.seq_len, candidates = net.candidates;
  const int64_t rows = blk.row_end - blk.row_begin, n = blk.positions, t_begin = blk.t_begin;
  std::fill(ws.du.begin(), ws.du.begin() + rows * h1, T(0));
  int64_t offset = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = blk.row_begin + r, length = blk.segment() ? n : len[row];
    if (length == 0) continue;
    const T* dz = dz1 + offset * h1;
    const T* kr = k + ((row / candidates) * seq_len + t_begin) * d;
    const T* qr = q + row * d;
    T* du = ws.du.data() + r * h1;
    for (int64_t t = 0; t < length; ++t)
      for (int64_t j = 0; j < h1; ++j) du[j] += dz[t * h1 + j];
    T* dm = ws.dm.data();
    small_mm<T>(d, h1, length, kr, 1, d, dz, h1, dm, h1, false);  // k^T dz1 [D, H1]
    build_m(net, qr, ws.m.data());
    T* dk = dk_all + ((row / candidates) * seq_len + t_begin) * d;
    const T* wr = w + row * seq_len + t_begin;
    const T* go = g_out + row * d;
    // the pooling term w g_out first (added to the other candidates' when there are several), then dz1 M^T
    // added (beta = 1)
    if (candidates == 1) {
      for (int64_t t = 0; t < length; ++t)
        for (int64_t c = 0; c < d; ++c) dk[t * d + c] = wr[t] * go[c];
    } else {
      for (int64_t t = 0; t < length; ++t)
        for (int64_t c = 0; c < d; ++c) dk[t * d + c] += wr[t] * go[c];
    }
    T* m_t = ws.m_t.data();  // M_b^T [H1, D], for small_mm's row-major B
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < h1; ++j) m_t[j * d + i] = ws.m[i * h1 + j];
    small_mm<T>(length, d, h1, dz, h1, 1, m_t, d, dk, d, true);
    T* dq = dq_block + r * d;
    for (int64_t i = 0; i < d * h1; ++i) d_base[i] += dm[i];
    if (net.outer) {
      mm<T>(true, false, d, d * h1, 1, T(1), qr, d, dm, d * h1, T(1), d_mq, d * h1);  // q dM_flat^T
      mm<T>(false, true, 1, d, d * h1, T(1), dm, d * h1, net.mq, d * h1, T(1), dq, d);
    } else {
      for (int64_t i = 0; i < d; ++i) {
        const T* dmr = dm + i * h1;
        const T* mqr = net.mq + i * h1;
        T* dmq = d_mq + i * h1;
        T acc = 0;
        for (int64_t j = 0; j < h1; ++j) {
          dmq[j] += qr[i] * dmr[j];
          acc += dmr[j] * mqr[j];
        }
        dq[i] += acc;
      }
    }
    offset += length;
  }
  // the block's rows at once: dQ += DU W_u, dW_u += DU^T Q, db1 += sum DU
  mm<T>(false, false, rows, d, h1, T(1), ws.du.data(), h1, net.w_u, d, T(1), dq_block, d);
  mm<T>(true, false, h1, d, rows, T(1), ws.du.data(), h1, q + blk.row_begin * d, d, T(1), d_wu, d);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < h1; ++j) d_b1[j] += ws.du[r * h1 + j];
}

// Zeros where a block's rows get no other write: its rows of dq (``dq_block``), the padding of their keys
// gradient (a segment: its row's padding, once; several candidates: the block's histories whole, which
// their rows add into).
template <typename T>
void zero_block_grads(const Net<T>& net, const Block& blk, const int64_t* len, T* dq_block, T* dk_all) {
  const int64_t d = net.dim, seq_len = net.seq_len, candidates = net.candidates;
  std::fill(dq_block, dq_block + (blk.row_end - blk.row_begin) * d, T(0));
  if (blk.segment()) {
    const int64_t row = blk.row_begin;
    if (blk.t_begin == 0)  // the row's padding, once
      std::fill(dk_all + (row * seq_len + len[row]) * d, dk_all + (row + 1) * seq_len * d, T(0));
  } else if (candidates == 1) {
    for (int64_t row = blk.row_begin; row < blk.row_end; ++row)  // padding (and empty rows) get zeros
      std::fill(dk_all + (row * seq_len + len[row]) * d, dk_all + (row + 1) * seq_len * d, T(0));
  } else {  // the block's histories, whole: their rows add into them
    std::fill(dk_all + blk.row_begin / candidates * seq_len * d, dk_all + blk.row_end / candidates * seq_len * d,
              T(0));
  }
}

// The output layer's backward over n positions: d_wout += h_L^T ds, d_bout += sum ds, dh = ds w_out^T [n, H_L].
template <typename T>
void output_layer_backward(const Net<T>& net, const T* h_last, const T* ds, int64_t n, T* d_wout, T* d_bout,
                           T* dh) {
  const int64_t last = net.widths.back();
  mm<T>(true, false, last, 1, n, T(1), h_last, last, ds, 1, T(1), d_wout, 1);
  T db_out = 0;
  for (int64_t i = 0; i < n; ++i) db_out += ds[i];
  *d_bout += db_out;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < last; ++j) dh[i * last + j] = ds[i] * net.w_out[j];
}

// The weight gradients: the block partials summed in block order (deterministic whatever thread ran which
// block), one tensor per ``GradLayout`` entry.
template <typename T>
std::vector<at::Tensor> summed_partials(const GradLayout& layout, const Buffer<T>& partials, int64_t nblocks,
                                        int64_t stride, const at::TensorOptions& options) {
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < layout.offset.size(); ++i) {
    at::Tensor grad = at::zeros({layout.size[i]}, options);
    T* g = grad.data_ptr<T>();
    for (int64_t b = 0; b < nblocks; ++b) {
      const T* src = partials.data() + b * stride + layout.offset[i];
      for (int64_t j = 0; j < layout.size[i]; ++j) g[j] += src[j];
    }
    grads.push_back(grad);
  }
  return grads;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> backward_impl(
    const Net<T>& net, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& keys,
    const at::Tensor& lengths, const at::Tensor& attn, const at::Tensor& saved) {
  // batch: query rows (B * C); the keys gradient of a history sums over its C rows, all in one block
  const int64_t batch = query.size(0), seq_len = keys.size(1), d = keys.size(2), h1 = net.h1();
  const int64_t candidates = net.candidates;
  at::Tensor d_query = at::empty_like(query);  // written row by row by the owning block
  at::Tensor d_keys = at::empty_like(keys);
  const GradLayout layout(net);
  const int64_t* len = lengths.data_ptr<int64_t>();
  const Plan plan = make_plan(net, len, batch, candidates);
  const auto kept = saved_offsets(net, plan.blocks, saved.numel());
  const int64_t nblocks = static_cast<int64_t>(plan.blocks.size());
  const int64_t stride = aligned_size<T>(layout.total);
  Buffer<T> partials(nblocks * stride, T(0));  // per-block weight gradients
  const T* q = query.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  const T* g_out = grad_out.data_ptr<T>();
  const T* w = attn.data_ptr<T>();
  T* dq_all = d_query.data_ptr<T>();
  T* dk_all = d_keys.data_ptr<T>();
  T* saved_base = saved.numel() ? const_cast<T*>(saved.data_ptr<T>()) : nullptr;
  const int64_t layers = net.layers();
  const int64_t out_slot = 4 + 2 * (layers - 1);  // d_wout in GradLayout
  // Rows cut into segments (lifelong histories, ``make_blocks``): each segment block writes its part of the
  // row's dq into ``segment_dq`` (summed into the row below, in segment order), and the softmax's
  // delta = sum_t w_t (k_t . g_out) of the whole row is computed first.
  std::vector<int64_t> segmented;
  for (const auto& blk : plan.blocks)
    if (blk.segment() && blk.t_begin == 0) segmented.push_back(blk.row_begin);
  Buffer<T> segment_dq(segmented.empty() ? 0 : nblocks * d, T(0));
  std::vector<T> row_delta(segmented.empty() || !net.softmax ? 0 : batch, T(0));
  run_blocks(net.softmax ? static_cast<int64_t>(segmented.size()) : 0, net.threads, [&](int64_t index) {
    const int64_t row = segmented[index], length = len[row], chunk = std::max<int64_t>(plan.max_positions, 1);
    Workspace<T>& ws = thread_workspace<T>();
    ws.reserve(net, plan.max_positions, plan.max_rows, true);
    T dot = 0;
    for (int64_t t0 = 0; t0 < length; t0 += chunk) {  // a chunk at a time: no [T] scratch
      const int64_t n = std::min(chunk, length - t0);
      mm<T>(false, false, n, 1, d, T(1), k + ((row / candidates) * seq_len + t0) * d, d, g_out + row * d, 1, T(0),
            ws.ds.data(), 1);
      const T* wr = w + row * seq_len + t0;
      for (int64_t t = 0; t < n; ++t) dot += wr[t] * ws.ds[t];
    }
    row_delta[row] = dot;
  });
  run_blocks(nblocks, net.threads, [&](int64_t index) {
    const Block& blk = plan.blocks[index];
    Workspace<T>& ws = thread_workspace<T>();
    ws.reserve(net, plan.max_positions, plan.max_rows, true);
    T* grads = partials.data() + index * stride;
    T* d_wu = grads + layout.offset[0];
    T* d_b1 = grads + layout.offset[1];
    T* d_base = grads + layout.offset[2];
    T* d_mq = grads + layout.offset[3];
    const int64_t n = blk.positions;
    // where the block's dq goes: its rows of d_query, or this segment's slot
    T* dq_block = blk.segment() ? segment_dq.data() + index * d : dq_all + blk.row_begin * d;
    zero_block_grads(net, blk, len, dq_block, dk_all);
    if (n == 0) return;
    const bool was_kept = index < static_cast<int64_t>(kept.size());
    const Acts<T> acts = was_kept ? saved_acts(net, saved_base + kept[index], n) : workspace_acts(net, ws);
    if (!was_kept) block_scores(net, q, k, len, blk, ws, acts);
    score_grads(net, blk, len, k, g_out, w, row_delta, ws.ds.data());
    T* dh = ws.dh_a.data();
    T* dh_prev = ws.dh_b.data();
    output_layer_backward(net, acts.h.back(), ws.ds.data(), n, grads + layout.offset[out_slot],
                          grads + layout.offset[out_slot + 1], dh);
    // hidden layers, last to first
    for (int64_t l = layers - 1; l >= 0; --l) {
      const int64_t width = net.widths[l];
      T* dalpha = (net.act == kPrelu || net.act == kDice) ? grads + layout.offset[out_slot + 2 + l] : nullptr;
      activate_backward(net, l, dh, acts.h[l], acts.z[l], acts.p[l], n, width, dalpha);
      if (l == 0) break;
      const int64_t prev = net.widths[l - 1];
      T* d_w = grads + layout.offset[4 + 2 * (l - 1)];
      T* d_b = grads + layout.offset[5 + 2 * (l - 1)];
      mm<T>(true, false, width, prev, n, T(1), dh, width, acts.h[l - 1], prev, T(1), d_w, prev);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < width; ++j) d_b[j] += dh[i * width + j];
      mm<T>(false, false, n, prev, width, T(1), dh, width, net.w[l], prev, T(0), dh_prev, prev);
      std::swap(dh, dh_prev);
    }
    // first layer: dh now holds dz1 [P, H1]
    first_layer_backward(net, blk, len, q, k, w, g_out, dh, ws, dq_block, dk_all, d_wu, d_b1, d_base, d_mq);
  });
  // a segmented row's dq: the sum of its segments', in segment order
  for (int64_t index = 0; index < nblocks; ++index) {
    const Block& blk = plan.blocks[index];
    if (!blk.segment()) continue;
    const T* part = segment_dq.data() + index * d;
    T* dq = dq_all + blk.row_begin * d;
    for (int64_t i = 0; i < d; ++i) dq[i] = blk.t_begin == 0 ? part[i] : dq[i] + part[i];
  }
  return {d_query, d_keys, summed_partials(layout, partials, nblocks, stride, keys.options())};
}

// ----------------------------------------------------------------------------------------------------------
// Dice in training mode: batch statistics over every valid position of the call
// ----------------------------------------------------------------------------------------------------------
// Hidden layer l normalises z_l with the mean and biased variance of z_l over all the call's valid positions
// (padding never enters: only valid positions are scored), so no block can go on to layer l + 1 before every
// block has its z_l: the forward runs one queue of blocks per hidden layer plus one for the scores (L + 1
// "regions" instead of 1), and so does the backward, since BatchNorm's backward needs two sums over the whole
// call before any dz. Between regions the per-block partial sums are merged in block order (deterministic).
//     forward:  xhat = (z - mean) rstd,  rstd = (var + eps)^-1/2,  p = sigmoid(xhat),  h = z (a + (1 - a) p)
//     backward: g = dL/dh;  g_xhat = g z (1 - a) p (1 - p);  dalpha = sum g z (1 - p);
//               dz = g (a + (1 - a) p) + rstd (g_xhat - mean(g_xhat) - xhat mean(g_xhat xhat))
// z_l and p_l of every valid position are kept ([P, H_l] each, ``DiceKept``) for the next region and the
// backward, which rebuilds h_l = z_l (a + (1 - a) p_l) from them (no exp); the gradients travel between the
// backward's regions as [P, H_l] arrays too. One candidate row per history (the Python side runs several on
// the composite path), every row whole (``make_plan(whole_rows)``). Block moments are computed in double (two
// passes over the block) and merged with Chan et al.'s pairwise update: exact enough for fp64 gradcheck,
// robust to a large mean.

// z_l and p_l [P, H_l] of every valid position, packed in block order, layer after layer in one tensor.
template <typename T>
struct DiceKept {
  std::vector<T*> z, p;
  static int64_t floats(const Net<T>& net, int64_t positions) {
    int64_t floats = 0;
    for (int64_t width : net.widths) floats += 2 * aligned_size<T>(positions * width);
    return floats;
  }
  DiceKept(const Net<T>& net, T* base, int64_t positions) {
    for (int64_t width : net.widths) {
      z.push_back(base);
      base += aligned_size<T>(positions * width);
      p.push_back(base);
      base += aligned_size<T>(positions * width);
    }
  }
};

// Each block's valid positions (the counts ``merge_moments`` weighs the blocks' moments by).
inline std::vector<int64_t> block_counts(const std::vector<Block>& blocks) {
  std::vector<int64_t> counts;
  for (const auto& blk : blocks) counts.push_back(blk.positions);
  return counts;
}

// Each block's first position in the call's packed order.
inline std::vector<int64_t> block_firsts(const std::vector<Block>& blocks) {
  std::vector<int64_t> firsts;
  int64_t first = 0;
  for (const auto& blk : blocks) {
    firsts.push_back(first);
    first += blk.positions;
  }
  return firsts;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
dice_train_forward_impl(Net<T>& net, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& lengths,
                        at::Tensor& kept_tensor, double eps) {
  const HelperPasses passes;  // one pass of blocks per hidden layer, then the scores'
  const int64_t batch = query.size(0), seq_len = keys.size(1), d = keys.size(2), h1 = net.h1();
  const int64_t layers = net.layers();
  at::Tensor out = at::empty({batch, d}, keys.options());
  at::Tensor attn = at::empty({batch, seq_len}, keys.options());
  at::Tensor lse = at::empty({net.softmax ? batch : 0}, keys.options());
  const int64_t* len = lengths.data_ptr<int64_t>();
  const Plan plan = make_plan(net, len, batch, 1, /*whole_rows=*/true);
  const std::vector<int64_t> firsts = block_firsts(plan.blocks);
  int64_t total = 0;
  for (int64_t i = 0; i < batch; ++i) total += len[i];
  TORCH_CHECK(kept_tensor.numel() >= DiceKept<T>::floats(net, total),
              "din_kernels_cpu: the buffer for the kept activations is too small (attention_dice_train_floats)");
  const DiceKept<T> kept(net, kept_tensor.data_ptr<T>(), total);
  const T* q = query.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  T* o = out.data_ptr<T>();
  T* w = attn.data_ptr<T>();
  T* l_out = lse.data_ptr<T>();
  const int64_t nblocks = static_cast<int64_t>(plan.blocks.size());
  std::vector<LayerStats<T>> stats(layers);
  net.mean.assign(layers, nullptr);
  net.rstd.assign(layers, nullptr);
  std::vector<at::Tensor> means, vars;
  // region l < L: z_l of every block (layer 0: the first layer; else from h_{l-1} = Dice(z_{l-1})) and its
  // moments; region L: h_{L-1}, the scores, each row's softmax and pooling
  for (int64_t l = 0; l <= layers; ++l) {
    const int64_t width = l < layers ? net.widths[l] : 0;
    std::vector<double> moments(nblocks * 2 * width);
    run_blocks(nblocks, net.threads, [&](int64_t index) {
      const Block& blk = plan.blocks[index];
      const int64_t n = blk.positions, first = firsts[index];
      Workspace<T>& ws = thread_workspace<T>();
      ws.reserve(net, plan.max_positions, plan.max_rows, false);
      if (l == 0) {
        if (n) first_layer_z(net, q, k, len, blk, ws, kept.z[0] + first * h1);
      } else if (n) {
        const int64_t prev = net.widths[l - 1];
        T* h = ws.h[l - 1].data();
        dice_batch_forward(kept.z[l - 1] + first * prev, kept.p[l - 1] + first * prev, h, n, prev,
                           net.mean[l - 1], net.rstd[l - 1], net.alpha[l - 1]);
        if (l < layers) {
          T* z = kept.z[l] + first * width;
          for (int64_t i = 0; i < n; ++i) std::copy(net.b[l], net.b[l] + width, z + i * width);  // beta = 1
          mm<T>(false, true, n, width, prev, T(1), h, prev, net.w[l], prev, T(1), z, width);
        } else {
          output_scores(net, h, n, ws.s.data());
        }
      }
      if (l < layers) {
        block_moments(kept.z[l] + first * width, n, width, moments.data() + index * 2 * width,
                      moments.data() + index * 2 * width + width);
        return;
      }
      int64_t offset = 0;
      for (int64_t row = blk.row_begin; row < blk.row_end; ++row) {
        finish_row(net, row, len[row], ws.s.data() + offset, k, w, l_out, o);
        offset += len[row];
      }
    });
    if (l == layers) break;
    std::vector<double> mean, var;
    merge_moments(block_counts(plan.blocks), moments, width, mean, var);
    at::Tensor mean_t = at::empty({width}, keys.options()), var_t = at::empty({width}, keys.options());
    for (int64_t j = 0; j < width; ++j) {
      mean_t.data_ptr<T>()[j] = static_cast<T>(mean[j]);
      var_t.data_ptr<T>()[j] = static_cast<T>(var[j]);
    }
    stats[l].set(mean_t.data_ptr<T>(), var_t.data_ptr<T>(), width, eps);
    net.mean[l] = stats[l].mean.data();
    net.rstd[l] = stats[l].rstd.data();
    means.push_back(mean_t);
    vars.push_back(var_t);
  }
  return {out, attn, lse, means, vars};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> dice_train_backward_impl(
    Net<T>& net, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& keys,
    const at::Tensor& lengths, const at::Tensor& attn, at::TensorList means, at::TensorList vars,
    const at::Tensor& kept_tensor, at::Tensor& scratch, double eps) {
  const HelperPasses passes;  // a pass of blocks per layer, back to the first
  const int64_t batch = query.size(0), d = keys.size(2), layers = net.layers();
  at::Tensor d_query = at::empty_like(query);
  at::Tensor d_keys = at::empty_like(keys);
  const GradLayout layout(net);
  const int64_t* len = lengths.data_ptr<int64_t>();
  const Plan plan = make_plan(net, len, batch, 1, /*whole_rows=*/true);
  const std::vector<int64_t> firsts = block_firsts(plan.blocks);
  int64_t total = 0, widest = 0;
  for (int64_t i = 0; i < batch; ++i) total += len[i];
  for (int64_t width : net.widths) widest = std::max(widest, width);
  TORCH_CHECK(kept_tensor.numel() >= DiceKept<T>::floats(net, total) && scratch.numel() >= 2 * total * widest,
              "din_kernels_cpu: the kept activations or the scratch do not fit this problem");
  const DiceKept<T> kept(net, const_cast<T*>(kept_tensor.data_ptr<T>()), total);
  std::vector<LayerStats<T>> stats(layers);
  net.mean.assign(layers, nullptr);
  net.rstd.assign(layers, nullptr);
  for (int64_t l = 0; l < layers; ++l) {  // the forward's statistics, rstd computed as the forward did
    stats[l].set(means[l].data_ptr<T>(), vars[l].data_ptr<T>(), net.widths[l], eps);
    net.mean[l] = stats[l].mean.data();
    net.rstd[l] = stats[l].rstd.data();
  }
  const int64_t nblocks = static_cast<int64_t>(plan.blocks.size());
  const int64_t stride = aligned_size<T>(layout.total);
  Buffer<T> partials(nblocks * stride, T(0));
  // dL/dh of a layer, then of the one below, [P, H_l] each: in the caller's scratch (reused across calls:
  // fresh pages of that size cost their faults again every call)
  T* g_layer = scratch.data_ptr<T>();
  T* g_below = g_layer + total * widest;
  const T* q = query.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  const T* g_out = grad_out.data_ptr<T>();
  const T* w = attn.data_ptr<T>();
  T* dq_all = d_query.data_ptr<T>();
  T* dk_all = d_keys.data_ptr<T>();
  const int64_t out_slot = 4 + 2 * (layers - 1);  // d_wout in GradLayout
  const std::vector<T> no_delta;  // (no segmented rows)
  std::vector<double> sums(nblocks * 2 * widest);
  Buffer<T> c1(widest), c2(widest);
  auto merge_sums = [&](int64_t width) { merge_backward_sums(sums, nblocks, width, total, c1.data(), c2.data()); };
  // region 0: the scores' and the output layer's gradients, dL/dh_{L-1}, and that layer's sums
  const int64_t last = net.widths.back();
  std::fill(sums.begin(), sums.end(), 0.0);  // (a block without positions leaves its sums at zero)
  run_blocks(nblocks, net.threads, [&](int64_t index) {
    const Block& blk = plan.blocks[index];
    const int64_t n = blk.positions, first = firsts[index];
    zero_block_grads(net, blk, len, dq_all + blk.row_begin * d, dk_all);
    if (n == 0) return;
    Workspace<T>& ws = thread_workspace<T>();
    ws.reserve(net, plan.max_positions, plan.max_rows, true);
    T* grads = partials.data() + index * stride;
    const T *z = kept.z[layers - 1] + first * last, *p = kept.p[layers - 1] + first * last;
    T* h = ws.h[layers - 1].data();
    dice_output(z, p, h, n, last, net.alpha[layers - 1]);
    score_grads(net, blk, len, k, g_out, w, no_delta, ws.ds.data());
    T* g = g_layer + first * last;
    output_layer_backward(net, h, ws.ds.data(), n, grads + layout.offset[out_slot],
                          grads + layout.offset[out_slot + 1], g);
    dice_backward_sums(g, z, p, n, last, net.mean[layers - 1], net.rstd[layers - 1], net.alpha[layers - 1],
                       grads + layout.offset[out_slot + 2 + layers - 1], sums.data() + index * 2 * last,
                       sums.data() + index * 2 * last + last);
  });
  merge_sums(last);
  // region L - l: layer l's dz; below it layer l's weight gradients and dL/dh_{l-1} with its sums, or at l = 0
  // the first layer's backward
  for (int64_t l = layers - 1; l >= 0; --l) {
    const int64_t width = net.widths[l], prev = l > 0 ? net.widths[l - 1] : 0;
    std::fill(sums.begin(), sums.end(), 0.0);
    run_blocks(nblocks, net.threads, [&](int64_t index) {
      const Block& blk = plan.blocks[index];
      const int64_t n = blk.positions, first = firsts[index];
      if (n == 0) return;
      Workspace<T>& ws = thread_workspace<T>();
      ws.reserve(net, plan.max_positions, plan.max_rows, true);
      T* grads = partials.data() + index * stride;
      T* dz = ws.dh_a.data();
      dice_backward_dz(g_layer + first * width, kept.z[l] + first * width, kept.p[l] + first * width, dz, n,
                       width, net.mean[l], net.rstd[l], net.alpha[l], c1.data(), c2.data());
      if (l == 0) {
        first_layer_backward(net, blk, len, q, k, w, g_out, dz, ws, dq_all + blk.row_begin * d, dk_all,
                             grads + layout.offset[0], grads + layout.offset[1], grads + layout.offset[2],
                             grads + layout.offset[3]);
        return;
      }
      const T *z = kept.z[l - 1] + first * prev, *p = kept.p[l - 1] + first * prev;
      T* h = ws.h[l - 1].data();
      dice_output(z, p, h, n, prev, net.alpha[l - 1]);
      T* d_w = grads + layout.offset[4 + 2 * (l - 1)];
      T* d_b = grads + layout.offset[5 + 2 * (l - 1)];
      mm<T>(true, false, width, prev, n, T(1), dz, width, h, prev, T(1), d_w, prev);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < width; ++j) d_b[j] += dz[i * width + j];
      T* g = g_below + first * prev;
      mm<T>(false, false, n, prev, width, T(1), dz, width, net.w[l], prev, T(0), g, prev);
      dice_backward_sums(g, z, p, n, prev, net.mean[l - 1], net.rstd[l - 1], net.alpha[l - 1],
                         grads + layout.offset[out_slot + 2 + l - 1], sums.data() + index * 2 * prev,
                         sums.data() + index * 2 * prev + prev);
    });
    if (l == 0) break;
    merge_sums(prev);
    std::swap(g_layer, g_below);
  }
  return {d_query, d_keys, summed_partials(layout, partials, nblocks, stride, keys.options())};
}

// Floats ``saved`` needs to keep every block of this problem (the caller bounds the buffer it passes).
int64_t attention_saved_floats(const at::Tensor& lengths, int64_t dim, bool outer, std::vector<int64_t> widths,
                               int64_t act, int64_t candidates) {
  TORCH_CHECK(lengths.device().is_cpu() && lengths.dim() == 1 && lengths.scalar_type() == at::kLong &&
              lengths.is_contiguous(), "din_kernels_cpu: lengths must be a contiguous int64 CPU vector");
  Net<float> net;  // the shapes only: what the block partition depends on
  net.dim = dim;
  net.outer = outer;
  net.widths = std::move(widths);
  net.act = act_code_check(act);
  TORCH_CHECK(candidates >= 1, "din_kernels_cpu: candidates must be >= 1");
  const Plan plan = make_plan(net, lengths.data_ptr<int64_t>(), lengths.size(0), candidates);
  int64_t floats = 0;
  for (const auto& blk : plan.blocks) floats += saved_block_floats(net, blk.positions);
  return floats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& lengths, const at::Tensor& w_u,
    const at::Tensor& b1, const at::Tensor& base, const at::Tensor& mq, bool outer, at::TensorList layer_w,
    at::TensorList layer_b, const at::Tensor& w_out, const at::Tensor& b_out, int64_t act, at::TensorList alphas,
    at::TensorList means, at::TensorList rstds, bool softmax, std::optional<double> scale, at::Tensor& saved,
    int64_t threads) {
  auto params = all_params(w_u, b1, base, mq, layer_w, layer_b, w_out, b_out, alphas, means, rstds);
  params.push_back(saved);
  check_inputs(query, keys, lengths, params, act, alphas, means, 1 + static_cast<int64_t>(layer_w.size()));
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "din_kernels_cpu::attention_fwd", [&] {
    auto net = make_net<scalar_t>(keys, w_u, b1, base, mq, outer, layer_w, layer_b, w_out, b_out, act, alphas,
                                  means, rstds, softmax, scale);
    net.threads = threads;
    net.candidates = keys.size(0) ? query.size(0) / keys.size(0) : 1;
    result = forward_impl<scalar_t>(net, query, keys, lengths, saved);
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& lengths,
    const at::Tensor& attn, const at::Tensor& w_u, const at::Tensor& b1, const at::Tensor& base,
    const at::Tensor& mq, bool outer, at::TensorList layer_w, at::TensorList layer_b, const at::Tensor& w_out,
    const at::Tensor& b_out, int64_t act, at::TensorList alphas, at::TensorList means, at::TensorList rstds,
    bool softmax, std::optional<double> scale, const at::Tensor& saved, int64_t threads) {
  auto params = all_params(w_u, b1, base, mq, layer_w, layer_b, w_out, b_out, alphas, means, rstds);
  for (const auto& t : {grad_out, attn, saved}) params.push_back(t);
  check_inputs(query, keys, lengths, params, act, alphas, means, 1 + static_cast<int64_t>(layer_w.size()));
  std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "din_kernels_cpu::attention_bwd", [&] {
    auto net = make_net<scalar_t>(keys, w_u, b1, base, mq, outer, layer_w, layer_b, w_out, b_out, act, alphas,
                                  means, rstds, softmax, scale);
    net.threads = threads;
    net.candidates = keys.size(0) ? query.size(0) / keys.size(0) : 1;
    result = backward_impl<scalar_t>(net, grad_out, query, keys, lengths, attn, saved);
  });
  return result;
}

// (kept floats, backward scratch floats) that Dice in training needs for these lengths and hidden widths.
std::tuple<int64_t, int64_t> attention_dice_train_floats(const at::Tensor& lengths, std::vector<int64_t> widths,
                                                         bool fp64) {
  TORCH_CHECK(lengths.device().is_cpu() && lengths.dim() == 1 && lengths.scalar_type() == at::kLong &&
              lengths.is_contiguous(), "din_kernels_cpu: lengths must be a contiguous int64 CPU vector");
  int64_t total = 0;
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < lengths.size(0); ++i) total += std::max<int64_t>(len[i], 0);
  const int64_t widest = widths.empty() ? 0 : *std::max_element(widths.begin(), widths.end());
  auto kept = [&](auto zero) {
    Net<decltype(zero)> net;
    net.widths = widths;
    return DiceKept<decltype(zero)>::floats(net, total);
  };
  return {fp64 ? kept(0.0) : kept(0.0f), 2 * total * widest};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
attention_dice_train_fwd(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& lengths,
                         const at::Tensor& w_u, const at::Tensor& b1, const at::Tensor& base, const at::Tensor& mq,
                         bool outer, at::TensorList layer_w, at::TensorList layer_b, const at::Tensor& w_out,
                         const at::Tensor& b_out, at::TensorList alphas, bool softmax, std::optional<double> scale,
                         double eps, at::Tensor& kept, int64_t threads) {
  const int64_t layers = 1 + static_cast<int64_t>(layer_w.size());
  auto params = all_params(w_u, b1, base, mq, layer_w, layer_b, w_out, b_out, alphas, {}, {});
  // (checked with prelu's rule, alphas only: the statistics are the call's own)
  params.push_back(kept);
  check_inputs(query, keys, lengths, params, kPrelu, alphas, {}, layers);
  TORCH_CHECK(query.size(0) == keys.size(0), "din_kernels_cpu: Dice in training takes one query row per history");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "din_kernels_cpu::attention_dice_train_fwd", [&] {
    auto net = make_net<scalar_t>(keys, w_u, b1, base, mq, outer, layer_w, layer_b, w_out, b_out, kDice, alphas, {},
                                  {}, softmax, scale);
    net.threads = threads;
    result = dice_train_forward_impl<scalar_t>(net, query, keys, lengths, kept, eps);
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> attention_dice_train_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& lengths,
    const at::Tensor& attn, const at::Tensor& w_u, const at::Tensor& b1, const at::Tensor& base,
    const at::Tensor& mq, bool outer, at::TensorList layer_w, at::TensorList layer_b, const at::Tensor& w_out,
    const at::Tensor& b_out, at::TensorList alphas, at::TensorList means, at::TensorList vars,
    const at::Tensor& kept, at::Tensor& scratch, bool softmax, std::optional<double> scale, double eps,
    int64_t threads) {
  const int64_t layers = 1 + static_cast<int64_t>(layer_w.size());
  auto params = all_params(w_u, b1, base, mq, layer_w, layer_b, w_out, b_out, alphas, means, vars);
  for (const auto& t : {grad_out, attn, kept, scratch}) params.push_back(t);
  check_inputs(query, keys, lengths, params, kDice, alphas, means, layers);
  TORCH_CHECK(query.size(0) == keys.size(0) && static_cast<int64_t>(vars.size()) == layers,
              "din_kernels_cpu: Dice in training: one query row per history, statistics per layer");
  std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "din_kernels_cpu::attention_dice_train_bwd", [&] {
    auto net = make_net<scalar_t>(keys, w_u, b1, base, mq, outer, layer_w, layer_b, w_out, b_out, kDice, alphas, {},
                                  {}, softmax, scale);
    net.threads = threads;
    result = dice_train_backward_impl<scalar_t>(net, grad_out, query, keys, lengths, attn, means, vars, kept, scratch,
                                                eps);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY(din_kernels_cpu, m) {
  m.def(
      "attention_fwd(Tensor query, Tensor keys, Tensor lengths, Tensor w_u, Tensor b1, Tensor base, Tensor mq, "
      "bool outer, Tensor[] layer_w, Tensor[] layer_b, Tensor w_out, Tensor b_out, int act, Tensor[] alphas, "
      "Tensor[] means, Tensor[] rstds, bool softmax, float? scale, Tensor(a!) saved, int threads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor keys, Tensor lengths, Tensor attn, Tensor w_u, "
      "Tensor b1, Tensor base, Tensor mq, bool outer, Tensor[] layer_w, Tensor[] layer_b, Tensor w_out, "
      "Tensor b_out, int act, Tensor[] alphas, Tensor[] means, Tensor[] rstds, bool softmax, float? scale, "
      "Tensor saved, int threads) -> (Tensor, Tensor, Tensor[])");
  m.def(
      "attention_dice_train_fwd(Tensor query, Tensor keys, Tensor lengths, Tensor w_u, Tensor b1, Tensor base, "
      "Tensor mq, bool outer, Tensor[] layer_w, Tensor[] layer_b, Tensor w_out, Tensor b_out, Tensor[] alphas, "
      "bool softmax, float? scale, float eps, Tensor(a!) kept, int threads) -> (Tensor, Tensor, Tensor, Tensor[], "
      "Tensor[])");
  m.def(
      "attention_dice_train_bwd(Tensor grad_out, Tensor query, Tensor keys, Tensor lengths, Tensor attn, "
      "Tensor w_u, Tensor b1, Tensor base, Tensor mq, bool outer, Tensor[] layer_w, Tensor[] layer_b, "
      "Tensor w_out, Tensor b_out, Tensor[] alphas, Tensor[] means, Tensor[] vars, Tensor kept, "
      "Tensor(b!) scratch, bool softmax, float? scale, float eps, int threads) -> (Tensor, Tensor, Tensor[])");
  m.def("attention_dice_train_floats(Tensor lengths, int[] widths, bool fp64) -> (int, int)");
  m.def("attention_saved_floats(Tensor lengths, int dim, bool outer, int[] widths, int act, int candidates=1) -> int");
}

TORCH_LIBRARY_IMPL(din_kernels_cpu, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_saved_floats", &attention_saved_floats);
  m.impl("attention_dice_train_fwd", &attention_dice_train_fwd);
  m.impl("attention_dice_train_bwd", &attention_dice_train_bwd);
  m.impl("attention_dice_train_floats", &attention_dice_train_floats);
}
