// Tests of causal GQA attention over packed sequences (native/src/cpu/attention.*, native/src/cuda/attention.*).
//
//   1. The test's own fp64 reference (explicit score matrices, explicit softmax Jacobian) is checked
//      against central finite differences of loss = sum(out * G).
//   2. The CPU backend (forward and backward) is checked against that reference.
//   3. The CUDA backend is checked against the CPU backend at the shapes that matter (head_dim
//      64/128, 32/8 heads, ragged lengths) and small head dims, with every split of the dK/dV pass,
//      for determinism, and with a too-small max_seqlen hint.
//   4. The tensor-core kernels (attention_mma.cu, precisions bf16 and tf32) against the CPU backend
//      with bounds on the relative L2 error, determinism, and the fp32 fallback for other head dims.
//   5. The wgmma kernels (attention_wgmma.cu, tf32; attention_wgmma_bf16.cu, bf16 inputs: forward,
//      dK/dV and dQ passes, taken where supported) against the mma.sync ones on the same inputs, and
//      the bf16 ones against the CPU backend as well.
// Inputs are fresh random numbers each run (the seed is printed on failure); outputs are poisoned
// with NaN before each call so that an element left unwritten fails the comparison.
#include <gtest/gtest.h>

#include "cudablocks/errors.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/attention.hpp"
#include "support.hpp"

#if CUDABLOCKS_WITH_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/attention.cuh"
#include "cuda/attention_mma.cuh"
#include "cuda/attention_wgmma.cuh"
#endif

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Shape {
    std::vector<int32_t> cu;  // cu_seqlens, n_seqs + 1 entries
    int n_seqs = 0, max_seqlen = 0;
    int64_t T = 0;
    int n_q = 0, n_kv = 0, d = 0;
    float scale = 0.f;
    int64_t q_size() const { return T * n_q * d; }
    int64_t kv_size() const { return T * n_kv * d; }
};

Shape make_shape(const std::vector<int>& lens, int n_q, int n_kv, int d) {
    Shape s;
    s.cu.push_back(0);
    for (int L : lens) {
        s.cu.push_back(s.cu.back() + L);
        s.max_seqlen = std::max(s.max_seqlen, L);
    }
    s.n_seqs = (int)lens.size();
    s.T = s.cu.back();
    s.n_q = n_q;
    s.n_kv = n_kv;
    s.d = d;
    s.scale = 1.0f / std::sqrt((float)d);
    return s;
}

std::string describe(const Shape& s) {
    std::string r = "lengths {";
    for (int i = 0; i < s.n_seqs; ++i) r += (i ? ", " : "") + std::to_string(s.cu[i + 1] - s.cu[i]);
    return r + "}, heads " + std::to_string(s.n_q) + "/" + std::to_string(s.n_kv) + ", head_dim " +
           std::to_string(s.d);
}

// A fresh seed per test, printed with every failure of that test.
struct Seeded {
    uint32_t seed;
    std::mt19937 gen;
    Seeded() : seed(std::random_device{}()), gen(seed) {}
    std::string trace() const { return "random seed " + std::to_string(seed); }
    std::vector<float> normal(int64_t n, float stddev) {
        std::normal_distribution<float> dist(0.f, stddev);
        std::vector<float> x((size_t)n);
        for (auto& e : x) e = dist(gen);
        return x;
    }
};

struct Inputs {
    std::vector<float> q, k, v, dout;
};

// q is drawn wider than k so that some softmax rows are peaked, not all near-uniform.
Inputs random_inputs(const Shape& s, Seeded& rng) {
    Inputs in;
    in.q = rng.normal(s.q_size(), 1.5f);
    in.k = rng.normal(s.kv_size(), 1.0f);
    in.v = rng.normal(s.kv_size(), 1.0f);
    in.dout = rng.normal(s.q_size(), 1.0f);
    return in;
}

std::vector<double> to_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }

// ---------------------------------------------------------------------------------------------
// fp64 reference, written independently of the backends: per (sequence, head) it builds the full
// score matrix, softmax, and for the backward the softmax Jacobian product
// dS = P * (dP - rowsum(P * dP)) (not the dout.out shortcut the backends use).

struct RefOut {
    std::vector<double> out, lse;
};
struct RefGrads {
    std::vector<double> dq, dk, dv;
};

// P[i][j] (j <= i) of one (sequence, head), row-major L x L (upper triangle zero).
std::vector<double> ref_probs(const Shape& s, const std::vector<double>& q, const std::vector<double>& k,
                              int seq, int h, std::vector<double>* lse_rows) {
    const int start = s.cu[seq], L = s.cu[seq + 1] - s.cu[seq];
    const int kvh = h / (s.n_q / s.n_kv);
    std::vector<double> P((size_t)L * L, 0.0);
    for (int i = 0; i < L; ++i) {
        double m = -std::numeric_limits<double>::infinity();
        for (int j = 0; j <= i; ++j) {
            double dot = 0.0;
            for (int c = 0; c < s.d; ++c)
                dot += q[((size_t)(start + i) * s.n_q + h) * s.d + c] * k[((size_t)(start + j) * s.n_kv + kvh) * s.d + c];
            P[(size_t)i * L + j] = dot * (double)s.scale;
            m = std::max(m, P[(size_t)i * L + j]);
        }
        double sum = 0.0;
        for (int j = 0; j <= i; ++j) sum += std::exp(P[(size_t)i * L + j] - m);
        for (int j = 0; j <= i; ++j) P[(size_t)i * L + j] = std::exp(P[(size_t)i * L + j] - m) / sum;
        if (lse_rows) lse_rows->push_back(m + std::log(sum));
    }
    return P;
}

RefOut ref_forward(const Shape& s, const std::vector<double>& q, const std::vector<double>& k,
                   const std::vector<double>& v) {
    RefOut r;
    r.out.assign((size_t)s.q_size(), 0.0);
    r.lse.assign((size_t)(s.T * s.n_q), 0.0);
    for (int seq = 0; seq < s.n_seqs; ++seq) {
        const int start = s.cu[seq], L = s.cu[seq + 1] - s.cu[seq];
        for (int h = 0; h < s.n_q; ++h) {
            const int kvh = h / (s.n_q / s.n_kv);
            std::vector<double> lse_rows;
            const std::vector<double> P = ref_probs(s, q, k, seq, h, &lse_rows);
            for (int i = 0; i < L; ++i) {
                r.lse[(size_t)(start + i) * s.n_q + h] = lse_rows[i];
                for (int c = 0; c < s.d; ++c) {
                    double acc = 0.0;
                    for (int j = 0; j <= i; ++j)
                        acc += P[(size_t)i * L + j] * v[((size_t)(start + j) * s.n_kv + kvh) * s.d + c];
                    r.out[((size_t)(start + i) * s.n_q + h) * s.d + c] = acc;
                }
            }
        }
    }
    return r;
}

