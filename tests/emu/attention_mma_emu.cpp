// Host emulation of the tensor-core attention kernels (native/src/cuda/attention_mma.cu) for machines
// without a GPU: the kernels' own source is compiled for the host (CUDABLOCKS_ATTN_MMA_EMULATION)
// and run with one std::thread per CUDA thread, std::barrier for __syncthreads and the warp
// collectives; mma.sync (bf16 m16n8k16, tf32 m16n8k8), ldmatrix.x4 (.trans) and cvt.rna.tf32 are
// emulated from the PTX ISA's fragment layouts. Checks forward and backward (every kernel, splits of
// the dK/dV pass included) against the CPU fp32 reference on small ragged shapes. Not a unit test
// of the PTX semantics themselves (they are this file's assumptions); a check of everything around
// them: staging, layouts, masking, online softmax, GQA, splits. Takes ~2 minutes.
//
//   g++ -std=c++20 -O2 -I/usr/local/cuda/include -Inative/src -Inative/include -Wno-unknown-pragmas \
//       tests/emu/attention_mma_emu.cpp native/src/cpu/attention.cpp native/src/cpu/parallel.cpp \
//       -o /tmp/attention_mma_emu -lpthread && /tmp/attention_mma_emu
#include <barrier>
#include <thread>
#include <vector>
#include <cstring>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <random>
#include <functional>
#include <type_traits>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

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
namespace cudablocks::cuda { namespace { alignas(16) uint4 smem_u4[262144 / 16]; } }
using cudablocks::cuda::smem_u4;

static std::barrier<>* g_block_bar = nullptr;
static std::vector<std::barrier<>*> g_warp_bar;
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
inline float bf_lo(uint32_t w) { return bits_f(w << 16); }
inline float bf_hi(uint32_t w) { return bits_f(w & 0xffff0000u); }

