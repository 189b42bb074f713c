// Native CPU kernels of the mean-field Gaussian posterior (bbb_lightning.bayes.native).
//
// normal_:        out ~ N(0, 1), Philox4x32-10 counters (Salmon et al. 2011) turned into
//                 normals by Box-Muller; element i depends only on (seed, i), not on threads.
// random_signs_:  out = +1 or -1 with probability 1/2 each (flipout's Rademacher signs), one
//                 Philox bit per element; element i depends only on (seed, i).
// scaled_normal_: out = mu + sigma eps or sigma eps for S samples, in one pass (no autograd).
// softplus_scale: sigma = softplus(rho) + min_scale and dsigma = sigmoid(rho) from one
//                 exp(-|rho|), and optionally sum_i log sigma_i, in one pass over rho.
// kl_rho_grad:    (sigma w - g / sigma) sigmoid(rho), the gradient with respect to rho of
//                 g KL(N(mu, sigma^2) || N(m, s^2)) with w = g / s^2, in one pass.
// sample_with_kl: one use of sigma (a draw mu + sigma eps, a perturbation sigma eps, or the
//                 variance sigma^2) together with the Gaussian-prior KL, from the three sums
//                 sum log sigma, sum sigma^2 and sum (mu - m)^2, in one pass over mu and rho;
//                 sample_with_kl_backward: the gradients of that use and of the KL together,
//                 in one pass.
//
// Built with CPU_CAPABILITY_AVX512 (AVX2) the loops run on 16 (8) float lanes, with Sleef for
// exp, log and sincospi; otherwise at::vec falls back to portable code with the same formulas.
// The normals of a key differ between the 16-lane and the 8-lane builds (the counter of
// element i depends on the lane count); each stream is exactly N(0, 1).
#include <torch/extension.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <mutex>
#include <optional>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#include <sleef.h>
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();           // 16 (AVX512), 8 (AVX2 and portable)
constexpr int64_t kNormalsPerBlock = 4 * kLanes;  // one Philox call: 4 words per lane
constexpr int64_t kGrain = 32768;                 // elements per parallel task

// -- Philox4x32-10 on kLanes counters ----------------------------------------------------
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

// Block: the 4 words of one Philox call in each of the kLanes lanes; x[w] holds word w of every
// lane (in a vector register where the instruction set has one).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
using IVec = __m512i;
inline void store_words(uint32_t* p, IVec x) { _mm512_storeu_si512(p, x); }
inline IVec broadcast(uint32_t k) { return _mm512_set1_epi32(static_cast<int>(k)); }
inline IVec bit_xor(IVec a, IVec b) { return _mm512_xor_si512(a, b); }
inline IVec add_words(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
inline IVec lane_index() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
// (w >> 8) as a float, lane by lane: the top 24 bits of w, exactly.
inline Vec top_bits(IVec w) { return Vec(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8))); }
// In each 64-bit lane: the product of the low 32 bits of a and m; the upper 32 bits moved to
// the lower (zeros above); a's lower 32 bits below and b's lower 32 bits above.
inline IVec mul_even(IVec a, IVec m) { return _mm512_mul_epu32(a, m); }
inline IVec high_words(IVec a) { return _mm512_srli_epi64(a, 32); }
inline IVec merge_halves(IVec a, IVec b) {
  return _mm512_mask_blend_epi32(0xAAAA, a, _mm512_slli_epi64(b, 32));
}
#else
using IVec = __m256i;
inline void store_words(uint32_t* p, IVec x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
}
inline IVec broadcast(uint32_t k) { return _mm256_set1_epi32(static_cast<int>(k)); }
inline IVec bit_xor(IVec a, IVec b) { return _mm256_xor_si256(a, b); }
inline IVec add_words(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
inline IVec lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline Vec top_bits(IVec w) { return Vec(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8))); }
inline IVec mul_even(IVec a, IVec m) { return _mm256_mul_epu32(a, m); }
inline IVec high_words(IVec a) { return _mm256_srli_epi64(a, 32); }
inline IVec merge_halves(IVec a, IVec b) {
  return _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA);
}
#endif

using Block = std::array<IVec, 4>;

// The counters (first + l, first >> 32, word2, word3) of the lanes l, first = block * kLanes:
// the low word of first is a multiple of kLanes, so adding a lane index never carries.
inline Block counters(uint64_t block, uint32_t word2, uint32_t word3) {
  const uint64_t first = block * kLanes;
  return {add_words(broadcast(static_cast<uint32_t>(first)), lane_index()),
          broadcast(static_cast<uint32_t>(first >> 32)), broadcast(word2), broadcast(word3)};
}

inline void store_block(const Block& x, uint32_t* out) {
  for (int w = 0; w < 4; ++w) store_words(out + w * kLanes, x[w]);
}

// The rounds run on the even and the odd lanes separately, each word of each half in the low 32
// bits of a 64-bit lane: there one 32 x 32 -> 64-bit multiply gives a product's low word in
// place and its high word one shift away, where a 32-bit layout needs two multiplies, three
// shifts and two blends per product. The upper 32 bits of a 64-bit lane then hold garbage that
// no multiply or shift of a product reads; the halves are merged back at the end.
inline void philox_half(std::array<IVec, 4>& x, uint32_t k0, uint32_t k1) {
  const IVec m0 = broadcast(kM0), m1 = broadcast(kM1);
  for (int round = 0; round < 10; ++round) {
    const IVec p0 = mul_even(x[0], m0), p1 = mul_even(x[2], m1);
    x[0] = bit_xor(bit_xor(high_words(p1), x[1]), broadcast(k0));
    x[2] = bit_xor(bit_xor(high_words(p0), x[3]), broadcast(k1));
    x[1] = p1;
    x[3] = p0;
    k0 += kW0;
    k1 += kW1;
  }
}

inline void philox(Block& x, uint32_t k0, uint32_t k1) {
  Block odd;
  for (int w = 0; w < 4; ++w) odd[w] = high_words(x[w]);
  philox_half(x, k0, k1);
  philox_half(odd, k0, k1);
  for (int w = 0; w < 4; ++w) x[w] = merge_halves(x[w], odd[w]);
}
#else
using Words = std::array<uint32_t, kLanes>;
using Block = std::array<Words, 4>;

