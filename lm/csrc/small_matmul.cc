// Small-batch matrix products for decoding on x86 CPUs, as an XLA FFI custom call (and, further
// down, attention through the KV cache, and training kernels for short sequences). Written once
// against lm/csrc/simd.h's 16-lane vectors: AVX-512, or AVX2 + FMA at half the width with
// smaller register tiles (the constants that say `v::kAvx512 ? a : b`).
//
//   out[M, N] = x[M, K] @ W          W: [K, N] ("nn") or [N, K] ("nt", the tied LM head)
//   out_i = x @ W_i                  several nn weights sharing x (q/k/v, gate/up), one call
//   out = silu(x @ W0) * (x @ W1)    "gated": a SwiGLU MLP's hidden layer, one call
//
// Many rows (a prompt's prefill) go through gemm_many, a packed-panel GEMM (see there).
// x and out are float32; W is float32 or bfloat16 (widened to float32 in registers, so a
// bfloat16 model streams half the bytes). Why not XLA's dot: with M of 1 to 64 rows a decode
// step is a matrix-vector product bound by reading the weights once, and XLA:CPU's kernels
// stream them at 4-12 GB/s for 2-64 rows and widen bfloat16 weights through memory
// (lm/native.py has the measurements). Here each weight is read once per call straight into
// registers: for up to 4 rows nn streams W in blocks of whole rows (8 rows at a time, each one
// contiguous run: the pattern the hardware prefetcher follows) into partial sums per block;
// for 5 to 16 rows (batched decoding) it keeps tiles of 8 rows x 48 columns of out in
// registers (tile_8x48; AVX2: 2 rows, on copies of contiguous blocks of W, nn_stream); nt
// reads each row of W once against up to 6 rows of x.
//
// Threads: W is cut into chunks (blocks of rows; of columns for a wide LM head) that the
// calling thread and helpers from XLA's intra-op pool (ffi::ThreadPool) claim from an atomic
// counter. The caller only ever waits for chunks that a running thread has claimed, so calls
// running at once cannot deadlock; a helper that arrives after the work is gone lingers for
// the next call (see Linger) or returns its thread to the pool.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bf16 = uint16_t;

// The first clamp(n, 0, 16) lanes: the mask of a (possibly partial, possibly empty) vector.
inline v::mask lane_mask(int64_t n) {
  return static_cast<v::mask>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
}

// f(std::integral_constant<int, R>{}) for the runtime r in [1, Max]: a register tile's row
// count as the compile-time R its accumulator array needs (r > Max runs Max).
template <int Max, typename F>
inline void with_rows(int64_t r, F&& f) {
  if constexpr (Max > 1) {
    if (r < Max) return with_rows<Max - 1>(r, f);
  }
  f(std::integral_constant<int, Max>{});
}

inline v::f32 load16(const float* p) { return v::loadu(p); }
inline v::f32 load16(const bf16* p) { return v::load_bf16(p); }
inline v::f32 load16(const float* p, v::mask m) { return v::maskz_loadu(m, p); }
inline v::f32 load16(const bf16* p, v::mask m) { return v::maskz_load_bf16(m, p); }

// out[:, j0:j1] += x[:, k0:k0+KB] @ W[k0:k0+KB, j0:j1]: KB rows of W are read as KB
// contiguous runs of (j1 - j0) columns, the access pattern the hardware prefetcher follows
// (a panel of a few columns over all K rows jumps a page per row and starves it). The
// accumulators are out's rows, which stay in L1/L2 ([M, j1 - j0] floats).
template <typename T, int KB>
void nn_rows(const float* x, const T* w, float* out, int64_t M, int64_t K, int64_t N,
             int64_t k0, int64_t j0, int64_t j1) {
  const T* wk = w + k0 * N;
  for (int64_t j = j0; j < j1; j += 16) {
    const int64_t rem = j1 - j;
    const v::mask mask = lane_mask(rem);
    v::f32 wv[KB];
    _Pragma("GCC unroll 16") for (int i = 0; i < KB; ++i) wv[i] = load16(wk + i * N + j, mask);
    for (int64_t m = 0; m < M; ++m) {
      float* o = out + m * N + j;
      const float* xm = x + m * K + k0;
      v::f32 acc = v::maskz_loadu(mask, o);
      _Pragma("GCC unroll 16") for (int i = 0; i < KB; ++i) {
        acc = v::fmadd(v::set1(xm[i]), wv[i], acc);
      }
      v::mask_storeu(o, mask, acc);
    }
  }
}

// out[m0:m0+MR, n0:n0+NR] = x[m0:m0+MR, :] @ W[n0:n0+NR, :]^T (W rows are contiguous in K).
template <typename T, int MR, int NR>
void nt_tile(const float* x, const T* w, float* out, int64_t K, int64_t N, int64_t m0,
             int64_t n0) {
  v::f32 acc[MR][NR];
  _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 16") for (int c = 0; c < NR; ++c) acc[r][c] = v::setzero();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    v::f32 wv[NR];
    _Pragma("GCC unroll 16") for (int c = 0; c < NR; ++c) wv[c] = load16(w + (n0 + c) * K + k);
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {
      v::f32 xv = v::loadu(x + (m0 + r) * K + k);
      _Pragma("GCC unroll 16") for (int c = 0; c < NR; ++c) acc[r][c] = v::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  if (k < K) {
    v::mask m = lane_mask(K - k);
    v::f32 wv[NR];
    _Pragma("GCC unroll 16") for (int c = 0; c < NR; ++c) wv[c] = load16(w + (n0 + c) * K + k, m);
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {
      v::f32 xv = v::maskz_loadu(m, x + (m0 + r) * K + k);
      _Pragma("GCC unroll 16") for (int c = 0; c < NR; ++c) acc[r][c] = v::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 16") for (int c = 0; c < NR; ++c) out[(m0 + r) * N + n0 + c] = v::reduce_add(acc[r][c]);
}

// nt_tile for MR x NR = 16 products (4 x 4, 2 x 8 or 1 x 16) whose dot products are reduced
// together by sum16x16 instead of one by one. The tied LM head ([49152, 576], one thread):
// 1 row 9.0 -> 8.3 ms, 4 rows 13.6 -> 10.5 ms; 16 rows unchanged at ~20 ms (bound elsewhere:
// the same product from a transposed copy of the weights through nn takes ~2/3 of that).
template <typename T, int MR, int NR>
void nt_tile16(const float* x, const T* w, float* out, int64_t K, int64_t N, int64_t m0,
               int64_t n0) {
  static_assert(MR * NR == 16);
  v::f32 acc[16];
  _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i) acc[i] = v::setzero();
  for (int64_t k = 0; k < K; k += 16) {
    const v::mask m = lane_mask(K - k);
    v::f32 wv[NR];
    _Pragma("GCC unroll 16") for (int c = 0; c < NR; ++c) wv[c] = load16(w + (n0 + c) * K + k, m);
    _Pragma("GCC unroll 4") for (int r = 0; r < MR; ++r) {
      const v::f32 xv = v::maskz_loadu(m, x + (m0 + r) * K + k);
      _Pragma("GCC unroll 16") for (int c = 0; c < NR; ++c) acc[r * NR + c] = v::fmadd(xv, wv[c], acc[r * NR + c]);
    }
  }
  // A copy: passing acc itself kept it in memory through the loop (16 stores a step).
  v::f32 fin[16];
  _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i) fin[i] = acc[i];
  const v::f32 s = v::sum16x16(fin);  // lane r * NR + c: out[m0 + r, n0 + c]
  _Pragma("GCC unroll 4") for (int r = 0; r < MR; ++r) {
    v::mask_storeu(out + (m0 + r) * N + n0 - r * NR, static_cast<v::mask>(((1u << NR) - 1) << (r * NR)), s);
  }
}

// Rows of x against W rows [n0, n0 + 16): groups of 4, then 2, then 1 row.
template <typename T>
void nt_rows16(const float* x, const T* w, float* out, int64_t M, int64_t K, int64_t N,
               int64_t n0) {
  int64_t m0 = M - M % 4;
  for (int64_t c = 0; c < 16; c += 4)
    for (int64_t r0 = 0; r0 < m0; r0 += 4) nt_tile16<T, 4, 4>(x, w, out, K, N, r0, n0 + c);
  for (; m0 + 2 <= M; m0 += 2)
    for (int64_t c = 0; c < 16; c += 8) nt_tile16<T, 2, 8>(x, w, out, K, N, m0, n0 + c);
  for (; m0 < M; ++m0) nt_tile16<T, 1, 16>(x, w, out, K, N, m0, n0);
}

// Row tiles of up to 6 (6 x 4 accumulators + 4 weight vectors + 1 broadcast <= 32 registers);
// on AVX2 one (4 accumulators and 4 weight vectors take all 16 ymm registers).
constexpr int kMaxRows = v::kAvx512 ? 6 : 1;

template <typename T, int NR>
void nt_rows(const float* x, const T* w, float* out, int64_t M, int64_t K, int64_t N,
             int64_t n0) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    with_rows<kMaxRows>(M - m0, [&](auto R) { nt_tile<T, R, NR>(x, w, out, K, N, m0, n0); });
  }
}

// Runs fn(0..chunks-1) on the calling thread and the pool (see the header comment).
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0;
  std::function<void(int64_t)> fn;
  void drain() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      fn(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helpers borrowed from XLA's pool linger: after draining a piece of work, a helper spins up
// to kLinger for the next call's work before it returns its thread to the pool. Why: an idle
// pool thread parks, and waking one took longer than a whole 576 x 576 product at one row
// (~70 us), so the caller did most of it alone at one thread's bandwidth (the attention output
// projection read its weights at 9.5 GB/s against 21 for the larger products). A decoding
// step's calls come every few tens of microseconds, so a lingering helper is there when the
// next one starts. Lingering holds a pool thread, never a thread of its own: a thread that
// spins beside XLA's two on two cores slowed decoding down (measured).
class Linger {
 public:
  void post(ffi::ThreadPool& pool, int64_t helpers, const std::shared_ptr<Work>& work) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      work_ = work;
      seq_.fetch_add(1, std::memory_order_release);
    }
    for (int64_t h = lingering_.load(std::memory_order_acquire); h < helpers; ++h) {
      pool.Schedule([this, work] { help(work); });
    }
  }

 private:
  static constexpr auto kLinger = std::chrono::microseconds(200);
  void help(std::shared_ptr<Work> work) {
    lingering_.fetch_add(1, std::memory_order_acq_rel);
    for (;;) {
      if (work) work->drain();
      uint64_t seen = seq_.load(std::memory_order_acquire);
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (seq_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if ((++spins & 255) == 0 && std::chrono::steady_clock::now() - start > kLinger) break;
      }
      if (seq_.load(std::memory_order_acquire) == seen) break;
      std::lock_guard<std::mutex> lock(mu_);
      work = work_;
    }
    lingering_.fetch_sub(1, std::memory_order_acq_rel);
  }
  std::mutex mu_;
  std::shared_ptr<Work> work_;  // the latest work (a caller drains whatever no helper claimed)
  std::atomic<uint64_t> seq_{0};
  std::atomic<int64_t> lingering_{0};
};

// A thread's scratch of at least n floats, kept between calls, for every task's buffers: the
// training-attention backward pass's (~140 KB) are past malloc's mmap threshold, and mapping
// and unmapping them for every task cost more than the task's arithmetic. On the calling
// thread, slot 1 holds a call's prepared weights (prepare) or a gated call's two products, and
// slot 3 a training backward call's intermediates, which every task reads; tasks use slot 0
// and slot 2 (AVX2: gemm_tiles', nn_stream's or over_rows' copies of operands).
float* scratch(size_t n, int slot = 0) {
  thread_local std::vector<float> buf[4];
  if (buf[slot].size() < n) buf[slot].resize(n);
  return buf[slot].data();
}

void parallel_for(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> fn) {
  static Linger* linger = new Linger();  // leaked on purpose: helpers may outlive any caller
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, chunks - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < chunks; ++i) fn(i);
    return;
  }
  auto work = std::make_shared<Work>();
  work->chunks = chunks;
  work->fn = std::move(fn);
  linger->post(pool, helpers, work);
  work->drain();
  while (work->done.load(std::memory_order_acquire) < chunks) _mm_pause();
}

// Register-blocked form for more rows (batched decoding, M of 5 to 16): a tile of MR <= 8 rows
// of out x 48 columns lives in 3*MR registers while kTileRows rows of W stream through it, so
// out is read and written once per 32 rows of W instead of once per 8 (at 16 rows nn_rows'
// traffic to out outweighed W's and ran at 4-7 GB/s). W is read in row segments of 48
// columns; the next tile's segments are prefetched by hand (a 48-column panel down 32 rows is
// a pattern the hardware prefetcher does not follow). Measured (30 matrices, 16 rows, float32,
// 2 threads): 576 x 1536 at 12-13 GB/s against 7 for nn_rows and 10 for XLA's dot; one thread
// with W in L2 reaches 130 GFLOP/s, 75% of the core's FMA peak. Tried and no better: 96 or 192
// columns per tile (4 or 2 rows), 64 or 16 rows of W per pass, prefetching into L2, column
// chunks across the threads instead of row chunks.
constexpr int kTileCols = 48;
// Rows of a tile: 8 x 3 accumulators of the 32 zmm registers; on AVX2, where a vector takes
// two of 16 ymm registers, 2 (12 registers of accumulators, the panel's loads beside them).
constexpr int kTileRowsMax = v::kAvx512 ? 8 : 2;

// c[r, :] (+)= sum_k a[r * lda + k] * b[k * ldb + :48] for MR <= 8 rows: the register tile of
// nn (b a block of W in place, with `prefetch` fetching the next tile's segments of b) and of
// gemm_many (b a packed panel, ldb 48; its loop unrolled twice: 207-238 against 191-194
// GFLOP/s, where unrolling cost nn's 8-row tiles 20 -> 15.6 GB/s). Columns past the masks mk
// are neither read nor written. Full (AVX2 only): no column is masked, so the loads carry no
// mask test (on AVX-512 a masked load costs nothing extra).
template <typename T, int MR, bool Packed, bool Full = false>
void tile_8x48(const float* a, int64_t lda, const T* b, int64_t ldb, int64_t kc, float* c,
               int64_t ldc, const v::mask (&mk)[3], bool first, bool prefetch) {
  v::f32 acc[MR][3];
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 3") for (int v = 0; v < 3; ++v)
      acc[r][v] = first ? v::setzero() : v::maskz_loadu(mk[v], c + r * ldc + 16 * v);
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    const T* bk = b + k * ldb;
    if (!Packed && prefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(bk + kTileCols), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(bk + kTileCols + 32), _MM_HINT_T0);
      if (sizeof(T) == 4) _mm_prefetch(reinterpret_cast<const char*>(bk + kTileCols + 16), _MM_HINT_T0);
    }
    if constexpr (v::kAvx512) {
      const v::f32 b0 = load16(bk, mk[0]), b1 = load16(bk + 16, mk[1]), b2 = load16(bk + 32, mk[2]);
      _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
        const v::f32 x = v::set1(a[r * lda + k]);
        acc[r][0] = v::fmadd(x, b0, acc[r][0]);
        acc[r][1] = v::fmadd(x, b1, acc[r][1]);
        acc[r][2] = v::fmadd(x, b2, acc[r][2]);
      }
    } else {
      // 16 ymm registers: 12 accumulators, the MR broadcasts, and one vector of b at a time
      // (loading all three first, as above, spilled accumulators to the stack).
      v::f32 x[MR];
      _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) x[r] = v::set1(a[r * lda + k]);
      _Pragma("GCC unroll 3") for (int c = 0; c < 3; ++c) {
        const v::f32 bv = Full ? load16(bk + 16 * c) : load16(bk + 16 * c, mk[c]);
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) acc[r][c] = v::fmadd(x[r], bv, acc[r][c]);
      }
    }
  };
  if constexpr (!v::kAvx512) {
    // Zen 3, 2 x 48 from L1: 49 GFLOP/s a core rolled, 72 unrolled four times (its FMA peak ~91).
    _Pragma("GCC unroll 4") for (int64_t k = 0; k < kc; ++k) step(k);
  } else if (Packed) {
    _Pragma("GCC unroll 2") for (int64_t k = 0; k < kc; ++k) step(k);
  } else {
    for (int64_t k = 0; k < kc; ++k) step(k);
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 3") for (int v = 0; v < 3; ++v)
      v::mask_storeu(c + r * ldc + 16 * v, mk[v], acc[r][v]);
}