RefGrads ref_backward(const Shape& s, const std::vector<double>& q, const std::vector<double>& k,
                      const std::vector<double>& v, const std::vector<double>& dout) {
    RefGrads g;
    g.dq.assign((size_t)s.q_size(), 0.0);
    g.dk.assign((size_t)s.kv_size(), 0.0);
    g.dv.assign((size_t)s.kv_size(), 0.0);
    auto qi = [&](int t, int h, int c) { return ((size_t)t * s.n_q + h) * s.d + c; };
    auto ki = [&](int t, int h, int c) { return ((size_t)t * s.n_kv + h) * s.d + c; };
    for (int seq = 0; seq < s.n_seqs; ++seq) {
        const int start = s.cu[seq], L = s.cu[seq + 1] - s.cu[seq];
        for (int h = 0; h < s.n_q; ++h) {
            const int kvh = h / (s.n_q / s.n_kv);
            const std::vector<double> P = ref_probs(s, q, k, seq, h, nullptr);
            std::vector<double> dP((size_t)L * L, 0.0);
            for (int i = 0; i < L; ++i)
                for (int j = 0; j <= i; ++j) {
                    double acc = 0.0;
                    for (int c = 0; c < s.d; ++c) acc += dout[qi(start + i, h, c)] * v[ki(start + j, kvh, c)];
                    dP[(size_t)i * L + j] = acc;
                }
            for (int i = 0; i < L; ++i) {
                double row = 0.0;
                for (int j = 0; j <= i; ++j) row += P[(size_t)i * L + j] * dP[(size_t)i * L + j];
                for (int j = 0; j <= i; ++j) {
                    const double p = P[(size_t)i * L + j];
                    const double dS = p * (dP[(size_t)i * L + j] - row) * (double)s.scale;
                    for (int c = 0; c < s.d; ++c) {
                        g.dq[qi(start + i, h, c)] += dS * k[ki(start + j, kvh, c)];
                        g.dk[ki(start + j, kvh, c)] += dS * q[qi(start + i, h, c)];
                        g.dv[ki(start + j, kvh, c)] += p * dout[qi(start + i, h, c)];
                    }
                }
            }
        }
    }
    return g;
}

// ---------------------------------------------------------------------------------------------
// Comparisons. NaN or Inf anywhere makes the error infinite, so unwritten (poisoned) outputs fail.

double rel_l2_impl(const std::vector<float>& got, const std::vector<double>& want) {
    if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
        num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        den += want[i] * want[i];
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

double rel_l2(const std::vector<float>& got, const std::vector<double>& want) {
    const double e = rel_l2_impl(got, want);
    if (std::getenv("CUDABLOCKS_TEST_VERBOSE")) std::printf("    rel_l2 = %.3e\n", e);
    return e;
}

[[maybe_unused]] double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
    for (float w : want)
        if (!std::isfinite(w)) return std::numeric_limits<double>::infinity();
    return rel_l2(got, to_double(want));
}

struct CpuResult {
    std::vector<float> out, lse, dq, dk, dv;
};

CpuResult run_cpu(const Shape& s, const Inputs& in) {
    CpuResult r;
    r.out.assign((size_t)s.q_size(), kNaN);
    r.lse.assign((size_t)(s.T * s.n_q), kNaN);
    cudablocks::cpu::attention_forward(in.q.data(), in.k.data(), in.v.data(), r.out.data(), r.lse.data(),
                                       s.cu.data(), s.n_seqs, s.max_seqlen, s.T, s.n_q, s.n_kv, s.d, s.scale);
    r.dq.assign((size_t)s.q_size(), kNaN);
    r.dk.assign((size_t)s.kv_size(), kNaN);
    r.dv.assign((size_t)s.kv_size(), kNaN);
    std::vector<float> ws((size_t)cudablocks::cpu::attention_backward_workspace_floats(s.T, s.n_q, s.n_kv, s.d));
    cudablocks::cpu::attention_backward(in.q.data(), in.k.data(), in.v.data(), r.out.data(), in.dout.data(),
                                        r.lse.data(), r.dq.data(), r.dk.data(), r.dv.data(), ws.data(),
                                        s.cu.data(), s.n_seqs, s.max_seqlen, s.T, s.n_q, s.n_kv, s.d, s.scale);
    return r;
}

// ---------------------------------------------------------------------------------------------
// 1. The reference itself against finite differences (fp64 throughout: tight tolerance).

TEST(AttentionReference, BackwardMatchesFiniteDifferences) {
    Seeded rng;
    SCOPED_TRACE(rng.trace());
    const Shape s = make_shape({3, 1, 4}, 4, 2, 3);
    const Inputs in = random_inputs(s, rng);
    std::vector<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
    const std::vector<double> G = to_double(in.dout);
    auto loss = [&]() {
        const RefOut r = ref_forward(s, q, k, v);
        double acc = 0.0;
        for (size_t i = 0; i < G.size(); ++i) acc += r.out[i] * G[i];
        return acc;
    };
    const RefGrads g = ref_backward(s, q, k, v, G);
    const double h = 1e-5;
    auto check = [&](std::vector<double>& x, const std::vector<double>& grad, const char* name) {
        double num = 0.0, den = 0.0;
        for (size_t i = 0; i < x.size(); ++i) {
            const double saved = x[i];
            x[i] = saved + h;
            const double lp = loss();
            x[i] = saved - h;
            const double lm = loss();
            x[i] = saved;
            const double fd = (lp - lm) / (2 * h);
            num += (fd - grad[i]) * (fd - grad[i]);
            den += grad[i] * grad[i];
        }
        EXPECT_LE(std::sqrt(num / den), 1e-7) << name;
    };
    check(q, g.dq, "dq");
    check(k, g.dk, "dk");
    check(v, g.dv, "dv");
}

// 2. CPU backend against the fp64 reference.

void check_cpu_against_reference(const std::vector<int>& lens, int n_q, int n_kv, int d) {
    Seeded rng;
    const Shape s = make_shape(lens, n_q, n_kv, d);
    SCOPED_TRACE(rng.trace() + ", " + describe(s));
    const Inputs in = random_inputs(s, rng);
    const CpuResult cpu = run_cpu(s, in);
    const RefOut ref = ref_forward(s, to_double(in.q), to_double(in.k), to_double(in.v));
    EXPECT_LE(rel_l2(cpu.out, ref.out), 1e-6) << "out";
    EXPECT_LE(rel_l2(cpu.lse, ref.lse), 1e-6) << "lse";
    const RefGrads g = ref_backward(s, to_double(in.q), to_double(in.k), to_double(in.v), to_double(in.dout));
    EXPECT_LE(rel_l2(cpu.dq, g.dq), 1e-5) << "dq";
    EXPECT_LE(rel_l2(cpu.dk, g.dk), 1e-5) << "dk";
    EXPECT_LE(rel_l2(cpu.dv, g.dv), 1e-5) << "dv";
}

