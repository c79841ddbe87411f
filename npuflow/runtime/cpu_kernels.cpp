// npuflow's CPU kernels, registered as torch ops in the npuflow_cpu namespace.
//
// npuflow_cpu::decode_attention: attention of one query per row over the engine's KV cache blocks.
// query (B, H, 1, D); key, value (nb, B, kv_heads, W, D) with the last dimension dense (the engine's SlotCache
// blocks, or a (B, kv_heads, L, D) tensor viewed as one block); mask (B or 1, 1, 1, nb * W) bool, true where the
// row attends; scaling the score factor. Returns (B, 1, H, D) in the query's dtype.
//
// Every (row, kv head) pair is one task of at::parallel_for: the query heads sharing that kv head are scored
// against each attended key in float32 (bf16 / fp16 widened on load), softmax in float32 with a vectorizable
// exp, then the values are summed with those weights. Masked positions are never read. A row with no attended
// position gets zeros (the Python reference would give NaN; the engine discards such rows).
//
// npuflow_cpu::int8_linear: x (M, K) @ (w (N, K) int8 * scale (N,)).T for the few rows of a decode step: the
// weight is read once, 64 bytes at a time from 4 output rows together, widened to float32 in registers and
// multiplied into float32 sums for every input row (M <= 4 per pass), then scaled; the output in x's dtype.
// A decode step is bound by these weight reads: the kernel's job is to keep the memory bus busy.
//
// npuflow_cpu::int4_linear: x (M, K) bf16 @ W.T with 4-bit weights, W[n, k] = (q[n, k] - z) * s over groups of
// inputs: packed (N, K / 2) uint8 holds, for each 64 inputs, 32 bytes whose low nibbles are q[0..31] and high
// nibbles q[32..63] (`pack_int4`); scales (N, K / group, 2) bf16 are [s, s * z]. Each 32 nibbles become 32
// bf16 values with one table lookup (vpermw), multiplied into float32 sums by vdpbf16ps; the sum of a group is
// scaled once (group 32: the low and the high nibbles of a 64 are two groups), and the zero term is s * z * sum(x over the group). AVX512-BF16 hosts; elsewhere a scalar loop
// (correct, slow: the runtime then keeps aten's int4 kernel).
//
// Built and loaded by npuflow/runtime/backends/cpu_kernels.py (g++ -O3 -march=native, cached per source hash).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  uint32_t u = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float widen(c10::Half x) { return static_cast<float>(x); }

// e^x for x <= 0 (scores minus their maximum), elementwise over n floats: Cephes' expf (range reduction by
// ln 2 in two parts, a degree-5 polynomial), written as plain arithmetic so that the loop vectorizes.
inline void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] < -87.0f ? -87.0f : x[i];
    float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln 2), exact in float
    float r = v - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 0]
    float two_k;
    std::memcpy(&two_k, &bits, 4);
    x[i] = p * two_k;
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of a float
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  int64_t i = 0;
  float s = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  s = _mm512_reduce_add_ps(acc);
#else
  float acc[16] = {0};
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += q[i + j] * widen(k[i + j]);
  for (int j = 0; j < 8; ++j) acc[j] += acc[j + 8];  // a tree, lane-wise: vector adds, not 16 dependent ones
  for (int j = 0; j < 4; ++j) acc[j] += acc[j + 4];
  for (int j = 0; j < 2; ++j) acc[j] += acc[j + 2];
  s = acc[0] + acc[1];
#endif
  for (; i < d; ++i) s += q[i] * widen(k[i]);
  return s;
}

template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t d) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= d; i += 16) _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, load16(v + i), _mm512_loadu_ps(acc + i)));
#endif
  for (; i < d; ++i) acc[i] += p * widen(v[i]);
}

// max and sum of n floats, 16 lanes at a time (vectorizable without reassociating a single chain)
inline float max_of(const float* x, int64_t n) {
  float lanes[16];
  for (int j = 0; j < 16; ++j) lanes[j] = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
  for (; t + 16 <= n; t += 16)
    for (int j = 0; j < 16; ++j) lanes[j] = x[t + j] > lanes[j] ? x[t + j] : lanes[j];
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < 16; ++j) m = lanes[j] > m ? lanes[j] : m;
  for (; t < n; ++t) m = x[t] > m ? x[t] : m;
  return m;
}