inline Block counters(uint64_t block, uint32_t word2, uint32_t word3) {
  Block x;
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t counter = block * kLanes + l;
    x[0][l] = static_cast<uint32_t>(counter);
    x[1][l] = static_cast<uint32_t>(counter >> 32);
    x[2][l] = word2;
    x[3][l] = word3;
  }
  return x;
}

inline void store_block(const Block& x, uint32_t* out) {
  for (int w = 0; w < 4; ++w) std::copy(x[w].begin(), x[w].end(), out + w * kLanes);
}

inline Vec top_bits(const Words& words) {
  alignas(64) float top[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) top[l] = static_cast<float>(words[l] >> 8);
  return Vec::loadu(top);
}

inline void philox(Block& x, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * x[0][l];
      const uint64_t p1 = static_cast<uint64_t>(kM1) * x[2][l];
      const uint32_t y0 = static_cast<uint32_t>(p1 >> 32) ^ x[1][l] ^ k0;
      const uint32_t y2 = static_cast<uint32_t>(p0 >> 32) ^ x[3][l] ^ k1;
      x[1][l] = static_cast<uint32_t>(p1);
      x[3][l] = static_cast<uint32_t>(p0);
      x[0][l] = y0;
      x[2][l] = y2;
    }
    k0 += kW0;
    k1 += kW1;
  }
}
#endif

// log to 3.5 ulp (Sleef's faster variant where available): for the Box-Muller radius and
// the KL's sum of log sigma, where a float32 ulp or two is far below the Monte Carlo noise.
inline Vec log_u35(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(Sleef_logf16_u35avx512f(x));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(Sleef_logf8_u35avx2(x));
#else
  return x.log();
#endif
}

// (top + 1/2) / 2^24, from the top 24 bits of a word: a uniform in the open interval (0, 1).
inline Vec open_uniform(const Vec& top) {
  return (top + Vec(0.5f)) * Vec(1.0f / 16777216.0f);
}

// Box-Muller: r = sqrt(-2 log u1), (r cos(2 pi u2), r sin(2 pi u2)) are independent N(0, 1).
inline void box_muller(const Vec& u1, const Vec& u2, float* cos_out, float* sin_out) {
  const Vec r = (log_u35(u1) * Vec(-2.0f)).sqrt();
#if defined(CPU_CAPABILITY_AVX512)
  const Sleef___m512_2 sin_cos = Sleef_sincospif16_u35avx512f(u2 + u2);  // of 2 pi u2
#elif defined(CPU_CAPABILITY_AVX2)
  const Sleef___m256_2 sin_cos = Sleef_sincospif8_u35avx2(u2 + u2);
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  (r * Vec(sin_cos.y)).store(cos_out);
  (r * Vec(sin_cos.x)).store(sin_out);
#else
  const Vec angle = u2 * Vec(6.28318530717958647692f);
  (r * angle.cos()).store(cos_out);
  (r * angle.sin()).store(sin_out);
#endif
}

// The 4 x kLanes random words of block `block` of the stream (seed, word2, word3): Philox of the
// counter (block * kLanes + l, word2, word3) in lane l, with key seed.
inline Block philox_block(uint64_t block, uint64_t seed, uint32_t word2, uint32_t word3) {
  Block x = counters(block, word2, word3);
  philox(x, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return x;
}

// The kNormalsPerBlock normals of block `block` of the stream (seed, sample): the counter of
// lane l is (block * kLanes + l, sample, 0) and the key is seed.
inline void normal_block(float* out, uint64_t block, uint64_t seed, uint32_t sample = 0) {
  const Block x = philox_block(block, seed, sample, 0);
  for (int pair = 0; pair < 2; ++pair) {
    box_muller(open_uniform(top_bits(x[2 * pair])), open_uniform(top_bits(x[2 * pair + 1])),
               out + 2 * pair * kLanes, out + (2 * pair + 1) * kLanes);
  }
}

// The `count` draws of block `block` of the stream (seed, sample), from its normals z_j:
// out[j] = mu[j] + sigma[j] z_j (sigma[j] z_j where mu is null), and eps[j] = z_j unless eps is
// null. The pointers start at the block's first element.
inline void draw_block(float* out, float* eps, const float* sigma, const float* mu, int64_t count,
                       uint64_t block, uint64_t seed, uint32_t sample) {
  alignas(64) float noise[kNormalsPerBlock];
  normal_block(noise, block, seed, sample);
  for (int64_t j = 0; j < count; j += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, count - j));
    const Vec z = Vec::loadu(noise + j);
    const Vec scaled = Vec::loadu(sigma + j, lanes) * z;
    if (eps != nullptr) z.store(eps + j, lanes);
    (mu != nullptr ? Vec::loadu(mu + j, lanes) + scaled : scaled).store(out + j, lanes);
  }
}

void check_float_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

// sample_shape + shape, the shape of S draws of a tensor of `shape`; `samples` receives S, which
// must be 1 to 2^32 - 1 (the sample is one word of the Philox counter).
std::vector<int64_t> with_samples(const std::vector<int64_t>& sample_shape, at::IntArrayRef shape,
                                  int64_t& samples) {
  samples = 1;
  for (const int64_t size : sample_shape) samples *= size;
  TORCH_CHECK(samples >= 1 && samples <= UINT32_MAX,
              "the sample shape must hold 1 to 2^32 - 1 samples");
  std::vector<int64_t> sizes(sample_shape);
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return sizes;
}

// -- kernels ----------------------------------------------------------------------------
// A fresh 64-bit key from torch's default CPU generator (what torch.manual_seed seeds), as
// ATen's own CPU samplers draw theirs.
int64_t random_key() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  return static_cast<int64_t>(at::check_generator<at::CPUGeneratorImpl>(generator)->random64());
}