TEST(CpuAttention, MatchesFp64ReferenceGqa) { check_cpu_against_reference({5, 1, 17, 9}, 4, 2, 16); }

TEST(CpuAttention, MatchesFp64ReferenceMhaWithEmptySequence) {
    check_cpu_against_reference({4, 0, 7, 0}, 3, 3, 8);
}

TEST(CpuAttention, MatchesFp64ReferenceOneKvHeadOddHeadDim) {
    check_cpu_against_reference({33}, 6, 1, 5);
}

// The first row of every sequence attends only to itself: out = v, lse = scale * q.k.
TEST(CpuAttention, FirstRowOfEachSequenceCopiesItsValue) {
    Seeded rng;
    SCOPED_TRACE(rng.trace());
    const Shape s = make_shape({3, 2, 6}, 2, 1, 4);
    const Inputs in = random_inputs(s, rng);
    const CpuResult cpu = run_cpu(s, in);
    for (int seq = 0; seq < s.n_seqs; ++seq) {
        const int t = s.cu[seq];
        for (int h = 0; h < s.n_q; ++h)
            for (int c = 0; c < s.d; ++c)
                EXPECT_FLOAT_EQ(cpu.out[((size_t)t * s.n_q + h) * s.d + c], in.v[(size_t)t * s.n_kv * s.d + c]);
    }
}

TEST(CpuAttention, RejectsInconsistentArguments) {
    const Shape s = make_shape({4, 4}, 4, 2, 8);
    std::vector<float> q((size_t)s.q_size(), 1.f), kv((size_t)s.kv_size(), 1.f), out((size_t)s.q_size()),
        lse((size_t)(s.T * s.n_q));
    auto fwd = [&](const int32_t* cu, int64_t T, int n_q, int n_kv) {
        cudablocks::cpu::attention_forward(q.data(), kv.data(), kv.data(), out.data(), lse.data(), cu, s.n_seqs,
                                           s.max_seqlen, T, n_q, n_kv, s.d, s.scale);
    };
    EXPECT_NO_THROW(fwd(s.cu.data(), s.T, 4, 2));
    EXPECT_THROW(fwd(s.cu.data(), s.T, 4, 3), cudablocks::InvalidArgumentError);       // heads not divisible
    EXPECT_THROW(fwd(s.cu.data(), s.T - 1, 4, 2), cudablocks::InvalidArgumentError);   // lengths don't sum to T
    const std::vector<int32_t> bad = {0, 5, 3};
    EXPECT_THROW(fwd(bad.data(), 3, 4, 2), cudablocks::InvalidArgumentError);          // decreasing cu_seqlens
}

// ---------------------------------------------------------------------------------------------
// 3. CUDA backend against the CPU backend.

#if CUDABLOCKS_WITH_CUDA

using cudablocks::test::have_cuda_device;

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// Minimal owning device array for the test (the project's Buffer is not needed here).
template <typename T>
struct DeviceArray {
    T* ptr = nullptr;
    size_t n = 0;
    explicit DeviceArray(size_t count) : n(count) {
        if (cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess)
            throw std::runtime_error("cudaMalloc failed");
    }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    ~DeviceArray() { cudaFree(ptr); }
    void upload(const std::vector<T>& h) {
        if (cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice) != cudaSuccess)
            throw std::runtime_error("cudaMemcpy H2D failed");
    }
    std::vector<T> download() const {
        std::vector<T> h(n);
        if (cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost) != cudaSuccess)
            throw std::runtime_error("cudaMemcpy D2H failed");
        return h;
    }
    void poison() {  // all-ones bytes = NaN for float
        if (cudaMemset(ptr, 0xFF, n * sizeof(T)) != cudaSuccess) throw std::runtime_error("cudaMemset failed");
    }
};

struct CudaRun {
    const Shape& s;
    DeviceArray<float> q, k, v, dout, out, lse, dq, dk, dv, ws;
    DeviceArray<int32_t> cu;
    CudaRun(const Shape& shape, const Inputs& in)
        : s(shape), q(s.q_size()), k(s.kv_size()), v(s.kv_size()), dout(s.q_size()), out(s.q_size()),
          lse(s.T * s.n_q), dq(s.q_size()), dk(s.kv_size()), dv(s.kv_size()),
          ws((size_t)cudablocks::cuda::attention_backward_workspace_floats(s.T, s.n_q, s.n_kv, s.d)),
          cu(s.cu.size()) {
        q.upload(in.q);
        k.upload(in.k);
        v.upload(in.v);
        dout.upload(in.dout);
        cu.upload(s.cu);
    }
    void forward(int max_seqlen) {
        out.poison();
        lse.poison();
        cudablocks::cuda::attention_forward(q.ptr, k.ptr, v.ptr, out.ptr, lse.ptr, cu.ptr, s.n_seqs, max_seqlen, s.T,
                                            s.n_q, s.n_kv, s.d, s.scale, nullptr);
    }
    // Backward from given (host) out and lse, so that CPU and CUDA backward see identical inputs.
    void backward(const std::vector<float>& out_h, const std::vector<float>& lse_h, int max_seqlen, int splits) {
        out.upload(out_h);
        lse.upload(lse_h);
        dq.poison();
        dk.poison();
        dv.poison();
        ws.poison();
        if (splits == 0)  // the public entry point (heuristic split)
            cudablocks::cuda::attention_backward(q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, lse.ptr, dq.ptr, dk.ptr,
                                                 dv.ptr, ws.ptr, cu.ptr, s.n_seqs, max_seqlen, s.T, s.n_q, s.n_kv,
                                                 s.d, s.scale, nullptr);
        else
            cudablocks::cuda::detail::attention_backward_with_splits(
                q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, lse.ptr, dq.ptr, dk.ptr, dv.ptr, ws.ptr, cu.ptr, s.n_seqs,
                max_seqlen, s.T, s.n_q, s.n_kv, s.d, s.scale, splits, nullptr);
    }
};

struct CudaCase {
    std::vector<int> lens;
    int n_q, n_kv, d;
};

class CudaAttention : public ::testing::TestWithParam<CudaCase> {
protected:
    void SetUp() override {
        if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device";
    }
};