inline float sum_of(const float* x, int64_t n) {
  float lanes[16] = {0};
  int64_t t = 0;
  for (; t + 16 <= n; t += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += x[t + j];
  float s = 0;
  for (int j = 0; j < 16; ++j) s += lanes[j];
  for (; t < n; ++t) s += x[t];
  return s;
}

template <typename T>
void decode_attention_impl(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const at::Tensor& mask, double scaling, at::Tensor& out) {
  const int64_t B = query.size(0), H = query.size(1), D = query.size(3);
  const int64_t nb = key.size(0), kvh = key.size(2), W = key.size(3), L = nb * W, g = H / kvh;
  const T* q = query.data_ptr<T>();  // contiguous (B, H, 1, D)
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  const bool* m = mask.data_ptr<bool>();
  T* o = out.data_ptr<T>();  // contiguous (B, 1, H, D)
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2), ks3 = key.stride(3);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1), vs2 = value.stride(2), vs3 = value.stride(3);
  const int64_t ms0 = mask.size(0) == 1 ? 0 : mask.stride(0), ms3 = mask.stride(3);
  const float scale = static_cast<float>(scaling);

  at::parallel_for(0, B * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(g * D), acc(g * D), scores(g * L);
    std::vector<int64_t> live(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kvh, hk = task % kvh;
      for (int64_t j = 0; j < g; ++j)
        for (int64_t i = 0; i < D; ++i) qf[j * D + i] = widen(q[(b * H + hk * g + j) * D + i]) * scale;
      int64_t n = 0;  // attended positions
      for (int64_t l = 0; l < L; ++l)
        if (m[b * ms0 + l * ms3]) live[n++] = l;
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (n > 0) {
        for (int64_t t = 0; t < n; ++t) {
          const int64_t l = live[t];
          const T* kp = k + (l / W) * ks0 + b * ks1 + hk * ks2 + (l % W) * ks3;
          for (int64_t j = 0; j < g; ++j) scores[j * L + t] = dot(&qf[j * D], kp, D);
        }
        for (int64_t j = 0; j < g; ++j) {
          float* s = &scores[j * L];
          const float mx = max_of(s, n);
          for (int64_t t = 0; t < n; ++t) s[t] -= mx;
          exp_nonpositive(s, n);
          const float inv = 1.0f / sum_of(s, n);
          for (int64_t t = 0; t < n; ++t) s[t] *= inv;
        }
        for (int64_t t = 0; t < n; ++t) {
          const int64_t l = live[t];
          const T* vp = v + (l / W) * vs0 + b * vs1 + hk * vs2 + (l % W) * vs3;
          for (int64_t j = 0; j < g; ++j) axpy(&acc[j * D], scores[j * L + t], vp, D);
        }
      }
      for (int64_t j = 0; j < g; ++j)
        for (int64_t i = 0; i < D; ++i) o[(b * H + hk * g + j) * D + i] = static_cast<T>(acc[j * D + i]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& mask, double scaling) {
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1, "decode_attention: query must be (B, H, 1, D)");
  TORCH_CHECK(key.dim() == 5 && value.sizes() == key.sizes(), "decode_attention: key/value must be (nb, B, kvh, W, D)");
  TORCH_CHECK(key.size(1) == query.size(0) && key.size(4) == query.size(3) && query.size(1) % key.size(2) == 0,
              "decode_attention: query and key shapes do not match");
  TORCH_CHECK(key.stride(4) == 1 && value.stride(4) == 1, "decode_attention: the head dimension must be dense");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "decode_attention: query, key and value must share a dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(3) == key.size(0) * key.size(3) &&
                  (mask.size(0) == 1 || mask.size(0) == query.size(0)),
              "decode_attention: mask must be bool (B, 1, 1, nb * W)");
  at::Tensor q = query.contiguous();
  at::Tensor out = at::empty({query.size(0), 1, query.size(1), query.size(3)}, query.options());
  switch (query.scalar_type()) {
    case at::kFloat: decode_attention_impl<float>(q, key, value, mask, scaling, out); break;
    case at::kBFloat16: decode_attention_impl<c10::BFloat16>(q, key, value, mask, scaling, out); break;
    case at::kHalf: decode_attention_impl<c10::Half>(q, key, value, mask, scaling, out); break;
    default: TORCH_CHECK(false, "decode_attention: float32, bfloat16 or float16 only, got ", query.scalar_type());
  }
  return out;
}