torch::Tensor normal_(torch::Tensor out, int64_t seed) {
  check_float_cpu(out, "out");
  float* data = out.data_ptr<float>();
  const int64_t n = out.numel();
  const int64_t blocks = (n + kNormalsPerBlock - 1) / kNormalsPerBlock;
  at::parallel_for(0, blocks, kGrain / kNormalsPerBlock, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kNormalsPerBlock;
      if (start + kNormalsPerBlock <= n) {
        normal_block(data + start, b, static_cast<uint64_t>(seed));
      } else {
        alignas(64) float tail[kNormalsPerBlock];
        normal_block(tail, b, static_cast<uint64_t>(seed));
        std::copy(tail, tail + (n - start), data + start);
      }
    }
  });
  return out;
}

// The kSignsPerBlock signs of block `block`: bit j of word w of one Philox call (the counter of
// lane l is (block * kLanes + l, 0, 1): another stream than the normals of the same key) gives
// element 32 w + j.
constexpr int64_t kSignsPerBlock = 4 * kLanes * 32;

inline void sign_block(float* out, int64_t count, uint64_t block, uint64_t seed) {
  alignas(64) uint32_t words[4 * kLanes];
  store_block(philox_block(block, seed, 0, 1), words);
  for (int64_t w = 0; w * 32 < count; ++w) {
    const uint32_t word = words[w];
    float* signs = out + w * 32;
    const int64_t bits = std::min<int64_t>(32, count - w * 32);
    for (int64_t j = 0; j < bits; ++j) {
      signs[j] = static_cast<float>(static_cast<int32_t>((word >> j) & 1u) * 2 - 1);
    }
  }
}

torch::Tensor random_signs_(torch::Tensor out, int64_t seed) {
  check_float_cpu(out, "out");
  float* data = out.data_ptr<float>();
  const int64_t n = out.numel();
  const int64_t blocks = (n + kSignsPerBlock - 1) / kSignsPerBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / kSignsPerBlock),
                   [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kSignsPerBlock;
      sign_block(data + start, std::min(kSignsPerBlock, n - start), b,
                 static_cast<uint64_t>(seed));
    }
  });
  return out;
}

// out[s, i] = mu_i + sigma_i z[s, i] (sigma_i z[s, i] where mu is empty), z[s, i] normal i of
// the stream (seed, s): the draws of sample_with_kl, without its eps, KL or gradient, written in
// one pass (a draw without autograd needs neither eps nor a second pass over it).
torch::Tensor scaled_normal_(torch::Tensor out, const torch::Tensor& sigma, const torch::Tensor& mu,
                             int64_t seed) {
  check_float_cpu(out, "out");
  check_float_cpu(sigma, "sigma");
  const int64_t n = sigma.numel();
  const bool has_mu = mu.numel() > 0;
  if (has_mu) {
    check_float_cpu(mu, "mu");
    TORCH_CHECK(mu.numel() == n, "mu and sigma must have the same number of elements");
  }
  if (n == 0) return out;
  const int64_t samples = out.numel() / n;
  TORCH_CHECK(out.numel() == samples * n, "out must hold whole samples of sigma's shape");
  TORCH_CHECK(samples <= UINT32_MAX, "at most 2^32 - 1 samples");
  const float* sg = sigma.data_ptr<float>();
  const float* m = has_mu ? mu.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t blocks = (n + kNormalsPerBlock - 1) / kNormalsPerBlock;
  at::parallel_for(0, samples * blocks, kGrain / kNormalsPerBlock, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / blocks, b = task % blocks;
      const int64_t start = b * kNormalsPerBlock;
      draw_block(o + s * n + start, nullptr, sg + start, has_mu ? m + start : nullptr,
                 std::min(kNormalsPerBlock, n - start), static_cast<uint64_t>(b),
                 static_cast<uint64_t>(seed), static_cast<uint32_t>(s));
    }
  });
  return out;
}

// -- local reparameterization's pre-activations ----------------------------------------------
// out[s, i] = mean_i + std_i z[s, i] with std_i = sqrt(max(variance_i, min_variance)) and z[s, i]
// normal i of the stream (seed, s) (as scaled_normal_), and eps = z where want_eps: S samples of
// one mean and variance in one pass, std computed once per element for all samples.
std::tuple<torch::Tensor, torch::Tensor> local_noise(const torch::Tensor& mean,
                                                     const torch::Tensor& variance,
                                                     const std::vector<int64_t>& sample_shape,
                                                     int64_t seed, double min_variance,
                                                     bool want_eps) {
  check_float_cpu(mean, "mean");
  check_float_cpu(variance, "variance");
  TORCH_CHECK(mean.sizes() == variance.sizes(), "mean and variance must have the same shape");
  int64_t samples;
  const auto sizes = with_samples(sample_shape, mean.sizes(), samples);
  auto out = torch::empty(sizes, mean.options());
  auto eps = want_eps ? torch::empty(sizes, mean.options()) : torch::empty({0}, mean.options());
  const int64_t n = mean.numel();
  if (n == 0) return {out, eps};
  const float* m = mean.data_ptr<float>();
  const float* v = variance.data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* e = want_eps ? eps.data_ptr<float>() : nullptr;
  const Vec floor(static_cast<float>(min_variance));
  const int64_t blocks = (n + kNormalsPerBlock - 1) / kNormalsPerBlock;
  const int64_t grain = std::max<int64_t>(1, kGrain / (kNormalsPerBlock * samples));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float std_dev[kNormalsPerBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kNormalsPerBlock;
      const int64_t count = std::min(kNormalsPerBlock, n - start);
      for (int64_t j = 0; j < count; j += kLanes) {
        const int lanes = static_cast<int>(std::min<int64_t>(kLanes, count - j));
        at::vec::maximum(Vec::loadu(v + start + j, lanes), floor).sqrt().store(std_dev + j);
      }
      for (int64_t s = 0; s < samples; ++s) {
        draw_block(o + s * n + start, e != nullptr ? e + s * n + start : nullptr, std_dev,
                   m + start, count, static_cast<uint64_t>(b), static_cast<uint64_t>(seed),
                   static_cast<uint32_t>(s));
      }
    }
  });
  return {out, eps};
}