inline void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    WarpBuf& B = g_wbuf[warp_id()];
    const int l = lane_id();
    for (int i = 0; i < 4; ++i) B.w[l][i] = a[i];
    B.w[l][4] = b[0]; B.w[l][5] = b[1];
    warp_sync();
    float A[16][16], Bm[16][8];
    for (int ln = 0; ln < 32; ++ln) {
        int g = ln >> 2, t = ln & 3;
        const uint32_t* r = B.w[ln];
        A[g][2*t] = bf_lo(r[0]); A[g][2*t+1] = bf_hi(r[0]);
        A[g+8][2*t] = bf_lo(r[1]); A[g+8][2*t+1] = bf_hi(r[1]);
        A[g][2*t+8] = bf_lo(r[2]); A[g][2*t+9] = bf_hi(r[2]);
        A[g+8][2*t+8] = bf_lo(r[3]); A[g+8][2*t+9] = bf_hi(r[3]);
        Bm[2*t][g] = bf_lo(r[4]); Bm[2*t+1][g] = bf_hi(r[4]);
        Bm[2*t+8][g] = bf_lo(r[5]); Bm[2*t+9][g] = bf_hi(r[5]);
    }
    warp_sync();
    const int g = l >> 2, t = l & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2*t, 2*t+1, 2*t, 2*t+1};
    for (int i = 0; i < 4; ++i) {
        double acc = d[i];
        for (int kk = 0; kk < 16; ++kk) acc += (double)A[rows[i]][kk] * Bm[kk][cols[i]];
        d[i] = (float)acc;
    }
}
inline void mma_tf32_1688(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    WarpBuf& B = g_wbuf[warp_id()];
    const int l = lane_id();
    for (int i = 0; i < 4; ++i) B.w[l][i] = a[i];
    B.w[l][4] = b[0]; B.w[l][5] = b[1];
    warp_sync();
    float A[16][8], Bm[8][8];
    for (int ln = 0; ln < 32; ++ln) {
        int g = ln >> 2, t = ln & 3;
        const uint32_t* r = B.w[ln];
        auto tf = [](uint32_t u) { return bits_f(u & 0xffffe000u); };
        A[g][t] = tf(r[0]); A[g+8][t] = tf(r[1]); A[g][t+4] = tf(r[2]); A[g+8][t+4] = tf(r[3]);
        Bm[t][g] = tf(r[4]); Bm[t+4][g] = tf(r[5]);
    }
    warp_sync();
    const int g = l >> 2, t = l & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2*t, 2*t+1, 2*t, 2*t+1};
    for (int i = 0; i < 4; ++i) {
        double acc = d[i];
        for (int kk = 0; kk < 8; ++kk) acc += (double)A[rows[i]][kk] * Bm[kk][cols[i]];
        d[i] = (float)acc;
    }
}
// ldmatrix.x4: lanes 8i..8i+7 give the 16-byte row addresses of 8x8 block i; lane l receives in
// r[i] the two elements (row l/4, columns 2(l%4), 2(l%4)+1) of block i, or with .trans those of
// (rows 2(l%4), 2(l%4)+1; column l/4).
inline void ldsm_x4_impl(const void* p, uint32_t r[4], bool trans) {
    WarpBuf& B = g_wbuf[warp_id()];
    const int l = lane_id();
    B.p[l] = p;
    // shared memory must be 16-byte aligned rows
    if (((uintptr_t)p - (uintptr_t)smem_u4) % 16 != 0) { std::fprintf(stderr, "ldmatrix misaligned\n"); std::abort(); }
    warp_sync();
    for (int i = 0; i < 4; ++i) {
        uint16_t M[8][8];
        for (int row = 0; row < 8; ++row) std::memcpy(M[row], B.p[8 * i + row], 16);
        const uint16_t lo = trans ? M[2 * (l % 4)][l / 4] : M[l / 4][2 * (l % 4)];
        const uint16_t hi = trans ? M[2 * (l % 4) + 1][l / 4] : M[l / 4][2 * (l % 4) + 1];
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    warp_sync();
}
inline void ldsm_x4(const void* p, uint32_t r[4]) { ldsm_x4_impl(p, r, false); }
inline void ldsm_x4_trans(const void* p, uint32_t r[4]) { ldsm_x4_impl(p, r, true); }

#include "cuda/attention_mma.cu"
#include "cpu/attention.hpp"

using namespace cudablocks::cuda;

template <class F>
void launch(dim3 grid, int nt, F kernel) {
    gridDim = grid;
    blockDim = dim3(nt);
    std::memset(smem_u4, 0xFF, sizeof(smem_u4));  // NaN-poison shared memory
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = make_uint3(x, y, z);
                std::barrier<> bar(nt);
                g_block_bar = &bar;
                std::vector<std::barrier<>*> wb;
                for (int w = 0; w < nt / 32; ++w) wb.push_back(new std::barrier<>(32));
                g_warp_bar = wb;
                g_wbuf.assign(nt / 32, WarpBuf{});
                std::vector<std::thread> th;
                for (int t = 0; t < nt; ++t)
                    th.emplace_back([&, t] { threadIdx = make_uint3(t, 0, 0); kernel(); });
                for (auto& t : th) t.join();
                for (auto* b : wb) delete b;
            }
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
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

// The split dK/dV pass's reduce (attention_reduce_kernel) on the host: dk, dv += the slabs in split order.
void add_slabs(float* dk, float* dv, const Slabs& slabs, int splits) {
    for (int64_t i = 0; i < slabs.size; ++i)
        for (int sp = 1; sp < splits; ++sp) { dk[i] += slabs(2 * (sp - 1))[i]; dv[i] += slabs(2 * (sp - 1) + 1)[i]; }
}

template <class Op, int D, int HPB>
bool run_case(std::vector<int> lens, int nq, int nkv, int splits, double ob, double gb, const char* name) {
    const Packed pk(lens);
    const std::vector<int32_t>& cu = pk.cu;
    const int maxlen = pk.maxlen, T = pk.T, n_seqs = pk.n_seqs;
    const float scale = 1.f / std::sqrt((float)D);
    Normal randn(123);
    auto q = randn((size_t)T * nq * D, 1.5f), k = randn((size_t)T * nkv * D, 1.f), v = randn((size_t)T * nkv * D, 1.f),
         dout = randn((size_t)T * nq * D, 1.f);
    std::vector<float> out_ref((size_t)T * nq * D), lse_ref((size_t)T * nq), dq_ref(q.size()), dk_ref(k.size()), dv_ref(v.size());
    cudablocks::cpu::attention_forward(q.data(), k.data(), v.data(), out_ref.data(), lse_ref.data(), cu.data(), n_seqs, maxlen, T, nq, nkv, D, scale);
    cudablocks::cpu::attention_backward(q.data(), k.data(), v.data(), out_ref.data(), dout.data(), lse_ref.data(), dq_ref.data(), dk_ref.data(), dv_ref.data(), nullptr, cu.data(), n_seqs, maxlen, T, nq, nkv, D, scale);

    const unsigned tiles = (maxlen + 63) / 64;
    const float nan = NAN;
    std::vector<float> out(out_ref.size(), nan), lse(lse_ref.size(), nan);
    launch(dim3(nq / HPB, n_seqs, tiles), 128 * HPB, [&] {
        attention_mma_forward_kernel<Op, D, HPB>(q.data(), k.data(), v.data(), out.data(), lse.data(), cu.data(), nq, nkv, scale * kLog2e);
    });
    const double eo = rel(out, out_ref), el = rel(lse, lse_ref);

    // backward from the reference out/lse
    const int group = nq / nkv;
    const int64_t rows = (int64_t)T * nq;
    const int64_t slab_n = (int64_t)T * nkv * D;
    const int64_t ws_n = ((rows + 63) / 64) * 64 + std::max<int64_t>(0, 2 * (group - 1) - group) * slab_n;
    std::vector<float> ws(ws_n, nan), dq(q.size(), nan), dk(k.size(), nan), dv(v.size(), nan);
    float* dsum = ws.data();
    {
        gridDim = dim3(1); // rowdot on host (same formula)
        for (int64_t r = 0; r < rows; ++r) { float a = 0; for (int c = 0; c < D; ++c) a += out_ref[r * D + c] * dout[r * D + c]; dsum[r] = a; }
    }
    const Slabs slabs{dq.data(), ws.data() + ((rows + 63) / 64) * 64, group, (int64_t)T * nkv * D};
    launch(dim3(nkv * splits, n_seqs, tiles), 128, [&] {
        attention_mma_dkdv_kernel<Op, D>(q.data(), k.data(), v.data(), dout.data(), lse_ref.data(), dsum, dk.data(), dv.data(), slabs, cu.data(), nq, nkv, splits, scale, scale * kLog2e);
    });
    add_slabs(dk.data(), dv.data(), slabs, splits);
    launch(dim3(nq, n_seqs, tiles), 128, [&] {
        attention_mma_dq_kernel<Op, D>(q.data(), k.data(), v.data(), dout.data(), lse_ref.data(), dsum, dq.data(), cu.data(), nq, nkv, scale, scale * kLog2e);
    });
    const double eq = rel(dq, dq_ref), ek = rel(dk, dk_ref), ev = rel(dv, dv_ref);
    const bool ok = eo <= ob && el <= ob && eq <= gb && ek <= gb && ev <= gb;
    std::printf("%-28s splits %d: out %.3e lse %.3e dq %.3e dk %.3e dv %.3e  %s\n", name, splits, eo, el, eq, ek, ev, ok ? "OK" : "FAIL");
    return ok;
}

// bf16 q, k, v, out, dout (the In = std::uint16_t kernels) against the fp32-input kernels on the same
// values (fp32 copies of the bf16 numbers): the operands staged are the same bits, so the forward's
// out must be the fp32 kernel's rounded once, and every other output the same bit for bit.
template <int D, int HPB>
bool run_bf16_inputs_case(std::vector<int> lens, int nq, int nkv, int splits, const char* name) {
    const Packed pk(lens);
    const std::vector<int32_t>& cu = pk.cu;
    const int maxlen = pk.maxlen, T = pk.T, n_seqs = pk.n_seqs;
    const float scale = 1.f / std::sqrt((float)D);
    Normal randn(321);
    auto to_bits = [](const std::vector<float>& x) {
        std::vector<uint16_t> b(x.size());
        for (size_t i = 0; i < x.size(); ++i) b[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
        return b;
    };
    auto widen = [](const std::vector<uint16_t>& b) {
        std::vector<float> x(b.size());
        for (size_t i = 0; i < b.size(); ++i) x[i] = bits_f((uint32_t)b[i] << 16);
        return x;
    };
    const auto q16 = to_bits(randn((size_t)T * nq * D, 1.5f)), k16 = to_bits(randn((size_t)T * nkv * D, 1.f)),
               v16 = to_bits(randn((size_t)T * nkv * D, 1.f)), dout16 = to_bits(randn((size_t)T * nq * D, 1.f));
    const auto q = widen(q16), k = widen(k16), v = widen(v16), dout = widen(dout16);
    const unsigned tiles = (maxlen + 63) / 64;
    const int group = nq / nkv;
    const int64_t rows = (int64_t)T * nq;
    const int64_t ws_n = ((rows + 63) / 64) * 64 + std::max<int64_t>(0, 2 * (group - 1) - group) * (int64_t)T * nkv * D;

    // Forwards: fp32 inputs (fp32 out), bf16 inputs (bf16 out).
    std::vector<float> out32(q.size(), NAN), lse32(rows, NAN), lse16(rows, NAN);
    std::vector<uint16_t> out16(q.size(), 0xFFFF);
    launch(dim3(nq / HPB, n_seqs, tiles), 128 * HPB, [&] {
        attention_mma_forward_kernel<Bf16Op, D, HPB, float>(q.data(), k.data(), v.data(), out32.data(), lse32.data(), cu.data(), nq, nkv, scale * kLog2e);
    });
    launch(dim3(nq / HPB, n_seqs, tiles), 128 * HPB, [&] {
        attention_mma_forward_kernel<Bf16Op, D, HPB, uint16_t>(q16.data(), k16.data(), v16.data(), out16.data(), lse16.data(), cu.data(), nq, nkv, scale * kLog2e);
    });
    const bool fwd_ok = to_bits(out32) == out16 && std::memcmp(lse32.data(), lse16.data(), rows * sizeof(float)) == 0;

    // Backwards from the bf16 out (D = rowsum(dout * out) on the host, the same numbers for both).
    const auto out = widen(out16);
    struct Grads { std::vector<float> dq, dk, dv; };
    auto run = [&](auto qp, auto kp, auto vp, auto doutp, auto dq_kernel) {
        using In = std::remove_cv_t<std::remove_pointer_t<decltype(qp)>>;
        Grads r{std::vector<float>(q.size(), NAN), std::vector<float>(k.size(), NAN), std::vector<float>(v.size(), NAN)};
        std::vector<float> ws(ws_n, 0.f);
        for (int64_t i = 0; i < rows; ++i) { float a = 0; for (int c = 0; c < D; ++c) a += out[i * D + c] * dout[i * D + c]; ws[i] = a; }
        const Slabs slabs{r.dq.data(), ws.data() + ((rows + 63) / 64) * 64, group, (int64_t)T * nkv * D};
        launch(dim3(nkv * splits, n_seqs, tiles), 128, [&] {
            attention_mma_dkdv_kernel<Bf16Op, D, false, In>(qp, kp, vp, doutp, lse32.data(), ws.data(), r.dk.data(), r.dv.data(), slabs, cu.data(), nq, nkv, splits, scale, scale * kLog2e);
        });
        add_slabs(r.dk.data(), r.dv.data(), slabs, splits);
        launch(dim3(nq, n_seqs, tiles), 128, [&] {
            dq_kernel(qp, kp, vp, doutp, lse32.data(), ws.data(), r.dq.data(), cu.data(), nq, nkv, scale, scale * kLog2e);
        });
        return r;
    };
    const Grads a = run(q.data(), k.data(), v.data(), dout.data(), attention_mma_dq_kernel<Bf16Op, D, false, float>);
    const Grads b = run(q16.data(), k16.data(), v16.data(), dout16.data(), attention_mma_dq_kernel<Bf16Op, D, true, uint16_t>);
    auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
        return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
    };
    const bool ok = fwd_ok && same(a.dq, b.dq) && same(a.dk, b.dk) && same(a.dv, b.dv);
    std::printf("%-34s splits %d: bf16 in/out equal to fp32 inputs bit for bit (forward %s)  %s\n", name, splits,
                fwd_ok ? "ok" : "differs", ok ? "OK" : "FAIL");
    return ok;
}

int main() {
    bool ok = true;
    ok &= run_bf16_inputs_case<64, 2>({70, 1, 130}, 4, 2, 2, "bf16 in/out d64 4/2 hpb2");
    ok &= run_bf16_inputs_case<128, 1>({64, 0, 129}, 3, 1, 1, "bf16 in/out d128 3/1 hpb1");
    ok &= run_case<Bf16Op, 64, 2>({70, 1, 130}, 4, 2, 1, 1.5e-2, 3e-2, "bf16 d64 4/2 hpb2");
    ok &= run_case<Bf16Op, 64, 2>({70, 1, 130}, 4, 2, 2, 1.5e-2, 3e-2, "bf16 d64 4/2 hpb2");
    ok &= run_case<Tf32Op, 64, 2>({70, 1, 130}, 4, 2, 2, 2e-3, 5e-3, "tf32 d64 4/2 hpb2");
    ok &= run_case<Tf32Op, 64, 1>({64, 0, 129}, 3, 1, 3, 2e-3, 5e-3, "tf32 d64 3/1 hpb1");
    ok &= run_case<Bf16Op, 128, 1>({64, 0, 129}, 3, 1, 2, 1.5e-2, 3e-2, "bf16 d128 3/1 hpb1");
    ok &= run_case<Bf16Op, 128, 2>({150, 5}, 8, 2, 3, 1.5e-2, 3e-2, "bf16 d128 8/2 hpb2");
    ok &= run_case<Tf32Op, 128, 2>({150, 5}, 8, 2, 4, 2e-3, 5e-3, "tf32 d128 8/2 hpb2");
    ok &= run_case<Tf32Op, 128, 1>({97}, 2, 2, 1, 2e-3, 5e-3, "tf32 d128 2/2 hpb1");
    std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
    return ok ? 0 : 1;
}
