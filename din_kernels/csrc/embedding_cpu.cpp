// An embedding lookup's two loops on the CPU (``din_kernels.embedding_concat``): the gather of rows into their
// columns of a concatenated output, and the dense gradient grad_weight[index[i]] += grad[i], rows in order.
//
// Why: aten's index_add_ (and scatter_add_, index_put_ with accumulate=True) pays a per-row dispatch of
// ~10 ns; a DIN training step adds ~13k rows of width 18 into each of its two tables, 155 us each on one
// thread (2-core CPU), 46 us here. The additions happen in the same order as index_add_'s (one row after
// another, serial), so the results are the same bits. Serial on purpose: rows repeat (popular items), and a
// parallel split would need per-thread tables or atomics. The gather prefetches rows ahead (see there).

#include <ATen/ATen.h>
#include <torch/library.h>

namespace {

template <typename T>
void index_add_rows_impl(T* out, int64_t rows, int64_t width, const int64_t* index, const T* source, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T* dst = out + index[i] * width;
    const T* src = source + i * width;
    for (int64_t j = 0; j < width; ++j) dst[j] += src[j];
  }
}

// What both ops need of their arguments: contiguous CPU tensors, ``table`` and ``rows`` of one floating dtype,
// int64 ``index`` whose every entry is a row of ``table`` (the callers check too; a bad index here would read or
// write outside the table).
const int64_t* checked_index(const at::Tensor& table, const at::Tensor& rows, const at::Tensor& index) {
  TORCH_CHECK(table.is_contiguous() && rows.is_contiguous() && index.is_contiguous() && table.device().is_cpu() &&
              rows.device().is_cpu() && index.device().is_cpu(), "din_kernels_cpu: contiguous CPU tensors only");
  TORCH_CHECK(index.scalar_type() == at::kLong && rows.scalar_type() == table.scalar_type(),
              "din_kernels_cpu: int64 index and tensors of one dtype");
  const int64_t count = table.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.size(0); ++i)
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < count, "din_kernels_cpu: index ", idx[i], " out of range [0, ", count,
                      ")");
  return idx;
}

// out [N, D] += rows of source [n, D] at index [n] (int64, each in [0, N)), in place; returns out.
at::Tensor& index_add_rows(at::Tensor& out, const at::Tensor& index, const at::Tensor& source) {
  TORCH_CHECK(out.dim() == 2 && source.dim() == 2 && index.dim() == 1 && source.size(0) == index.size(0) &&
              source.size(1) == out.size(1), "din_kernels_cpu: index_add_rows takes out [N, D], index [n], source [n, D]");
  const int64_t* idx = checked_index(out, source, index);
  const int64_t rows = out.size(0), n = index.size(0);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "din_kernels_cpu::index_add_rows", [&] {
    index_add_rows_impl<scalar_t>(out.data_ptr<scalar_t>(), rows, out.size(1), idx, source.data_ptr<scalar_t>(), n);
  });
  return out;
}

// out[:, column:column + D] = weight[index] for weight [N, D] and out [n, W] (W >= column + D), the lookup's
// rows gathered straight into their columns of the concatenated output. The table rows are prefetched a few
// ids ahead: in a training step the tables have left the caches (the attention's working set passed through
// them), and each row is a dependent miss that aten's index_select waits for one at a time.
template <typename T>
void gather_rows_impl(T* out, int64_t ldo, const T* weight, int64_t width, const int64_t* index, int64_t n) {
  constexpr int64_t kAhead = 24;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {  // (a row of 18 floats spans two cache lines)
      __builtin_prefetch(weight + index[i + kAhead] * width);
      __builtin_prefetch(weight + index[i + kAhead] * width + width - 1);
    }
    const T* src = weight + index[i] * width;
    T* dst = out + i * ldo;
    for (int64_t j = 0; j < width; ++j) dst[j] = src[j];
  }
}

at::Tensor& gather_rows(at::Tensor& out, int64_t column, const at::Tensor& weight, const at::Tensor& index) {
  TORCH_CHECK(out.dim() == 2 && weight.dim() == 2 && index.dim() == 1 && out.size(0) == index.size(0) &&
              column >= 0 && column + weight.size(1) <= out.size(1),
              "din_kernels_cpu: gather_rows takes out [n, W], weight [N, D] (column + D <= W), index [n]");
  const int64_t* idx = checked_index(weight, out, index);
  const int64_t n = index.size(0);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "din_kernels_cpu::gather_rows", [&] {
    gather_rows_impl<scalar_t>(out.data_ptr<scalar_t>() + column, out.size(1), weight.data_ptr<scalar_t>(),
                               weight.size(1), idx, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(din_kernels_cpu, m) {
  m.def("index_add_rows(Tensor(a!) out, Tensor index, Tensor source) -> Tensor(a!)");
  m.def("gather_rows(Tensor(a!) out, int column, Tensor weight, Tensor index) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(din_kernels_cpu, CPU, m) {
  m.impl("index_add_rows", &index_add_rows);
  m.impl("gather_rows", &gather_rows);
}