// tile_8x48 over `rows` rows of a and c, 8 at a time (nn prefetches in the first only).
template <typename T, bool Packed>
void tiles_8x48(int64_t rows, const float* a, int64_t lda, const T* b, int64_t ldb, int64_t kc,
                float* c, int64_t ldc, const v::mask (&mk)[3], bool first) {
  const bool full = !v::kAvx512 && mk[0] == 0xFFFF && mk[1] == 0xFFFF && mk[2] == 0xFFFF;
  for (int64_t m = 0; m < rows; m += kTileRowsMax, a += kTileRowsMax * lda, c += kTileRowsMax * ldc) {
    with_rows<kTileRowsMax>(rows - m, [&](auto R) {
      if (full) {
        tile_8x48<T, R, Packed, true>(a, lda, b, ldb, kc, c, ldc, mk, first, m == 0);
      } else {
        tile_8x48<T, R, Packed>(a, lda, b, ldb, kc, c, ldc, mk, first, m == 0);
      }
    });
  }
}

// Columns [j, j1) of rows [k0, k1) of W against all M rows of x into out.
template <typename T>
void nn_tile_rows(const float* x, const T* w, float* out, int64_t M, int64_t K, int64_t N,
                  int64_t k0, int64_t k1, int64_t j, int64_t j1, bool first) {
  const v::mask mk[3] = {lane_mask(j1 - j), lane_mask(j1 - j - 16), lane_mask(j1 - j - 32)};
  tiles_8x48<T, false>(M, x + k0, K, w + k0 * N + j, N, k1 - k0, out + j, N, mk, first);
}

// Rows of W per pass over a block's columns (AVX-512; AVX2 streams W through nn_stream).
constexpr int64_t kTileRows = 32;

// `rows` rows of `width` columns of W (row stride ld) into dst as 48-column panels:
// [ceil(width / 48)][rows][48], zero past the width (bfloat16 widened). prefetch: fetch
// the row 8 ahead by hand (rows ld apart: further than the hardware prefetcher follows).
template <typename T>
void pack_panels(const T* w, int64_t ld, int64_t rows, int64_t width, float* dst, bool prefetch) {
  const int64_t panels = (width + kTileCols - 1) / kTileCols;
  for (int64_t k = 0; k < rows; ++k) {
    const T* src = w + k * ld;
    if (prefetch && k + 8 < rows) {
      for (int64_t o = 0; o < width; o += 64 / static_cast<int64_t>(sizeof(T))) {
        _mm_prefetch(reinterpret_cast<const char*>(src + 8 * ld + o), _MM_HINT_T0);
      }
    }
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t j = p * kTileCols;
      float* d = dst + (p * rows + k) * kTileCols;
      _Pragma("GCC unroll 3") for (int v = 0; v < 3; ++v) {
        v::storeu(d + 16 * v, load16(src + j + 16 * v, lane_mask(width - j - 16 * v)));
      }
    }
  }
}

// AVX2's form of the register-blocked nn (M > 4): W read in blocks of kStreamRows rows x
// kStreamCols columns, each row's segment one contiguous run (the whole row of a 576-wide W),
// copied (bfloat16 widened) into 48-column panels of kStreamRows x 48 contiguous floats in
// thread-local scratch, and the tiles run on the copy while prefetching the next block, a
// share before each tile, so memory is read while they compute. On Zen 3 the in-place
// 48-column panels above jump a W row (a different page) every 192 bytes and their
// prefetches into L1 evict the panel the next tiles read. Measured, one thread, 30 layers'
// weights cycled from memory, 16 rows: 576 x 576, 576 x 1536, 1536 x 576 at 34-48 GFLOP/s
// against 25-33, SmolLM2's [576, 49152] head (a column chunk 12288 wide) at 30-39 against
// 15-18, and 6 to 12 rows alike; SmolLM2 at batch 16 (2 threads, alternated in one process):
// 168-181 tok/s against 111-140, 131-138 without the prefetches, 158-168 with them as T2 or
// NTA hints. Tried and no better: 24, 48, 64, 96 or 128 rows a block, 288, 384 or 768
// columns, prefetching within the copy, prefetching inside the tiles' k loops. Zen 3 reads
// memory at ~11.5 GB/s a core and ~20 on both; at 16 rows the tiles need ~9 a core, so the
// copy still waits on memory for about a third of the tiles' time.
constexpr int64_t kStreamRows = 32;
constexpr int64_t kStreamCols = 12 * kTileCols;

// A cursor over the cache lines of `rows` rows of W, each `per_row` lines long and `stride`
// bytes from the last: the block nn_stream's tiles prefetch, a share before each tile.
struct Lines {
  const char* row = nullptr;
  int64_t stride = 0, per_row = 0, rows = 0, col = 0;
  void next() {
    if (rows <= 0) return;
    _mm_prefetch(row + 64 * col, _MM_HINT_T0);
    if (++col == per_row) col = 0, row += stride, --rows;
  }
};

// The lines of nn_stream's first block of rows [k0, k1) x columns [j0, j1) of W [K, N].
template <typename T>
Lines first_block(const T* w, int64_t N, int64_t k0, int64_t k1, int64_t j0, int64_t j1) {
  if (k0 >= k1 || j0 >= j1) return Lines{};
  const int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  return Lines{reinterpret_cast<const char*>(w + k0 * N + j0), N * static_cast<int64_t>(sizeof(T)),
               (std::min(j1, j0 + kStreamCols) - j0 + line - 1) / line,
               std::min(k1, k0 + kStreamRows) - k0};
}

// Rows [k0, k1) x columns [j0, j1) of W into out (written). The last block's tiles prefetch
// `after` (the block the thread runs next, when known).
template <typename T>
void nn_stream(const float* x, const T* w, float* out, int64_t M, int64_t K, int64_t N,
               int64_t k0, int64_t k1, int64_t j0, int64_t j1, Lines after) {
  float* pk = scratch(kStreamRows * kStreamCols, 2);
  for (int64_t jb = j0; jb < j1; jb += kStreamCols) {
    const int64_t je = std::min(j1, jb + kStreamCols), panels = (je - jb + kTileCols - 1) / kTileCols;
    for (int64_t kb = k0; kb < k1; kb += kStreamRows) {
      const int64_t ke = std::min(k1, kb + kStreamRows), kr = ke - kb;
      pack_panels(w + kb * N + jb, N, kr, je - jb, pk, false);
      // The next block: the following rows of these columns, else the next columns' first.
      const bool down = ke < k1;
      const int64_t nk = down ? ke : k0, nj = down ? jb : je;
      Lines ahead = nj < j1 ? first_block(w, N, nk, k1, nj, j1) : after;
      const int64_t tiles = panels * ((M + kTileRowsMax - 1) / kTileRowsMax);
      const int64_t per_tile = (ahead.rows * ahead.per_row + tiles - 1) / tiles;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t j = jb + p * kTileCols;
        const v::mask mk[3] = {lane_mask(je - j), lane_mask(je - j - 16), lane_mask(je - j - 32)};
        for (int64_t m = 0; m < M; m += kTileRowsMax) {
          for (int64_t i = 0; i < per_tile; ++i) ahead.next();
          with_rows<kTileRowsMax>(M - m, [&](auto R) {
            tile_8x48<float, R, true, true>(x + m * K + kb, K, pk + p * kr * kTileCols, kTileCols,
                                            kr, out + m * N + j, N, mk, kb == k0, false);
          });
        }
      }
    }
  }
}

// Rows [k0, k1) of W into out[M, N] (zeroed here): a chunk of nn_many (AVX2 at 5-16 rows
// runs nn_many_stream instead).
template <typename T>
void nn_block(const float* x, const T* w, float* out, int64_t M, int64_t K, int64_t N,
              int64_t k0, int64_t k1, int64_t j0, int64_t j1) {
  if (M > 4) {
    for (int64_t kb = k0; kb < k1; kb += kTileRows) {
      const int64_t ke = std::min(k1, kb + kTileRows);
      for (int64_t j = j0; j < j1; j += kTileCols) {
        nn_tile_rows<T>(x, w, out, M, K, N, kb, ke, j, j1, kb == k0);
      }
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) std::fill(out + m * N + j0, out + m * N + j1, 0.0f);
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) nn_rows<T, 8>(x, w, out, M, K, N, k, j0, j1);
  for (; k < k1; ++k) nn_rows<T, 1>(x, w, out, M, K, N, k, j0, j1);
}

// A wide W (an LM head, more than 4096 columns) is cut by columns, each chunk written straight
// into out; others by rows into partial sums (when accumulating, every W: the sums go onto out).
inline bool by_columns(int64_t N, bool accumulate) { return N > 4096 && !accumulate; }

// One weight of an nn call and how its work is cut into chunks.
struct NnPlan {
  const void* w;
  bool bf16;
  int64_t N;
  float* out;
  bool by_columns;  // wide W (an LM head): column chunks written straight into out
  int64_t step;     // columns (by_columns) or rows of W per chunk
  int64_t chunks;
  float* partial;   // row chunks: [chunks, M, N] partial sums (null when chunks == 1)
};

template <typename T>
void nn_chunk(const NnPlan& p, const float* x, int64_t M, int64_t K, int64_t c) {
  const T* w = static_cast<const T*>(p.w);
  if (p.by_columns) {
    const int64_t j0 = c * p.step;
    nn_block<T>(x, w, p.out, M, K, p.N, 0, K, j0, std::min(p.N, j0 + p.step));
  } else {
    float* dst = p.partial ? p.partial + c * M * p.N : p.out;
    nn_block<T>(x, w, dst, M, K, p.N, c * p.step, std::min(K, (c + 1) * p.step), 0, p.N);
  }
}

// out_i (+)= the sum of plan i's chunks' partial sums (plans with partials), added in chunk
// order, in slices of out shared between the threads.
void add_partials(ffi::ThreadPool& pool, int64_t M, const std::vector<NnPlan>& plans,
                  bool accumulate) {
  std::vector<std::pair<int, int64_t>> sums;  // (plan, slice of 4096 floats)
  constexpr int64_t kSlice = 4096;
  for (size_t i = 0; i < plans.size(); ++i) {
    if (!plans[i].partial) continue;
    for (int64_t o = 0; o < M * plans[i].N; o += kSlice) sums.emplace_back(static_cast<int>(i), o);
  }
  const NnPlan* ps = plans.data();
  const std::pair<int, int64_t>* ss = sums.data();
  parallel_for(pool, static_cast<int64_t>(sums.size()), [=](int64_t t) {
    const NnPlan& p = ps[ss[t].first];
    const int64_t size = M * p.N, lo = ss[t].second, hi = std::min(size, lo + kSlice);
    if (!accumulate) std::copy(p.partial + lo, p.partial + hi, p.out + lo);
    for (int64_t c = accumulate ? 0 : 1; c < p.chunks; ++c) {
      const float* src = p.partial + c * size;
      for (int64_t i = lo; i < hi; ++i) p.out[i] += src[i];
    }
  });
}

// nn_many on AVX2 at 5-16 rows (nn_stream). Each weight's rows are cut into chunks of
// kStreamChunk rows (an LM head's columns into chunks of kStreamHeadCols), every chunk with
// its own partial sums; the threads claim chunks one at a time, and claim their next one when
// they start one, so that the current chunk's last block prefetches the next chunk's first
// (across weights too: q, k and v; gate and up). Why: with one fixed chunk a thread, a step of
// SmolLM2 at batch 16 spent ~6.5% of both threads' time with one waiting for the other at the
// end of a call (parallel_for timed; the threads' speeds differ from call to call), and each
// chunk started cold. Measured, SmolLM2 at batch 16, chunkings alternated generation by
// generation in one process (64 tokens x 8-10 rounds, median ratio to one chunk a thread):
// 192-row chunks 1.053-1.096 (float32) and 1.035 (bfloat16); 96 rows 1.038, 128 rows 1.022,
// 288 rows 1.054; 32-row blocks into per-thread partial sums 1.012-1.067 (and not deterministic:
// the sums' grouping followed the claims); chunks of 48, 96 or 192 columns down all rows
// 0.80-0.98 (rows of W read 192-768 bytes at a time). The chunks are fixed by the shapes
// alone and added up in order, so the result does not depend on which thread ran what.
constexpr int64_t kStreamChunk = 6 * kStreamRows;
constexpr int64_t kStreamHeadCols = 4 * kStreamCols;

struct StreamChunk {
  int plan;
  int64_t k0, k1, j0, j1;
  float* partial;  // the chunk's partial sums [M, N] (null: straight into out)
};

void nn_many_stream(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K,
                    std::vector<NnPlan>& plans, bool accumulate) {
  int64_t buffered = 0;
  for (NnPlan& p : plans) {
    p.by_columns = by_columns(p.N, accumulate);
    p.partial = nullptr;
    p.chunks = p.by_columns ? (p.N + kStreamHeadCols - 1) / kStreamHeadCols
                            : (K + kStreamChunk - 1) / kStreamChunk;
    if (!p.by_columns && (p.chunks > 1 || accumulate)) buffered += p.chunks * M * p.N;
  }
  std::unique_ptr<float[]> partial(buffered ? new float[buffered] : nullptr);
  std::vector<StreamChunk> chunks;
  float* next_partial = partial.get();
  for (size_t i = 0; i < plans.size(); ++i) {
    NnPlan& p = plans[i];
    const int plan = static_cast<int>(i);
    if (p.by_columns) {
      for (int64_t j = 0; j < p.N; j += kStreamHeadCols) {
        chunks.push_back({plan, 0, K, j, std::min(p.N, j + kStreamHeadCols), nullptr});
      }
      continue;
    }
    if (p.chunks > 1 || accumulate) {
      p.partial = next_partial;
      next_partial += p.chunks * M * p.N;
    }
    for (int64_t c = 0; c < p.chunks; ++c) {
      chunks.push_back({plan, c * kStreamChunk, std::min(K, (c + 1) * kStreamChunk), 0, p.N,
                        p.partial ? p.partial + c * M * p.N : nullptr});
    }
  }
  const int64_t n = static_cast<int64_t>(chunks.size());
  const NnPlan* ps = plans.data();
  const StreamChunk* cs = chunks.data();
  auto first_of = [&](int64_t c) {
    if (c >= n) return Lines{};
    const StreamChunk& ch = cs[c];
    const NnPlan& p = ps[ch.plan];
    return p.bf16 ? first_block(static_cast<const bf16*>(p.w), p.N, ch.k0, ch.k1, ch.j0, ch.j1)
                  : first_block(static_cast<const float*>(p.w), p.N, ch.k0, ch.k1, ch.j0, ch.j1);
  };
  std::atomic<int64_t> claimed{0};
  parallel_for(pool, pool.num_threads() + 1, [&](int64_t) {
    for (int64_t c = claimed.fetch_add(1, std::memory_order_relaxed); c < n;) {
      const int64_t after = claimed.fetch_add(1, std::memory_order_relaxed);
      const StreamChunk& ch = cs[c];
      const NnPlan& p = ps[ch.plan];
      float* dst = ch.partial ? ch.partial : p.out;
      if (p.bf16) {
        nn_stream(x, static_cast<const bf16*>(p.w), dst, M, K, p.N, ch.k0, ch.k1, ch.j0, ch.j1,
                  first_of(after));
      } else {
        nn_stream(x, static_cast<const float*>(p.w), dst, M, K, p.N, ch.k0, ch.k1, ch.j0, ch.j1,
                  first_of(after));
      }
      c = after;
    }
  });
  add_partials(pool, M, plans, accumulate);
}

// out_i = x @ W_i for weights sharing x (q/k/v, gate/up): one call, one pool of chunks, so the
// small matrices ride along with the large ones instead of each paying for a thread handoff.
// accumulate: out_i += x @ W_i (every weight through partial sums, added onto out at the end).
void nn_many(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K,
             std::vector<NnPlan>& plans, bool accumulate = false) {
  if (!v::kAvx512 && M > 4) return nn_many_stream(pool, x, M, K, plans, accumulate);
  const int64_t threads = pool.num_threads() + 1;
  int64_t buffered = 0;
  for (NnPlan& p : plans) {
    p.by_columns = by_columns(p.N, accumulate);
    if (p.by_columns) {
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(2 * threads, p.N / 2048));
      p.step = ((p.N + chunks - 1) / chunks + 15) / 16 * 16;
      p.chunks = (p.N + p.step - 1) / p.step;
    } else {
      // Row chunks: each streams one contiguous block of W into its own partial sums.
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(2 * threads, K / 64));
      p.step = ((K + chunks - 1) / chunks + 7) / 8 * 8;
      p.chunks = (K + p.step - 1) / p.step;
      if (p.chunks > 1 || accumulate) buffered += p.chunks * M * p.N;
    }
  }
  std::unique_ptr<float[]> partial(buffered ? new float[buffered] : nullptr);
  std::vector<std::pair<int, int64_t>> tasks;  // (plan, chunk)
  float* next = partial.get();
  for (size_t i = 0; i < plans.size(); ++i) {
    NnPlan& p = plans[i];
    p.partial = nullptr;
    if (!p.by_columns && (p.chunks > 1 || accumulate)) {
      p.partial = next;
      next += p.chunks * M * p.N;
    }
    for (int64_t c = 0; c < p.chunks; ++c) tasks.emplace_back(static_cast<int>(i), c);
  }
  const NnPlan* ps = plans.data();
  const std::pair<int, int64_t>* ts = tasks.data();
  parallel_for(pool, static_cast<int64_t>(tasks.size()), [=](int64_t t) {
    const NnPlan& p = ps[ts[t].first];
    p.bf16 ? nn_chunk<bf16>(p, x, M, K, ts[t].second) : nn_chunk<float>(p, x, M, K, ts[t].second);
  });
  add_partials(pool, M, plans, accumulate);
}