TEST_P(CudaAttention, MatchesCpu) {
    const CudaCase& c = GetParam();
    Seeded rng;
    const Shape s = make_shape(c.lens, c.n_q, c.n_kv, c.d);
    SCOPED_TRACE(rng.trace() + ", " + describe(s));
    const Inputs in = random_inputs(s, rng);
    const CpuResult cpu = run_cpu(s, in);
    CudaRun run(s, in);

    run.forward(s.max_seqlen);
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_LE(rel_l2(run.out.download(), cpu.out), 1e-5) << "out";
    EXPECT_LE(rel_l2(run.lse.download(), cpu.lse), 1e-5) << "lse";

    // Every split of the dK/dV pass (0 = heuristic; uneven splits included), all against the CPU.
    const int group = s.n_q / s.n_kv;
    for (int splits = 0; splits <= group; ++splits) {
        SCOPED_TRACE("kv_splits " + std::to_string(splits));
        run.backward(cpu.out, cpu.lse, s.max_seqlen, splits);
        CUDA_OK(cudaDeviceSynchronize());
        EXPECT_LE(rel_l2(run.dq.download(), cpu.dq), 1e-4) << "dq";
        EXPECT_LE(rel_l2(run.dk.download(), cpu.dk), 1e-4) << "dk";
        EXPECT_LE(rel_l2(run.dv.download(), cpu.dv), 1e-4) << "dv";
    }
}

TEST_P(CudaAttention, DeterministicAndIndependentOfMaxSeqlenHint) {
    const CudaCase& c = GetParam();
    Seeded rng;
    const Shape s = make_shape(c.lens, c.n_q, c.n_kv, c.d);
    SCOPED_TRACE(rng.trace() + ", " + describe(s));
    const Inputs in = random_inputs(s, rng);
    CudaRun run(s, in);

    run.forward(s.max_seqlen);
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<float> out = run.out.download(), lse = run.lse.download();
    run.backward(out, lse, s.max_seqlen, 1);
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<float> dq = run.dq.download(), dk = run.dk.download(), dv = run.dv.download();

    // Same call again: bitwise identical.
    run.forward(s.max_seqlen);
    run.backward(out, lse, s.max_seqlen, 1);
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_TRUE(run.out.download() == out);
    EXPECT_TRUE(run.lse.download() == lse);
    EXPECT_TRUE(run.dq.download() == dq);
    EXPECT_TRUE(run.dk.download() == dk);
    EXPECT_TRUE(run.dv.download() == dv);

    // A max_seqlen hint far below the true maximum only shrinks the grid: blocks loop over the
    // remaining tiles, and each tile is computed exactly as before.
    run.forward(1);
    run.backward(out, lse, 1, 1);
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_TRUE(run.out.download() == out);
    EXPECT_TRUE(run.lse.download() == lse);
    EXPECT_TRUE(run.dq.download() == dq);
    EXPECT_TRUE(run.dk.download() == dk);
    EXPECT_TRUE(run.dv.download() == dv);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttention,
    ::testing::Values(CudaCase{{512, 37, 1, 300}, 32, 8, 128},  // Qwen3-4B heads
                      CudaCase{{512, 37, 1, 300}, 32, 8, 64},
                      CudaCase{{130}, 8, 8, 128},               // MHA, one sequence
                      CudaCase{{5, 1, 17, 9, 0, 70}, 4, 2, 16},  // includes an empty sequence
                      CudaCase{{5, 1, 17, 9, 129}, 4, 2, 32},
                      CudaCase{{64, 65, 3}, 6, 2, 80},          // head_dim served by the 128 tile
                      CudaCase{{200, 7}, 4, 1, 4}),
    [](const ::testing::TestParamInfo<CudaCase>& info) {
        const CudaCase& c = info.param;
        return "d" + std::to_string(c.d) + "_h" + std::to_string(c.n_q) + "_" + std::to_string(c.n_kv) + "_" +
               std::to_string(info.index);
    });

TEST(CudaAttentionArgs, RejectsUnsupportedHeadDim) {
    if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device";
    const Shape s = make_shape({8}, 2, 1, 8);
    DeviceArray<float> buf(4096);
    DeviceArray<int32_t> cu(2);
    cu.upload(s.cu);
    EXPECT_THROW(cudablocks::cuda::attention_forward(buf.ptr, buf.ptr, buf.ptr, buf.ptr, buf.ptr, cu.ptr, 1, 8, 8, 2,
                                                     1, 6, 1.f, nullptr),
                 cudablocks::InvalidArgumentError);  // not a multiple of 4
    EXPECT_THROW(cudablocks::cuda::attention_forward(buf.ptr, buf.ptr, buf.ptr, buf.ptr, buf.ptr, cu.ptr, 1, 8, 8, 2,
                                                     1, 256, 1.f, nullptr),
                 cudablocks::InvalidArgumentError);  // above 128
    EXPECT_THROW(cudablocks::cuda::attention_forward(buf.ptr, buf.ptr, buf.ptr, buf.ptr, buf.ptr, cu.ptr, 1, 8, 8, 3,
                                                     2, 8, 1.f, nullptr),
                 cudablocks::InvalidArgumentError);  // heads not divisible
}

#endif  // CUDABLOCKS_WITH_CUDA

}  // namespace

// ---------------------------------------------------------------------------------------------
// 4. Tensor-core attention (bf16 / tf32 operands, fp32 accumulation) against the CPU backend.

#if CUDABLOCKS_WITH_CUDA

