// mtlopt's optional CPU kernel, called from JAX through XLA's FFI (jax.ffi.ffi_call).
//
// Why: XLA:CPU computes the Gramian J J^T of a (T, P) float32 array slowly (a YNNPACK fusion for
// the single dot: 27-42 ms at T = 10, P = 1e6; the chunked dot loop mtlopt uses without this
// kernel: 7-9 ms, on one core), while the work is one pass over 4 P T bytes. This kernel packs
// column panels (scaled, contiguous) into a small buffer, takes every pair's dot product from
// there, and splits the columns over XLA's intra-op thread pool: 2.4-3.7 ms at T = 10, P = 1e6
// on a 2-core Zen 4 (benchmarks/aggregation.py). See mtlopt/_src/native.py for when it is
// used; everything here has a pure-JAX twin that is used otherwise.
//
// Measured and left out: the combination pass w @ J as a kernel of the same kind (16 columns
// summed in registers, the same prefetch, with the finiteness check fused) took 1.3-2.6 ms
// against 1.1-2.2 ms for XLA's own dot; a 2 x 4 block of rows in the pair loop, written for
// the compiler to vectorise, ran 1.6-3.5x slower than the 1 x 4 one below.
//
// Determinism: the columns are cut into ranges by the pool's size alone, each range sums into
// its own double-precision partial Gramian, and the partials are added in range order, so the
// result does not depend on which thread ran which range.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;   // one 512-bit vector of floats, or two 256-bit ones
constexpr int64_t kPanel = 256;  // columns per packed panel: T rows of 1 KB
constexpr int64_t kPrefetchPanels = 4;
constexpr int64_t kFlushPanels = 16;  // 4096 columns: 256 terms per float32 lane sum
constexpr int64_t kMinRangeColumns = 1 << 15;  // below this, one thread does a range
constexpr int64_t kMaxRanges = 64;

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define MTLOPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MTLOPT_CLONES
#endif

// lanes[(i * T + j) * kLanes + l] (j >= i) += sum over k = l mod kLanes of p_i[k] p_j[k], for
// the packed panel p (T rows of kPanel floats). The per-lane sums stay in float32 over
// kFlushPanels panels and are added up in double then. One core, P = 1e6, this loop alone:
// 2.6 ms at T = 10 and 35-39 ms at T = 40, against 2.9-3.1 and 45-54 when the lanes were
// reduced after every panel.
MTLOPT_CLONES void PanelPairs(const float* p, int64_t T, float* lanes) {
  for (int64_t i = 0; i < T; ++i) {
    const float* a = p + i * kPanel;
    int64_t j = i;
    for (; j + 4 <= T; j += 4) {
      const float* b0 = p + j * kPanel;
      const float* b1 = b0 + kPanel;
      const float* b2 = b1 + kPanel;
      const float* b3 = b2 + kPanel;
      float* s0 = lanes + (i * T + j) * kLanes;
      float* s1 = s0 + kLanes;
      float* s2 = s1 + kLanes;
      float* s3 = s2 + kLanes;
      float t0[kLanes], t1[kLanes], t2[kLanes], t3[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        t0[l] = s0[l];
        t1[l] = s1[l];
        t2[l] = s2[l];
        t3[l] = s3[l];
      }
      for (int64_t k = 0; k < kPanel; k += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const float x = a[k + l];
          t0[l] += x * b0[k + l];
          t1[l] += x * b1[k + l];
          t2[l] += x * b2[k + l];
          t3[l] += x * b3[k + l];
        }
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        s0[l] = t0[l];
        s1[l] = t1[l];
        s2[l] = t2[l];
        s3[l] = t3[l];
      }
    }
    for (; j < T; ++j) {
      const float* b = p + j * kPanel;
      float* s = lanes + (i * T + j) * kLanes;
      float t[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) t[l] = s[l];
      for (int64_t k = 0; k < kPanel; k += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) t[l] += a[k + l] * b[k + l];
      }
      for (int64_t l = 0; l < kLanes; ++l) s[l] = t[l];
    }
  }
}

// acc[i * T + j] += the sum of lanes[(i * T + j) * kLanes + :] for j >= i; the lanes zeroed.
void FlushLanes(int64_t T, float* lanes, double* acc) {
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t j = i; j < T; ++j) {
      float* s = lanes + (i * T + j) * kLanes;
      double t = 0;
      for (int64_t l = 0; l < kLanes; ++l) t += s[l];
      acc[i * T + j] += t;
      std::fill(s, s + kLanes, 0.0f);
    }
  }
}

