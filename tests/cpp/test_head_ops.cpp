// The classification head's ops through the Backend interface: the CPU backend against direct
// loops written here, and the CUDA backend against the CPU one when a device is there. Fresh
// random inputs each run; write-only outputs start as NaN so that an unwritten element fails.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cudablocks/backend.hpp"
#include "cudablocks/buffer.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/stream.hpp"
#include "support.hpp"

namespace cudablocks {
namespace {

using test::random_normal;
using test::relative_error;
using test::rng;
using Vec = std::vector<float>;
using Ids = std::vector<std::int32_t>;

Ids random_ids(std::size_t n, int limit) {
  std::uniform_int_distribution<int> dist(0, limit - 1);
  Ids ids(n);
  for (auto& id : ids) id = dist(rng());
  return ids;
}

// A small batch: 5 packed sequences of 1-7 tokens, hidden 33, 4 classes, vocabulary 20.
struct Batch {
  std::int64_t hidden = 33, classes = 4, vocab = 20;
  Ids cu_seqlens{0};
  Ids ids, labels, rows, offsets, order;
  Vec x, table, grad_out, logits, weights;

  Batch() {
    for (int len : random_ids(5, 7)) cu_seqlens.push_back(cu_seqlens.back() + len + 1);
    const std::size_t tokens = static_cast<std::size_t>(cu_seqlens.back());
    ids = random_ids(tokens, 6);  // repeats: several tokens per row in the backward
    labels = random_ids(5, static_cast<int>(classes));
    x = random_normal(tokens * hidden);
    table = random_normal(static_cast<std::size_t>(vocab * hidden));
    grad_out = random_normal(tokens * hidden);
    logits = random_normal(static_cast<std::size_t>(5 * classes), 3.0f);
    for (int c = 0; c < classes; ++c) weights.push_back(0.5f + static_cast<float>(c));
    // The host grouping (cudablocks.ops.embedding_backward_index): rows ascending, stable order.
    offsets.push_back(0);
    for (int id = 0; id < vocab; ++id) {
      for (std::size_t t = 0; t < tokens; ++t) {
        if (ids[t] == id) order.push_back(static_cast<std::int32_t>(t));
      }
      if (static_cast<std::int32_t>(order.size()) > offsets.back()) {
        rows.push_back(id);
        offsets.push_back(static_cast<std::int32_t>(order.size()));
      }
    }
  }
  std::int64_t tokens() const { return cu_seqlens.back(); }
  std::int64_t seqs() const { return static_cast<std::int64_t>(cu_seqlens.size()) - 1; }
};

// Runs every head op of `batch` on `device` and returns the outputs in host vectors.
std::vector<Vec> run_head_ops(const Device& device, const Batch& b) {
  const Backend& be = backend_for(device);
  const Stream stream(device);
  auto upload = [&](const auto& v, DType dtype) {
    Buffer buffer = Buffer::empty({static_cast<std::int64_t>(v.size())}, dtype, device);
    buffer.copy_from_host(v.data(), stream);
    return buffer;
  };
  auto output = [&](std::int64_t n) {
    Buffer buffer = Buffer::empty({n}, DType::Float32, device);
    buffer.fill(NAN, stream);
    return buffer;
  };
  const std::int64_t T = b.tokens(), H = b.hidden, B = b.seqs(), C = b.classes;
  Buffer ids = upload(b.ids, DType::Int32), cu = upload(b.cu_seqlens, DType::Int32);
  Buffer x = upload(b.x, DType::Float32), table = upload(b.table, DType::Float32);
  Buffer logits = upload(b.logits, DType::Float32), labels = upload(b.labels, DType::Int32);
  Buffer weights = upload(b.weights, DType::Float32);
  Buffer embedded = output(T * H), last = output(B * H), mean = output(B * H), dx_last = output(T * H),
         dx_mean = output(T * H), dlogits = output(B * C), probs = output(B * C);
  Buffer grad_table = upload(b.table, DType::Float32), loss_sum = upload(Vec{1.5f}, DType::Float32);

  be.embedding_forward(ids.data_as<std::int32_t>(), table.data(), DType::Float32, embedded.data_as<float>(), T,
                       b.vocab, H, stream);
  Buffer rows = upload(b.rows, DType::Int32), offsets = upload(b.offsets, DType::Int32);
  Buffer order = upload(b.order, DType::Int32), grad_out = upload(b.grad_out, DType::Float32);
  be.embedding_backward(grad_out.data_as<float>(), rows.data_as<std::int32_t>(), offsets.data_as<std::int32_t>(),
                        order.data_as<std::int32_t>(), grad_table.data_as<float>(),
                        static_cast<std::int64_t>(b.rows.size()), T, T, b.vocab, H, stream);
  be.pool_forward(x.data_as<float>(), cu.data_as<std::int32_t>(), last.data_as<float>(), B, T, H, PoolMode::Last,
                  stream);
  be.pool_forward(x.data_as<float>(), cu.data_as<std::int32_t>(), mean.data_as<float>(), B, T, H, PoolMode::Mean,
                  stream);
  be.pool_backward(last.data_as<float>(), cu.data_as<std::int32_t>(), dx_last.data_as<float>(), B, T, H,
                   PoolMode::Last, stream);
  be.pool_backward(mean.data_as<float>(), cu.data_as<std::int32_t>(), dx_mean.data_as<float>(), B, T, H,
                   PoolMode::Mean, stream);
  be.cross_entropy(logits.data_as<float>(), labels.data_as<std::int32_t>(), weights.data_as<float>(),
                   loss_sum.data_as<float>(), dlogits.data_as<float>(), probs.data_as<float>(), 0.25f, B, C, stream);

  std::vector<Vec> results;
  for (const Buffer* out : {&embedded, &grad_table, &last, &mean, &dx_last, &dx_mean, &loss_sum, &dlogits, &probs}) {
    Vec host(static_cast<std::size_t>(out->numel()));
    out->copy_to_host(host.data(), stream);
    results.push_back(std::move(host));
  }
  stream.synchronize();
  return results;
}

TEST(HeadOps, CpuMatchesDirectLoops) {
  const Batch b;
  const std::vector<Vec> got = run_head_ops(Device(), b);
  const std::int64_t T = b.tokens(), H = b.hidden, B = b.seqs(), C = b.classes;
  std::vector<std::vector<double>> want(got.size());
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < H; ++h) want[0].push_back(b.table[b.ids[t] * H + h]);
  }
  want[1].assign(b.table.begin(), b.table.end());
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < H; ++h) want[1][b.ids[t] * H + h] += b.grad_out[t * H + h];
  }
  want[2].assign(B * H, 0.0);
  want[3].assign(B * H, 0.0);
  want[4].assign(T * H, 0.0);
  want[5].assign(T * H, 0.0);
  for (std::int64_t s = 0; s < B; ++s) {
    const std::int64_t begin = b.cu_seqlens[s], end = b.cu_seqlens[s + 1];
    for (std::int64_t h = 0; h < H; ++h) {
      want[2][s * H + h] = b.x[(end - 1) * H + h];
      for (std::int64_t t = begin; t < end; ++t) want[3][s * H + h] += b.x[t * H + h] / double(end - begin);
      want[4][(end - 1) * H + h] = want[2][s * H + h];
      for (std::int64_t t = begin; t < end; ++t) want[5][t * H + h] = want[3][s * H + h] / double(end - begin);
    }
  }
  double loss = 1.5;
  for (std::int64_t i = 0; i < B; ++i) {
    double sum_exp = 0.0;
    for (std::int64_t c = 0; c < C; ++c) sum_exp += std::exp(double(b.logits[i * C + c]));
    const double w = b.weights[b.labels[i]];
    loss += w * (std::log(sum_exp) - b.logits[i * C + b.labels[i]]);
    for (std::int64_t c = 0; c < C; ++c) {
      const double p = std::exp(double(b.logits[i * C + c])) / sum_exp;
      want[7].push_back(0.25 * w * (p - (c == b.labels[i] ? 1.0 : 0.0)));
      want[8].push_back(p);
    }
  }
  want[6] = {loss};
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_LE(relative_error(got[i], want[i]), 1e-6) << "output " << i;
}

