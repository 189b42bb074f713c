// Native CPU kernels of the mean-field Gaussian posterior (bbb_lightning.bayes.native).
//
// normal_:        out ~ N(0, 1), Philox4x32-10 counters (Salmon et al. 2011) turned into
//                 normals by Box-Muller; element i depends only on (seed, i), not on threads.
// softplus_scale: sigma = softplus(rho) + min_scale and dsigma = sigmoid(rho) from one
//                 exp(-|rho|), and optionally sum_i log sigma_i, in one pass over rho.
// kl_rho_grad:    (sigma w - g / sigma) sigmoid(rho), the gradient with respect to rho of
//                 g KL(N(mu, sigma^2) || N(m, s^2)) with w = g / s^2, in one pass.
//
// Built with CPU_CAPABILITY_AVX512 (AVX2) the loops run on 16 (8) float lanes, with Sleef for
// exp, log and sincospi; otherwise at::vec falls back to portable code with the same formulas.
// The normals of a key differ between the 16-lane and the 8-lane builds (the counter of
// element i depends on the lane count); each stream is exactly N(0, 1).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

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

using Words = uint32_t[4][kLanes];

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
using IVec = __m512i;
inline IVec load_words(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void store_words(uint32_t* p, IVec x) { _mm512_storeu_si512(p, x); }
inline IVec broadcast(uint32_t k) { return _mm512_set1_epi32(static_cast<int>(k)); }
inline IVec bit_xor(IVec a, IVec b) { return _mm512_xor_si512(a, b); }
// The high and low 32 bits of a * m, lane by lane.
inline void mul_hi_lo(IVec a, IVec m, IVec& hi, IVec& lo) {
  const IVec even = _mm512_mul_epu32(a, m);
  const IVec odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#else
using IVec = __m256i;
inline IVec load_words(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline void store_words(uint32_t* p, IVec x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
}
inline IVec broadcast(uint32_t k) { return _mm256_set1_epi32(static_cast<int>(k)); }
inline IVec bit_xor(IVec a, IVec b) { return _mm256_xor_si256(a, b); }
inline void mul_hi_lo(IVec a, IVec m, IVec& hi, IVec& lo) {
  const IVec even = _mm256_mul_epu32(a, m);
  const IVec odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

inline void philox(Words& x, uint32_t k0, uint32_t k1) {
  IVec x0 = load_words(x[0]), x1 = load_words(x[1]), x2 = load_words(x[2]);
  IVec x3 = load_words(x[3]);
  const IVec m0 = broadcast(kM0), m1 = broadcast(kM1);
  for (int round = 0; round < 10; ++round) {
    IVec hi0, lo0, hi1, lo1;
    mul_hi_lo(x0, m0, hi0, lo0);
    mul_hi_lo(x2, m1, hi1, lo1);
    x0 = bit_xor(bit_xor(hi1, x1), broadcast(k0));
    x2 = bit_xor(bit_xor(hi0, x3), broadcast(k1));
    x1 = lo1;
    x3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  store_words(x[0], x0);
  store_words(x[1], x1);
  store_words(x[2], x2);
  store_words(x[3], x3);
}
#else
inline void philox(Words& x, uint32_t k0, uint32_t k1) {
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

// (w >> 8 + 1/2) / 2^24: a uniform in the open interval (0, 1) from the top 24 bits of w.
inline Vec open_uniform(const uint32_t* words) {
  alignas(64) float top[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    top[l] = static_cast<float>(static_cast<int32_t>(words[l] >> 8));
  }
  return (Vec::loadu(top) + Vec(0.5f)) * Vec(1.0f / 16777216.0f);
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

// The kNormalsPerBlock normals of block `block` of the stream `seed`.
inline void normal_block(float* out, uint64_t block, uint64_t seed) {
  Words x;
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t counter = block * kLanes + l;
    x[0][l] = static_cast<uint32_t>(counter);
    x[1][l] = static_cast<uint32_t>(counter >> 32);
    x[2][l] = 0;
    x[3][l] = 0;
  }
  philox(x, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int pair = 0; pair < 2; ++pair) {
    box_muller(open_uniform(x[2 * pair]), open_uniform(x[2 * pair + 1]),
               out + 2 * pair * kLanes, out + (2 * pair + 1) * kLanes);
  }
}

void check_float_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

// -- kernels ----------------------------------------------------------------------------
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

// Where sigma = softplus(rho) (no floor) is below TINY_RHO, log sigma = rho - sigma / 2 up to
// O(e^(2 rho)): log of a number near the float32 underflow loses all precision.
constexpr float kTinyRho = -20.0f;

std::tuple<torch::Tensor, torch::Tensor, double> softplus_scale(
    const torch::Tensor& rho, double min_scale, bool log_sum) {
  check_float_cpu(rho, "rho");
  auto sigma = torch::empty_like(rho);
  auto dsigma = torch::empty_like(rho);
  const float* r = rho.data_ptr<float>();
  float* s = sigma.data_ptr<float>();
  float* d = dsigma.data_ptr<float>();
  const Vec floor(static_cast<float>(min_scale)), zero(0.0f), one(1.0f), half(0.5f);
  const Vec tiny_rho(min_scale > 0 ? -INFINITY : kTinyRho);
  const double total = at::parallel_reduce(
      int64_t{0}, rho.numel(), kGrain, 0.0,
      [&](int64_t begin, int64_t end, double partial) {
        // sum log sigma in float lanes, Kahan-compensated: a float sum of many equal terms
        // (e.g. sigma = min_scale) would otherwise round the same way at every addition.
        Vec sum(0.0f), compensation(0.0f);
        for (int64_t i = begin; i < end; i += kLanes) {
          const int count = static_cast<int>(std::min<int64_t>(kLanes, end - i));
          const Vec x = Vec::loadu(r + i, count);
          const Vec e = (zero - x.abs()).exp();  // exp(-|rho|) in (0, 1]
          const Vec sig = at::vec::maximum(x, zero) + e.log1p() + floor;
          const Vec inv = one / (one + e);
          const Vec dsig = Vec::blendv(e * inv, inv, x >= zero);  // sigmoid(rho)
          sig.store(s + i, count);
          dsig.store(d + i, count);
          if (log_sum) {
            Vec log_sig = Vec::blendv(log_u35(sig), x - half * sig, x < tiny_rho);
            if (count < kLanes) log_sig = Vec::set(zero, log_sig, count);
            const Vec term = log_sig - compensation;
            const Vec next = sum + term;
            compensation = (next - sum) - term;
            sum = next;
          }
        }
        alignas(64) float lanes[kLanes], lost[kLanes];
        sum.store(lanes);
        compensation.store(lost);
        for (int64_t l = 0; l < kLanes; ++l) partial += static_cast<double>(lanes[l]) - lost[l];
        return partial;
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
  const Vec w(static_cast<float>(weight)), g(static_cast<float>(grad)), one(1.0f), half(0.5f);
  const Vec tiny_rho(min_scale > 0 ? -INFINITY : kTinyRho);
  at::parallel_for(0, rho.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, end - i));
      const Vec x = Vec::loadu(r + i, count);
      const Vec sig = Vec::loadu(s + i, count);
      const Vec dsig = Vec::loadu(d + i, count);
      const Vec value = (sig * w - g / sig) * dsig;
      // sigmoid(rho) / sigma = 1 - sigma / 2 + O(e^(2 rho)) where sigma underflows.
      const Vec small = sig * dsig * w - (one - half * sig) * g;
      Vec::blendv(value, small, x < tiny_rho).store(o + i, count);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("normal_", &normal_, "Fill a float32 CPU tensor with N(0, 1) draws of stream seed.");
  m.def("softplus_scale", &softplus_scale,
        "(softplus(rho) + min_scale, sigmoid(rho), sum log sigma or 0) in one pass.");
  m.def("kl_rho_grad", &kl_rho_grad,
        "(sigma weight - grad / sigma) sigmoid(rho), small-rho safe, in one pass.");
}