// Copies scale * x[:, c0:c0 + w] into the panel buffer (rows of kPanel, zero-padded past w), and
// asks for the rows kPrefetchPanels panels ahead (into L2), so that memory keeps streaming while
// the dot products run. One thread, T = 10, P = 1e6: packing alone 2.4-4.0 ms without the
// prefetch, 1.4-2.0 with it 4 panels ahead (1, 2, 8 ahead: 3.2-3.8, 2.0-2.2, 2.2-2.5; prefetch
// into L1: 3.0-5.2); the whole pass 5.5-6.1 -> 3.8-4.3 ms. The hardware prefetchers alone do not
// keep T streams 4 MB apart busy.
MTLOPT_CLONES void Pack(const float* x, int64_t T, int64_t C, int64_t c0, int64_t w, float scale,
                        float* p) {
  for (int64_t t = 0; t < T; ++t) {
    const float* row = x + t * C + c0;
    float* out = p + t * kPanel;
    if (c0 + (kPrefetchPanels + 1) * kPanel <= C) {
      const float* ahead = row + kPrefetchPanels * kPanel;
      for (int64_t k = 0; k < kPanel; k += 16) __builtin_prefetch(ahead + k, 0, 1);
    }
    for (int64_t k = 0; k < w; ++k) out[k] = scale * row[k];
    for (int64_t k = w; k < kPanel; ++k) out[k] = 0.0f;
  }
}

// The upper triangle of the Gramian of scale * x[:, c0:c1], added into acc (T * T doubles).
void GramianRange(const float* x, int64_t T, int64_t C, int64_t c0, int64_t c1, float scale,
                  double* acc) {
  std::vector<float> panel(static_cast<size_t>(T * kPanel));
  std::vector<float> lanes(static_cast<size_t>(T * T * kLanes));
  int64_t panels = 0;
  for (int64_t c = c0; c < c1; c += kPanel) {
    const int64_t w = std::min(kPanel, c1 - c);
    Pack(x, T, C, c, w, scale, panel.data());
    PanelPairs(panel.data(), T, lanes.data());
    if (++panels % kFlushPanels == 0) FlushLanes(T, lanes.data(), acc);
  }
  FlushLanes(T, lanes.data(), acc);
}

// Runs fn(r) for r in [0, n) on the calling thread and the pool. A range is claimed by whoever
// gets to it first, so the caller never waits for a task the pool has not started (the pool may
// be busy, or be the thread running this call): it waits only for ranges already running.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  struct State {
    std::vector<std::atomic<bool>> claimed;
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
    explicit State(int64_t n) : claimed(static_cast<size_t>(n)) {
      for (auto& c : claimed) c.store(false);
    }
  };
  auto state = std::make_shared<State>(n);
  auto run = [state, n, fn]() {
    for (int64_t r = 0; r < n; ++r) {
      if (state->claimed[r].exchange(true)) continue;
      fn(r);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t r = 1; r < n; ++r) pool.Schedule(decltype(run)(run));
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

int64_t NumRanges(ffi::ThreadPool& pool, int64_t C) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::clamp<int64_t>(C / kMinRangeColumns, 1, std::min(threads, kMaxRanges));
}

ffi::Error GramianImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("mtlopt_gramian: x must be (..., T, C)");
  const int64_t T = dims[dims.size() - 2];
  const int64_t C = dims[dims.size() - 1];
  const int64_t batch = T * C == 0 ? 0 : static_cast<int64_t>(x.element_count()) / (T * C);
  if (static_cast<int64_t>(scale.element_count()) != std::max<int64_t>(batch, 1) &&
      scale.element_count() != 1) {
    return ffi::Error::InvalidArgument("mtlopt_gramian: one scale per batch element");
  }
  float* g = out->typed_data();
  std::fill(g, g + out->element_count(), 0.0f);
  if (T == 0 || C == 0) return ffi::Error::Success();
  const int64_t ranges = NumRanges(pool, C);
  std::vector<double> partial(static_cast<size_t>(ranges * T * T));
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x.typed_data() + b * T * C;
    const float s = scale.typed_data()[scale.element_count() == 1 ? 0 : b];
    std::fill(partial.begin(), partial.end(), 0.0);
    ParallelFor(pool, ranges, [&](int64_t r) {
      const int64_t c0 = C * r / ranges, c1 = C * (r + 1) / ranges;
      GramianRange(xb, T, C, c0, c1, s, partial.data() + r * T * T);
    });
    float* gb = g + b * T * T;
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t j = i; j < T; ++j) {
        double v = 0;
        for (int64_t r = 0; r < ranges; ++r) v += partial[r * T * T + i * T + j];
        gb[i * T + j] = gb[j * T + i] = static_cast<float>(v);
      }
    }
  }
  return ffi::Error::Success();
}