TEST(HeadOps, CpuRejectsOutOfRangeValuesBeforeWriting) {
  const Backend& cpu = backend_for(Device());
  const Stream stream{Device()};
  const Vec table = random_normal(4 * 3);
  Vec out(2 * 3, 7.0f), loss{0.0f};
  const Ids bad_ids{1, 4}, labels{0, 3};
  EXPECT_THROW(cpu.embedding_forward(bad_ids.data(), table.data(), DType::Float32, out.data(), 2, 4, 3, stream),
               InvalidArgumentError);
  EXPECT_EQ(out, Vec(2 * 3, 7.0f));
  const Vec logits = random_normal(2 * 3);
  EXPECT_THROW(cpu.cross_entropy(logits.data(), labels.data(), nullptr, loss.data(), out.data(), nullptr, 1.0f, 2, 3,
                                 stream),
               InvalidArgumentError);
  EXPECT_EQ(loss[0], 0.0f);
}

TEST(HeadOps, CudaMatchesCpu) {
  if (!test::have_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const Batch b;
  const std::vector<Vec> cpu = run_head_ops(Device(), b), cuda = run_head_ops(Device(DeviceType::CUDA, 0), b);
  EXPECT_EQ(cuda[1], cpu[1]) << "embedding_backward sums in the same order on both";
  for (std::size_t i = 0; i < cpu.size(); ++i) EXPECT_LE(relative_error(cuda[i], cpu[i]), 1e-6) << "output " << i;
}

}  // namespace
}  // namespace cudablocks