// Many-row products (a prompt's prefill: M > kNnRows rows), after BLIS (Van Zee & van de
// Geijn 2015) without its packing of x. A task owns kGemmPanels panels of 48 columns of W: it
// copies them (bfloat16 widened) into a thread-local block, contiguous per panel, then for
// each chunk of kGemmChunk rows of x runs each panel, kc of its rows at a time, against the
// chunk's 8-row tiles (tile_8x48: 24 accumulators, 3 panel loads and 8 broadcasts per 24
// FMAs), so the panel's rows stay in L1/L2 and the chunk of x in L2 while the tile's 8 rows
// are broadcast straight from x. A copy is one task's own work, so one thread's copy (bound
// by reading W from memory, ~11 GB/s) overlaps the other's arithmetic. Measured, 512 rows,
// 2 threads, weights cycled from memory: 245-260 GFLOP/s of the cores' ~330 peak in a C++
// harness; side by side in one process 175-224, XLA's dot 186-209, PyTorch's oneDNN 243-263
// (so about XLA's rate in float32; bfloat16 weights are widened once, in the copy, where XLA's
// dot widened them through memory). Measured and no better:
// packing x too (its copy costs what it saves), tasks of 128 rows x 4 pre-copied panels (each
// panel read from L3 for only 16 tiles), 12 x 32, 14 x 32 and 6 x 64 tiles, one panel a task,
// prefetching x by hand. Up to kNnRows rows nn_many is the faster (no copy: 15-20 GB/s of
// weights at 4-16 rows against 10-13 here).
constexpr int64_t kNnRows = 16;      // up to here nn_many
// Rows of a panel per pass over the tiles: the pass's slice of the panel (kc x 48 floats) is
// re-read by every tile of the chunk, so it should sit in L1. 192 rows (36 KB) suit Ice Lake's
// 48 KB L1; Zen 3's is 32 KB, where 36 KB read cyclically missed L1 on nearly every line:
// 128 (at most 24 KB) there. Measured on Zen 3, 2 threads, SmolLM2's 512-token prefill, 4
// rounds of 8 alternated launches: medians 0.89-1.12 s against 1.03-1.18 s (-5 to -13%); a
// one-thread C++ harness of the products alone gave +4-9% (96 rows: about as 128). The
// blocking does not change the order of the additions: the outputs are bitwise the same.
constexpr int64_t kGemmDepth = v::kAvx512 ? 192 : 128;
constexpr int64_t kGemmPanels = 2;   // panels per task

// One weight of a gemm_many call, or with `up` a gated pair: out = silu(x @ w) * (x @ up).
struct GemmPlan {
  const void* w;
  bool bf16;
  int64_t N;
  float* out;
  int64_t panels;            // ceil(N / 48)
  const void* up = nullptr;  // the gated pair's second weight (same shape and dtype)
  bool packed = false;       // W in lm.native.pack's layout (gemm_pack_packed)
};

// Panels [p0, p1) of W into dst: [p1 - p0][K][48], zero past column N.
template <typename T>
void gemm_pack(const void* wv, int64_t N, int64_t K, int64_t p0, int64_t p1, float* dst) {
  const int64_t j0 = p0 * kTileCols;
  pack_panels(static_cast<const T*>(wv) + j0, N, K, std::min(N, p1 * kTileCols) - j0, dst, true);
}

// out[r, :n] = silu(g[r, :n]) * u[r, :n] = g / (1 + e^-g) * u for `rows` rows of g and u.
inline void silu_mul(const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t rows,
                     int64_t n, float* out, int64_t ldo) {
  const v::f32 one = v::set1(1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < n; c += 16) {
      const v::mask m = lane_mask(n - c);
      const v::f32 gv = v::maskz_loadu(m, g + r * ldg + c);
      const v::f32 uv = v::maskz_loadu(m, u + r * ldu + c);
      const v::f32 den = v::add(one, v::exp(v::sub(v::setzero(), gv)));
      v::mask_storeu(out + r * ldo + c, m, v::mul(v::div(gv, den), uv));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Packed weights: decoding's layout on AVX2 hosts (lm.native.pack; the shape stays [K, N]).
// W's columns are cut into panels of kPackCols, each stored whole before the next: columns
// [j, j + w) as K rows of w floats (or bfloat16s) starting at element j K, w = 24 but for the
// last N % 24 columns. A decoding step streams each panel front to back (the pattern the
// hardware prefetcher follows, with no copy), kPackDepth rows at a time, through 4 x 24
// register tiles: each panel row loaded feeds 12 FMAs of 4 rows of x, where the row-major form
// (nn_stream) copies W into panels first and runs 2 x 48 tiles. The thread prefetches the
// block it runs next, a share during each pass of 4 rows. Measured (Zen 3, 16 rows, 2 threads,
// SmolLM2's 30 layers of q/k/v, o, gate/up and down cycled from memory): 32-35 ms a step in a
// C++ harness with whole panels, against 51.5 for nn_stream through XLA in the same phase of
// the host; through XLA, products and head, 56.8 against 80.4 ms. A panel's tiles add over K
// in one order, so the result does not depend on the threads.
constexpr int64_t kPackCols = 24;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The packed panel of `width` < 24 columns at src (K rows of width) into dst as K rows of 24
// floats, ldd apart, zero past the width (bfloat16 widened).
template <typename T>
void widen_panel(const T* src, int64_t K, int64_t width, float* dst, int64_t ldd) {
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < kPackCols; ++c) dst[k * ldd + c] = c < width ? widen(src[k * width + c]) : 0.0f;
  }
}

// out[r, :width] = (accumulate ? out[r, :width] : 0) + x[r, :K] @ P for MR <= 4 rows, P
// K rows of 24 (ld 24; zero past width). Prefetches `lines` cache lines from pf, one or two
// a row of P.
template <typename T, int MR>
void packed_tile(const float* x, int64_t ldx, int64_t K, const T* p, float* out, int64_t ldo,
                 int64_t width, bool accumulate, const char* pf, int64_t lines) {
  __m256 acc[MR][3];
  alignas(32) float t[MR][kPackCols];  // a narrow panel's rows of out, zero-padded to 24
  const bool full = width == kPackCols;
  if (!full) {
    for (int r = 0; r < MR; ++r) {
      for (int64_t c = 0; c < kPackCols; ++c) t[r][c] = accumulate && c < width ? out[r * ldo + c] : 0.0f;
    }
  }
  _Pragma("GCC unroll 4") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 3") for (int c = 0; c < 3; ++c) {
      acc[r][c] = !accumulate ? _mm256_setzero_ps()
                  : full      ? _mm256_loadu_ps(out + r * ldo + 8 * c)
                              : _mm256_load_ps(&t[r][8 * c]);
    }
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    const T* pk = p + k * kPackCols;
    const __m256 b0 = load8(pk), b1 = load8(pk + 8), b2 = load8(pk + 16);
    _Pragma("GCC unroll 4") for (int r = 0; r < MR; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xb, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, b1, acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(xb, b2, acc[r][2]);
    }
  };
  const int two = lines > K;  // lines a row of P: 1 or 2
  const int64_t kp = pf ? std::min(K, (lines + two) >> two) : 0;
  int64_t k = 0;
  _Pragma("GCC unroll 4") for (; k < kp; ++k) {
    const char* q = pf + (k << two) * 64;
    _mm_prefetch(q, _MM_HINT_T0);
    if (two) _mm_prefetch(q + 64, _MM_HINT_T0);
    step(k);
  }
  _Pragma("GCC unroll 4") for (; k < K; ++k) step(k);
  if (full) {
    _Pragma("GCC unroll 4") for (int r = 0; r < MR; ++r)
      _Pragma("GCC unroll 3") for (int c = 0; c < 3; ++c) _mm256_storeu_ps(out + r * ldo + 8 * c, acc[r][c]);
    return;
  }
  _Pragma("GCC unroll 4") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 3") for (int c = 0; c < 3; ++c) _mm256_store_ps(&t[r][8 * c], acc[r][c]);
  for (int r = 0; r < MR; ++r) std::copy(t[r], t[r] + width, out + r * ldo);
}

// Rows of a packed panel per pass over x's rows: 128 x 24 floats (12 KB) stay in L1 for the
// 4 passes of a decoding step's 16 rows while the next block streams in beside them. Measured
// (C++ harness, Zen 3, 16 rows, 2 threads, SmolLM2's layers cycled from memory; 4 rounds):
// 25.4-27.1 ms a step against 27.9-30.1 with whole panels (55-147 KB, passes 2-4 from L2);
// 64 rows 27.3-28.2.
constexpr int64_t kPackDepth = 128;

// out[:M, :width] (+)= x @ P for one panel P of packed W (K rows of `width` <= 24 columns; a
// narrow one is widened into a zero-padded copy first), kPackDepth rows of P at a time, 4
// rows of x a pass. `next` (`bytes` long) is the panel the thread runs next: each block
// prefetches the one after it, a share a pass.
template <typename T>
void packed_panel(const float* x, int64_t M, int64_t K, const T* p, int64_t width, float* out,
                  int64_t ldo, bool accumulate, const char* next, int64_t bytes) {
  const int64_t passes = (M + 3) / 4, depth = M <= kNnRows ? kPackDepth : K;
  auto blocks = [&](const auto* q) {
    using U = std::remove_const_t<std::remove_pointer_t<decltype(q)>>;
    for (int64_t k0 = 0; k0 < K; k0 += depth) {
      const int64_t kc = std::min(depth, K - k0);
      const bool last = k0 + kc >= K;
      // The block after this one: the panel's next rows, else the next panel's first ones.
      const char* ahead = last ? next : reinterpret_cast<const char*>(q + (k0 + kc) * kPackCols);
      const int64_t ahead_bytes = last ? std::min<int64_t>(bytes, depth * kPackCols * sizeof(T))
                                       : std::min(depth, K - k0 - kc) * kPackCols * static_cast<int64_t>(sizeof(U));
      const int64_t lines = ahead ? (ahead_bytes + 63) / 64 : 0, share = (lines + passes - 1) / passes;
      for (int64_t m = 0, i = 0; m < M; m += 4, ++i) {
        const int64_t n = std::max<int64_t>(0, std::min(share, lines - i * share));
        with_rows<4>(M - m, [&](auto R) {
          packed_tile<U, R>(x + m * K + k0, K, kc, q + k0 * kPackCols, out + m * ldo, ldo, width,
                            accumulate || k0 > 0, n ? ahead + 64 * i * share : nullptr, n);
        });
      }
    }
  };
  if (width == kPackCols) return blocks(p);
  float* t = scratch(K * kPackCols, 2);
  widen_panel(p, K, width, t, kPackCols);
  blocks(static_cast<const float*>(t));
}

// out_i (=, or += with accumulate) x @ W_i for packed weights sharing x (q/k/v), or with gated
// out = silu(x @ W_0) * (x @ W_1): one pool of panels (a gated pair's two panels together)
// that the threads claim one at a time, claiming the next when they start one (to prefetch it).
void packed_many(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K,
                 const std::vector<NnPlan>& plans, bool gated, bool accumulate) {
  std::vector<std::pair<int, int64_t>> tasks;  // (plan, first column)
  for (size_t i = 0; i < (gated ? 1 : plans.size()); ++i) {
    for (int64_t j = 0; j < plans[i].N; j += kPackCols) tasks.emplace_back(static_cast<int>(i), j);
  }
  const int64_t n = static_cast<int64_t>(tasks.size());
  // Panel j of plan `plan` into dst (ld ldo), then prefetching panel after_j of after_plan.
  auto panel = [&](int plan, int64_t j, float* dst, int64_t ldo, bool add, int after_plan,
                   int64_t after_j) {
    const NnPlan& p = plans[plan];
    const char* next = nullptr;
    int64_t bytes = 0;
    if (after_plan >= 0) {
      const NnPlan& q = plans[after_plan];
      const int64_t size = q.bf16 ? 2 : 4;
      next = static_cast<const char*>(q.w) + after_j * K * size;
      bytes = std::min(kPackCols, q.N - after_j) * K * size;
    }
    const int64_t width = std::min(kPackCols, p.N - j);
    if (p.bf16) {
      packed_panel(x, M, K, static_cast<const bf16*>(p.w) + j * K, width, dst, ldo, add, next, bytes);
    } else {
      packed_panel(x, M, K, static_cast<const float*>(p.w) + j * K, width, dst, ldo, add, next, bytes);
    }
  };
  std::atomic<int64_t> claimed{0};
  parallel_for(pool, pool.num_threads() + 1, [&](int64_t) {
    for (int64_t c = claimed.fetch_add(1, std::memory_order_relaxed); c < n;) {
      const int64_t after = claimed.fetch_add(1, std::memory_order_relaxed);
      const auto [plan, j] = tasks[c];
      const int next_plan = after < n ? tasks[after].first : -1;
      const int64_t next_j = after < n ? tasks[after].second : 0;
      const NnPlan& p = plans[plan];
      if (gated) {  // x @ W_up into a strip, then out = silu(x @ W_gate) * strip
        const int64_t width = std::min(kPackCols, p.N - j);
        float* strip = scratch(M * kPackCols);
        panel(0, j, p.out + j, p.N, false, 1, j);  // the up panel next
        panel(1, j, strip, kPackCols, false, next_plan, next_j);
        silu_mul(p.out + j, p.N, strip, kPackCols, M, width, p.out + j, p.N);
      } else {
        panel(plan, j, p.out + j, p.N, accumulate, next_plan, next_j);
      }
      c = after;
    }
  });
}

// gemm_pack for packed W: 48-column panels [p0, p1), each two packed panels side by side.
template <typename T>
void gemm_pack_packed(const void* wv, int64_t N, int64_t K, int64_t p0, int64_t p1, float* dst) {
  const T* w = static_cast<const T*>(wv);
  for (int64_t q = p0; q < p1; ++q) {
    float* d = dst + (q - p0) * K * kTileCols;
    for (int64_t half = 0; half < kTileCols / kPackCols; ++half) {
      const int64_t j = q * kTileCols + half * kPackCols, width = std::max<int64_t>(0, std::min(kPackCols, N - j));
      const T* src = w + j * K;
      float* dh = d + half * kPackCols;
      if (width < kPackCols) {
        widen_panel(src, K, width, dh, kTileCols);
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < kPackCols; ++c) dh[k * kTileCols + c] = widen(src[k * kPackCols + c]);
      }
    }
  }
}

constexpr int64_t kGemmChunk = 128;  // rows of x per pass over a task's panels (x's block in L2)

// Panels [p0, p0 + kGemmPanels) of one plan: copy them (both weights' for a gated pair), then
// for each chunk of rows of x, run every panel kc of its rows at a time against the chunk's
// 8-row tiles. A gated pair's two products land in a chunk-sized strip and leave as one.
void gemm_task(const GemmPlan& g, const float* x, int64_t M, int64_t K, int64_t p0,
               bool accumulate) {
  const int64_t p1 = std::min(g.panels, p0 + kGemmPanels), n = p1 - p0;
  const int64_t copies = g.up ? 2 : 1, panel_size = K * kTileCols;
  float* packed = scratch(copies * n * (panel_size + kGemmChunk * kTileCols));
  float* strip = packed + copies * n * panel_size;  // gated: [2n][chunk][48]
  for (int64_t c = 0; c < copies; ++c) {
    const void* w = c ? g.up : g.w;
    float* dst = packed + c * n * panel_size;
    if (g.packed) {
      g.bf16 ? gemm_pack_packed<bf16>(w, g.N, K, p0, p1, dst) : gemm_pack_packed<float>(w, g.N, K, p0, p1, dst);
    } else {
      g.bf16 ? gemm_pack<bf16>(w, g.N, K, p0, p1, dst) : gemm_pack<float>(w, g.N, K, p0, p1, dst);
    }
  }
  const int64_t blocks = (K + kGemmDepth - 1) / kGemmDepth, kc = (K + blocks - 1) / blocks;
  for (int64_t m0 = 0; m0 < M; m0 += kGemmChunk) {
    const int64_t m1 = std::min(M, m0 + kGemmChunk);
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t rows = std::min(kc, K - k0);
      for (int64_t q = 0; q < copies * n; ++q) {
        const int64_t j = (p0 + q % n) * kTileCols;
        const v::mask mk[3] = {lane_mask(g.N - j), lane_mask(g.N - j - 16), lane_mask(g.N - j - 32)};
        const float* panel = packed + q * panel_size + k0 * kTileCols;
        float* c = g.up ? strip + q * kGemmChunk * kTileCols : g.out + m0 * g.N + j;
        const bool first = k0 == 0 && !accumulate;  // else onto what out (or the strip) holds
        tiles_8x48<float, true>(m1 - m0, x + m0 * K + k0, K, panel, kTileCols, rows, c,
                                g.up ? kTileCols : g.N, mk, first);
      }
    }
    for (int64_t q = 0; g.up && q < n; ++q) {
      const int64_t j = (p0 + q) * kTileCols;
      silu_mul(strip + q * kGemmChunk * kTileCols, kTileCols,
               strip + (q + n) * kGemmChunk * kTileCols, kTileCols, m1 - m0, std::min<int64_t>(kTileCols, g.N - j), g.out + m0 * g.N + j, g.N);
    }
  }
}

