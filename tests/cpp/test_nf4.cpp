// NF4 (bitsandbytes' 4-bit format): the CPU against values worked out by hand for small vectors;
// CUDA against the CPU (bit-identical absmax, dequantization and double quantization; packed codes
// identical but for elements within an ulp of a threshold, where CUDA's approximate reciprocal,
// bitsandbytes' own, may pick the neighbour: at most a handful in millions).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/float_bits.hpp"
#include "cudablocks/buffer.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/nf4.hpp"
#include "cudablocks/stream.hpp"
#include "support.hpp"

namespace cudablocks {
namespace {

using Bytes = std::vector<std::uint8_t>;
using Vec = std::vector<float>;

using test::download;
using test::upload;

struct Quantized {
  Bytes packed;
  Vec absmax;
};

Quantized quantize_cpu(const Vec& x, int blocksize) {
  const Device cpu;
  Stream s(cpu);
  Buffer xb = upload(x, DType::Float32, cpu, s);
  const auto n = static_cast<std::int64_t>(x.size());
  Buffer packed = Buffer::empty({(n + 1) / 2}, DType::UInt8, cpu);
  Buffer absmax = Buffer::empty({(n + blocksize - 1) / blocksize}, DType::Float32, cpu);
  nf4_quantize(xb, blocksize, packed, absmax, s);
  return {download<std::uint8_t>(packed, s), download<float>(absmax, s)};
}

Vec dequantize_cpu(const Quantized& q, std::int64_t n, int blocksize) {
  const Device cpu;
  Stream s(cpu);
  Buffer out = Buffer::empty({n}, DType::Float32, cpu);
  nf4_dequantize(upload(q.packed, DType::UInt8, cpu, s), upload(q.absmax, DType::Float32, cpu, s), blocksize, out,
                 s);
  return download<float>(out, s);
}

// x / absmax with absmax 1: 1 -> 15, -1 -> 0, 0.5 -> 12 (0.5 < 0.50166, the 12|13 threshold),
// -0.5 -> 2, 0.1 -> 8, 0 -> 7, -0.05 -> 6 (below -0.04553), 0.3 -> 11 (above 0.29201).
TEST(Nf4, HandComputedCodes) {
  const Vec x = {1.0f, -1.0f, 0.5f, -0.5f, 0.1f, 0.0f, -0.05f, 0.3f};
  const Quantized q = quantize_cpu(x, 64);
  EXPECT_EQ(q.packed, (Bytes{0xF0, 0xC2, 0x87, 0x6B}));
  EXPECT_EQ(q.absmax, (Vec{1.0f}));
  const Vec y = dequantize_cpu(q, 8, 64);
  const Vec want = {1.0f, -1.0f, 0.44070982933044434f, -0.5250730514526367f, 0.07958029955625534f, 0.0f,
                    -0.09105003625154495f, 0.33791524171829224f};
  EXPECT_EQ(y, want);

  // Twice the values: the same codes, absmax 2, every value doubled exactly.
  Vec x2 = x;
  for (float& v : x2) v *= 2.0f;
  const Quantized q2 = quantize_cpu(x2, 32);
  EXPECT_EQ(q2.packed, q.packed);
  EXPECT_EQ(q2.absmax, (Vec{2.0f}));
  const Vec y2 = dequantize_cpu(q2, 8, 32);
  for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(y2[i], 2.0f * want[i]) << i;

  // An odd count: 0.2 -> 9 (0.12026 < 0.2 < 0.20352), and the pad nibble is the code of 0 (7).
  Vec x3 = x;
  x3.push_back(0.2f);
  const Quantized q3 = quantize_cpu(x3, 64);
  EXPECT_EQ(q3.packed, (Bytes{0xF0, 0xC2, 0x87, 0x6B, 0x97}));
}

TEST(Nf4, BlocksAndZeroBlock) {
  // Two blocks of 32: the first all zero (absmax 0: bitsandbytes' 0 * (1 / 0) = NaN gives code 0),
  // the second with absmax 4 and 2 / 4 = 0.5 -> 12, -4 -> 0, 1 / 4 = 0.25 -> 10.
  Vec x(64, 0.0f);
  x[32] = 2.0f;
  x[33] = -4.0f;
  x[34] = 1.0f;
  const Quantized q = quantize_cpu(x, 32);
  EXPECT_EQ(q.absmax, (Vec{0.0f, 4.0f}));
  for (int j = 0; j < 16; ++j) EXPECT_EQ(q.packed[j], 0x00) << j;
  EXPECT_EQ(q.packed[16], 0xC0);
  EXPECT_EQ(q.packed[17], 0xA7);
  for (int j = 18; j < 32; ++j) EXPECT_EQ(q.packed[j], 0x77) << j;
  const Vec y = dequantize_cpu(q, 64, 32);
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_TRUE(std::signbit(y[0]));  // -1 * 0
  EXPECT_EQ(y[32], 4.0f * 0.44070982933044434f);
  EXPECT_EQ(y[33], -4.0f);
  EXPECT_EQ(y[34], 4.0f * 0.24611230194568634f);
}

TEST(Nf4, DoubleQuantHandComputed) {
  // absmax [1, 2, 3, 4]: offset 2.5, centred [-1.5, -0.5, 0.5, 1.5], absmax2 1.5; +-1.5 / 1.5 = +-1
  // map to the ends of the 8-bit map (0 and 255, value 1.0 exactly).
  const Device cpu;
  Stream s(cpu);
  Vec map(256);
  Buffer absmax = upload(Vec{1.0f, 2.0f, 3.0f, 4.0f}, DType::Float32, cpu, s);
  Buffer code = Buffer::empty({256}, DType::Float32, cpu);
  {
    // The map from the Python constant is not reachable here; any sorted map in [-1, 1] with
    // map[255] = 1 exercises the arithmetic: a uniform one.
    for (int i = 0; i < 256; ++i) map[i] = i == 255 ? 1.0f : -1.0f + 2.0f * static_cast<float>(i) / 255.0f;
    code.copy_from_host(map.data(), s);
  }
  Buffer offset = Buffer::empty({1}, DType::Float32, cpu);
  Buffer qabsmax = Buffer::empty({4}, DType::UInt8, cpu);
  Buffer absmax2 = Buffer::empty({1}, DType::Float32, cpu);
  nf4_double_quantize(absmax, code, offset, /*compute_offset=*/true, qabsmax, absmax2, s);
  EXPECT_EQ(download<float>(offset, s), (Vec{2.5f}));
  EXPECT_EQ(download<float>(absmax2, s), (Vec{1.5f}));
  const Bytes q = download<std::uint8_t>(qabsmax, s);
  EXPECT_EQ(q[0], 0);
  EXPECT_EQ(q[3], 255);
  Buffer back = Buffer::empty({4}, DType::Float32, cpu);
  nf4_double_dequantize(qabsmax, absmax2, offset, code, back, s);
  const Vec b = download<float>(back, s);
  EXPECT_EQ(b[3], 4.0f);
  EXPECT_EQ(b[0], map[0] * 1.5f + 2.5f);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(b[i], 1.0f + static_cast<float>(i), 1.5 / 255.0 + 1e-6) << i;
}

TEST(Nf4, RejectsBadArguments) {
  const Device cpu;
  Stream s(cpu);
  Buffer x = Buffer::zeros({256}, DType::Float32, s);
  Buffer packed = Buffer::empty({128}, DType::UInt8, cpu);
  Buffer absmax = Buffer::empty({4}, DType::Float32, cpu);
  EXPECT_THROW(nf4_quantize(x, 48, packed, absmax, s), InvalidArgumentError);
  EXPECT_THROW(nf4_quantize(x, 8192, packed, absmax, s), InvalidArgumentError);
  Buffer short_packed = Buffer::empty({127}, DType::UInt8, cpu);
  EXPECT_THROW(nf4_quantize(x, 64, short_packed, absmax, s), ShapeError);
  Buffer wrong_absmax = Buffer::empty({2}, DType::Float32, cpu);
  EXPECT_THROW(nf4_quantize(x, 64, packed, wrong_absmax, s), ShapeError);
  Buffer ints = Buffer::zeros({256}, DType::Int32, s);
  EXPECT_THROW(nf4_quantize(ints, 64, packed, absmax, s), DtypeError);
  EXPECT_THROW(nf4_dequantize(packed, absmax, 64, ints, s), DtypeError);
  EXPECT_NO_THROW(nf4_quantize(x, 64, packed, absmax, s));
}

#if CUDABLOCKS_WITH_CUDA

std::vector<std::uint16_t> to_half_bits(const Vec& x, DType dtype) {
  std::vector<std::uint16_t> h(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    h[i] = dtype == DType::BFloat16 ? float_to_bf16_bits(x[i]) : float_to_fp16_bits(x[i]);
  }
  return h;
}

TEST(Nf4, CudaMatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const Device cpu;
  const Device gpu(DeviceType::CUDA, 0);
  Stream cs(cpu), gs(gpu);
  struct Case {
    std::int64_t n;
    int blocksize;
  };
  for (DType in : {DType::Float32, DType::BFloat16, DType::Float16}) {
    for (Case c : {Case{9728LL * 256, 64}, Case{1001 * 333, 64}, Case{4097 * 3, 4096}, Case{999 * 77, 32},
                   Case{12345, 128}}) {
      const Vec xf = test::random_normal(static_cast<std::size_t>(c.n), 0.02f);
      const std::int64_t blocks = (c.n + c.blocksize - 1) / c.blocksize;
      Bytes packed[2];
      Vec absmax[2];
      int k = 0;
      for (auto* dev : {&cpu, &gpu}) {
        Stream& s = dev == &cpu ? cs : gs;
        Buffer xb = in == DType::Float32 ? upload(xf, in, *dev, s) : upload(to_half_bits(xf, in), in, *dev, s);
        Buffer p = Buffer::empty({(c.n + 1) / 2, 1}, DType::UInt8, *dev);
        Buffer a = Buffer::empty({blocks}, DType::Float32, *dev);
        nf4_quantize(xb, c.blocksize, p, a, s);
        packed[k] = download<std::uint8_t>(p, s);
        absmax[k] = download<float>(a, s);
        ++k;
      }
      EXPECT_EQ(absmax[0], absmax[1]) << dtype_name(in) << " n " << c.n;
      int differ = 0;
      for (std::size_t j = 0; j < packed[0].size(); ++j) {
        for (int shift : {4, 0}) {
          const int a = (packed[0][j] >> shift) & 15, b = (packed[1][j] >> shift) & 15;
          if (a != b) {
            ++differ;
            EXPECT_EQ(std::abs(a - b), 1) << "byte " << j;
          }
        }
      }
      EXPECT_LE(differ, 2) << dtype_name(in) << " n " << c.n;

      // The CPU's bytes dequantized on both: bit-identical in every output dtype.
      for (DType out : {DType::Float32, DType::BFloat16, DType::Float16}) {
        std::vector<std::uint8_t> res[2];
        int r = 0;
        for (auto* dev : {&cpu, &gpu}) {
          Stream& s = dev == &cpu ? cs : gs;
          Buffer o = Buffer::empty({c.n}, out, *dev);
          nf4_dequantize(upload(packed[0], DType::UInt8, *dev, s), upload(absmax[0], DType::Float32, *dev, s),
                         c.blocksize, o, s);
          res[r++] = download<std::uint8_t>(o, s);
        }
        EXPECT_TRUE(res[0] == res[1]) << "dequantize to " << dtype_name(out) << ", n " << c.n;
      }

      // Double quantization of the CPU's absmax with a uniform 8-bit map: offset and absmax2
      // identical, codes identical but for rare reciprocal-adjacent ones, inverse identical.
      Vec map(256);
      for (int i = 0; i < 256; ++i) map[i] = i == 255 ? 1.0f : -1.0f + 2.0f * static_cast<float>(i) / 255.0f;
      Vec off[2], a2[2], back[2];
      Bytes q[2];
      int d = 0;
      for (auto* dev : {&cpu, &gpu}) {
        Stream& s = dev == &cpu ? cs : gs;
        Buffer ab = upload(absmax[0], DType::Float32, *dev, s);
        Buffer code = upload(map, DType::Float32, *dev, s);
        Buffer ob = Buffer::empty({1}, DType::Float32, *dev);
        Buffer qb = Buffer::empty({blocks}, DType::UInt8, *dev);
        Buffer a2b = Buffer::empty({(blocks + 255) / 256}, DType::Float32, *dev);
        nf4_double_quantize(ab, code, ob, true, qb, a2b, s);
        Buffer bb = Buffer::empty({blocks}, DType::Float32, *dev);
        // The inverse from the CPU's codes on both devices.
        nf4_double_dequantize(d == 0 ? qb : upload(q[0], DType::UInt8, *dev, s), a2b, ob, code, bb, s);
        off[d] = download<float>(ob, s);
        a2[d] = download<float>(a2b, s);
        q[d] = download<std::uint8_t>(qb, s);
        back[d] = download<float>(bb, s);
        ++d;
      }
      EXPECT_EQ(off[0], off[1]);
      EXPECT_EQ(a2[0], a2[1]);
      int qdiff = 0;
      for (std::size_t j = 0; j < q[0].size(); ++j) qdiff += q[0][j] != q[1][j];
      EXPECT_LE(qdiff, 2);
      EXPECT_EQ(back[0], back[1]);
    }
  }
}

#endif  // CUDABLOCKS_WITH_CUDA

}  // namespace
}  // namespace cudablocks
