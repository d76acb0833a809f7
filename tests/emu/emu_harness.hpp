// Host emulation of CUDA kernels for machines without a GPU (tests/emu/*_emu.cpp): one std::thread
// per CUDA thread of a block, std::barrier for __syncthreads, the warp collectives and the
// warpgroups' named barriers, and the small pieces of the CUDA runtime the kernels use. A file
// includes this, adds its own tensor-core instructions, then the kernels' source (compiled for the
// host with CUDABLOCKS_ATTN_MMA_EMULATION) and its checks.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cpu/attention.hpp"

#undef __global__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __launch_bounds__(...)
#define __shared__
#define CUDABLOCKS_ATTN_MMA_EMULATION 1

thread_local uint3 threadIdx;
uint3 blockIdx;
dim3 gridDim, blockDim;

static std::barrier<>* g_block_bar = nullptr;
static std::vector<std::barrier<>*> g_warp_bar, g_warpgroup_bar;
struct WarpBuf { uint32_t w[32][16]; const void* p[32]; };
static std::vector<WarpBuf> g_wbuf;

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline int lane_id() { return threadIdx.x & 31; }
inline int warp_id() { return threadIdx.x >> 5; }
inline void warp_sync() { g_warp_bar[warp_id()]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    WarpBuf& b = g_wbuf[warp_id()];
    std::memcpy(&b.w[lane_id()][0], &v, 4);
    warp_sync();
    float r;
    std::memcpy(&r, &b.w[lane_id() ^ mask][0], 4);
    warp_sync();
    return r;
}
template <class T> inline T __ldg(const T* p) { return *p; }

inline float bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline uint32_t to_tf32(float x) {  // cvt.rna.tf32.f32: round to nearest, ties away from zero
    uint32_t u = f_bits(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    u += 0x1000u;
    return u & 0xffffe000u;
}
inline float __uint_as_float(uint32_t u) { return bits_f(u); }

// Runs kernel() for every block of the grid, nt threads each, shared memory (smem, bytes) poisoned
// with NaN first.
template <class F>
void launch(dim3 grid, int nt, void* smem, size_t bytes, F kernel) {
    gridDim = grid;
    blockDim = dim3(nt);
    std::memset(smem, 0xFF, bytes);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = make_uint3(x, y, z);
                std::barrier<> bar(nt);
                g_block_bar = &bar;
                std::vector<std::barrier<>*> wb, wgb;
                for (int w = 0; w < nt / 32; ++w) wb.push_back(new std::barrier<>(32));
                for (int w = 0; w < nt / 128; ++w) wgb.push_back(new std::barrier<>(128));
                g_warp_bar = wb;
                g_warpgroup_bar = wgb;
                g_wbuf.assign(nt / 32, WarpBuf{});
                std::vector<std::thread> th;
                for (int t = 0; t < nt; ++t)
                    th.emplace_back([&, t] { threadIdx = make_uint3(t, 0, 0); kernel(); });
                for (auto& t : th) t.join();
                for (auto* b : wb) delete b;
                for (auto* b : wgb) delete b;
            }
}

// Relative L2 error of a against b (infinite when a has a non-finite value).
inline double rel(const std::vector<float>& a, const std::vector<float>& b) {
    double n = 0, d = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite(a[i])) return INFINITY;
        n += (double)(a[i] - b[i]) * (a[i] - b[i]);
        d += (double)b[i] * b[i];
    }
    return std::sqrt(n / d);
}

// Packed sequences of the given lengths: cu_seqlens, the longest, the token and sequence counts.
struct Packed {
    std::vector<int32_t> cu{0};
    int maxlen = 0, T = 0, n_seqs = 0;
    explicit Packed(const std::vector<int>& lens) : n_seqs((int)lens.size()) {
        for (int L : lens) { cu.push_back(cu.back() + L); maxlen = std::max(maxlen, L); }
        T = cu.back();
    }
};

// n normal samples of standard deviation sd from a fixed-seed generator.
struct Normal {
    std::mt19937 gen;
    explicit Normal(unsigned seed) : gen(seed) {}
    std::vector<float> operator()(size_t n, float sd) {
        std::normal_distribution<float> d(0, sd);
        std::vector<float> x(n);
        for (auto& e : x) e = d(gen);
        return x;
    }
};

// x rounded to bf16 (round to nearest even): its bit patterns, and the values as floats.
inline std::vector<uint16_t> bf16_bits_of(const std::vector<float>& x) {
    std::vector<uint16_t> b(x.size());
    for (size_t i = 0; i < x.size(); ++i) b[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
    return b;
}
inline std::vector<float> widened(const std::vector<uint16_t>& b) {
    std::vector<float> x(b.size());
    for (size_t i = 0; i < b.size(); ++i) x[i] = bits_f((uint32_t)b[i] << 16);
    return x;
}

// An attention case: packed sequences, fixed-seed random q, k, v, dout (rounded to bf16 values
// when bf16_values), and the CPU fp32 reference's out, lse and gradients on them.
struct AttentionCase {
    Packed pk;
    int nq, nkv, d;
    float scale;
    std::vector<float> q, k, v, dout, out, lse, dq, dk, dv;
    AttentionCase(const std::vector<int>& lens, int nq_, int nkv_, int d_, bool bf16_values = false)
        : pk(lens), nq(nq_), nkv(nkv_), d(d_), scale(1.f / std::sqrt((float)d_)) {
        Normal randn(123);
        const size_t nqd = (size_t)pk.T * nq * d, nkvd = (size_t)pk.T * nkv * d;
        q = randn(nqd, 1.5f);
        k = randn(nkvd, 1.f);
        v = randn(nkvd, 1.f);
        dout = randn(nqd, 1.f);
        if (bf16_values)
            for (auto* x : {&q, &k, &v, &dout}) *x = widened(bf16_bits_of(*x));
        out.resize(nqd);
        lse.resize((size_t)pk.T * nq);
        dq.resize(nqd);
        dk.resize(nkvd);
        dv.resize(nkvd);
        cudablocks::cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), pk.cu.data(),
                                           pk.n_seqs, pk.maxlen, pk.T, nq, nkv, d, scale);
        cudablocks::cpu::attention_backward(q.data(), k.data(), v.data(), out.data(), dout.data(), lse.data(),
                                            dq.data(), dk.data(), dv.data(), nullptr, pk.cu.data(), pk.n_seqs,
                                            pk.maxlen, pk.T, nq, nkv, d, scale);
    }
    // D = rowsum(dout * out) of the reference's out (the backward's row dots), per (token, head).
    std::vector<float> row_dots() const {
        std::vector<float> r((size_t)pk.T * nq);
        for (size_t i = 0; i < r.size(); ++i) {
            float a = 0;
            for (int c = 0; c < d; ++c) a += out[i * d + c] * dout[i * d + c];
            r[i] = a;
        }
        return r;
    }
};