// out_i = x @ W_i for M > kNnRows rows: one pool of tasks over every weight's panel pairs.
void gemm_many(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K,
               const std::vector<GemmPlan>& plans, bool accumulate = false) {
  std::vector<std::pair<int, int64_t>> tasks;  // (plan, first panel)
  for (size_t i = 0; i < plans.size(); ++i) {
    for (int64_t p = 0; p < plans[i].panels; p += kGemmPanels) tasks.emplace_back(static_cast<int>(i), p);
  }
  const GemmPlan* ps = plans.data();
  const std::pair<int, int64_t>* ts = tasks.data();
  parallel_for(pool, static_cast<int64_t>(tasks.size()), [=](int64_t t) {
    gemm_task(ps[ts[t].first], x, M, K, ts[t].second, accumulate);
  });
}

template <typename T>
void nt(ffi::ThreadPool& pool, const float* x, const T* w, float* out, int64_t M, int64_t K,
        int64_t N) {
  constexpr int64_t kRowsPerChunk = 64;
  const int64_t chunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  parallel_for(pool, chunks, [=](int64_t c) {
    const int64_t end = std::min(N, (c + 1) * kRowsPerChunk);
    int64_t n0 = c * kRowsPerChunk;
    // nt_tile16's 16 accumulators are 32 ymm registers on AVX2: there groups of 4 rows of W.
    for (; v::kAvx512 && n0 + 16 <= end; n0 += 16) nt_rows16<T>(x, w, out, M, K, N, n0);
    for (; n0 + 4 <= end; n0 += 4) nt_rows<T, 4>(x, w, out, M, K, N, n0);
    for (; n0 < end; ++n0) nt_rows<T, 1>(x, w, out, M, K, N, n0);
  });
}

// gated: two weights [K, N] (an MLP's gate and up) and one output, silu(x @ W0) * (x @ W1).
// accumulate: one weight, then a residual [M, N] that XLA aliases to the output: out = r + x W.
// packed: the weights are in lm.native.pack's layout (not with transpose_w).
ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs args,
                           ffi::RemainingRets outs, bool transpose_w, bool gated,
                           bool accumulate, bool packed) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || x.element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("small_matmul: x must be 2-D float32");
  }
  const size_t n_w = args.size() - (accumulate ? 1 : 0);  // the residual is not a weight
  if (gated ? n_w != 2 || outs.size() != 1 || transpose_w || accumulate
            : n_w == 0 || n_w != outs.size() || (transpose_w && n_w != 1) ||
                  (accumulate && (n_w != 1 || transpose_w)) || (packed && transpose_w)) {
    return ffi::Error::InvalidArgument(
        "small_matmul: one output per weight (one weight for nt or accumulate; two weights, one "
        "output gated; packed weights are not transposed)");
  }
  const int64_t M = xd[0], K = xd[1];
  const float* xp = static_cast<const float*>(x.untyped_data());
  std::vector<NnPlan> plans;
  std::vector<GemmPlan> gemms;
  for (size_t i = 0; i < n_w; ++i) {
    auto w = args.get<ffi::AnyBuffer>(i);
    auto out = outs.get<ffi::AnyBuffer>(gated ? 0 : i);
    if (w.has_error()) return w.error();
    if (out.has_error()) return out.error();
    auto wd = w->dimensions();
    if (wd.size() != 2 || (transpose_w ? wd[1] : wd[0]) != K) {
      return ffi::Error::InvalidArgument("small_matmul: w must be 2-D and contract with x");
    }
    const bool bf = w->element_type() == ffi::BF16;
    if (!bf && w->element_type() != ffi::F32) {
      return ffi::Error::InvalidArgument("small_matmul: w must be float32 or bfloat16");
    }
    if ((*out)->element_type() != ffi::F32) {
      return ffi::Error::InvalidArgument("small_matmul: outputs must be float32");
    }
    const int64_t N = transpose_w ? wd[0] : wd[1];
    float* op = static_cast<float*>((*out)->untyped_data());
    if (transpose_w) {
      bf ? nt<bf16>(pool, xp, static_cast<const bf16*>(w->untyped_data()), op, M, K, N)
         : nt<float>(pool, xp, static_cast<const float*>(w->untyped_data()), op, M, K, N);
      return ffi::Error::Success();
    }
    if (gated && i == 1) {
      if (N != gemms[0].N || bf != gemms[0].bf16) {
        return ffi::Error::InvalidArgument("small_matmul: gated weights must match in shape and dtype");
      }
      gemms[0].up = w->untyped_data();
      continue;
    }
    plans.push_back(NnPlan{w->untyped_data(), bf, N, op, false, 0, 0, nullptr});
    gemms.push_back(GemmPlan{w->untyped_data(), bf, N, op, (N + kTileCols - 1) / kTileCols});
    gemms.back().packed = packed;
  }
  // Packed float32 weights take the 4 x 24 tiles at any number of rows: SmolLM2's 512-token
  // prefill 0.73 against 0.80 s through gemm_many (9 alternated rounds, Zen 3). Packed
  // bfloat16 past kNnRows rows goes to gemm_many, which widens each panel once, in its copy,
  // where the tiles widen on every pass of 4 rows (0.84 against 0.81 s).
  const bool any_bf16 = std::any_of(gemms.begin(), gemms.end(), [](const GemmPlan& g) { return g.bf16; });
  if (packed && (M <= kNnRows || !any_bf16)) {
    if (gated) plans.push_back(NnPlan{gemms[0].up, gemms[0].bf16, gemms[0].N, plans[0].out, false, 0, 0, nullptr});
    packed_many(pool, xp, M, K, plans, gated, accumulate);
  } else if (M > kNnRows) {
    gemm_many(pool, xp, M, K, gemms, accumulate);
  } else if (gated) {  // both products into the caller's scratch, then one pass to the output
    const int64_t N = gemms[0].N;
    float* gu = scratch(2 * M * N, 1);
    plans[0].out = gu;
    plans.push_back(NnPlan{gemms[0].up, gemms[0].bf16, N, gu + M * N, false, 0, 0, nullptr});
    nn_many(pool, xp, M, K, plans);
    silu_mul(gu, N, gu + M * N, N, M, N, gemms[0].out, N);
  } else {
    nn_many(pool, xp, M, K, plans, accumulate);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Attention of one new token per row to a KV cache (a decoding step), for rows of 1 to 16.
//
//   out[b, n, :] = softmax_s(q[b, n, :] . K[b, n / G, :, s] * scale, mask[b, s]) @ V[b, n / G]
//
// K cache [B, KV, H, S], V cache [B, KV, S, H] (lm.model.init_cache's layouts), float32 or
// bfloat16; q and out float32 [B, N, H], N = G * KV heads. Why: through XLA a step's attention
// is a batch of B * KV tiny products ([G, H] x [H, S], then [G, S] x [S, H]) plus a softmax in
// five more ops, ~0.4 ms a layer at batch 16 (15% of a SmolLM2 step, more than its 576 x 576
// projections); here each (row, KV head) pair is one task that reads its keys and values once.
// A masked key scores the lowest float32, as lm.layers.dot_attention, so a row without any
// visible key averages all values (never the case in decoding: a token sees itself).

// x rotated by RoPE (Su et al. 2021) in HF's rotate-half layout: for i < half = H / 2,
// (x[i], x[i + half]) -> (x[i] c[i] - x[i + half] s[i], x[i + half] c[i] + x[i] s[i]), with c
// and s the cosines and sines of the token's angles. half == 0: no rotation (a copy).
// Rotating here saves XLA's elementwise ops on q and k (a batch-16 decoding step spent ~3 ms
// of ~60 in them, a 512-token prefill ~40 ms).
inline void rope(const float* x, const float* c, const float* s, int64_t H, int64_t half,
                 float* out) {
  if (half == 0) {
    std::copy(x, x + H, out);
    return;
  }
  for (int64_t i = 0; i < half; i += 16) {
    const v::mask m = lane_mask(half - i);
    const v::f32 x1 = v::maskz_loadu(m, x + i), x2 = v::maskz_loadu(m, x + half + i);
    const v::f32 cv = v::maskz_loadu(m, c + i), sv = v::maskz_loadu(m, s + i);
    v::mask_storeu(out + i, m, v::fnmadd(x2, sv, v::mul(x1, cv)));
    v::mask_storeu(out + half + i, m, v::fmadd(x1, sv, v::mul(x2, cv)));
  }
}

// float32 -> T: bfloat16 rounds to nearest even (as XLA's convert).
inline void store_as(float* p, float x) { *p = x; }
inline void store_as(bf16* p, float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    *p = static_cast<bf16>((u >> 16) | 0x40);  // NaN stays NaN
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1);
  *p = static_cast<bf16>(u >> 16);
}

// x[0, n) <- e^(x - max x) (a softmax's numerators, in place); returns 1 / their sum.
inline float softmax_row(float* x, int64_t n) {
  v::f32 mx = v::set1(-3.4028235e38f);
  int64_t s = 0;
  for (; s + 16 <= n; s += 16) mx = v::max(mx, v::loadu(x + s));
  const v::mask tail = lane_mask(n - s);
  if (n - s) mx = v::mask_max(mx, tail, mx, v::maskz_loadu(tail, x + s));
  const v::f32 m = v::set1(v::reduce_max(mx));
  v::f32 sum = v::setzero();
  for (s = 0; s + 16 <= n; s += 16) {
    const v::f32 e = v::exp(v::sub(v::loadu(x + s), m));
    v::storeu(x + s, e);
    sum = v::add(sum, e);
  }
  if (n - s) {
    const v::f32 e = v::exp(v::sub(v::maskz_loadu(tail, x + s), m));
    v::mask_storeu(x + s, tail, e);
    sum = v::mask_add(sum, tail, sum, e);
  }
  return 1.0f / v::reduce_add(sum);
}

// Query heads attended together (the G heads of one KV head share its K and V), and vectors
// of 16 columns per pass: their accumulators fill 12 of AVX2's 16 ymm registers (a vector is
// two) or 16 of AVX-512's 32 zmm. Measured on Zen 3 (one SmolLM2 layer's call at batch 16,
// 141 of 256 slots filled, 30 layers' donated caches cycled, timed from Python): 487-526
// against 557-632 us in float32 and 465-479 against 609-767 in bfloat16 for one head at a
// time over 64 columns; in a profiled batch-16 step the attention's share in bfloat16 fell
// from 9.9% to 7.5% (float32's stayed ~8%: its cache reads wait on memory).
constexpr int kHeadsMax = v::kAvx512 ? 4 : 3;
constexpr int kAttnVecs = v::kAvx512 ? 4 : 2;

// acc[g] = sum_i a[g * lda + i] * rows[i, col0 : col0 + 16 NV] for GR heads g, rows [n, width]
// (row-major): each row segment is loaded (and widened) once for all GR heads, where one head
// at a time paid a load per FMA. mk masks off the columns at or past limit (<= width).
template <typename T, int GR, int NV, bool Full>
void combine_heads_rows(const float* a, int64_t lda, const T* rows, int64_t n, int64_t width,
                        int64_t col0, const v::mask (&mk)[NV], v::f32 (&acc)[GR][NV]) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = rows + i * width + col0;
    v::f32 x[GR];
    _Pragma("GCC unroll 4") for (int g = 0; g < GR; ++g) x[g] = v::set1(a[g * lda + i]);
    _Pragma("GCC unroll 4") for (int c = 0; c < NV; ++c) {
      const v::f32 b = Full ? load16(row + 16 * c) : load16(row + 16 * c, mk[c]);
      _Pragma("GCC unroll 4") for (int g = 0; g < GR; ++g) acc[g][c] = v::fmadd(x[g], b, acc[g][c]);
    }
  }
}

template <typename T, int GR, int NV>
void combine_heads(const float* a, int64_t lda, const T* rows, int64_t n, int64_t width,
                   int64_t limit, int64_t col0, v::mask (&mk)[NV], v::f32 (&acc)[GR][NV]) {
  bool full = true;
  for (int c = 0; c < NV; ++c) {
    mk[c] = lane_mask(limit - col0 - 16 * c);
    full = full && mk[c] == v::mask(0xFFFF);
    for (int g = 0; g < GR; ++g) acc[g][c] = v::setzero();
  }
  if (full) {
    combine_heads_rows<T, GR, NV, true>(a, lda, rows, n, width, col0, mk, acc);
  } else {
    combine_heads_rows<T, GR, NV, false>(a, lda, rows, n, width, col0, mk, acc);
  }
}

// GR query heads (q [GR, H]) against the first n of S keys of one KV head.
template <typename T, int GR>
void attend_heads(const float* q, const T* k, const T* v, const uint8_t* mask, float* out,
                  int64_t H, int64_t S, int64_t n, float scale, float* scores) {
  constexpr int NV = kAttnVecs;
  const v::f32 lowest = v::set1(-3.4028235e38f);
  v::mask mk[NV];
  v::f32 acc[GR][NV];
  // scores[g, s] = sum_h q[g, h] K[h, s]: K's rows are contiguous in s.
  for (int64_t s0 = 0; s0 < n; s0 += 16 * NV) {
    combine_heads<T, GR, NV>(q, H, k, H, S, n, s0, mk, acc);
    for (int c = 0; c < NV; ++c) {
      if (!mk[c]) break;
      const v::mask seen = v::nonzero16(mask + s0 + 16 * c, mk[c]);
      for (int g = 0; g < GR; ++g) {
        const v::f32 sc = v::mask_blend(seen, lowest, v::mul(acc[g][c], v::set1(scale)));
        v::mask_storeu(scores + g * S + s0 + 16 * c, mk[c], sc);
      }
    }
  }
  float inv[GR];
  for (int g = 0; g < GR; ++g) inv[g] = softmax_row(scores + g * S, n);
  // out[g] = (sum_s p[g, s] V[s, :]) / sum_s p[g, s]: V's rows are contiguous in h.
  for (int64_t h0 = 0; h0 < H; h0 += 16 * NV) {
    combine_heads<T, GR, NV>(scores, S, v, n, H, H, h0, mk, acc);
    for (int g = 0; g < GR; ++g) {
      for (int c = 0; c < NV; ++c) {
        v::mask_storeu(out + g * H + h0 + 16 * c, mk[c], v::mul(acc[g][c], v::set1(inv[g])));
      }
    }
  }
}

// One (row, KV head): G query heads against S keys of head size H.
template <typename T>
void attend_one(const float* q, const T* k, const T* v, const uint8_t* mask, float* out,
                int64_t G, int64_t H, int64_t S, float scale, float* scores) {
  // Slots past the last one the mask admits weigh exactly 0 after the softmax: skip them (a
  // decoding step's cache is filled up to its index; the rest of the bucket is empty). With
  // no slot admitted, all S stay (a uniform average, as without the cut).
  int64_t n = S;
  while (n > 0 && !mask[n - 1]) --n;
  if (n == 0) n = S;
  for (int64_t g = 0; g < G; g += kHeadsMax) {
    with_rows<kHeadsMax>(G - g, [&](auto R) {
      attend_heads<T, R>(q + g * H, k, v, mask, out + g * H, H, S, n, scale, scores + g * S);
    });
  }
}