// ---- int8 weight-only linear ----

template <typename T>
inline void widen_row(const T* x, float* out, int64_t k) {
  for (int64_t i = 0; i < k; ++i) out[i] = widen(x[i]);
}

// acc[m][r] += sum_k x[m][k] * w[r][k] for R weight rows and M input rows, float32 inputs widened from int8
// Software prefetch distance in bytes along a weight row. Each block of 4 rows of a 1024-wide int8 weight is
// one 4 KiB page, where the hardware prefetchers stop: without this the kernel read 21 GB/s with 2 threads,
// with it 38-50 (4096: 35, 12288: 37-45), one decode step's weights of the 220M Llama, aten's kernel 31.
constexpr int64_t NPUFLOW_PF = 8192;
template <int M, int R>
inline void int8_block(const float* x, int64_t K, const int8_t* w, int64_t ldw, float* sums) {
#if defined(__AVX512F__)
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k) + NPUFLOW_PF, _MM_HINT_T0);
    for (int kk = 0; kk < 64; kk += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r)
        wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + k + kk))));
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k + kk);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
  }
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + k))));
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += x[m * K + t] * float(w[r * ldw + t]);
      sums[m * R + r] = s;
    }
#else
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float lanes[16] = {0};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 16; ++j) lanes[j] += x[m * K + k + j] * float(w[r * ldw + k + j]);
      float s = 0;
      for (int j = 0; j < 16; ++j) s += lanes[j];
      for (; k < K; ++k) s += x[m * K + k] * float(w[r * ldw + k]);
      sums[m * R + r] = s;
    }
#endif
}

// out[m][n] = sum * scale[n] for output rows n0..n1 of M input rows, straight into the output tensor
template <int M, typename T, typename S>
void int8_rows(const float* x, int64_t K, const int8_t* w, int64_t ldw, const S* scale, int64_t n0, int64_t n1,
               T* out, int64_t N) {
  constexpr int R = 4;  // M * R <= 16 accumulators, R weight vectors and one of x: within the 32 registers
  float sums[M * R];
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    int8_block<M, R>(x, K, w + n * ldw, ldw, sums);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) out[m * N + n + r] = static_cast<T>(sums[m * R + r] * widen(scale[n + r]));
  }
  for (; n < n1; ++n) {
    int8_block<M, 1>(x, K, w + n * ldw, ldw, sums);
    for (int m = 0; m < M; ++m) out[m * N + n] = static_cast<T>(sums[m] * widen(scale[n]));
  }
}

template <typename T, typename S>
void int8_linear_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out) {
  const int64_t rows = x.size(0), K = x.size(1), N = w.size(0), ldw = w.stride(0);
  const T* xp = x.data_ptr<T>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const S* sp = scale.data_ptr<S>();
  T* op = out.data_ptr<T>();
  thread_local std::vector<float> xf;  // the input rows in float32, reused from call to call
  xf.resize(rows * K);
  for (int64_t m = 0; m < rows; ++m) widen_row(xp + m * K, &xf[m * K], K);
  // each thread a contiguous range of output rows (a multiple of 16: whole cache lines of y), >= 64 KiB of weight
  const int64_t grain = std::max<int64_t>(16, ((65536 / std::max<int64_t>(K, 1)) + 15) / 16 * 16);
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const int64_t mm = std::min<int64_t>(4, rows - m0);
    const float* xm = &xf[m0 * K];
    T* om = op + m0 * N;
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      switch (mm) {
        case 1: int8_rows<1>(xm, K, wp, ldw, sp, n0, n1, om, N); break;
        case 2: int8_rows<2>(xm, K, wp, ldw, sp, n0, n1, om, N); break;
        case 3: int8_rows<3>(xm, K, wp, ldw, sp, n0, n1, om, N); break;
        default: int8_rows<4>(xm, K, wp, ldw, sp, n0, n1, om, N); break;
      }
    });
  }
}