// The combination pass, out = w @ x for a (T, C) float32 x, with its finiteness check in the same
// read: check = the sum of out[c] * 0, which is 0 when every output is finite and NaN otherwise
// (inf * 0 is NaN, and NaN stays NaN through the sum), so the non-finite guard after the combination
// needs no second pass over the output. kCombineBlock columns are summed over the T rows in
// registers (2 x 16 lanes); kCombineAhead columns ahead of each row are asked for (into L2).
// One core, T = 10, P = 1e6, a C++ harness on a loaded machine (medians of 57 calls): 32 columns
// with 512 / 1024 ahead 0.98 / 0.96 ms; 64 columns 1.29 / 1.14; 16 columns 1.50; no prefetch
// 3.30 ms (the hardware prefetchers do not keep T streams busy); non-temporal stores 0.94 (kept
// out: no clear gain, and they need x86 intrinsics).
constexpr int64_t kCombineBlock = 32;
constexpr int64_t kCombineAhead = 1024;
constexpr int64_t kCombineChunk = 1 << 15;  // columns per claimed chunk (a multiple of kLanes)

MTLOPT_CLONES float CombineRange(const float* x, const float* w, int64_t T, int64_t C, int64_t c0,
                                 int64_t c1, float* out) {
  float check[kLanes] = {};
  int64_t c = c0;
  for (; c + kCombineBlock <= c1; c += kCombineBlock) {
    if (c + kCombineAhead + kCombineBlock <= C) {
      for (int64_t t = 0; t < T; ++t) {
        const float* ahead = x + t * C + c + kCombineAhead;
        for (int64_t k = 0; k < kCombineBlock; k += kLanes) __builtin_prefetch(ahead + k, 0, 1);
      }
    }
    float acc[kCombineBlock];
    for (int64_t l = 0; l < kCombineBlock; ++l) acc[l] = w[0] * x[c + l];
    for (int64_t t = 1; t < T; ++t) {
      const float* row = x + t * C + c;
      const float wt = w[t];
      for (int64_t l = 0; l < kCombineBlock; ++l) acc[l] += wt * row[l];
    }
    for (int64_t l = 0; l < kCombineBlock; ++l) out[c + l] = acc[l];
    for (int64_t l = 0; l < kCombineBlock; ++l) check[l % kLanes] += acc[l] * 0.0f;
  }
  for (; c < c1; ++c) {
    float acc = w[0] * x[c];
    for (int64_t t = 1; t < T; ++t) acc += w[t] * x[t * C + c];
    out[c] = acc;
    check[0] += acc * 0.0f;
  }
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += check[l];
  return sum;
}