// Writes the step's new key and value into slot `index` of the (aliased, updated in place)
// cache, then attends. Doing the write here saves XLA's two dynamic-update-slices a layer: the
// new key is a column of the [H, S] key block, 3072 scattered floats at batch 16 (~50 us).
template <typename T>
void write_slot(const float* k_new, const T* v_new, T* k, T* v, int64_t H, int64_t S,
                int64_t index) {
  for (int64_t h = 0; h < H; ++h) store_as(k + h * S + index, k_new[h]);
  std::copy(v_new, v_new + H, v + index * H);
}

// One (row, KV head) task of a step: RoPE on its queries and key, the cache slot, then the
// attention. Offsets count elements from the starts of the new entries and of the caches.
template <typename T>
void step_task(const float* q, const float* k_new, const void* v_new, int64_t new_off, void* k,
               void* v, int64_t kv_off, const uint8_t* mask, float* out, int64_t G, int64_t H,
               int64_t S, int64_t slot, float scale, const float* c, const float* sn,
               int64_t half) {
  float* qr = scratch((G + 1) * H + G * S);
  float* kr = qr + G * H;
  for (int64_t g = 0; g < G; ++g) rope(q + g * H, c, sn, H, half, qr + g * H);
  rope(k_new + new_off, c, sn, H, half, kr);
  T* kb = static_cast<T*>(k) + kv_off;
  T* vb = static_cast<T*>(v) + kv_off;
  write_slot<T>(kr, static_cast<const T*>(v_new) + new_off, kb, vb, H, S, slot);
  attend_one<T>(qr, kb, vb, mask, out, G, H, S, scale, kr + H);
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k_new, ffi::AnyBuffer v_new,
                               ffi::AnyBuffer k_in, ffi::AnyBuffer v_in,
                               ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::U8> mask,
                               ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                               ffi::ResultBuffer<ffi::F32> out,
                               ffi::Result<ffi::AnyBuffer> k, ffi::Result<ffi::AnyBuffer> v,
                               float scale) {
  auto qd = q.dimensions(), kd = k->dimensions(), vd = v->dimensions(), md = mask.dimensions();
  auto knd = k_new.dimensions(), vnd = v_new.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || knd.size() != 3 ||
      vnd.size() != 3 || index.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "decode_attention: q [B, N, H], new k and v [B, KV, H], caches k [B, KV, H, S] and "
        "v [B, KV, S, H], index [], mask [B, S], cos and sin [B, H / 2] or [B, 0]");
  }
  const int64_t B = qd[0], N = qd[1], H = qd[2], KV = kd[1], S = kd[3];
  if (kd[0] != B || kd[2] != H || vd[0] != B || vd[1] != KV || vd[2] != S || vd[3] != H ||
      md[0] != B || md[1] != S || KV == 0 || N % KV != 0 || knd[0] != B || knd[1] != KV ||
      knd[2] != H || vnd[0] != B || vnd[1] != KV || vnd[2] != H) {
    return ffi::Error::InvalidArgument("decode_attention: operand shapes do not match");
  }
  auto cd = cos.dimensions(), sd = sin.dimensions();
  const int64_t half = cd.size() == 2 ? cd[1] : -1;
  if (cd.size() != 2 || sd.size() != 2 || cd[0] != B || sd[0] != B || sd[1] != half ||
      (half != 0 && 2 * half != H)) {
    return ffi::Error::InvalidArgument("decode_attention: cos and sin must be [B, H / 2] or [B, 0]");
  }
  const auto type = k->element_type();
  if (v->element_type() != type || v_new.element_type() != type ||
      (type != ffi::F32 && type != ffi::BF16)) {
    return ffi::Error::InvalidArgument(
        "decode_attention: the cache and the new entries must be float32 or bfloat16 alike");
  }
  const int64_t slot = index.typed_data()[0];
  if (slot < 0 || slot >= S) {
    return ffi::Error::InvalidArgument("decode_attention: index outside the cache");
  }
  const bool bf = type == ffi::BF16;
  const int64_t G = N / KV;
  const float* qp = q.typed_data();
  const uint8_t* mp = mask.typed_data();
  float* op = out->typed_data();
  void* kp = k->untyped_data();
  void* vp = v->untyped_data();
  const float* knp = k_new.typed_data();
  const void* vnp = v_new.untyped_data();
  const float* cp = cos.typed_data();
  const float* sp = sin.typed_data();
  parallel_for(pool, B * KV, [=](int64_t task) {
    const int64_t b = task / KV, kv = task % KV;
    const int64_t q_off = (b * N + kv * G) * H, kv_off = (b * KV + kv) * H * S;
    const int64_t new_off = (b * KV + kv) * H;
    (bf ? step_task<bf16> : step_task<float>)(qp + q_off, knp, vnp, new_off, kp, vp, kv_off,
                                              mp + b * S, op + q_off, G, H, S, slot, scale,
                                              cp + b * half, sp + b * half, half);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Attention of T new tokens per row (a prompt's prefill), written into the KV cache first.
//
//   K[b, kv, :, index + t] = k_new[b, t, kv, :],  V[b, kv, index + t, :] = v_new[b, t, kv, :]
//   out[b, t, n, :] = softmax_s(q[b, t, n, :] . K[b, n / G, :, s] * scale, mask[b, t, s]) @ V
//                     over the first E cache slots (E = mask's last dimension).
//
// Why: through XLA a 512-token SmolLM2 prefill spent a third of its time (~0.3 s of 0.9) in
// attention and the transposed cache writes: blocks of batched products over re-laid-out
// queries, dense masks and copies, each op a pass over memory. Here one task takes a (row,
// KV head, block of tokens) and keeps everything in cache: tiles of up to 12 query vectors
// (the G heads of consecutive tokens) against 32 keys or 32 value columns live in 24
// registers while K's [H, S] rows (or V's [S, H] rows) stream through them: 2 loads per 24
// FMAs (6 x 64 tiles took 4 loads, and a 512-token SmolLM2 layer 2.1-2.3 ms against 1.9 on
// 2 threads; 8 x 48 was no better than 12 x 32). Each query vector
// reads keys only up to its last visible one (the mask's last set entry, so a causal mask
// skips the upper triangle); a masked key scores the lowest float32, as
// lm.layers.dot_attention, and a vector that sees no key averages all E values.

// query vectors per register tile: 12 x 2 accumulators (AVX2: 2 x 2, as gemm_tiles)
constexpr int kAttRows = v::kAvx512 ? 12 : 2;
constexpr int kAttCols = 2;     // 32 keys or value columns per tile, so 2 loads feed 24 FMAs
constexpr int64_t kTokBlock = 32;  // tokens per task

// acc[r * C + c] = sum_l A(r, l) * B[l * ldb + 16 c] for R rows and C vectors of 16 columns
// (masked by mk; B float32 or bfloat16, widened in registers). A(r, l) is a[r * lda + l], or with TA (A given transposed, [L, rows])
// a[l * lda + r]: the backward pass's dS^T Q and P^T dO read dS and P down their columns
// instead of transposing them (two [64, 64] copies a task, a sixth of its time).
template <typename T, int R, int C, bool TA, bool Full = false>
inline void tile_gemm(const float* a, int64_t lda, int64_t L, const T* b, int64_t ldb,
                      const v::mask* mk, v::f32* out) {
  v::f32 acc[R][C];  // local accumulators: registers (accumulating into `out` kept it in memory)
  _Pragma("GCC unroll 12") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 4") for (int c = 0; c < C; ++c) acc[r][c] = v::setzero();
  auto step = [&](int64_t l) __attribute__((always_inline)) {
    const T* bl = b + l * ldb;
    v::f32 bv[C];
    _Pragma("GCC unroll 4") for (int c = 0; c < C; ++c) {
      bv[c] = Full ? load16(bl + 16 * c) : load16(bl + 16 * c, mk[c]);  // Full: as tile_8x48
    }
    _Pragma("GCC unroll 12") for (int r = 0; r < R; ++r) {
      const v::f32 ab = v::set1(TA ? a[l * lda + r] : a[r * lda + l]);
      _Pragma("GCC unroll 4") for (int c = 0; c < C; ++c) acc[r][c] = v::fmadd(ab, bv[c], acc[r][c]);
    }
  };
  if constexpr (v::kAvx512) {
    for (int64_t l = 0; l < L; ++l) step(l);
  } else {
    _Pragma("GCC unroll 4") for (int64_t l = 0; l < L; ++l) step(l);  // as tile_8x48
  }
  _Pragma("GCC unroll 12") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 4") for (int c = 0; c < C; ++c) out[r * C + c] = acc[r][c];
}

// R query vectors (rows of q [R, H], mask rows m[r] of E bytes) against keys [0, e): scores
// into sc[r * ld ...], softmaxed in place (unnormalized), then out[r] = P V / row sum, in
// blocks of 16 * C keys (or value columns): R x C accumulators.
template <typename T, int R, int C>
void tile_attend(const float* q, const uint8_t* const* m, const T* k, const T* v,
                 float* const* out, int64_t H, int64_t S, int64_t e, float scale, float* sc,
                 int64_t ld) {
  const v::f32 lowest = v::set1(-3.4028235e38f);
  v::f32 acc[R * C];
  v::mask mk[C];
  for (int64_t s0 = 0; s0 < e; s0 += 16 * C) {
    for (int c = 0; c < C; ++c) mk[c] = lane_mask(e - s0 - 16 * c);
    tile_gemm<T, R, C, false>(q, H, H, k + s0, S, mk, acc);
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C && mk[c]; ++c) {
        const v::mask seen = v::nonzero16(m[r] + s0 + 16 * c, mk[c]);
        const v::f32 x = v::mask_blend(seen, lowest, v::mul(acc[r * C + c], v::set1(scale)));
        v::mask_storeu(sc + r * ld + s0 + 16 * c, mk[c], x);
      }
    }
  }
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = softmax_row(sc + r * ld, e);
  for (int64_t h0 = 0; h0 < H; h0 += 16 * C) {
    for (int c = 0; c < C; ++c) mk[c] = lane_mask(H - h0 - 16 * c);
    tile_gemm<T, R, C, false>(sc, ld, e, v + h0, H, mk, acc);
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        v::mask_storeu(out[r] + h0 + 16 * c, mk[c], v::mul(acc[r * C + c], v::set1(inv[r])));
      }
    }
  }
}

// 1 + the index of the last nonzero byte of m[0, n), 0 if none: 64 bytes at a time from the end.
inline int64_t last_set(const uint8_t* m, int64_t n) {
  while (n > 0) {
    const int64_t lo = std::max<int64_t>(0, n - 64);
    const uint64_t nz = v::nonzero64(m + lo, n - lo >= 64 ? ~0ull : (1ull << (n - lo)) - 1);
    if (nz) return lo + 64 - __builtin_clzll(nz);
    n = lo;
  }
  return 0;
}

// Shapes of a prefill call (see PrefillAttentionImpl).
struct Prefill {
  int64_t B, T, N, KV, G, H, S, E, index, half;
  float scale;
  const float* cos;  // [B, T, half]
  const float* sin;
};

// Tokens [t0, t1) of row b against KV head kv: the G query vectors of each token, 6 at a time.
template <typename T>
void prefill_task(const Prefill& d, const float* q, const uint8_t* mask, const T* k, const T* v,
                  float* out, int64_t b, int64_t kv, int64_t t0, int64_t t1) {
  const int64_t ld = (d.E + 15) / 16 * 16;
  float* sc = scratch(kAttRows * (ld + d.H));
  float* qbuf = sc + kAttRows * ld;  // the tile's queries after RoPE
  const T* kb = k + (b * d.KV + kv) * d.H * d.S;
  const T* vb = v + (b * d.KV + kv) * d.S * d.H;
  const int64_t total = (t1 - t0) * d.G;
  for (int64_t i0 = 0; i0 < total; i0 += kAttRows) {
    const int R = static_cast<int>(std::min<int64_t>(kAttRows, total - i0));
    const uint8_t* mr[kAttRows];
    float* orow[kAttRows];
    int64_t e = 0;
    bool blind = false;  // a vector that sees no key: the whole tile reads all E keys
    for (int r = 0; r < R; ++r) {
      const int64_t t = t0 + (i0 + r) / d.G, n = kv * d.G + (i0 + r) % d.G;
      const int64_t off = ((b * d.T + t) * d.N + n) * d.H;
      const int64_t bt = (b * d.T + t) * d.half;
      rope(q + off, d.cos + bt, d.sin + bt, d.H, d.half, qbuf + r * d.H);
      orow[r] = out + off;
      mr[r] = mask + (b * d.T + t) * d.E;
      const int64_t last = last_set(mr[r], d.E);
      blind |= last == 0;
      e = std::max(e, last);
    }
    if (blind) e = d.E;
    if constexpr (kAttRows == 12) {
      switch (R) {
        case 1: tile_attend<T, 1, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 2: tile_attend<T, 2, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 3: tile_attend<T, 3, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 4: tile_attend<T, 4, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 5: tile_attend<T, 5, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 6: tile_attend<T, 6, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 7: tile_attend<T, 7, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 8: tile_attend<T, 8, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 9: tile_attend<T, 9, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 10: tile_attend<T, 10, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        case 11: tile_attend<T, 11, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
        default: tile_attend<T, kAttRows, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld); break;
      }
    } else {
      with_rows<kAttRows>(R, [&](auto Rt) {
        tile_attend<T, Rt, kAttCols>(qbuf, mr, kb, vb, orow, d.H, d.S, e, d.scale, sc, ld);
      });
    }
  }
}

// The new keys and values of row b, KV head kv into cache slots [index, index + T): keys as
// the columns of the [H, S] block (a transpose), values as rows.
template <typename T>
void prefill_write(const Prefill& d, const float* k_new, const T* v_new, T* k, T* v, int64_t b,
                   int64_t kv) {
  T* kb = k + (b * d.KV + kv) * d.H * d.S + d.index;
  T* vb = v + ((b * d.KV + kv) * d.S + d.index) * d.H;
  float* kr = scratch(d.H);
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t off = ((b * d.T + t) * d.KV + kv) * d.H;
    const int64_t bt = (b * d.T + t) * d.half;
    rope(k_new + off, d.cos + bt, d.sin + bt, d.H, d.half, kr);
    for (int64_t h = 0; h < d.H; ++h) store_as(kb + h * d.S + t, kr[h]);
    std::copy(v_new + off, v_new + off + d.H, vb + t * d.H);
  }
}

