// What the C++ CPU ops share: work cut into blocks that the calling thread and helper threads pull from a
// counter (``run_blocks``: one "parallel region" per call, robust when other processes hold cores), the
// helpers themselves (torch's OpenMP team or a pool of our own), 64-byte aligned scratch, a vectorisable
// sigmoid, and row-major products on the BLAS inside torch (``mm``).
#pragma once

#include <ATen/Parallel.h>

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

extern "C" {
// Fortran BLAS, exported by libtorch_cpu (MKL or OpenBLAS inside the wheel).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL's per-thread thread count (absent from a wheel whose BLAS is not MKL: then only the OpenMP setting).
int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));  // the C entry (lower case is Fortran)
}

namespace din_kernels_cpu {

// exp for fp32 without a library call, so that the loops around it vectorise (-O3 -march=native): Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial for e^r, 2^n from the exponent
// bits; ~1 ulp on [-87, 88], clamped outside (sigmoid saturates there anyway).
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_fast(double x) { return std::exp(x); }  // fp64 (gradcheck): the library's

template <typename T>
void sigmoid_(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = T(1) / (T(1) + exp_fast(-x[i]));
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C, as the column-major product C^T = op(B)^T op(A)^T.
template <typename T>
void mm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
        int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int LDA = static_cast<int>(std::max<int64_t>(lda, 1)), LDB = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int LDC = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
  } else {
    dgemm_(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
  }
}

// Every scratch buffer and every kept block starts on a 64-byte boundary: BLAS picks its code path by the
// alignment of its operands, so equal alignment everywhere is what makes the results independent of which
// thread (workspace) ran a block and of whether its activations were kept or recomputed.
constexpr int64_t kAlignBytes = 64;

template <typename T>
int64_t aligned_size(int64_t count) {
  constexpr int64_t per_line = kAlignBytes / sizeof(T);
  return (count + per_line - 1) / per_line * per_line;
}

template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlignBytes))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(kAlignBytes)); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
};

template <typename T>
using Buffer = std::vector<T, AlignedAllocator<T>>;

template <typename T>
void grow(Buffer<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
}

// BLAS calls inside a block run on the calling thread only (the parallelism is over blocks).
class SingleThreaded {
 public:
  SingleThreaded() : omp_before_(omp_get_max_threads()) {
    omp_set_num_threads(1);
    if (MKL_Set_Num_Threads_Local) mkl_before_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreaded() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_before_);
    omp_set_num_threads(omp_before_);
  }

 private:
  int omp_before_, mkl_before_ = 0;
};

// Blocks handed out by an atomic counter to the caller and its helpers. Shared-owned: a helper that starts
// after the call returned finds the counter exhausted and never touches ``work``.
struct BlockQueue {
  int64_t count = 0;
  std::atomic<int64_t> next{0}, done{0};
  const std::function<void(int64_t)>* work = nullptr;
  std::mutex mutex;
  std::condition_variable finished;
  std::exception_ptr error;