// The gradients of L = <G, out> for local_noise's out, in one pass:
//   dL/dmean = sum_s G_s (empty for one sample: it is G itself),
//   dL/dvariance = sum_s G_s eps_s / (2 std) where variance >= min_variance, else 0
// (the gradient of the clamp, as torch's clamp_min).
std::tuple<torch::Tensor, torch::Tensor> local_noise_backward(const torch::Tensor& grad,
                                                              const torch::Tensor& eps,
                                                              const torch::Tensor& variance,
                                                              double min_variance) {
  for (const auto* t : {&grad, &eps, &variance}) check_float_cpu(*t, "grad, eps, variance");
  const int64_t n = variance.numel();
  const int64_t samples = grad.numel() / std::max<int64_t>(n, 1);
  TORCH_CHECK(grad.numel() == samples * n && eps.numel() == grad.numel(),
              "grad and eps must hold whole samples of the variance's shape");
  // No element (an empty batch): nothing to sum, and samples = 0 would divide the grain by 0.
  if (n == 0) return {torch::empty({0}, grad.options()), torch::empty_like(variance)};
  auto grad_mean = samples > 1 ? torch::empty_like(variance) : torch::empty({0}, grad.options());
  auto grad_variance = torch::empty_like(variance);
  const float* g = grad.data_ptr<float>();
  const float* e = eps.data_ptr<float>();
  const float* v = variance.data_ptr<float>();
  float* gm = samples > 1 ? grad_mean.data_ptr<float>() : nullptr;
  float* gv = grad_variance.data_ptr<float>();
  const Vec floor(static_cast<float>(min_variance)), zero(0.0f), half(0.5f);
  at::parallel_for(0, n, std::max<int64_t>(1, kGrain / samples), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, end - i));
      Vec grad_sum = zero, grad_eps = zero;  // sum_s G_s and sum_s G_s eps_s
      for (int64_t s = 0; s < samples; ++s) {
        const Vec gs = Vec::loadu(g + s * n + i, count);
        grad_sum = grad_sum + gs;
        grad_eps = at::vec::fmadd(gs, Vec::loadu(e + s * n + i, count), grad_eps);
      }
      if (gm != nullptr) grad_sum.store(gm + i, count);
      const Vec var = Vec::loadu(v + i, count);
      const Vec value = half * grad_eps / at::vec::maximum(var, floor).sqrt();
      Vec::blendv(zero, value, var >= floor).store(gv + i, count);
    }
  });
  return {grad_mean, grad_variance};
}

// A float sum per lane, Kahan-compensated: a float sum of many equal terms (e.g. log sigma
// at sigma = min_scale) would otherwise round the same way at every addition. A lane that
// overflows to inf keeps no compensation, which would be inf and then turn the sum into
// inf - inf = NaN.
struct KahanSum {
  Vec sum{0.0f}, lost{0.0f};
  void add(const Vec& value) {
    const Vec term = value - lost;
    const Vec next = sum + term;
    const Vec finite = next.abs() < Vec(std::numeric_limits<float>::infinity());
    lost = Vec::blendv(Vec(0.0f), (next - sum) - term, finite);
    sum = next;
  }
  double total() const {
    alignas(64) float lanes[kLanes], missing[kLanes];
    sum.store(lanes);
    lost.store(missing);
    double out = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) out += static_cast<double>(lanes[l]) - missing[l];
    return out;
  }
};

// A float sum per lane that adds kTerms vectors in plain float and hands each such partial
// sum to a KahanSum: 2.75 instructions per term instead of 7 (the joint node's forward on a
// 784 x 400 weight 8 % faster), as accurate as Kahan alone on a million equal terms (test:
// longer partial sums, 8 or 16 terms, tripled the KL's error there).
struct ChunkedSum {
  static constexpr int kTerms = 4;
  Vec partial{0.0f};
  int terms = 0;
  KahanSum sum;
  void add(const Vec& value) {
    partial = partial + value;
    if (++terms == kTerms) {
      sum.add(partial);
      partial = Vec(0.0f);
      terms = 0;
    }
  }
  double total() {
    sum.add(partial);
    partial = Vec(0.0f);
    terms = 0;
    return sum.total();
  }
};

// Where sigma = softplus(rho) (no floor) is below TINY_RHO, log sigma = rho - sigma / 2 up to
// O(e^(2 rho)): log of a number near the float32 underflow loses all precision.
constexpr float kTinyRho = -20.0f;

// log1p(e) for e in [0, 1], to 2 ulp: 2 atanh(t) with t = e / (2 + e) in [0, 1/3], by its series
// 2 t sum_k t^(2k) / (2k + 1) up to k = 7 (the rest is below 2^-30 of the value). One division
// and eight fused multiply-adds: about half the time of Sleef's log1p (which serves any x).
inline Vec log1p_unit(const Vec& e) {
  const Vec t = e / (Vec(2.0f) + e);
  const Vec t2 = t * t;
  Vec series(1.0f / 15.0f);
  for (const float c : {1.0f / 13.0f, 1.0f / 11.0f, 1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f,
                        1.0f / 3.0f}) {
    series = at::vec::fmadd(series, t2, Vec(c));
  }
  const Vec two_t = t + t;
  return at::vec::fmadd(two_t * t2, series, two_t);
}

// sigma = softplus(rho) + floor and dsigma = sigmoid(rho), from one exp(-|rho|).
inline void softplus_sigmoid(const Vec& x, const Vec& floor, Vec& sigma, Vec& dsigma) {
  const Vec zero(0.0f), one(1.0f);
  const Vec e = (zero - x.abs()).exp();  // exp(-|rho|) in (0, 1]
  sigma = at::vec::maximum(x, zero) + log1p_unit(e) + floor;
  const Vec inv = one / (one + e);
  dsigma = Vec::blendv(e * inv, inv, x >= zero);
}

// log sigma, as rho - sigma / 2 where rho < tiny_rho.
inline Vec log_sigma_of(const Vec& x, const Vec& sigma, const Vec& tiny_rho) {
  return Vec::blendv(log_u35(sigma), x - Vec(0.5f) * sigma, x < tiny_rho);
}