ffi::Error PrefillAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                ffi::Buffer<ffi::F32> k_new, ffi::AnyBuffer v_new,
                                ffi::AnyBuffer k_in, ffi::AnyBuffer v_in,
                                ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::U8> mask,
                                ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                ffi::ResultBuffer<ffi::F32> out,
                                ffi::Result<ffi::AnyBuffer> k, ffi::Result<ffi::AnyBuffer> v,
                                float scale) {
  auto qd = q.dimensions(), kd = k->dimensions(), vd = v->dimensions(), md = mask.dimensions();
  auto knd = k_new.dimensions(), vnd = v_new.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3 || knd.size() != 4 ||
      vnd.size() != 4 || index.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "prefill_attention: q [B, T, N, H], new k and v [B, T, KV, H], caches k [B, KV, H, S] "
        "and v [B, KV, S, H], index [], mask [B, T, E], cos and sin [B, T, H / 2] or [B, T, 0]");
  }
  Prefill d;
  d.B = qd[0], d.T = qd[1], d.N = qd[2], d.H = qd[3], d.KV = kd[1], d.S = kd[3], d.E = md[2];
  if (kd[0] != d.B || kd[2] != d.H || vd[0] != d.B || vd[1] != d.KV || vd[2] != d.S ||
      vd[3] != d.H || md[0] != d.B || md[1] != d.T || d.E > d.S || d.E == 0 || d.KV == 0 ||
      d.N % d.KV != 0 || knd[0] != d.B || knd[1] != d.T || knd[2] != d.KV || knd[3] != d.H ||
      vnd[0] != d.B || vnd[1] != d.T || vnd[2] != d.KV || vnd[3] != d.H) {
    return ffi::Error::InvalidArgument("prefill_attention: operand shapes do not match");
  }
  auto cd = cos.dimensions(), sd = sin.dimensions();
  d.half = cd.size() == 3 ? cd[2] : -1;
  if (cd.size() != 3 || sd.size() != 3 || cd[0] != d.B || cd[1] != d.T || sd[0] != d.B ||
      sd[1] != d.T || sd[2] != d.half || (d.half != 0 && 2 * d.half != d.H)) {
    return ffi::Error::InvalidArgument(
        "prefill_attention: cos and sin must be [B, T, H / 2] or [B, T, 0]");
  }
  d.cos = cos.typed_data();
  d.sin = sin.typed_data();
  const auto type = k->element_type();
  if (v->element_type() != type || v_new.element_type() != type ||
      (type != ffi::F32 && type != ffi::BF16)) {
    return ffi::Error::InvalidArgument(
        "prefill_attention: the cache and the new entries must be float32 or bfloat16 alike");
  }
  d.index = index.typed_data()[0];
  if (d.index < 0 || d.index + d.T > d.S) {
    return ffi::Error::InvalidArgument("prefill_attention: the new tokens overrun the cache");
  }
  d.G = d.N / d.KV;
  d.scale = scale;
  const bool bf = type == ffi::BF16;
  const float* qp = q.typed_data();
  const uint8_t* mp = mask.typed_data();
  float* op = out->typed_data();
  void* kp = k->untyped_data();
  void* vp = v->untyped_data();
  const float* knp = k_new.typed_data();
  const void* vnp = v_new.untyped_data();
  parallel_for(pool, d.B * d.KV, [=](int64_t task) {
    const int64_t b = task / d.KV, kv = task % d.KV;
    if (bf) {
      prefill_write<bf16>(d, knp, static_cast<const bf16*>(vnp), static_cast<bf16*>(kp),
                          static_cast<bf16*>(vp), b, kv);
    } else {
      prefill_write<float>(d, knp, static_cast<const float*>(vnp), static_cast<float*>(kp),
                           static_cast<float*>(vp), b, kv);
    }
  });
  // Later tokens see more keys: their blocks go first, so the last tasks claimed are short.
  const int64_t blocks = (d.T + kTokBlock - 1) / kTokBlock;
  parallel_for(pool, d.B * d.KV * blocks, [=](int64_t task) {
    const int64_t blk = blocks - 1 - task / (d.B * d.KV), bk = task % (d.B * d.KV);
    const int64_t b = bk / d.KV, kv = bk % d.KV;
    const int64_t t0 = blk * kTokBlock, t1 = std::min(d.T, t0 + kTokBlock);
    if (bf) {
      prefill_task<bf16>(d, qp, mp, static_cast<const bf16*>(kp), static_cast<const bf16*>(vp),
                         op, b, kv, t0, t1);
    } else {
      prefill_task<float>(d, qp, mp, static_cast<const float*>(kp),
                          static_cast<const float*>(vp), op, b, kv, t0, t1);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Training attention for short sequences (forward, and its gradient), float32.
//
//   o = softmax(q k^T * scale, mask) v       per (row, head); G query heads share a KV head
//
// Why: a small model's training step at T = 64 (the Shakespeare recipe: 4 heads of 32) spent
// ~20 ms of ~70 in XLA's attention ops, each a pass over tiny tensors plus transposes. Here one
// task takes a (row, KV head) and every product is a small dense one held in registers
// (gemm_small), reading q, k, v and writing o, P and the gradients in place through row
// strides (no gathered copies), and skipping the keys past a block of queries' last visible
// one (a causal mask's upper triangle). The forward returns the probabilities P as the
// residual of the backward:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K * scale,
//   dK = dS^T Q * scale.
// Measured (one thread, the Shakespeare shapes: 48 tasks of T = 64, H = 32): forward 0.47 ms,
// backward 0.56 ms a layer, against 0.62 and 1.33 ms with gathered copies, explicit
// transposes of dS and P and four-vector tiles on 32-float heads.

inline float sum16(const float* a, const float* b, int64_t n) {  // sum a*b (b null: sum a)
  v::f32 acc = v::setzero();
  for (int64_t i = 0; i < n; i += 16) {
    const v::mask m = lane_mask(n - i);
    const v::f32 x = v::maskz_loadu(m, a + i);
    acc = b ? v::fmadd(x, v::maskz_loadu(m, b + i), acc) : v::add(acc, x);
  }
  return v::reduce_add(acc);
}


// Register tiles of C vectors of columns: 6 rows of 4 vectors or 12 of 2 (at most 24
// accumulators + C loads + 1 broadcast of the 32 registers). Two vectors serve 32-float heads
// (the Shakespeare recipe's), where four would leave half the multiplies on masked lanes.
template <int C, bool TA>
void gemm_tiles(const float* A, int64_t lda, const float* B, int64_t ldb, float* Cm, int64_t ldc,
                int64_t M, int64_t L, int64_t N, float alpha, bool accumulate) {
  // AVX2: 2 rows of 2 vectors, 8 accumulators + 4 loads + 1 broadcast of its 16 ymm
  // registers (3 rows spilled an accumulator to the stack every step: 36 against 67-82
  // GFLOP/s, Zen 3, one thread, the Shakespeare MLP's products).
  constexpr int RT = (v::kAvx512 ? 24 : 4) / C;
  // Zen 3, 2 threads, the Shakespeare layer's attention (12 x 64 tokens, 4 heads of 32), 4
  // alternated runs each, packing every panel against none of these: backward 0.60-0.91 ->
  // 0.52-0.57 ms, forward 0.50-0.78 -> 0.47-0.64 ms. (Same products in the same order.)
  constexpr int64_t kPackAbove = 64;
  v::f32 acc[RT * C];
  v::mask mk[C];
  const v::f32 al = v::set1(alpha);
  // Column panels outside, row tiles inside: a panel of B (L x 64 floats, 32 KB at L = 128)
  // stays in L1 while every row tile passes over it.
  for (int64_t n0 = 0; n0 < N; n0 += 16 * C) {
    for (int c = 0; c < C; ++c) mk[c] = lane_mask(N - n0 - 16 * c);
    const float* panel = B + n0;
    int64_t ldp = ldb;
    if (!v::kAvx512 && (L > kPackAbove || N - n0 < 16 * C)) {
      // AVX2's 2-row tiles pass over the panel 24 times for 48 rows: copied once, contiguous
      // and zero past N, it stays in L1 (in place, its rows ldb apart, 2 KB at N = 512, fall
      // into few L1 sets). Zen 3, one thread, 48 x 128 x 512 with 3-row tiles: 29 -> 37 GFLOP/s.
      // A whole panel of at most kPackAbove rows is read in place (the training attention's
      // products, L = H or the visible keys): there the copy cost more than it saved.
      float* packed = scratch(L * 16 * C, 2);
      for (int64_t l = 0; l < L; ++l) {
        for (int c = 0; c < C; ++c) v::storeu(packed + (l * C + c) * 16, v::maskz_loadu(mk[c], B + l * ldb + n0 + 16 * c));
      }
      panel = packed, ldp = 16 * C;
    }
    for (int64_t m0 = 0; m0 < M; m0 += RT) {
      const int R = static_cast<int>(std::min<int64_t>(RT, M - m0));
      with_rows<RT>(R, [&](auto Rt) {
        const float* a = TA ? A + m0 : A + m0 * lda;
        tile_gemm<float, Rt, C, TA, !v::kAvx512>(a, lda, L, panel, ldp, mk, acc);
      });
      for (int r = 0; r < R; ++r) {
        float* cr = Cm + (m0 + r) * ldc + n0;
        for (int c = 0; c < C; ++c) {
          v::f32 x = v::mul(acc[r * C + c], al);
          if (accumulate) x = v::add(x, v::maskz_loadu(mk[c], cr + 16 * c));
          v::mask_storeu(cr + 16 * c, mk[c], x);
        }
      }
    }
  }
}

// C[M, N] = alpha * A[M, L] @ B[L, N] (+ C with accumulate); row strides lda, ldb, ldc. With
// ta, A is given transposed: A[m, l] at A[l * lda + m].
void gemm_small(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                int64_t M, int64_t L, int64_t N, float alpha, bool ta = false,
                bool accumulate = false) {
  // AVX2: always 2 vectors of columns (3 rows x 2 = 12 of its 16 ymm registers; 4 vectors
  // leave one row a tile, every panel load feeding only 4 FMAs).
  if (N <= 32 || !v::kAvx512) {
    (ta ? gemm_tiles<2, true> : gemm_tiles<2, false>)(A, lda, B, ldb, C, ldc, M, L, N, alpha, accumulate);
  } else {
    (ta ? gemm_tiles<4, true> : gemm_tiles<4, false>)(A, lda, B, ldb, C, ldc, M, L, N, alpha, accumulate);
  }
}

// dst[c, r] = src[r, c] for src [rows, cols] (row stride lds) into dst (row stride ldd).
// In 16 x 16 blocks: a [128, 512] weight column by column took ~0.5 ms (every store another
// cache line); a block's 16 destination lines stay in L1 while it is written (52 us).
inline void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows,
                      int64_t cols) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16)
      for (int64_t r = r0; r < std::min(rows, r0 + 16); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + 16); ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Shapes of a training-attention call. Token (b, t)'s query heads are the row
// q + (b * T + t) * qs ([N, H]), key (b, s)'s heads k + (b * S + s) * ks ([KV, H]), likewise v
// with vs; dq, dk and dv have the strides of q, k and v. Separate q [B, T, N, H], k and v
// [B, S, KV, H] have strides N * H and KV * H; the fused projection [B, T, (N + 2 KV) H] gives
// all three the stride (N + 2 KV) H and offsets 0, N H and (N + KV) H, so the model's q/k/v
// slices and the concatenation of their gradients are not copies of their own.
struct TrainAtt {
  int64_t B, T, S, N, KV, G, H;
  int64_t qs, ks, vs;
  float scale;
};

// Query rows per block of a task: the scores of a block are computed up to its last visible
// key, so a causal mask skips (most of) the upper triangle.
constexpr int64_t kAttBlock = 12;

// ext[t] = 1 + the last key token t of row b sees (S for a token that sees none: it averages
// all values, as lm.layers.dot_attention), in a buffer of the thread's.
const int64_t* key_extents(const TrainAtt& d, const uint8_t* mask, int64_t b) {
  thread_local std::vector<int64_t> buf;
  if (buf.size() < static_cast<size_t>(d.T)) buf.resize(d.T);
  int64_t* ext = buf.data();
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t e = last_set(mask + (b * d.T + t) * d.S, d.S);
    ext[t] = e ? e : d.S;
  }
  return ext;
}

inline int64_t block_extent(const int64_t* ext, int64_t t0, int64_t t1) {
  return *std::max_element(ext + t0, ext + t1);
}

// Scores of rows [t0, t1) in p (row stride S), valid over [0, e): masked keys to the lowest
// float32, softmax, the columns from e on set to 0.
void softmax_block(float* p, int64_t S, const uint8_t* mask, int64_t t0, int64_t t1, int64_t e) {
  const v::f32 lowest = v::set1(-3.4028235e38f);
  if (S <= 64) {
    // A row in four registers, in one pass (the general loop below makes four passes with
    // two horizontal reductions and a fill a row: 5.2 of a task's 12 us at S = 64).
    const uint64_t cols = S == 64 ? ~0ull : (1ull << S) - 1;
    const uint64_t upto = e == 64 ? ~0ull : (1ull << e) - 1;
    for (int64_t t = t0; t < t1; ++t) {
      const uint64_t seen = v::nonzero64(mask + t * S, upto);  // visible keys below e
      float* pr = p + t * S;
      v::f32 x[4];
      v::f32 mx = lowest;
      for (int c = 0; c < 4; ++c) {
        const v::mask in = static_cast<v::mask>(upto >> (16 * c));
        x[c] = v::mask_blend(static_cast<v::mask>(seen >> (16 * c)), lowest,
                                    v::maskz_loadu(in, pr + 16 * c));
        mx = v::max(mx, x[c]);
      }
      const v::f32 m = v::set1(v::reduce_max(mx));
      v::f32 sum = v::setzero();
      for (int c = 0; c < 4; ++c) {
        // Lanes past S hold the lowest too: keep them out of a row that sees no key, whose
        // S lanes all give e^0 (it averages the values, as the loop below).
        x[c] = v::maskz_mov(static_cast<v::mask>(cols >> (16 * c)),
                                   v::exp(v::sub(x[c], m)));
        sum = v::add(sum, x[c]);
      }
      const v::f32 inv = v::set1(1.0f / v::reduce_add(sum));
      for (int c = 0; c < 4; ++c) {
        v::mask_storeu(pr + 16 * c, static_cast<v::mask>(cols >> (16 * c)),
                              v::mul(x[c], inv));
      }
    }
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* mr = mask + t * S;
    float* pr = p + t * S;
    for (int64_t s0 = 0; s0 < e; s0 += 16) {
      const v::mask m = lane_mask(e - s0);
      const v::mask seen = v::nonzero16(mr + s0, m);
      v::mask_storeu(pr + s0, m, v::mask_blend(seen, lowest, v::maskz_loadu(m, pr + s0)));
    }
    const v::f32 inv = v::set1(softmax_row(pr, e));
    for (int64_t s0 = 0; s0 < e; s0 += 16) {
      const v::mask m = lane_mask(e - s0);
      v::mask_storeu(pr + s0, m, v::mul(v::maskz_loadu(m, pr + s0), inv));
    }
    std::fill(pr + e, pr + S, 0.0f);
  }
}

// One (row b, KV head kv) task: for each of its G query heads, P = softmax(q K^T * scale)
// ([T, S], straight into p [B, N, T, S]) and o = P V, a block of kAttBlock tokens at a time.
void train_fwd_task(const TrainAtt& d, const float* q, const float* k, const float* v,
                    const uint8_t* mask, float* o, float* p, int64_t b, int64_t kv) {
  const int64_t T = d.T, S = d.S, H = d.H;
  const int64_t* ext = key_extents(d, mask, b);
  float* kt = scratch(H * S);
  transpose(k + b * S * d.ks + kv * H, d.ks, kt, S, S, H);  // K^T [H, S]
  const float* vb = v + b * S * d.vs + kv * H;
  const uint8_t* mb = mask + b * T * S;
  for (int64_t g = 0; g < d.G; ++g) {
    const int64_t n = kv * d.G + g;
    float* pg = p + (b * d.N + n) * T * S;
    for (int64_t t0 = 0; t0 < T; t0 += kAttBlock) {
      const int64_t t1 = std::min(T, t0 + kAttBlock), e = block_extent(ext, t0, t1);
      gemm_small(q + (b * T + t0) * d.qs + n * H, d.qs, kt, S, pg + t0 * S, S, t1 - t0, H, e,
                 d.scale);
      softmax_block(pg, S, mb, t0, t1, e);
      gemm_small(pg + t0 * S, S, vb, d.vs, o + ((b * T + t0) * d.N + n) * H, d.N * H, t1 - t0, e,
                 H, 1.0f);
    }
  }
}

// The gradient of one (row, KV head) task: per query head g,
//   dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale   (blocks of tokens, up to
//   their last visible key), then dK += dS^T Q * scale and dV += P^T dO, each key block from
//   the first token that sees one of its keys.
void train_bwd_task(const TrainAtt& d, const float* q, const float* k, const float* v,
                    const uint8_t* mask, const float* o, const float* p, const float* dout,
                    float* dq, float* dk, float* dv, int64_t b, int64_t kv) {
  const int64_t T = d.T, S = d.S, H = d.H, NH = d.N * H;
  const int64_t* ext = key_extents(d, mask, b);
  float* vt = scratch(H * S + T * S);
  float* ds = vt + H * S;  // [T, S]
  transpose(v + b * S * d.vs + kv * H, d.vs, vt, S, S, H);  // V^T [H, S]
  const float* kb = k + b * S * d.ks + kv * H;
  const uint8_t* mb = mask + b * T * S;
  for (int64_t g = 0; g < d.G; ++g) {
    const int64_t n = kv * d.G + g;
    const float* pg = p + (b * d.N + n) * T * S;
    const float* qg = q + b * T * d.qs + n * H;
    const float* og = o + b * T * NH + n * H;
    const float* dog = dout + b * T * NH + n * H;
    for (int64_t t0 = 0; t0 < T; t0 += kAttBlock) {
      const int64_t t1 = std::min(T, t0 + kAttBlock), e = block_extent(ext, t0, t1);
      gemm_small(dog + t0 * NH, NH, vt, S, ds + t0 * S, S, t1 - t0, H, e, 1.0f);  // dP
      for (int64_t t = t0; t < t1; ++t) {
        const v::f32 D = v::set1(sum16(dog + t * NH, og + t * NH, H));
        const uint8_t* mr = mb + t * S;
        float* dr = ds + t * S;
        for (int64_t s0 = 0; s0 < e; s0 += 16) {
          const v::mask m = lane_mask(e - s0);
          // Masked keys get no gradient, also in a row that sees no key (P uniform there).
          const v::mask seen = v::nonzero16(mr + s0, m);
          const v::f32 dp = v::maskz_loadu(m, dr + s0);
          const v::f32 pr = v::maskz_loadu(m, pg + t * S + s0);
          v::mask_storeu(dr + s0, m, v::maskz_mul(seen, pr, v::sub(dp, D)));
        }
        std::fill(dr + e, dr + S, 0.0f);
      }
      gemm_small(ds + t0 * S, S, kb, d.ks, dq + (b * T + t0) * d.qs + n * H, d.qs, t1 - t0, e, H,
                 d.scale);  // dQ
    }
    for (int64_t s0 = 0; s0 < S; s0 += kAttBlock) {
      const int64_t s1 = std::min(S, s0 + kAttBlock);
      int64_t t_lo = 0;  // tokens before t_lo see none of keys [s0, s1): zero rows of dS and P
      while (t_lo < T && ext[t_lo] <= s0) ++t_lo;
      const int64_t L = T - t_lo;
      gemm_small(ds + t_lo * S + s0, S, qg + t_lo * d.qs, d.qs, dk + (b * S + s0) * d.ks + kv * H,
                 d.ks, s1 - s0, L, H, d.scale, true, g > 0);  // dK
      gemm_small(pg + t_lo * S + s0, S, dog + t_lo * NH, NH, dv + (b * S + s0) * d.vs + kv * H,
                 d.vs, s1 - s0, L, H, 1.0f, true, g > 0);  // dV
    }
  }
}