// x (..., T, C), w (..., T) -> out (..., C), check (...). The leading (batch) dimensions have
// out's sizes, or 1 in x or w (JAX's "expand_dims" batching: an argument that vmap does not map
// keeps a dimension of 1 and is read once for every batch element).
ffi::Error CombineImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> check) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto od = out->dimensions();
  const auto cd = check->dimensions();
  const size_t nb = xd.size() < 2 ? 0 : xd.size() - 2;
  if (xd.size() < 2 || wd.size() != nb + 1 || od.size() != nb + 1 || cd.size() != nb ||
      wd[nb] != xd[nb] || od[nb] != xd[nb + 1]) {
    return ffi::Error::InvalidArgument("mtlopt_combine: x (..., T, C), w (..., T), out (..., C)");
  }
  const int64_t T = xd[nb];
  const int64_t C = xd[nb + 1];
  int64_t batch = 1;
  std::vector<int64_t> x_stride(nb), w_stride(nb);
  for (size_t i = nb; i-- > 0;) {
    if (cd[i] != od[i] || (xd[i] != 1 && xd[i] != od[i]) || (wd[i] != 1 && wd[i] != od[i])) {
      return ffi::Error::InvalidArgument("mtlopt_combine: batch dimensions do not broadcast");
    }
    x_stride[i] = xd[i] == 1 ? 0 : 1;
    w_stride[i] = wd[i] == 1 ? 0 : 1;
  }
  // Element strides of the batch dimensions (0 where broadcast), innermost last.
  int64_t xs = T * C, ws = T;
  for (size_t i = nb; i-- > 0;) {
    x_stride[i] *= xs;
    w_stride[i] *= ws;
    xs *= xd[i];
    ws *= wd[i];
    batch *= od[i];
  }
  float* o = out->typed_data();
  float* k = check->typed_data();
  if (T == 0) std::fill(o, o + out->element_count(), 0.0f);
  std::fill(k, k + check->element_count(), 0.0f);
  if (T == 0 || C == 0) return ffi::Error::Success();
  // Chunks of kCombineChunk columns, claimed one at a time by whichever thread is free (the
  // caller included): a pool thread that the OS preempts holds up at most one chunk. Four fixed
  // ranges over 2 threads measured 1.8 ms against XLA's single-core dot's 1.24 on a loaded
  // machine (the caller waiting for a range claimed by a preempted thread).
  const int64_t chunks = (C + kCombineChunk - 1) / kCombineChunk;
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), chunks);
  std::vector<float> partial(static_cast<size_t>(chunks));
  for (int64_t b = 0; b < batch; ++b) {
    int64_t xo = 0, wo = 0;
    for (int64_t i = static_cast<int64_t>(nb) - 1, rest = b; i >= 0; --i) {
      const int64_t idx = rest % od[i];
      rest /= od[i];
      xo += idx * x_stride[i];
      wo += idx * w_stride[i];
    }
    const float* xb = x.typed_data() + xo;
    const float* wb = w.typed_data() + wo;
    float* ob = o + b * C;
    std::atomic<int64_t> next{0};
    ParallelFor(pool, workers, [&](int64_t) {
      for (int64_t r = next.fetch_add(1); r < chunks; r = next.fetch_add(1)) {
        const int64_t c0 = r * kCombineChunk, c1 = std::min(C, c0 + kCombineChunk);
        partial[r] = CombineRange(xb, wb, T, C, c0, c1, ob);
      }
    });
    float sum = 0.0f;
    for (int64_t r = 0; r < chunks; ++r) sum += partial[r];
    k[b] = sum;
  }
  return ffi::Error::Success();
}

// The guard's fill, in place (the result aliases x): x (..., C) set to fill[b] where ok[b] is
// false, left as it is (not read, not written) where it is true. A select or a conditional copy
// in XLA writes the whole output again into a new buffer: at T = 10, P = 1e6 that added 0.15 ms
// with freed memory kept in the process and 1.4 ms with glibc's defaults (fresh pages).
ffi::Error FillUnlessImpl(ffi::Buffer<ffi::PRED> ok, ffi::Buffer<ffi::F32> fill,
                          ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t batch = static_cast<int64_t>(ok.element_count());
  if (static_cast<int64_t>(fill.element_count()) != batch ||
      out->element_count() != x.element_count() ||
      (batch == 0 ? x.element_count() != 0 : x.element_count() % batch != 0)) {
    return ffi::Error::InvalidArgument("mtlopt_fill_unless: ok (...), fill (...), x (..., C)");
  }
  if (batch == 0) return ffi::Error::Success();
  const int64_t C = static_cast<int64_t>(x.element_count()) / batch;
  const float* src = x.typed_data();
  float* dst = out->typed_data();
  for (int64_t b = 0; b < batch; ++b) {
    if (ok.typed_data()[b]) {
      if (dst != src) std::copy(src + b * C, src + (b + 1) * C, dst + b * C);
    } else {
      std::fill(dst + b * C, dst + (b + 1) * C, fill.typed_data()[b]);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// What this library was built against, read by mtlopt/_src/native.py before it registers the
// handlers (a runtime whose XLA FFI API is older than these headers' rejects them): the FFI API
// version of the headers compiled in, and the jaxlib release that shipped them (setup.py passes
// it in; "unknown" for a build by hand).
#ifndef MTLOPT_JAXLIB_VERSION
#define MTLOPT_JAXLIB_VERSION "unknown"
#endif

extern "C" int MtloptFfiApiMajor() { return XLA_FFI_API_MAJOR; }
extern "C" int MtloptFfiApiMinor() { return XLA_FFI_API_MINOR; }
extern "C" const char* MtloptBuildJaxlib() { return MTLOPT_JAXLIB_VERSION; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtloptGramian, GramianImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtloptCombine, CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtloptFillUnless, FillUnlessImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