// (sigma w - g / sigma) sigmoid(rho); where rho < tiny_rho, sigmoid(rho) / sigma is
// 1 - sigma / 2 + O(e^(2 rho)) (sigma underflows).
inline Vec kl_rho_term(const Vec& x, const Vec& sigma, const Vec& dsigma, const Vec& w,
                       const Vec& g, const Vec& tiny_rho) {
  const Vec value = (sigma * w - g / sigma) * dsigma;
  const Vec small = sigma * dsigma * w - (Vec(1.0f) - Vec(0.5f) * sigma) * g;
  return Vec::blendv(value, small, x < tiny_rho);
}

// sum_i log sigma_i, finite for any finite rho, over the lanes of a loop. With AVX-512 or
// AVX2, sigma = 2^k m with m in [1, 2) is split by bit manipulation: the exponents k are summed
// (exactly: integers, flushed to a double long before a float sum could round them) and the
// mantissas multiplied into one running product per lane, renormalized after each factor; one
// log per lane at the end replaces a log per weight. Lanes where sigma needs the small-rho form
// (or is subnormal) take log_sigma_of instead. Otherwise, a compensated sum of log_sigma_of.
struct LogSigmaSum {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  Vec exponents{0.0f}, mantissas{1.0f};
  int64_t terms = 0;
  double flushed = 0.0;
  KahanSum direct;

  // exponent k and mantissa m in [1, 2) of positive normal floats, lane by lane
  static void split(const Vec& v, Vec& exponent, Vec& mantissa) {
#if defined(CPU_CAPABILITY_AVX512)
    exponent = Vec(_mm512_getexp_ps(v));
    mantissa = Vec(_mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero));
#else
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i biased = _mm256_srli_epi32(bits, 23);
    exponent = Vec(_mm256_cvtepi32_ps(_mm256_sub_epi32(biased, _mm256_set1_epi32(127))));
    mantissa = Vec(_mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000))));
#endif
  }

  void add(const Vec& x, const Vec& sigma, const Vec& tiny_rho, int count) {
    const Vec one(1.0f), zero(0.0f);
    const Vec special = (x < tiny_rho) | (sigma < Vec(FLT_MIN));
    Vec factor = Vec::blendv(sigma, one, special);
    if (count < kLanes) factor = Vec::set(one, factor, count);
    if (special.zero_mask() != (1 << kLanes) - 1) {  // some lane takes the direct form
      Vec value = Vec::blendv(zero, log_sigma_of(x, sigma, tiny_rho), special);
      if (count < kLanes) value = Vec::set(zero, value, count);
      direct.add(value);
    }
    Vec exponent, mantissa;
    split(factor, exponent, mantissa);
    exponents = exponents + exponent;
    split(mantissas * mantissa, exponent, mantissa);  // the product is in [1, 4)
    exponents = exponents + exponent;
    mantissas = mantissa;
    if (++terms == kFlushEvery) flush();
  }

  void flush() {
    alignas(64) float lanes[kLanes];
    exponents.store(lanes);
    for (int64_t l = 0; l < kLanes; ++l) flushed += lanes[l];
    exponents = Vec(0.0f);
    terms = 0;
  }

  double total() {
    flush();
    alignas(64) float lanes[kLanes];
    mantissas.store(lanes);
    double log_mantissas = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) log_mantissas += std::log(static_cast<double>(lanes[l]));
    return flushed * kLn2 + log_mantissas + direct.total();
  }

  // each add changes a lane's exponent sum by at most 2 * 150: exact in float below 2^24
  static constexpr int64_t kFlushEvery = 16384;
  static constexpr double kLn2 = 0.69314718055994530942;
#else
  KahanSum direct;

  void add(const Vec& x, const Vec& sigma, const Vec& tiny_rho, int count) {
    Vec value = log_sigma_of(x, sigma, tiny_rho);
    if (count < kLanes) value = Vec::set(Vec(0.0f), value, count);
    direct.add(value);
  }

  double total() { return direct.total(); }
#endif
};

std::tuple<torch::Tensor, torch::Tensor, double> softplus_scale(
    const torch::Tensor& rho, double min_scale, bool log_sum) {
  check_float_cpu(rho, "rho");
  auto sigma = torch::empty_like(rho);
  auto dsigma = torch::empty_like(rho);
  const float* r = rho.data_ptr<float>();
  float* s = sigma.data_ptr<float>();
  float* d = dsigma.data_ptr<float>();
  const Vec floor(static_cast<float>(min_scale));
  const Vec tiny_rho(min_scale > 0 ? -INFINITY : kTinyRho);
  const double total = at::parallel_reduce(
      int64_t{0}, rho.numel(), kGrain, 0.0,
      [&](int64_t begin, int64_t end, double partial) {
        LogSigmaSum log_sigma;
        for (int64_t i = begin; i < end; i += kLanes) {
          const int count = static_cast<int>(std::min<int64_t>(kLanes, end - i));
          const Vec x = Vec::loadu(r + i, count);
          Vec sig, dsig;
          softplus_sigmoid(x, floor, sig, dsig);
          sig.store(s + i, count);
          dsig.store(d + i, count);
          if (log_sum) log_sigma.add(x, sig, tiny_rho, count);
        }
        return partial + log_sigma.total();
      },
      std::plus<double>());
  return {sigma, dsigma, total};
}

torch::Tensor kl_rho_grad(const torch::Tensor& rho, const torch::Tensor& sigma,
                          const torch::Tensor& dsigma, double weight, double grad,
                          double min_scale) {
  check_float_cpu(rho, "rho");
  check_float_cpu(sigma, "sigma");
  check_float_cpu(dsigma, "dsigma");
  TORCH_CHECK(sigma.numel() == rho.numel() && dsigma.numel() == rho.numel(),
              "rho, sigma and dsigma must have the same number of elements");
  auto out = torch::empty_like(rho);
  const float* r = rho.data_ptr<float>();
  const float* s = sigma.data_ptr<float>();
  const float* d = dsigma.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const Vec w(static_cast<float>(weight)), g(static_cast<float>(grad));
  const Vec tiny_rho(min_scale > 0 ? -INFINITY : kTinyRho);
  at::parallel_for(0, rho.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, end - i));
      const Vec x = Vec::loadu(r + i, count);
      const Vec sig = Vec::loadu(s + i, count);
      const Vec dsig = Vec::loadu(d + i, count);
      kl_rho_term(x, sig, dsig, w, g, tiny_rho).store(o + i, count);
    }
  });
  return out;
}