namespace {

using cudablocks::Precision;

struct MmaCase {
    std::vector<int> lens;
    int n_q, n_kv, d;
    Precision precision;
};

const char* precision_label(Precision p) { return p == Precision::BF16 ? "bf16" : p == Precision::TF32 ? "tf32" : "fp32"; }

// Bounds on the relative L2 error against the fp32 CPU backend. Operand rounding alone is
// 2^-9 (bf16) / 2^-11 (tf32) per element; the gradients go through one more rounded product.
double out_bound(Precision p) { return p == Precision::BF16 ? 1.5e-2 : 2e-3; }
double grad_bound(Precision p) { return p == Precision::BF16 ? 3e-2 : 5e-3; }

struct MmaRun : CudaRun {
    Precision precision;
    MmaRun(const Shape& shape, const Inputs& in, Precision p) : CudaRun(shape, in), precision(p) {}
    void forward_mma(int max_seqlen) {
        out.poison();
        lse.poison();
        cudablocks::cuda::attention_forward_mma(q.ptr, k.ptr, v.ptr, out.ptr, lse.ptr, cu.ptr, s.n_seqs, max_seqlen,
                                                s.T, s.n_q, s.n_kv, s.d, s.scale, precision, nullptr);
    }
    // splits: 0 = the public entry point (heuristic split of the dK/dV pass), else forced.
    void backward_mma(const std::vector<float>& out_h, const std::vector<float>& lse_h, int max_seqlen,
                      int splits = 0) {
        out.upload(out_h);
        lse.upload(lse_h);
        dq.poison();
        dk.poison();
        dv.poison();
        ws.poison();
        if (splits == 0)
            cudablocks::cuda::attention_backward_mma(q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, lse.ptr, dq.ptr, dk.ptr,
                                                     dv.ptr, ws.ptr, cu.ptr, s.n_seqs, max_seqlen, s.T, s.n_q,
                                                     s.n_kv, s.d, s.scale, precision, nullptr);
        else
            cudablocks::cuda::detail::attention_backward_mma_with_splits(
                q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, lse.ptr, dq.ptr, dk.ptr, dv.ptr, ws.ptr, cu.ptr, s.n_seqs,
                max_seqlen, s.T, s.n_q, s.n_kv, s.d, s.scale, precision, splits, nullptr);
    }
};

// Forces the backward's staging variant (detail::set_attention_mma_async_staging) for a scope;
// restores "from the environment" afterwards.
struct StagingMode {
    explicit StagingMode(int mode) { cudablocks::cuda::detail::set_attention_mma_async_staging(mode); }
    ~StagingMode() { cudablocks::cuda::detail::set_attention_mma_async_staging(-1); }
    StagingMode(const StagingMode&) = delete;
    StagingMode& operator=(const StagingMode&) = delete;
};

class CudaAttentionMma : public ::testing::TestWithParam<MmaCase> {
protected:
    void SetUp() override {
        if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device";
    }
};

TEST_P(CudaAttentionMma, MatchesCpuWithinRoundingBounds) {
    const MmaCase& c = GetParam();
    ASSERT_TRUE(cudablocks::cuda::attention_mma_supported(c.d, c.precision));
    Seeded rng;
    const Shape s = make_shape(c.lens, c.n_q, c.n_kv, c.d);
    SCOPED_TRACE(rng.trace() + ", " + describe(s) + ", " + precision_label(c.precision));
    const Inputs in = random_inputs(s, rng);
    const CpuResult cpu = run_cpu(s, in);
    MmaRun run(s, in, c.precision);

    run.forward_mma(s.max_seqlen);
    CUDA_OK(cudaDeviceSynchronize());
    const double e_out = rel_l2(run.out.download(), cpu.out);
    const double e_lse = rel_l2(run.lse.download(), cpu.lse);
    std::printf("    [%s d%d %d/%d] rel L2: out %.3e  lse %.3e\n", precision_label(c.precision), c.d, c.n_q,
                c.n_kv, e_out, e_lse);
    EXPECT_LE(e_out, out_bound(c.precision)) << "out";
    EXPECT_LE(e_lse, out_bound(c.precision)) << "lse";

    // Backward from the CPU's out and lse, so that it sees the same inputs as the CPU backward; every
    // split of the dK/dV pass (0 = heuristic; uneven splits included).
    // Every staging variant of the backward (0 synchronous, 1 and 2 cp.async): the same bits.
    const int group = s.n_q / s.n_kv;
    for (int splits = 0; splits <= group; ++splits) {
        SCOPED_TRACE("kv_splits " + std::to_string(splits));
        std::vector<float> sync_dq, sync_dk, sync_dv;
        for (int async = 0; async <= 2; ++async) {
            SCOPED_TRACE("staging mode " + std::to_string(async));
            StagingMode mode(async);
            run.backward_mma(cpu.out, cpu.lse, s.max_seqlen, splits);
            CUDA_OK(cudaDeviceSynchronize());
            const std::vector<float> dq = run.dq.download(), dk = run.dk.download(), dv = run.dv.download();
            const double e_dq = rel_l2(dq, cpu.dq);
            const double e_dk = rel_l2(dk, cpu.dk);
            const double e_dv = rel_l2(dv, cpu.dv);
            std::printf("    [%s d%d %d/%d splits %d staging %d] rel L2: dq %.3e  dk %.3e  dv %.3e\n",
                        precision_label(c.precision), c.d, c.n_q, c.n_kv, splits, async, e_dq, e_dk, e_dv);
            EXPECT_LE(e_dq, grad_bound(c.precision)) << "dq";
            EXPECT_LE(e_dk, grad_bound(c.precision)) << "dk";
            EXPECT_LE(e_dv, grad_bound(c.precision)) << "dv";
            if (!async) {
                sync_dq = dq;
                sync_dk = dk;
                sync_dv = dv;
            } else {
                EXPECT_TRUE(dq == sync_dq) << "dq: async staging differs from sync staging";
                EXPECT_TRUE(dk == sync_dk) << "dk: async staging differs from sync staging";
                EXPECT_TRUE(dv == sync_dv) << "dv: async staging differs from sync staging";
            }
        }
    }
}

// No atomics: the same call gives the same bits, and a too-small max_seqlen hint only shrinks the grid.
TEST_P(CudaAttentionMma, DeterministicAndIndependentOfMaxSeqlenHint) {
    const MmaCase& c = GetParam();
    Seeded rng;
    const Shape s = make_shape(c.lens, c.n_q, c.n_kv, c.d);
    SCOPED_TRACE(rng.trace() + ", " + describe(s) + ", " + precision_label(c.precision));
    const Inputs in = random_inputs(s, rng);
    MmaRun run(s, in, c.precision);

    run.forward_mma(s.max_seqlen);
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<float> out = run.out.download(), lse = run.lse.download();
    // Splits forced to 1: the heuristic split depends on the hint, and the split changes the order
    // in which a group's heads are summed.
    run.backward_mma(out, lse, s.max_seqlen, 1);
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<float> dq = run.dq.download(), dk = run.dk.download(), dv = run.dv.download();

    for (int hint : {s.max_seqlen, 1})
        for (int async = 0; async <= 2; ++async) {
            SCOPED_TRACE("max_seqlen hint " + std::to_string(hint) + ", staging mode " + std::to_string(async));
            StagingMode mode(async);
            run.forward_mma(hint);
            run.backward_mma(out, lse, hint, 1);
            CUDA_OK(cudaDeviceSynchronize());
            EXPECT_TRUE(run.out.download() == out);
            EXPECT_TRUE(run.lse.download() == lse);
            EXPECT_TRUE(run.dq.download() == dq);
            EXPECT_TRUE(run.dk.download() == dk);
            EXPECT_TRUE(run.dv.download() == dv);
        }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttentionMma,
    ::testing::Values(MmaCase{{512, 37, 1, 300}, 32, 8, 128, Precision::BF16},  // Qwen3-4B heads
                      MmaCase{{512, 37, 1, 300}, 32, 8, 128, Precision::TF32},
                      MmaCase{{512, 37, 1, 300}, 32, 8, 64, Precision::BF16},
                      MmaCase{{512, 37, 1, 300}, 32, 8, 64, Precision::TF32},
                      MmaCase{{130, 0, 64, 65}, 6, 6, 128, Precision::BF16},  // MHA, empty sequence, tile edges
                      MmaCase{{130, 0, 64, 65}, 6, 2, 64, Precision::TF32}),
    [](const ::testing::TestParamInfo<MmaCase>& info) {
        const MmaCase& c = info.param;
        return std::string(precision_label(c.precision)) + "_d" + std::to_string(c.d) + "_h" + std::to_string(c.n_q) +
               "_" + std::to_string(c.n_kv) + "_" + std::to_string(info.index);
    });

// Head dims other than 64/128 (and Precision::FP32) run the fp32 kernels: bitwise the fp32 results.
TEST(CudaAttentionMmaFallback, OtherHeadDimsAndFp32UseTheFp32Kernels) {
    if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device";
    EXPECT_FALSE(cudablocks::cuda::attention_mma_supported(80, Precision::BF16));
    EXPECT_FALSE(cudablocks::cuda::attention_mma_supported(128, Precision::FP32));
    for (const auto& cs : {MmaCase{{64, 65, 3}, 6, 2, 80, Precision::BF16}, MmaCase{{70, 9}, 4, 2, 128, Precision::FP32}}) {
        Seeded rng;
        const Shape s = make_shape(cs.lens, cs.n_q, cs.n_kv, cs.d);
        SCOPED_TRACE(rng.trace() + ", " + describe(s) + ", " + precision_label(cs.precision));
        const Inputs in = random_inputs(s, rng);
        MmaRun run(s, in, cs.precision);
        run.forward(s.max_seqlen);
        CUDA_OK(cudaDeviceSynchronize());
        const std::vector<float> out = run.out.download(), lse = run.lse.download();
        run.backward(out, lse, s.max_seqlen, 0);
        CUDA_OK(cudaDeviceSynchronize());
        const std::vector<float> dq = run.dq.download(), dk = run.dk.download(), dv = run.dv.download();
        run.forward_mma(s.max_seqlen);
        run.backward_mma(out, lse, s.max_seqlen);
        CUDA_OK(cudaDeviceSynchronize());
        EXPECT_TRUE(run.out.download() == out);
        EXPECT_TRUE(run.lse.download() == lse);
        EXPECT_TRUE(run.dq.download() == dq);
        EXPECT_TRUE(run.dk.download() == dk);
        EXPECT_TRUE(run.dv.download() == dv);
    }
}

// Switches the wgmma kernels (detail::set_attention_wgmma) for a scope; restores "from the
// environment" afterwards.
struct WgmmaMode {
    explicit WgmmaMode(int mode) { cudablocks::cuda::detail::set_attention_wgmma(mode); }
    ~WgmmaMode() { cudablocks::cuda::detail::set_attention_wgmma(-1); }
    WgmmaMode(const WgmmaMode&) = delete;
    WgmmaMode& operator=(const WgmmaMode&) = delete;
};

// The wgmma tests' cases (head_dim 128): Qwen3-4B heads with ragged lengths, an empty sequence and
// tile edges with a group of 2, and a max_seqlen hint of 1 (a grid shorter than the longest
// sequence's tiles: blocks loop over tiles).
struct WgmmaCase {
    std::vector<int> lens;
    int n_q, n_kv, hint;
};
std::vector<WgmmaCase> wgmma_cases() {
    return {{{512, 37, 1, 300}, 32, 8, 512}, {{130, 0, 64, 65}, 4, 2, 130}, {{300, 200}, 8, 2, 1}};
}

// The wgmma tf32 kernels (forward, dK/dV and dQ passes) and the mma.sync ones round the same
// operands to tf32 and, in the forward and the dQ pass, sum the same 8-wide products in the same
// order (the dK/dV pass sums the items of its two warpgroups apart, then adds them). So their
// outputs agree far more closely than either agrees with fp32 (out_bound, grad_bound); on an H200
// (2026-11-28) out, lse and dq were equal bit for bit, dk and dv within 1.1e-6. CudaAttentionMma
// checks the wgmma kernels against the CPU backend. Cases: wgmma_cases().
TEST(CudaAttentionWgmma, AgreesWithTheMmaSyncKernels) {
    if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device";
    if (!cudablocks::cuda::attention_wgmma_supported(128, 32, 8))
        GTEST_SKIP() << "no wgmma attention here (needs an sm_90a build on a compute capability 9.0 GPU)";
    EXPECT_FALSE(cudablocks::cuda::attention_wgmma_supported(64, 32, 8));
    EXPECT_FALSE(cudablocks::cuda::attention_wgmma_supported(128, 6, 6));  // odd group
    for (const WgmmaCase& c : wgmma_cases()) {
        Seeded rng;
        const Shape s = make_shape(c.lens, c.n_q, c.n_kv, 128);
        SCOPED_TRACE(rng.trace() + ", " + describe(s) + ", max_seqlen hint " + std::to_string(c.hint));
        const Inputs in = random_inputs(s, rng);
        MmaRun run(s, in, Precision::TF32);
        std::vector<float> out[2], lse[2];
        for (int mode = 0; mode < 2; ++mode) {
            WgmmaMode wgmma(mode);
            run.forward_mma(c.hint);
            CUDA_OK(cudaDeviceSynchronize());
            out[mode] = run.out.download();
            lse[mode] = run.lse.download();
        }
        const double e_out = rel_l2(out[1], out[0]), e_lse = rel_l2(lse[1], lse[0]);
        std::printf("    wgmma vs mma.sync, rel L2: out %.3e  lse %.3e\n", e_out, e_lse);
        EXPECT_LE(e_out, 1e-4) << "out";
        EXPECT_LE(e_lse, 1e-5) << "lse";
        // The backward from the same out and lse, with the heuristic split of the dK/dV pass and with
        // every head of a group in its own block (partial slabs and their reduce).
        for (int splits : {0, c.n_q / c.n_kv}) {
            SCOPED_TRACE("kv_splits " + std::to_string(splits));
            std::vector<float> dq[2], dk[2], dv[2];
            for (int mode = 0; mode < 2; ++mode) {
                WgmmaMode wgmma(mode);
                run.backward_mma(out[0], lse[0], c.hint, splits);
                CUDA_OK(cudaDeviceSynchronize());
                dq[mode] = run.dq.download();
                dk[mode] = run.dk.download();
                dv[mode] = run.dv.download();
            }
            const double e_dq = rel_l2(dq[1], dq[0]), e_dk = rel_l2(dk[1], dk[0]), e_dv = rel_l2(dv[1], dv[0]);
            std::printf("    wgmma vs mma.sync, splits %d, rel L2: dq %.3e  dk %.3e  dv %.3e\n", splits, e_dq, e_dk,
                        e_dv);
            EXPECT_LE(e_dq, 1e-4) << "dq";
            EXPECT_LE(e_dk, 1e-4) << "dk";
            EXPECT_LE(e_dv, 1e-4) << "dv";
        }
    }
}

// bf16 <-> fp32 of the bf16 I/O tests: bit patterns rounded to nearest even, and back.
using cudablocks::test::bf16_of;
using cudablocks::test::float_of;

// The inputs replaced by their bf16 values (the bf16 I/O tests compare with fp32 math on them).
void round_to_bf16(Inputs& in) {
    for (std::vector<float>* x : {&in.q, &in.k, &in.v, &in.dout}) *x = float_of(bf16_of(*x));
}

// A run's q, k, v and dout in bf16 on the device (bf16 mode's blocks keep them so), a bf16 out, and
// the bf16-input entry points on them; lse, dq, dk, dv, the workspace and cu_seqlens are the run's.
// The outputs are poisoned first unless `poison` is false (timing loops).
struct Bf16Io {
    MmaRun& run;
    DeviceArray<uint16_t> q, k, v, out, dout;
    Bf16Io(MmaRun& r, const Inputs& in)
        : run(r), q(in.q.size()), k(in.k.size()), v(in.v.size()), out(in.q.size()), dout(in.dout.size()) {
        q.upload(bf16_of(in.q));
        k.upload(bf16_of(in.k));
        v.upload(bf16_of(in.v));
        dout.upload(bf16_of(in.dout));
    }
    void forward(int max_seqlen, bool poison = true) {
        const Shape& s = run.s;
        if (poison) {
            out.poison();
            run.lse.poison();
        }
        cudablocks::cuda::attention_forward_mma(q.ptr, k.ptr, v.ptr, out.ptr, run.lse.ptr, run.cu.ptr, s.n_seqs,
                                                max_seqlen, s.T, s.n_q, s.n_kv, s.d, s.scale, nullptr);
    }
    // From the out and lse on the device.
    void backward(int max_seqlen, bool poison = true) {
        const Shape& s = run.s;
        if (poison) {
            run.dq.poison();
            run.dk.poison();
            run.dv.poison();
            run.ws.poison();
        }
        cudablocks::cuda::attention_backward_mma(q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, run.lse.ptr, run.dq.ptr,
                                                 run.dk.ptr, run.dv.ptr, run.ws.ptr, run.cu.ptr, s.n_seqs, max_seqlen,
                                                 s.T, s.n_q, s.n_kv, s.d, s.scale, nullptr);
    }
};

// bf16 q, k, v, out and dout (bf16 mode's blocks keep them so) give, bit for bit, what the fp32-input
// BF16 kernels give on the same values, the forward's out rounded once to bf16: the staging's
// rounding is then exact and the row dots sum the same numbers in the same order. Head dim 80 has
// no tensor-core kernel: both run the fp32 kernels (the bf16 tensors on fp32 copies). The mma.sync
// kernels only (the wgmma ones, which sum in another order, are CudaAttentionWgmmaBf16's).
TEST(CudaAttentionMmaBf16Inputs, EqualTheFp32InputsOnTheSameValues) {
    if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device";
    WgmmaMode mma_sync_only(0);
    for (const auto& cs : {MmaCase{{300, 1, 77}, 8, 2, 128, Precision::BF16},
                           MmaCase{{130, 64}, 4, 4, 64, Precision::BF16},
                           MmaCase{{64, 65, 3}, 6, 2, 80, Precision::BF16}}) {
        Seeded rng;
        const Shape s = make_shape(cs.lens, cs.n_q, cs.n_kv, cs.d);
        SCOPED_TRACE(rng.trace() + ", " + describe(s));
        Inputs in = random_inputs(s, rng);
        round_to_bf16(in);
        MmaRun run(s, in, cs.precision);
        run.forward_mma(s.max_seqlen);
        CUDA_OK(cudaDeviceSynchronize());
        const std::vector<uint16_t> out16 = bf16_of(run.out.download());
        const std::vector<float> lse = run.lse.download();
        run.backward_mma(float_of(out16), lse, s.max_seqlen);
        CUDA_OK(cudaDeviceSynchronize());
        const std::vector<float> dq = run.dq.download(), dk = run.dk.download(), dv = run.dv.download();

        Bf16Io io(run, in);
        io.forward(s.max_seqlen);
        CUDA_OK(cudaDeviceSynchronize());
        EXPECT_TRUE(io.out.download() == out16);
        EXPECT_TRUE(run.lse.download() == lse);
        run.lse.upload(lse);
        io.backward(s.max_seqlen);
        CUDA_OK(cudaDeviceSynchronize());
        EXPECT_TRUE(run.dq.download() == dq);
        EXPECT_TRUE(run.dk.download() == dk);
        EXPECT_TRUE(run.dv.download() == dv);
    }
}

// The wgmma bf16 kernels (attention_wgmma_bf16.cu) on bf16 q, k, v, out, dout against the mma.sync
// bf16 I/O kernels: the same bf16 operands, P and dS rounded to bf16 alike, fp32 sums (on an H200,
// 2026-11-28, every output equalled theirs bit for bit; the bounds leave room for another order of
// summation: an occasional last-bit flip of out's bf16 rounding, the rest far below either's error
// against fp32 math), and the wgmma error against the CPU backend (fp32 on the same bf16 values) no
// larger than the mma.sync one (FlashAttention's rule: at most 1.2x, plus a hair for ties). Cases:
// wgmma_cases().
TEST(CudaAttentionWgmmaBf16, AgreesWithTheMmaSyncKernelsAndTheCpu) {
    if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device";
    if (!cudablocks::cuda::attention_wgmma_supported(128, 32, 8))
        GTEST_SKIP() << "no wgmma attention here (needs an sm_90a build on a compute capability 9.0 GPU)";
    for (const WgmmaCase& c : wgmma_cases()) {
        Seeded rng;
        const Shape s = make_shape(c.lens, c.n_q, c.n_kv, 128);
        SCOPED_TRACE(rng.trace() + ", " + describe(s) + ", max_seqlen hint " + std::to_string(c.hint));
        Inputs in = random_inputs(s, rng);
        round_to_bf16(in);
        const CpuResult cpu = run_cpu(s, in);
        MmaRun run(s, in, Precision::BF16);
        Bf16Io io(run, in);
        std::vector<float> out[2], lse[2], dq[2], dk[2], dv[2];
        for (int mode = 0; mode < 2; ++mode) {
            WgmmaMode wgmma(mode);
            io.forward(c.hint);
            CUDA_OK(cudaDeviceSynchronize());
            out[mode] = float_of(io.out.download());
            lse[mode] = run.lse.download();
        }
        // Both backwards from the mma.sync forward's out and lse.
        io.out.upload(bf16_of(out[0]));
        for (int mode = 0; mode < 2; ++mode) {
            WgmmaMode wgmma(mode);
            run.lse.upload(lse[0]);
            io.backward(c.hint);
            CUDA_OK(cudaDeviceSynchronize());
            dq[mode] = run.dq.download();
            dk[mode] = run.dk.download();
            dv[mode] = run.dv.download();
        }
        std::printf("    wgmma vs mma.sync (bf16 I/O), rel L2: out %.3e  lse %.3e  dq %.3e  dk %.3e  dv %.3e\n",
                    rel_l2(out[1], out[0]), rel_l2(lse[1], lse[0]), rel_l2(dq[1], dq[0]), rel_l2(dk[1], dk[0]),
                    rel_l2(dv[1], dv[0]));
        EXPECT_LE(rel_l2(out[1], out[0]), 1e-3) << "out";
        EXPECT_LE(rel_l2(lse[1], lse[0]), 1e-5) << "lse";
        EXPECT_LE(rel_l2(dq[1], dq[0]), 1e-3) << "dq";
        EXPECT_LE(rel_l2(dk[1], dk[0]), 1e-3) << "dk";
        EXPECT_LE(rel_l2(dv[1], dv[0]), 1e-3) << "dv";
        const char* names[] = {"out", "dq", "dk", "dv"};
        const std::vector<float>* ours[2][4] = {{&out[0], &dq[0], &dk[0], &dv[0]}, {&out[1], &dq[1], &dk[1], &dv[1]}};
        const std::vector<float>* ref[4] = {&cpu.out, &cpu.dq, &cpu.dk, &cpu.dv};
        for (int i = 0; i < 4; ++i) {
            const double e_mma = rel_l2(*ours[0][i], *ref[i]), e_wgmma = rel_l2(*ours[1][i], *ref[i]);
            std::printf("    %s rel L2 vs cpu: wgmma %.3e  mma.sync %.3e\n", names[i], e_wgmma, e_mma);
            EXPECT_LE(e_wgmma, 1.2 * e_mma + 1e-5) << names[i];
        }
    }
}

// Milliseconds per call of fwd and of bwd: one warm-up call each, then 20 calls of each between
// events (results through references: CUDA_OK asserts).
template <class Fwd, class Bwd>
void time_forward_backward(Fwd fwd, Bwd bwd, float& ms_f, float& ms_b) {
    fwd();
    bwd();
    CUDA_OK(cudaDeviceSynchronize());
    cudaEvent_t e[3];
    for (cudaEvent_t& ev : e) CUDA_OK(cudaEventCreate(&ev));
    const int iters = 20;
    CUDA_OK(cudaEventRecord(e[0]));
    for (int i = 0; i < iters; ++i) fwd();
    CUDA_OK(cudaEventRecord(e[1]));
    for (int i = 0; i < iters; ++i) bwd();
    CUDA_OK(cudaEventRecord(e[2]));
    CUDA_OK(cudaEventSynchronize(e[2]));
    CUDA_OK(cudaEventElapsedTime(&ms_f, e[0], e[1]));
    CUDA_OK(cudaEventElapsedTime(&ms_b, e[1], e[2]));
    for (cudaEvent_t ev : e) cudaEventDestroy(ev);
    ms_f /= iters;
    ms_b /= iters;
}

// Timing (disabled by default): ./test_attention --gtest_also_run_disabled_tests
//   --gtest_filter='*AttentionTiming*'. Qwen3-4B heads at 8 x 512 and 1 x 2048 tokens, fp32 / tf32 /
// bf16; TFLOP/s counted as bench/suites.py does (forward 2*n_q*d*sum(L^2), backward 2.5x that).
TEST(CudaAttentionTiming, DISABLED_Qwen3Heads) {
    if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device";
    for (const std::vector<int>& lens : {std::vector<int>(8, 512), std::vector<int>{2048}}) {
        Seeded rng;
        const Shape s = make_shape(lens, 32, 8, 128);
        const Inputs in = random_inputs(s, rng);
        double useful = 0;
        for (int L : lens) useful += 2.0 * s.n_q * s.d * (double)L * L;
        for (Precision p : {Precision::FP32, Precision::TF32, Precision::BF16})
            for (int async = 0; async <= (p == Precision::FP32 ? 0 : p == Precision::TF32 ? 3 : 2); ++async) {
                // tf32 "staging 3": staging 1 with the wgmma kernels (the others run mma.sync only).
                StagingMode mode(async == 3 ? 1 : async);
                WgmmaMode wgmma(async == 3 ? 1 : 0);
                MmaRun run(s, in, p);
                auto fwd = [&] {
                    cudablocks::cuda::attention_forward_mma(run.q.ptr, run.k.ptr, run.v.ptr, run.out.ptr, run.lse.ptr,
                                                            run.cu.ptr, s.n_seqs, s.max_seqlen, s.T, s.n_q, s.n_kv, s.d,
                                                            s.scale, p, nullptr);
                };
                auto bwd = [&] {
                    cudablocks::cuda::attention_backward_mma(run.q.ptr, run.k.ptr, run.v.ptr, run.out.ptr, run.dout.ptr,
                                                             run.lse.ptr, run.dq.ptr, run.dk.ptr, run.dv.ptr, run.ws.ptr,
                                                             run.cu.ptr, s.n_seqs, s.max_seqlen, s.T, s.n_q, s.n_kv,
                                                             s.d, s.scale, p, nullptr);
                };
                float ms_f = 0, ms_b = 0;
                time_forward_backward(fwd, bwd, ms_f, ms_b);
                std::printf("    %zu x %d tokens, %s staging %d: forward %.3f ms (%.0f TFLOP/s), "
                            "backward %.3f ms (%.0f TFLOP/s)\n",
                            lens.size(), lens[0], precision_label(p), async, ms_f,
                            useful / ms_f * 1e-9, ms_b, 2.5 * useful / ms_b * 1e-9);
            }
        // bf16 q, k, v, out, dout in global memory (bf16 mode's blocks): the same products on copied
        // tiles, double-buffered; mma.sync, then wgmma.
        for (int use_wgmma = 0; use_wgmma < 2; ++use_wgmma) {
            WgmmaMode wgmma(use_wgmma);
            MmaRun run(s, in, Precision::BF16);
            Bf16Io io(run, in);
            auto fwd = [&] { io.forward(s.max_seqlen, false); };
            auto bwd = [&] { io.backward(s.max_seqlen, false); };
            float ms_f = 0, ms_b = 0;
            time_forward_backward(fwd, bwd, ms_f, ms_b);
            std::printf("    %zu x %d tokens, bf16 in/out, %s: forward %.3f ms (%.0f TFLOP/s), backward %.3f ms "
                        "(%.0f TFLOP/s)\n",
                        lens.size(), lens[0], use_wgmma ? "wgmma" : "mma.sync", ms_f, useful / ms_f * 1e-9, ms_b,
                        2.5 * useful / ms_b * 1e-9);
        }
    }
}

}  // namespace

#endif  // CUDABLOCKS_WITH_CUDA