template <typename T>
void int8_linear_for(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out) {
  switch (scale.scalar_type()) {
    case at::kFloat: int8_linear_impl<T, float>(x, w, scale, out); break;
    case at::kBFloat16: int8_linear_impl<T, c10::BFloat16>(x, w, scale, out); break;
    case at::kHalf: int8_linear_impl<T, c10::Half>(x, w, scale, out); break;
    default: TORCH_CHECK(false, "int8_linear: float32, bfloat16 or float16 scales only, got ", scale.scalar_type());
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_linear: x (M, K), w (N, K)");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.stride(1) == 1, "int8_linear: w must be int8 with dense rows");
  TORCH_CHECK(scale.numel() == w.size(0), "int8_linear: one scale per output row");
  at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: int8_linear_for<float>(xc, w, sc, out); break;
    case at::kBFloat16: int8_linear_for<c10::BFloat16>(xc, w, sc, out); break;
    case at::kHalf: int8_linear_for<c10::Half>(xc, w, sc, out); break;
    default: TORCH_CHECK(false, "int8_linear: float32, bfloat16 or float16 activations only, got ", x.scalar_type());
  }
  return out;
}

// ---- int4 weight-only linear ----

std::string simd() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return "avx512_bf16";
#elif defined(__AVX512F__)
  return "avx512";
#else
  return "generic";
#endif
}

// sums[m * R + r] = sum_k x[m][k] * W[n + r][k] for R rows of packed 4-bit weight (see above)
template <int M, int R>
inline void int4_block(const c10::BFloat16* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w,
                       const c10::BFloat16* sz, float* sums) {
  const int64_t groups = K / G;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  // bf16 bits of 0.0, 1.0, ..., 15.0 (the other 16 entries unused)
  const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
                                         0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m512 total[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) total[m][r] = _mm512_setzero_ps();
  if (G == 32) {  // each 64 inputs are two groups: the low nibbles one, the high nibbles the next
    for (int64_t c = 0; c < K / 64; ++c) {
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = w + r * (K / 2) + c * 32;
        _mm_prefetch(reinterpret_cast<const char*>(p) + NPUFLOW_PF, _MM_HINT_T0);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_and_si256(b, low)), table);
        const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(
            _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), low)), table);
        const __m512 s0 = _mm512_set1_ps(widen(sz[(r * groups + 2 * c) * 2]));
        const __m512 s1 = _mm512_set1_ps(widen(sz[(r * groups + 2 * c + 1) * 2]));
        for (int m = 0; m < M; ++m) {
          const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + m * K + c * 64);
          const __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + m * K + c * 64 + 32);
          total[m][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), lo, x0), s0, total[m][r]);
          total[m][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), hi, x1), s1, total[m][r]);
        }
      }
    }
  }
  for (int64_t g = 0; G % 64 == 0 && g < groups; ++g) {
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
      __m512bh lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = w + r * (K / 2) + k / 2;
        _mm_prefetch(reinterpret_cast<const char*>(p) + NPUFLOW_PF, _MM_HINT_T0);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        lo[r] = (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_and_si256(b, low)), table);
        hi[r] = (__m512bh)_mm512_permutexvar_epi16(
            _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), low)), table);
      }
      for (int m = 0; m < M; ++m) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        const __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[m][r], lo[r], x0), hi[r], x1);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_set1_ps(widen(sz[(r * groups + g) * 2]));
      for (int m = 0; m < M; ++m) total[m][r] = _mm512_fmadd_ps(acc[m][r], scale, total[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) sums[m * R + r] = _mm512_reduce_add_ps(total[m][r]);
#else
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float t = 0;
      for (int64_t g = 0; g < groups; ++g) {
        float a = 0;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const uint8_t b = w[r * (K / 2) + (k / 64) * 32 + (k % 32)];
          a += widen(x[m * K + k]) * float(k % 64 < 32 ? b & 15 : b >> 4);
        }
        t += a * widen(sz[(r * groups + g) * 2]);
      }
      sums[m * R + r] = t;
    }
#endif
  for (int m = 0; m < M; ++m)  // minus s * z * sum(x) per group
    for (int r = 0; r < R; ++r) {
      float zt = 0;
      for (int64_t g = 0; g < groups; ++g) zt += widen(sz[(r * groups + g) * 2 + 1]) * xsum[m * groups + g];
      sums[m * R + r] -= zt;
    }
}