// -- one use of sigma together with the Gaussian-prior KL -------------------------------------
// kDraw: out[s] = mu + sigma eps[s]; kPerturbation: out[s] = sigma eps[s]; kVariance: out =
// sigma^2 (no eps). eps[s, i] is normal i of the stream (seed, s), as normal_ for s = 0.
enum Use : int64_t { kDraw = 0, kPerturbation = 1, kVariance = 2 };

using Sums = std::array<double, 3>;  // sum log sigma, sum sigma^2, sum (mu - m)^2

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>
sample_with_kl(const torch::Tensor& mu, const torch::Tensor& rho, int64_t use,
               const std::vector<int64_t>& sample_shape, int64_t seed, double min_scale,
               double loc, double prior_scale) {
  check_float_cpu(mu, "mu");
  check_float_cpu(rho, "rho");
  TORCH_CHECK(mu.sizes() == rho.sizes(), "mu and rho must have the same shape");
  TORCH_CHECK(use >= kDraw && use <= kVariance, "use must be 0 (draw), 1 (perturbation) or 2");
  TORCH_CHECK(use != kVariance || sample_shape.empty(), "the variance takes no sample shape");
  TORCH_CHECK(prior_scale > 0, "the prior scale must be > 0");
  int64_t samples;
  const auto sample_sizes = with_samples(sample_shape, rho.sizes(), samples);
  const int64_t n = rho.numel();
  const bool draws = use != kVariance;
  auto out = draws ? torch::empty(sample_sizes, rho.options()) : torch::empty_like(rho);
  auto eps = draws ? torch::empty(sample_sizes, rho.options()) : torch::empty({0}, rho.options());
  const float* m = mu.data_ptr<float>();
  const float* r = rho.data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* e = eps.data_ptr<float>();
  const Vec floor(static_cast<float>(min_scale)), prior_loc(static_cast<float>(loc));
  const Vec zero(0.0f);
  const Vec tiny_rho(min_scale > 0 ? -INFINITY : kTinyRho);
  const int64_t blocks = (n + kNormalsPerBlock - 1) / kNormalsPerBlock;
  const Sums sums = at::parallel_reduce(
      int64_t{0}, blocks, kGrain / kNormalsPerBlock, Sums{0.0, 0.0, 0.0},
      [&](int64_t begin, int64_t end, Sums partial) {
        LogSigmaSum log_sigma;
        ChunkedSum sigma_sq, diff_sq;
        alignas(64) float sg[kNormalsPerBlock];  // sigma of the block, for every sample
        for (int64_t b = begin; b < end; ++b) {
          const int64_t start = b * kNormalsPerBlock;
          const int64_t block_count = std::min(kNormalsPerBlock, n - start);
          for (int64_t j = 0; j < block_count; j += kLanes) {
            const int64_t i = start + j;
            const int count = static_cast<int>(std::min<int64_t>(kLanes, block_count - j));
            const Vec x = Vec::loadu(r + i, count);
            Vec sig, dsig;
            softplus_sigmoid(x, floor, sig, dsig);
            sig.store(sg + j);
            if (!draws) (sig * sig).store(o + i, count);
            const Vec diff = Vec::loadu(m + i, count) - prior_loc;
            log_sigma.add(x, sig, tiny_rho, count);
            Vec sig_sq = sig * sig, diff_sq_value = diff * diff;
            if (count < kLanes) {
              sig_sq = Vec::set(zero, sig_sq, count);
              diff_sq_value = Vec::set(zero, diff_sq_value, count);
            }
            sigma_sq.add(sig_sq);
            diff_sq.add(diff_sq_value);
          }
          if (!draws) continue;
          for (int64_t s = 0; s < samples; ++s) {
            draw_block(o + s * n + start, e + s * n + start, sg,
                       use == kDraw ? m + start : nullptr, block_count, static_cast<uint64_t>(b),
                       static_cast<uint64_t>(seed), static_cast<uint32_t>(s));
          }
        }
        partial[0] += log_sigma.total();
        partial[1] += sigma_sq.total();
        partial[2] += diff_sq.total();
        return partial;
      },
      [](Sums a, const Sums& b) {
        for (size_t k = 0; k < a.size(); ++k) a[k] += b[k];
        return a;
      });
  // KL = sum_i [log s - log sigma_i + (sigma_i^2 + (mu_i - m)^2) / (2 s^2) - 1/2]
  const double count = static_cast<double>(n);
  const double kl = count * std::log(prior_scale) - sums[0] +
                    0.5 * ((sums[1] + sums[2]) / (prior_scale * prior_scale) - count);
  return {out, eps, torch::scalar_tensor(kl, rho.options())};
}