  void drain() {
    SingleThreaded single;  // (a block calls BLAS and plain loops only: no aten, no autograd state)
    for (int64_t index = next.fetch_add(1); index < count; index = next.fetch_add(1)) {
      try {
        (*work)(index);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

// Helper threads of this library, parked on a condition variable between calls. Not torch's inter-op pool:
// its tasks carry the caller's thread-local state, Python objects included, whose release needs the GIL
// (a late task released during interpreter shutdown aborted the process). Deliberately never destroyed
// (no join at exit), and made anew in a forked child, whose copy has no threads behind it.
class HelperPool {
 public:
  static HelperPool& get() {
    static std::mutex creation;
    static HelperPool* pool = nullptr;
    std::lock_guard<std::mutex> lock(creation);
    if (pool == nullptr || pool->pid_ != getpid()) pool = new HelperPool();  // a fork's copy is abandoned
    return *pool;
  }

  void submit(const std::shared_ptr<BlockQueue>& queue, int64_t helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int64_t>(threads_) < helpers) {
      std::thread([this] { loop(); }).detach();
      ++threads_;
    }
    for (int64_t i = 0; i < helpers; ++i) tasks_.push_back(queue);
    pending_.fetch_add(helpers);
    ready_.notify_all();
  }

  void begin_passes() { passes_.fetch_add(1); }
  void end_passes() { passes_.fetch_sub(1); }

 private:
  HelperPool() : pid_(getpid()) {}

  // While an op of several passes runs (``HelperPasses``), a helper that finished its blocks watches for the
  // next pass's queue instead of sleeping: the head MLP submits six queues of ~0.1 ms each, and waking a
  // parked thread (futex, scheduler) cost about its share of such a pass (measured: B=256 forward 243 ->
  // 180 us at two threads). Between ops it sleeps at once (watching there cost a busy machine's neighbours
  // the core); yielding, so that a neighbour that wants the core gets it, and bounded by ``kWatch``.
  static constexpr std::chrono::microseconds kWatch{1000};

  void loop() {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kWatch;
      while (pending_.load(std::memory_order_acquire) == 0 && passes_.load(std::memory_order_acquire) > 0 &&
             std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      std::shared_ptr<BlockQueue> queue;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [&] { return !tasks_.empty(); });
        queue = std::move(tasks_.front());
        tasks_.pop_front();
        pending_.fetch_sub(1);
      }
      queue->drain();  // a queue already drained by the caller returns at once
    }
  }

  pid_t pid_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<BlockQueue>> tasks_;
  std::atomic<int64_t> pending_{0};  // tasks_.size(), read without the lock by a watching helper
  std::atomic<int64_t> passes_{0};   // ops of several passes in progress (``HelperPasses``)
  size_t threads_ = 0;
};

// Held by an op that calls ``run_blocks`` once per pass (several passes): between its passes the helpers watch
// for the next queue rather than sleep (``HelperPool::loop``).
class HelperPasses {
 public:
  HelperPasses() { HelperPool::get().begin_passes(); }
  ~HelperPasses() { HelperPool::get().end_passes(); }
  HelperPasses(const HelperPasses&) = delete;
  HelperPasses& operator=(const HelperPasses&) = delete;
};

// Whether the helpers' share of a call runs on torch's OpenMP team rather than on ``HelperPool``: when torch
// itself runs parallel ops at least as wide (``threads`` <= its intra-op setting). Then the team's threads
// spin for a few ms after each of torch's parallel ops, on the very cores the helpers would need: our own
// helpers shared those cores with the spinners (measured, 2 cores, torch at 2 threads, each call right after
// torch work: B=256, T=50 forward + backward 6.5 ms on the pool against 4.7 ms on the team, 9.0 against 13.9
// ms beside a busy neighbour; B=1024, T=100 34.5 against 31.3 ms). With torch narrower (``din train``'s
// torch at 1 thread) there is no such team and the pool wakes as fast. Blocks are still handed out by the
// queue, so the results do not depend on which threads ran them. Not in a forked child: GNU OpenMP's team
// does not survive a fork (the pool is made anew there).
inline const pid_t kLoadedInProcess = getpid();  // (initialised when the library loads)

inline bool on_openmp_team(int64_t threads) {
  return threads <= at::get_num_threads() && getpid() == kLoadedInProcess;
}

inline void run_blocks(int64_t count, int64_t threads, const std::function<void(int64_t)>& work) {
  if (count == 0) return;
  auto queue = std::make_shared<BlockQueue>();
  queue->count = count;
  queue->work = &work;
  if (threads <= 0) threads = at::get_num_threads();
  const int64_t helpers = at::in_parallel_region() ? 0 : std::min<int64_t>(threads, count) - 1;
  if (helpers > 0 && on_openmp_team(threads)) {
    // one region per call; a team thread that arrives after the queue ran dry leaves at once (drain
    // catches every exception: none may leave an OpenMP region)
#pragma omp parallel num_threads(helpers + 1)
    queue->drain();
  } else {
    if (helpers > 0) HelperPool::get().submit(queue, helpers);
    queue->drain();
  }
  std::unique_lock<std::mutex> lock(queue->mutex);
  queue->finished.wait(lock, [&] { return queue->done.load() == count; });
  if (queue->error) std::rethrow_exception(queue->error);
}

}  // namespace din_kernels_cpu