// B, T, S, N, KV, H of a call from the mask [B, T, S] and the attributes, checked against the
// operands' sizes (q, k, v may be one fused buffer: see TrainAtt).
ffi::Error train_shapes(size_t q_size, size_t k_size, size_t v_size,
                        const ffi::Buffer<ffi::U8>& mask, int64_t heads, int64_t kv_heads,
                        int64_t head_dim, bool fused, TrainAtt* d) {
  auto md = mask.dimensions();
  if (md.size() != 3 || heads < 1 || kv_heads < 1 || head_dim < 1 || heads % kv_heads != 0) {
    return ffi::Error::InvalidArgument("train_attention: mask [B, T, S], heads % kv_heads == 0");
  }
  d->B = md[0], d->T = md[1], d->S = md[2], d->N = heads, d->KV = kv_heads, d->H = head_dim;
  d->G = heads / kv_heads;
  const int64_t width = (heads + 2 * kv_heads) * head_dim;
  d->qs = fused ? width : heads * head_dim;
  d->ks = d->vs = fused ? width : kv_heads * head_dim;
  const bool ok = fused ? (d->S == d->T && q_size == static_cast<size_t>(d->B * d->T * width))
                        : (q_size == static_cast<size_t>(d->B * d->T * d->qs) &&
                           k_size == static_cast<size_t>(d->B * d->S * d->ks) &&
                           v_size == static_cast<size_t>(d->B * d->S * d->vs));
  if (!ok) return ffi::Error::InvalidArgument("train_attention: operand sizes do not match");
  return ffi::Error::Success();
}

ffi::Error TrainAttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                 ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                 ffi::Buffer<ffi::U8> mask, ffi::ResultBuffer<ffi::F32> o,
                                 ffi::ResultBuffer<ffi::F32> p, float scale, int64_t heads,
                                 int64_t kv_heads, int64_t head_dim, bool fused) {
  TrainAtt d;
  if (auto e = train_shapes(q.element_count(), k.element_count(), v.element_count(), mask,
                            heads, kv_heads, head_dim, fused, &d);
      e.failure())
    return e;
  d.scale = scale;
  const int64_t koff = fused ? heads * head_dim : 0, voff = fused ? koff + kv_heads * head_dim : 0;
  const float *qp = q.typed_data(), *kp = k.typed_data() + koff, *vp = v.typed_data() + voff;
  const uint8_t* mp = mask.typed_data();
  float *op = o->typed_data(), *pp = p->typed_data();
  parallel_for(pool, d.B * d.KV, [=](int64_t task) {
    train_fwd_task(d, qp, kp, vp, mp, op, pp, task / d.KV, task % d.KV);
  });
  return ffi::Error::Success();
}

// dq, dk, dv: three outputs, or (fused) one [B, T, (N + 2 KV) H] output given three times.
ffi::Error train_bwd(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& q,
                     const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                     const ffi::Buffer<ffi::U8>& mask, const ffi::Buffer<ffi::F32>& o,
                     const ffi::Buffer<ffi::F32>& p, const ffi::Buffer<ffi::F32>& dout,
                     float* dqp, float* dkp, float* dvp, float scale, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, bool fused) {
  TrainAtt d;
  if (auto e = train_shapes(q.element_count(), k.element_count(), v.element_count(), mask,
                            heads, kv_heads, head_dim, fused, &d);
      e.failure())
    return e;
  d.scale = scale;
  const int64_t koff = fused ? heads * head_dim : 0, voff = fused ? koff + kv_heads * head_dim : 0;
  const float *qp = q.typed_data(), *kp = k.typed_data() + koff, *vp = v.typed_data() + voff;
  const float *opp = o.typed_data(), *pp = p.typed_data(), *dop = dout.typed_data();
  const uint8_t* mp = mask.typed_data();
  dkp += koff, dvp += voff;
  parallel_for(pool, d.B * d.KV, [=](int64_t task) {
    train_bwd_task(d, qp, kp, vp, mp, opp, pp, dop, dqp, dkp, dvp, task / d.KV, task % d.KV);
  });
  return ffi::Error::Success();
}

ffi::Error TrainAttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                 ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                 ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::F32> o,
                                 ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> dout,
                                 ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                                 ffi::ResultBuffer<ffi::F32> dv, float scale, int64_t heads,
                                 int64_t kv_heads, int64_t head_dim) {
  return train_bwd(pool, q, k, v, mask, o, p, dout, dq->typed_data(), dk->typed_data(),
                   dv->typed_data(), scale, heads, kv_heads, head_dim, false);
}

ffi::Error TrainAttentionQkvBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                    ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::F32> o,
                                    ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> dout,
                                    ffi::ResultBuffer<ffi::F32> dqkv, float scale, int64_t heads,
                                    int64_t kv_heads, int64_t head_dim) {
  float* out = dqkv->typed_data();
  return train_bwd(pool, qkv, qkv, qkv, mask, o, p, dout, out, out, out, scale, heads, kv_heads,
                   head_dim, true);
}


// ---------------------------------------------------------------------------------------------
// Training MLP sublayer of a pre-norm block (GPT-2 without biases):
//
//   y = x + act(norm(x) W1) W2      x [M, D], W1 [D, F], W2 [F, D]
//
// norm: LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019) with a scale (and a
// bias); act: GELU's tanh form (Hendrycks & Gimpel 2016) or ReLU. Why: in the Shakespeare
// recipe's step (768 rows, D 128, F 512) XLA spent ~35 ms of ~66 in the four MLPs and their
// layer norms (shrinking F to 16 took the step to 31 ms), against ~5 ms of arithmetic: a dozen
// small ops a layer, each a pass over memory with a thread hand-off. Here a task takes
// kMlpRows rows through the whole sublayer with the products held in registers (gemm_w, on
// weights prepared once a call: prepare). The backward
// pass gives dx row by row (dh = dL/d(norm(x) W1) and d(norm(x)) kept in scratch), then the
// sums over all rows: the weight gradients xn^T dh and g^T dy and the norm's (over_rows).
//   forward residuals: xhat (normalized, before scale/bias), xn = xhat * scale + bias,
//   h = xn W1, g = act(h), rstd = 1 / sqrt(var + eps) per row.
//   backward: dg = dy W2^T, dh = dg * act'(h), dxn = dh W1^T, dxhat = dxn * scale,
//   dx = dy + rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))  (RMSNorm: no mean).

struct TrainMlp {
  int64_t M, D, F;
  float eps;
  bool rms, gelu;
};
constexpr int64_t kMlpRows = v::kAvx512 ? 48 : 96;  // rows per task: 16 (8) tasks at 768 rows


// tanh(u) = 1 - 2 / (e^(2u) + 1): saturates to +-1 through exp16's 0 and infinity.
inline v::f32 tanh16(v::f32 u) {
  const v::f32 one = v::set1(1.0f);
  const v::f32 e = v::exp(v::min(v::add(u, u), v::set1(88.0f)));
  return v::sub(one, v::div(v::set1(2.0f), v::add(e, one)));
}

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// g = act(h) over n values (in place allowed: g may be h).
inline void act_fwd(const float* h, float* g, int64_t n, bool gelu) {
  const v::f32 half = v::set1(0.5f), one = v::set1(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const v::mask m = lane_mask(n - i);
    const v::f32 x = v::maskz_loadu(m, h + i);
    v::f32 y;
    if (gelu) {
      const v::f32 u = v::mul(v::set1(kGeluC),
                                     v::fmadd(v::mul(v::set1(kGeluA), x), v::mul(x, x), x));
      y = v::mul(v::mul(half, x), v::add(one, tanh16(u)));
    } else {
      y = v::max(x, v::setzero());
    }
    v::mask_storeu(g + i, m, y);
  }
}

// d *= act'(h) over n values.
inline void act_bwd(const float* h, float* d, int64_t n, bool gelu) {
  const v::f32 half = v::set1(0.5f), one = v::set1(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const v::mask m = lane_mask(n - i);
    const v::f32 x = v::maskz_loadu(m, h + i);
    const v::f32 dv = v::maskz_loadu(m, d + i);
    v::f32 y;
    if (gelu) {
      const v::f32 x2 = v::mul(x, x);
      const v::f32 u = v::mul(v::set1(kGeluC),
                                     v::fmadd(v::mul(v::set1(kGeluA), x), x2, x));
      const v::f32 t = tanh16(u);
      // d/dx 0.5 x (1 + t) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)
      const v::f32 du = v::mul(v::set1(kGeluC),
                                      v::fmadd(v::set1(3.0f * kGeluA), x2, one));
      const v::f32 sech2 = v::fnmadd(t, t, one);
      const v::f32 grad = v::fmadd(v::mul(half, x), v::mul(sech2, du),
                                          v::mul(half, v::add(one, t)));
      y = v::mul(dv, grad);
    } else {
      y = v::maskz_mov(v::positive(x), dv);
    }
    v::mask_storeu(d + i, m, y);
  }
}

// Rows [r0, r0 + R) of x [M, D] normalized: xhat, xn = xhat * scale + bias, rstd.
void norm_rows(const TrainMlp& d, const float* x, const float* scale, const float* bias,
               float* xhat, float* xn, float* rstd, int64_t r0, int64_t R) {
  const int64_t D = d.D;
  for (int64_t r = r0; r < r0 + R; ++r) {
    const float* xr = x + r * D;
    const float mean = d.rms ? 0.0f : sum16(xr, nullptr, D) / D;
    float* xh = xhat + r * D;
    for (int64_t i = 0; i < D; ++i) xh[i] = xr[i] - mean;
    const float rs = 1.0f / std::sqrt(sum16(xh, xh, D) / D + d.eps);
    rstd[r] = rs;
    float* xo = xn + r * D;
    for (int64_t i = 0; i < D; ++i) {
      xh[i] *= rs;
      xo[i] = xh[i] * scale[i] + bias[i];
    }
  }
}

// The norm's backward for rows [r0, r0 + R): dx = res + rstd * (dxhat - mean(dxhat) -
// xhat * mean(dxhat * xhat)) with dxhat = dxn * scale; res (the residual branch's gradient)
// may be null.
void norm_rows_bwd(const TrainMlp& d, const float* dxn, const float* xhat, const float* rstd,
                   const float* scale, const float* res, float* dx, int64_t r0, int64_t R) {
  const int64_t D = d.D;
  float* dxhat = scratch(D);
  for (int64_t r = r0; r < r0 + R; ++r) {
    const float* xh = xhat + r * D;
    const float* dn = dxn + r * D;
    for (int64_t i = 0; i < D; ++i) dxhat[i] = dn[i] * scale[i];
    const float a = d.rms ? 0.0f : sum16(dxhat, nullptr, D) / D;
    const float b = sum16(dxhat, xh, D) / D;
    const float rs = rstd[r];
    float* dxr = dx + r * D;
    for (int64_t i = 0; i < D; ++i) {
      dxr[i] = (res ? res[r * D + i] : 0.0f) + rs * (dxhat[i] - a - xh[i] * b);
    }
  }
}

// AVX2's tiles for the training products: 4 rows x 24 columns (12 ymm accumulators, 3 panel
// loads and a broadcast: all 16 registers; each panel row loaded feeds 12 FMAs), over panels
// of kPackCols packed once per call (pack24). Why: gemm_tiles' AVX2 form (2 rows x 32
// columns: 8 accumulators, each panel row feeding 8 FMAs at 6 loads) packed its panels of the
// weights again in every task. The decoding kernel's packed_tile is the same tile; this one
// also reads A transposed (the backward's sums over rows) and runs a narrow last panel on
// fewer vectors (packed_tile widens it to 24 columns: at N = 128, 8 columns costing 24).
constexpr int64_t kPanel = kPackCols;

// out[R, :width] (+)= A[R, L] @ P for one panel P ([L][kPanel], zero past width; NV =
// ceil(width / 8) vectors of it are read). A(r, l) is a[r * lda + l], or with TA a[l * lda + r].
template <int R, int NV, bool TA>
void tile24(const float* a, int64_t lda, int64_t L, const float* p, float* c, int64_t ldc,
            int64_t width, bool accumulate) {
  __m256 acc[R][NV];
  _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 3") for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_ps();
  auto step = [&](int64_t l) __attribute__((always_inline)) {
    __m256 b[NV];
    _Pragma("GCC unroll 3") for (int j = 0; j < NV; ++j) b[j] = _mm256_loadu_ps(p + l * kPanel + 8 * j);
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(TA ? a + l * lda + r : a + r * lda + l);
      _Pragma("GCC unroll 3") for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_fmadd_ps(x, b[j], acc[r][j]);
    }
  };
  _Pragma("GCC unroll 4") for (int64_t l = 0; l < L; ++l) step(l);
  _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {
    _Pragma("GCC unroll 3") for (int j = 0; j < NV; ++j) {
      float* cp = c + r * ldc + 8 * j;
      const int64_t n = width - 8 * j;
      __m256 y = acc[r][j];
      if (n >= 8) {
        if (accumulate) y = _mm256_add_ps(y, _mm256_loadu_ps(cp));
        _mm256_storeu_ps(cp, y);
      } else if (n > 0) {
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        if (accumulate) y = _mm256_add_ps(y, _mm256_maskload_ps(cp, m));
        _mm256_maskstore_ps(cp, m, y);
      }
    }
  }
}

// C[M, N] (+)= A[M, L] @ B for B packed by pack24; panels outside, row tiles inside (a
// panel, 12 KB at L = 128, stays in L1 while the tiles pass over it).
template <bool TA>
void gemm24(const float* a, int64_t lda, const float* panels, int64_t L, int64_t N, float* c,
            int64_t ldc, int64_t M, bool accumulate = false) {
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t w = std::min(kPanel, N - n0);
    const float* p = panels + n0 * L;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* am = TA ? a + m0 : a + m0 * lda;
      float* cm = c + m0 * ldc + n0;
      with_rows<4>(M - m0, [&](auto R) {
        if (w > 16) tile24<R, 3, TA>(am, lda, L, p, cm, ldc, w, accumulate);
        else if (w > 8) tile24<R, 2, TA>(am, lda, L, p, cm, ldc, w, accumulate);
        else tile24<R, 1, TA>(am, lda, L, p, cm, ldc, w, accumulate);
      });
    }
  }
}

// Panels [j0, j1) of B [L, N] as gemm24 reads them: panel j (columns 24j..) at dst + 24 j L,
// [L][24], zero past N. B(l, n) = b[l * ldb + n], or with bt (B given transposed) b[n * ldb + l].
void pack24(const float* b, int64_t ldb, bool bt, int64_t L, int64_t N, int64_t j0, int64_t j1,
            float* dst) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t n0 = j * kPanel, w = std::min(kPanel, N - n0);
    float* d = dst + n0 * L;
    if (w < kPanel) std::fill(d, d + L * kPanel, 0.0f);
    if (bt) {
      for (int64_t c = 0; c < w; ++c) {
        const float* src = b + (n0 + c) * ldb;
        for (int64_t l = 0; l < L; ++l) d[l * kPanel + c] = src[l];
      }
    } else {
      for (int64_t l = 0; l < L; ++l) std::copy(b + l * ldb + n0, b + l * ldb + n0 + w, d + l * kPanel);
    }
  }
}

inline int64_t panels24(int64_t N) { return (N + kPanel - 1) / kPanel; }

// A weight of a training call as its products read it, prepared once per call: on AVX-512
// W [L, N] row-major (read in place; the backward's W^T a copy), on AVX2 24-column panels
// (pack24). Copies go to the calling thread's scratch slot 1, cut over the pool (16 rows or
// one panel a chunk). Why here: XLA's transposes of the weights for the backward pass were
// separate ops of ~0.1-0.2 ms each in the step.
struct Weight {
  const float* p;
  int64_t L, N;
};