// The gradients of L = <G, out> + g KL with KL against N(m, s^2), w = g / s^2 (`kl_weight`):
//   dL/dmu  = [sum_s G_s if kDraw] + w (mu - m)
//   dL/drho = ([sum_s G_s eps_s, or 2 G sigma for kVariance] + sigma w - g / sigma) sigmoid(rho),
// with the small-rho form of the KL term where sigma underflows. An empty `grad` means G = 0.
// sigma and sigmoid(rho) are computed again from rho: cheaper than storing them in the forward
// and reading them back, on a CPU where the step is bound by memory traffic as much as by math.
std::tuple<torch::Tensor, torch::Tensor> sample_with_kl_backward(
    const torch::Tensor& grad, const torch::Tensor& eps, const torch::Tensor& mu,
    const torch::Tensor& rho, int64_t use, double kl_grad, double kl_weight, double loc,
    double min_scale, bool want_mu, bool want_rho) {
  for (const auto* t : {&mu, &rho}) check_float_cpu(*t, "mu, rho");
  TORCH_CHECK(mu.sizes() == rho.sizes(), "mu and rho must have the same shape");
  const int64_t n = rho.numel();
  const bool has_grad = grad.numel() > 0;
  const bool draws = use != kVariance;
  int64_t samples = 1;
  if (has_grad) {
    check_float_cpu(grad, "grad");
    samples = grad.numel() / std::max<int64_t>(n, 1);
    TORCH_CHECK(grad.numel() == samples * n && (!draws || eps.numel() == grad.numel()),
                "grad (and eps) must hold whole samples of rho's shape");
    if (draws) check_float_cpu(eps, "eps");
  }
  torch::Tensor grad_mu, grad_rho;
  if (want_mu) grad_mu = torch::empty_like(mu);
  if (want_rho) grad_rho = torch::empty_like(rho);
  const float* g = has_grad ? grad.data_ptr<float>() : nullptr;
  const float* e = has_grad && draws ? eps.data_ptr<float>() : nullptr;
  const float* m = mu.data_ptr<float>();
  const float* r = rho.data_ptr<float>();
  float* gm = want_mu ? grad_mu.data_ptr<float>() : nullptr;
  float* gr = want_rho ? grad_rho.data_ptr<float>() : nullptr;
  const Vec w(static_cast<float>(kl_weight)), kg(static_cast<float>(kl_grad));
  const Vec prior_loc(static_cast<float>(loc)), zero(0.0f), two(2.0f);
  const Vec floor(static_cast<float>(min_scale));
  const Vec tiny_rho(min_scale > 0 ? -INFINITY : kTinyRho);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, end - i));
      Vec grad_sum = zero, grad_eps = zero;  // sum_s G_s and sum_s G_s eps_s (or 2 G sigma)
      if (has_grad) {
        for (int64_t s = 0; s < samples; ++s) {
          const Vec gs = Vec::loadu(g + s * n + i, count);
          grad_sum = grad_sum + gs;
          if (draws) grad_eps = at::vec::fmadd(gs, Vec::loadu(e + s * n + i, count), grad_eps);
        }
      }
      if (want_mu) {
        const Vec kl_part = w * (Vec::loadu(m + i, count) - prior_loc);
        (use == kDraw ? grad_sum + kl_part : kl_part).store(gm + i, count);
      }
      if (want_rho) {
        const Vec x = Vec::loadu(r + i, count);
        Vec sig, dsig;
        softplus_sigmoid(x, floor, sig, dsig);
        if (!draws) grad_eps = two * grad_sum * sig;
        (grad_eps * dsig + kl_rho_term(x, sig, dsig, w, kg, tiny_rho)).store(gr + i, count);
      }
    }
  });
  return {grad_mu, grad_rho};
}

// -- the autograd node of sample_with_kl, for several tensors ---------------------------------
// The node's outputs: out_t and KL_t for every tensor t, as sample_with_kl computes them (each
// with its own noise key drawn here from torch's default generator, in order), then a 0-dim
// bool, non-differentiable, that the backward sets once it has run (and freed the saved eps,
// mu and rho): a KL kept for the loss is only valid while it is false. One node serves the
// tensors of one layer (weight and bias): a node written in C++ costs no Python per forward
// and backward, and one node per layer instead of one per tensor halves the autograd nodes,
// their backward calls and the Python around them, which for a network's few large tensors is
// most of what the posterior adds to a step besides the kernels. Like Python's
// @once_differentiable, the backward's outputs raise if a second derivative is taken through
// them (create_graph=True).
struct SampleWithKLNode : public torch::autograd::Function<SampleWithKLNode> {
  // mus and rhos are TensorLists, which autograd counts as one input per tensor (in this order,
  // then the five other arguments): needs_input_grad(t) is mu_t's, needs_input_grad(N + t) rho_t's.
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, at::TensorList mus, at::TensorList rhos,
      int64_t use, const std::vector<int64_t>& sample_shape,
      const std::vector<double>& min_scales, const std::vector<double>& locs,
      const std::vector<double>& prior_scales) {
    const size_t count = mus.size();
    TORCH_CHECK(rhos.size() == count && min_scales.size() == count && locs.size() == count &&
                    prior_scales.size() == count,
                "sample_with_kl_node needs one rho, min_scale, loc and scale per mu");
    torch::autograd::variable_list outputs(2 * count + 1), saved(3 * count);
    std::vector<double> constants(3 * count);  // min_scale_t, loc_t, 1 / s_t^2 for the backward
    for (size_t t = 0; t < count; ++t) {
      RECORD_FUNCTION("bbb_lightning::sample_with_kl", std::vector<c10::IValue>());
      const int64_t seed = use != kVariance ? random_key() : 0;  // no noise: no key drawn
      auto [out, eps, kl] = sample_with_kl(mus[t], rhos[t], use, sample_shape, seed,
                                           min_scales[t], locs[t], prior_scales[t]);
      outputs[t] = out;
      outputs[count + t] = kl;
      saved[t] = eps;
      saved[count + t] = mus[t];
      saved[2 * count + t] = rhos[t];
      constants[3 * t] = min_scales[t];
      constants[3 * t + 1] = locs[t];
      constants[3 * t + 2] = 1.0 / (prior_scales[t] * prior_scales[t]);
    }
    auto released = torch::empty({}, mus[0].options().dtype(torch::kBool));
    *released.mutable_data_ptr<bool>() = false;  // written directly: no operator dispatch
    outputs[2 * count] = released;
    ctx->save_for_backward(saved);
    ctx->saved_data["use"] = use;
    ctx->saved_data["constants"] = std::move(constants);
    ctx->saved_data["released"] = released;
    ctx->mark_non_differentiable({released});
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    *ctx->saved_data["released"].toTensor().mutable_data_ptr<bool>() = true;
    const auto saved = ctx->get_saved_variables();
    const size_t count = saved.size() / 3;
    torch::autograd::variable_list result(2 * count + 5);  // + use, shape, scales, locs, scales
    const int64_t use = ctx->saved_data["use"].toInt();
    const auto constants = ctx->saved_data["constants"].toDoubleList();
    bool second_order = false;
    for (size_t t = 0; t < count; ++t) {
      const torch::Tensor &grad = grads[t], &grad_kl = grads[count + t];
      if (!grad.defined() && !grad_kl.defined()) continue;
      second_order = second_order || (grad.defined() && grad.requires_grad()) ||
                     (grad_kl.defined() && grad_kl.requires_grad());
      const double kl_grad = !grad_kl.defined() ? 0.0
                             : grad_kl.scalar_type() == at::kFloat && grad_kl.is_cpu()
                                 ? static_cast<double>(*grad_kl.const_data_ptr<float>())
                                 : grad_kl.item<double>();
      const bool want_mu = ctx->needs_input_grad(t) && (grad_kl.defined() || use == kDraw);
      const bool want_rho = ctx->needs_input_grad(count + t);
      RECORD_FUNCTION("bbb_lightning::sample_with_kl_backward", std::vector<c10::IValue>());
      at::NoGradGuard no_grad;
      const torch::Tensor& rho = saved[2 * count + t];
      auto [grad_mu, grad_rho] = sample_with_kl_backward(
          grad.defined() ? grad.contiguous() : torch::empty({0}, rho.options()), saved[t],
          saved[count + t], rho, use, kl_grad, kl_grad * constants.get(3 * t + 2),
          constants.get(3 * t + 1), constants.get(3 * t), want_mu, want_rho);
      result[t] = grad_mu;
      result[count + t] = grad_rho;
    }
    if (second_order && at::GradMode::is_enabled()) {  // as @once_differentiable: they raise
      auto error = std::make_shared<torch::autograd::DelayedError>(
          "trying to differentiate twice the posterior's sample_with_kl node, which has no "
          "second derivative",
          static_cast<int>(2 * count));
      torch::autograd::variable_list marked;
      for (size_t k = 0; k < 2 * count; ++k) {
        marked.push_back(result[k].defined() ? result[k].detach().requires_grad_(true)
                                             : torch::Tensor());
      }
      auto wrapped = error->apply(std::move(marked));
      for (size_t k = 0; k < 2 * count; ++k) result[k] = wrapped[k];
    }
    return result;
  }
};