template <int M>
void int4_rows(const c10::BFloat16* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w,
               const c10::BFloat16* sz, int64_t n0, int64_t n1, c10::BFloat16* y, int64_t N) {
  constexpr int R = 4;
  const int64_t groups = K / G;
  float sums[M * R];
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    int4_block<M, R>(x, xsum, K, G, w + n * (K / 2), sz + n * groups * 2, sums);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n + r] = static_cast<c10::BFloat16>(sums[m * R + r]);
  }
  for (; n < n1; ++n) {
    int4_block<M, 1>(x, xsum, K, G, w + n * (K / 2), sz + n * groups * 2, sums);
    for (int m = 0; m < M; ++m) y[m * N + n] = static_cast<c10::BFloat16>(sums[m]);
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_linear: x must be (M, K) bfloat16");
  const int64_t rows = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) * 2 == K && packed.is_contiguous(),
              "int4_linear: packed must be contiguous uint8 (N, K / 2)");
  TORCH_CHECK((group_size == 32 || group_size % 64 == 0) && group_size > 0 && K % group_size == 0 && K % 64 == 0,
              "int4_linear: K must be a multiple of 64 and of the group size (32 or a multiple of 64)");
  const int64_t groups = K / group_size;
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == N &&
                  sz.size(1) == groups && sz.size(2) == 2,
              "int4_linear: scales must be contiguous bfloat16 (N, K / group_size, 2)");
  at::Tensor xc = x.contiguous();
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  thread_local std::vector<float> xsum;  // per row and group: sum(x), for the zero term
  xsum.assign(rows * groups, 0.0f);
  at::Tensor out = at::empty({rows, N}, x.options());
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * groups + k / group_size] += widen(xp[m * K + k]);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sp = sz.data_ptr<c10::BFloat16>();
  const int64_t grain = std::max<int64_t>(16, ((131072 / std::max<int64_t>(K, 1)) + 15) / 16 * 16);
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const int64_t mm = std::min<int64_t>(4, rows - m0);
    const c10::BFloat16* xm = xp + m0 * K;
    const float* xs = &xsum[m0 * groups];
    c10::BFloat16* ym = op + m0 * N;
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      switch (mm) {
        case 1: int4_rows<1>(xm, xs, K, group_size, wp, sp, n0, n1, ym, N); break;
        case 2: int4_rows<2>(xm, xs, K, group_size, wp, sp, n0, n1, ym, N); break;
        case 3: int4_rows<3>(xm, xs, K, group_size, wp, sp, n0, n1, ym, N); break;
        default: int4_rows<4>(xm, xs, K, group_size, wp, sp, n0, n1, ym, N); break;
      }
    });
  }
  return out;
}

// W (N, K) bf16 = q * s - s * z from int4_linear's packed layout: the prefill weight, one row per task
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& sz, int64_t group_size) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && K % 64 == 0 &&
                  (group_size == 32 || group_size % 64 == 0) && K % group_size == 0,
              "int4_dequantize: packed must be contiguous uint8 (N, K / 2), K a multiple of 64 and of the group");
  const int64_t groups = K / group_size;
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == N * groups * 2,
              "int4_dequantize: scales must be contiguous bfloat16 (N, K / group_size, 2)");
  at::Tensor out = at::empty({N, K}, packed.options().dtype(at::kBFloat16));
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sp = sz.data_ptr<c10::BFloat16>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; k += 64) {
        const uint8_t* b = wp + n * (K / 2) + k / 2;
        c10::BFloat16* o = op + n * K + k;
        for (int half = 0; half < 2; ++half) {
          const int64_t g = (k + 32 * half) / group_size;
          const float s = widen(sp[(n * groups + g) * 2]), z = widen(sp[(n * groups + g) * 2 + 1]);
          for (int i = 0; i < 32; ++i)  // vectorizes
            o[32 * half + i] = static_cast<c10::BFloat16>(float(half ? b[i] >> 4 : b[i] & 15) * s - z);
        }
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(npuflow_cpu, lib) {
  lib.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor mask, float scaling) -> Tensor");
  lib.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  lib.def("int4_linear(Tensor x, Tensor packed, Tensor scales, int group_size) -> Tensor");
  lib.def("int4_dequantize(Tensor packed, Tensor scales, int group_size) -> Tensor");
  lib.def("simd() -> str", &simd);
}

TORCH_LIBRARY_IMPL(npuflow_cpu, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
  lib.impl("int8_linear", &int8_linear);
  lib.impl("int4_linear", &int4_linear);
  lib.impl("int4_dequantize", &int4_dequantize);
}