// Each (W [K, N], K, N, transposed) as the right operand of x @ W (L = K) or x @ W^T (L = N).
std::vector<Weight> prepare(ffi::ThreadPool& pool,
                            const std::vector<std::tuple<const float*, int64_t, int64_t, bool>>& ws) {
  std::vector<Weight> out;
  size_t total = 0;
  std::vector<int64_t> first_chunk;  // running count of chunks
  int64_t chunks = 0;
  for (auto [w, k, n, t] : ws) {
    const int64_t L = t ? n : k, N = t ? k : n;
    const bool copy = !v::kAvx512 || t;
    out.push_back({copy ? nullptr : w, L, N});
    first_chunk.push_back(chunks);
    if (copy) {
      total += v::kAvx512 ? L * N : panels24(N) * kPanel * L;
      chunks += v::kAvx512 ? (k + 15) / 16 : panels24(N);
    }
  }
  float* buf = scratch(total, 1);
  for (Weight& w : out) {
    if (!w.p) w.p = buf, buf += v::kAvx512 ? w.L * w.N : panels24(w.N) * kPanel * w.L;
  }
  parallel_for(pool, chunks, [&](int64_t c) {
    size_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
    const auto [w, k, n, t] = ws[i];
    float* dst = const_cast<float*>(out[i].p);
    const int64_t j = c - first_chunk[i];
    if constexpr (v::kAvx512) {
      const int64_t r0 = j * 16, rows = std::min<int64_t>(16, k - r0);
      transpose(w + r0 * n, n, dst + r0, k, rows, n);
    } else {
      pack24(w, n, t, out[i].L, out[i].N, j, j + 1, dst);
    }
  });
  return out;
}

// c[M, w.N] = a[M, w.L] @ w (row stride lda).
inline void gemm_w(const float* a, int64_t lda, const Weight& w, float* c, int64_t ldc, int64_t M) {
  if constexpr (v::kAvx512) {
    gemm_small(a, lda, w.p, w.N, c, ldc, M, w.L, w.N, 1.0f);
  } else {
    gemm24<false>(a, lda, w.p, w.L, w.N, c, ldc, M);
  }
}

void mlp_fwd_task(const TrainMlp& d, const float* x, const float* scale, const float* bias,
                  const Weight& w1, const Weight& w2, float* y, float* xhat, float* xn, float* h,
                  float* g, float* rstd, int64_t r0) {
  const int64_t R = std::min(kMlpRows, d.M - r0), D = d.D, F = d.F;
  norm_rows(d, x, scale, bias, xhat, xn, rstd, r0, R);
  gemm_w(xn + r0 * D, D, w1, h + r0 * F, F, R);
  act_fwd(h + r0 * F, g + r0 * F, R * F, d.gelu);
  gemm_w(g + r0 * F, F, w2, y + r0 * D, D, R);
  for (int64_t i = r0 * D; i < (r0 + R) * D; ++i) y[i] += x[i];
}

void mlp_bwd_task(const TrainMlp& d, const float* dy, const float* xhat, const float* rstd,
                  const float* h, const float* scale, const Weight& w1t, const Weight& w2t,
                  float* dx, float* dh, float* dxn, int64_t r0) {
  const int64_t R = std::min(kMlpRows, d.M - r0), D = d.D, F = d.F;
  gemm_w(dy + r0 * D, D, w2t, dh + r0 * F, F, R);  // dg = dy W2^T
  act_bwd(h + r0 * F, dh + r0 * F, R * F, d.gelu);
  gemm_w(dh + r0 * F, F, w1t, dxn + r0 * D, D, R);  // dxn = dh W1^T
  norm_rows_bwd(d, dxn, xhat, rstd, scale, dy, dx, r0, R);
}

// The backward calls' second phase: the gradients summed over all M rows, computed in the
// call instead of by XLA (whose dots of these shapes, A^T B with K = 768, ran at ~97 GFLOP/s on
// both Zen 3 cores and took ~13 of a ~45 ms Shakespeare step). Each weight's gradient
// C [I, O] = A^T B (A [M, I], B [M, O]) is cut into blocks of kOverI x kOverO, one task each,
// whose register tiles accumulate over kOverL rows at a time (the block's packed panel of B
// and its lines of A stay in L1; over all 768 rows at once they streamed from L2). The norm's
// dscale = sum(dxn * xhat) and dbias = sum(dxn) are tasks of 64 columns. Every sum runs in
// a fixed order whatever thread takes it, so the gradients are the same from run to run.
struct OverRows {
  const float* a;
  const float* b;
  float* c;
  int64_t I, O;
};
constexpr int64_t kOverL = 128, kOverI = 128, kOverO = v::kAvx512 ? 64 : 4 * kPanel;

struct NormSums {
  const float* dxn;
  const float* xhat;
  float* dscale;
  float* dbias;
};

void over_rows(ffi::ThreadPool& pool, int64_t M, int64_t D, const std::vector<OverRows>& ps,
               const NormSums& ns) {
  std::vector<std::function<void()>> tasks;
  for (const OverRows& p : ps) {
    for (int64_t i0 = 0; i0 < p.I; i0 += kOverI) {
      for (int64_t n0 = 0; n0 < p.O; n0 += kOverO) {
        tasks.push_back([&p, M, i0, n0] {
          const int64_t ni = std::min(kOverI, p.I - i0), nn = std::min(kOverO, p.O - n0);
          for (int64_t l0 = 0; l0 < M; l0 += kOverL) {
            const int64_t L = std::min(kOverL, M - l0);
            const float *a = p.a + l0 * p.I + i0, *b = p.b + l0 * p.O + n0;
            float* c = p.c + i0 * p.O + n0;
            if constexpr (v::kAvx512) {
              gemm_small(a, p.I, b, p.O, c, p.O, ni, L, nn, 1.0f, true, l0 > 0);
            } else {
              float* panels = scratch(panels24(nn) * kPanel * L, 2);
              pack24(b, p.O, false, L, nn, 0, panels24(nn), panels);
              gemm24<true>(a, p.I, panels, L, nn, c, p.O, ni, l0 > 0);
            }
          }
        });
      }
    }
  }
  for (int64_t j0 = 0; j0 < D; j0 += 64) {
    tasks.push_back([&ns, M, D, j0] {
      const int64_t n = std::min<int64_t>(64, D - j0);
      float s[64] = {}, b[64] = {};
      for (int64_t r = 0; r < M; ++r) {
        const float *dn = ns.dxn + r * D + j0, *xh = ns.xhat + r * D + j0;
        for (int64_t j = 0; j < n; ++j) s[j] += dn[j] * xh[j], b[j] += dn[j];
      }
      std::copy(s, s + n, ns.dscale + j0), std::copy(b, b + n, ns.dbias + j0);
    });
  }
  parallel_for(pool, tasks.size(), [&](int64_t t) { tasks[t](); });
}

ffi::Error mlp_shapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& scale,
                      const ffi::Buffer<ffi::F32>& bias, const ffi::Buffer<ffi::F32>& w1,
                      const ffi::Buffer<ffi::F32>& w2, TrainMlp* d) {
  auto xd = x.dimensions(), w1d = w1.dimensions(), w2d = w2.dimensions();
  if (xd.size() != 2 || w1d.size() != 2 || w2d.size() != 2) {
    return ffi::Error::InvalidArgument("train_mlp: x [M, D], w1 [D, F], w2 [F, D]");
  }
  d->M = xd[0], d->D = xd[1], d->F = w1d[1];
  if (w1d[0] != d->D || w2d[0] != d->F || w2d[1] != d->D || scale.element_count() != d->D ||
      bias.element_count() != d->D) {
    return ffi::Error::InvalidArgument("train_mlp: operand shapes do not match");
  }
  return ffi::Error::Success();
}

ffi::Error TrainMlpFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w2,
                           ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> xhat,
                           ffi::ResultBuffer<ffi::F32> xn, ffi::ResultBuffer<ffi::F32> h,
                           ffi::ResultBuffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> rstd,
                           float eps, bool rms, bool gelu) {
  TrainMlp d;
  if (auto e = mlp_shapes(x, scale, bias, w1, w2, &d); e.failure()) return e;
  d.eps = eps, d.rms = rms, d.gelu = gelu;
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  const auto ws = prepare(pool, {{w1.typed_data(), d.D, d.F, false}, {w2.typed_data(), d.F, d.D, false}});
  float *yp = y->typed_data(), *xhp = xhat->typed_data(), *xnp = xn->typed_data();
  float *hp = h->typed_data(), *gp = g->typed_data(), *rp = rstd->typed_data();
  parallel_for(pool, (d.M + kMlpRows - 1) / kMlpRows, [&](int64_t task) {
    mlp_fwd_task(d, xp, sp, bp, ws[0], ws[1], yp, xhp, xnp, hp, gp, rp, task * kMlpRows);
  });
  return ffi::Error::Success();
}

ffi::Error TrainMlpBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> xhat, ffi::Buffer<ffi::F32> rstd,
                           ffi::Buffer<ffi::F32> xn, ffi::Buffer<ffi::F32> h,
                           ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w2,
                           ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw1,
                           ffi::ResultBuffer<ffi::F32> dw2, ffi::ResultBuffer<ffi::F32> dscale,
                           ffi::ResultBuffer<ffi::F32> dbias, bool rms, bool gelu) {
  auto xd = dy.dimensions(), w1d = w1.dimensions(), w2d = w2.dimensions();
  if (xd.size() != 2 || w1d.size() != 2 || w2d.size() != 2 || xhat.element_count() != dy.element_count() ||
      xn.element_count() != dy.element_count() || w1d[0] != xd[1] || w2d[1] != xd[1] ||
      w2d[0] != w1d[1] || rstd.element_count() != xd[0] || h.element_count() != xd[0] * w1d[1] ||
      g.element_count() != xd[0] * w1d[1] || scale.element_count() != xd[1]) {
    return ffi::Error::InvalidArgument("train_mlp backward: operand shapes do not match");
  }
  TrainMlp d{xd[0], xd[1], w1d[1], 0.0f, rms, gelu};
  const auto wt = prepare(pool, {{w1.typed_data(), d.D, d.F, true}, {w2.typed_data(), d.F, d.D, true}});
  const float *dyp = dy.typed_data(), *xhp = xhat.typed_data(), *rp = rstd.typed_data();
  const float *hp = h.typed_data(), *sp = scale.typed_data();
  float* dhp = scratch(d.M * (d.F + d.D), 3);  // dh [M, F], then dxn [M, D]
  float *dxp = dx->typed_data(), *dnp = dhp + d.M * d.F;
  parallel_for(pool, (d.M + kMlpRows - 1) / kMlpRows, [&](int64_t task) {
    mlp_bwd_task(d, dyp, xhp, rp, hp, sp, wt[0], wt[1], dxp, dhp, dnp, task * kMlpRows);
  });
  over_rows(pool, d.M, d.D,
            {{xn.typed_data(), dhp, dw1->typed_data(), d.D, d.F},   // dW1 = xn^T dh
             {g.typed_data(), dyp, dw2->typed_data(), d.F, d.D}},   // dW2 = g^T dy
            {dnp, xhp, dscale->typed_data(), dbias->typed_data()});
  return ffi::Error::Success();
}

// y = norm(x) W (the q/k/v projections of a pre-norm block's attention half, W = [Wq Wk Wv]):
// the MLP's first half alone; the backward gives dx, then xn^T dy and the norm's parameter
// gradients (over_rows).
ffi::Error NormDenseFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> xhat, ffi::ResultBuffer<ffi::F32> xn,
                            ffi::ResultBuffer<ffi::F32> rstd, float eps, bool rms) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[0] != xd[1] || scale.element_count() != xd[1] ||
      bias.element_count() != xd[1]) {
    return ffi::Error::InvalidArgument("norm_dense: x [M, D], scale and bias [D], w [D, N]");
  }
  TrainMlp d{xd[0], xd[1], wd[1], eps, rms, false};
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  const Weight wp = prepare(pool, {{w.typed_data(), d.D, d.F, false}})[0];
  float *yp = y->typed_data(), *xhp = xhat->typed_data(), *xnp = xn->typed_data();
  float* rp = rstd->typed_data();
  parallel_for(pool, (d.M + kMlpRows - 1) / kMlpRows, [&](int64_t task) {
    const int64_t r0 = task * kMlpRows, R = std::min(kMlpRows, d.M - r0);
    norm_rows(d, xp, sp, bp, xhp, xnp, rp, r0, R);
    gemm_w(xnp + r0 * d.D, d.D, wp, yp + r0 * d.F, d.F, R);
  });
  return ffi::Error::Success();
}

ffi::Error NormDenseBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                            ffi::Buffer<ffi::F32> xhat, ffi::Buffer<ffi::F32> rstd,
                            ffi::Buffer<ffi::F32> xn, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                            ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> dscale,
                            ffi::ResultBuffer<ffi::F32> dbias, bool rms) {
  auto yd = dy.dimensions(), hd = xhat.dimensions(), wd = w.dimensions();
  if (yd.size() != 2 || hd.size() != 2 || wd.size() != 2 || hd[0] != yd[0] || wd[1] != yd[1] ||
      wd[0] != hd[1] || rstd.element_count() != yd[0] || scale.element_count() != hd[1] ||
      xn.element_count() != xhat.element_count()) {
    return ffi::Error::InvalidArgument("norm_dense backward: operand shapes do not match");
  }
  TrainMlp d{yd[0], hd[1], yd[1], 0.0f, rms, false};
  const float *xhp = xhat.typed_data(), *rp = rstd.typed_data(), *sp = scale.typed_data();
  const Weight wt = prepare(pool, {{w.typed_data(), d.D, d.F, true}})[0];
  const float* dyp = dy.typed_data();
  float *dxp = dx->typed_data(), *dnp = scratch(d.M * d.D, 3);  // dxn [M, D]
  parallel_for(pool, (d.M + kMlpRows - 1) / kMlpRows, [&](int64_t task) {
    const int64_t r0 = task * kMlpRows, R = std::min(kMlpRows, d.M - r0);
    gemm_w(dyp + r0 * d.F, d.F, wt, dnp + r0 * d.D, d.D, R);  // dy W^T
    norm_rows_bwd(d, dnp, xhp, rp, sp, nullptr, dxp, r0, R);
  });
  over_rows(pool, d.M, d.D, {{xn.typed_data(), dyp, dw->typed_data(), d.D, d.F}},  // xn^T dy
            {dnp, xhp, dscale->typed_data(), dbias->typed_data()});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<bool>("transpose_w")
                                  .Attr<bool>("gated")
                                  .Attr<bool>("accumulate")
                                  .Attr<bool>("packed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new key
                                  .Arg<ffi::AnyBuffer>()         // new value
                                  .Arg<ffi::AnyBuffer>()         // key cache (aliased to ret 1)
                                  .Arg<ffi::AnyBuffer>()         // value cache (to ret 2)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()  // RoPE cosines
                                  .Arg<ffi::Buffer<ffi::F32>>()  // RoPE sines
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmPrefillAttention, PrefillAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new keys
                                  .Arg<ffi::AnyBuffer>()         // new values
                                  .Arg<ffi::AnyBuffer>()         // key cache (aliased to ret 1)
                                  .Arg<ffi::AnyBuffer>()         // value cache (to ret 2)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // first slot
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [B, T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // RoPE cosines
                                  .Arg<ffi::Buffer<ffi::F32>>()  // RoPE sines
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTrainAttentionFwd, TrainAttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [B, T, S]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // o [B, T, N, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // P [B, N, T, S]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<bool>("fused"));  // q, k, v: one [B, T, (N+2KV)H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTrainAttentionBwd, TrainAttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [B, T, S]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // P
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dO
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("head_dim"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTrainAttentionQkvBwd, TrainAttentionQkvBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv [B, T, (N+2KV)H]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [B, T, T]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // P
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dO
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dqkv
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("head_dim"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTrainMlpFwd, TrainMlpFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm scale [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm bias [D] (zeros: RMSNorm)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W1 [D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W2 [F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // xhat
                                  .Ret<ffi::Buffer<ffi::F32>>()  // xn
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd [M]
                                  .Attr<float>("eps")
                                  .Attr<bool>("rms")
                                  .Attr<bool>("gelu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmTrainMlpBwd, TrainMlpBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [M, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xhat
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xn
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g = act(h)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W1 [D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W2 [F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW2
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<bool>("rms")
                                  .Attr<bool>("gelu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmNormDenseFwd, NormDenseFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm scale [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm bias [D] (zeros: RMSNorm)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W [D, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // xhat
                                  .Ret<ffi::Buffer<ffi::F32>>()  // xn
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd [M]
                                  .Attr<float>("eps")
                                  .Attr<bool>("rms"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmNormDenseBwd, NormDenseBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [M, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xhat [M, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xn
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W [D, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<bool>("rms"));