// Whether the node applies: autograd records (grad mode on, some tensor requiring grad) and
// every tensor is a contiguous float32 CPU tensor, as the kernels need. Checked here rather than
// in Python, where these few attribute reads per tensor cost more than the node itself.
bool node_applies(const std::vector<torch::Tensor>& mus, const std::vector<torch::Tensor>& rhos) {
  if (!at::GradMode::is_enabled() || mus.empty()) return false;
  bool recorded = false;
  for (const auto* tensors : {&mus, &rhos}) {
    for (const auto& t : *tensors) {
      if (!t.defined() || !t.device().is_cpu() || t.scalar_type() != at::kFloat ||
          t.layout() != at::kStrided || !t.is_contiguous()) {
        return false;
      }
      recorded = recorded || t.requires_grad();
    }
  }
  return recorded;
}

// (outs, KLs, released) of one SampleWithKLNode over the tensors (mus[t], rhos[t]), or None
// where it does not apply (node_applies).
std::optional<std::tuple<std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor>>
sample_with_kl_node(const std::vector<torch::Tensor>& mus, const std::vector<torch::Tensor>& rhos,
                    int64_t use, const std::vector<int64_t>& sample_shape,
                    const std::vector<double>& min_scales, const std::vector<double>& locs,
                    const std::vector<double>& prior_scales) {
  if (!node_applies(mus, rhos)) return std::nullopt;
  auto outputs = SampleWithKLNode::apply(at::TensorList(mus), at::TensorList(rhos), use,
                                         sample_shape, min_scales, locs, prior_scales);
  const auto count = static_cast<std::ptrdiff_t>(mus.size());
  return std::make_tuple(
      std::vector<torch::Tensor>(outputs.begin(), outputs.begin() + count),
      std::vector<torch::Tensor>(outputs.begin() + count, outputs.begin() + 2 * count),
      outputs[2 * count]);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("normal_", &normal_, "Fill a float32 CPU tensor with N(0, 1) draws of stream seed.");
  m.def("random_signs_", &random_signs_,
        "Fill a float32 CPU tensor with +1 or -1, probability 1/2 each, of stream seed.");
  m.def("scaled_normal_", &scaled_normal_,
        "Fill out (S samples of sigma's shape) with mu + sigma eps, or sigma eps, in one pass.");
  m.def("local_noise", &local_noise,
        "(mean + sqrt(max(variance, min_variance)) eps for S samples, eps or empty) in one pass.");
  m.def("local_noise_backward", &local_noise_backward,
        "(grad mean summed over samples or empty, grad variance) of local_noise, in one pass.");
  m.def("softplus_scale", &softplus_scale,
        "(softplus(rho) + min_scale, sigmoid(rho), sum log sigma or 0) in one pass.");
  m.def("kl_rho_grad", &kl_rho_grad,
        "(sigma weight - grad / sigma) sigmoid(rho), small-rho safe, in one pass.");
  m.def("random_key", &random_key, "A 64-bit key from torch's default CPU generator.");
  m.def("sample_with_kl", &sample_with_kl,
        "(out, eps, KL(N(mu, sigma^2) || N(m, s^2)) summed) in one pass; "
        "out is mu + sigma eps (use 0), sigma eps (1) or sigma^2 (2).");
  m.def("sample_with_kl_backward", &sample_with_kl_backward,
        "(grad mu, grad rho) of <grad, out> + kl_grad KL, in one pass.");
  m.def("sample_with_kl_node", &sample_with_kl_node,
        "([out_t], [KL_t], released) of sample_with_kl for tensors (mu_t, rho_t) as one autograd "
        "node, or None unless autograd records and all are contiguous float32 CPU tensors; "
        "released turns true once its backward has run.");
}
