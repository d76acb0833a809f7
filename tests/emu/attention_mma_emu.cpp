// Host emulation of the tensor-core attention kernels (native/src/cuda/attention_mma.cu) for machines
// without a GPU: the kernels' own source is compiled for the host (CUDABLOCKS_ATTN_MMA_EMULATION)
// and run on emu_harness.hpp's threads and barriers; mma.sync (bf16 m16n8k16, tf32 m16n8k8),
// ldmatrix.x4 (.trans) and cvt.rna.tf32 are emulated from the PTX ISA's fragment layouts. Checks
// forward and backward (every kernel, splits of the dK/dV pass included) against the CPU fp32
// reference on small ragged shapes. Not a unit test
// of the PTX semantics themselves (they are this file's assumptions); a check of everything around
// them: staging, layouts, masking, online softmax, GQA, splits. Takes ~2 minutes. ctest runs it in
// a build with the CUDA backend (CMakeLists.txt builds it with the host compiler).
#include <functional>
#include <type_traits>

#include <cuda_bf16.h>

#include "emu_harness.hpp"

namespace cudablocks::cuda { namespace { alignas(16) uint4 smem_u4[262144 / 16]; } }
using cudablocks::cuda::smem_u4;

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

using namespace cudablocks::cuda;

// The split dK/dV pass's reduce (attention_reduce_kernel) on the host: dk, dv += the slabs in split order.
void add_slabs(float* dk, float* dv, const Slabs& slabs, int splits) {
    for (int64_t i = 0; i < slabs.size; ++i)
        for (int sp = 1; sp < splits; ++sp) { dk[i] += slabs(2 * (sp - 1))[i]; dv[i] += slabs(2 * (sp - 1) + 1)[i]; }
}

template <class Op, int D, int HPB>
bool run_case(std::vector<int> lens, int nq, int nkv, int splits, double ob, double gb, const char* name) {
    const AttentionCase c(lens, nq, nkv, D);
    const std::vector<int32_t>& cu = c.pk.cu;
    const int maxlen = c.pk.maxlen, T = c.pk.T, n_seqs = c.pk.n_seqs;
    const float scale = c.scale;
    const std::vector<float>&q = c.q, &k = c.k, &v = c.v, &dout = c.dout, &out_ref = c.out, &lse_ref = c.lse,
                             &dq_ref = c.dq, &dk_ref = c.dk, &dv_ref = c.dv;

    const unsigned tiles = (maxlen + 63) / 64;
    const float nan = NAN;
    std::vector<float> out(out_ref.size(), nan), lse(lse_ref.size(), nan);
    launch(dim3(nq / HPB, n_seqs, tiles), 128 * HPB, smem_u4, sizeof(smem_u4), [&] {
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
        const std::vector<float> dots = c.row_dots();  // the row-dot kernel's sums, on the host
        std::copy(dots.begin(), dots.end(), dsum);
    }
    const Slabs slabs{dq.data(), ws.data() + ((rows + 63) / 64) * 64, group, (int64_t)T * nkv * D};
    launch(dim3(nkv * splits, n_seqs, tiles), 128, smem_u4, sizeof(smem_u4), [&] {
        attention_mma_dkdv_kernel<Op, D>(q.data(), k.data(), v.data(), dout.data(), lse_ref.data(), dsum, dk.data(), dv.data(), slabs, cu.data(), nq, nkv, splits, scale, scale * kLog2e);
    });
    add_slabs(dk.data(), dv.data(), slabs, splits);
    launch(dim3(nq, n_seqs, tiles), 128, smem_u4, sizeof(smem_u4), [&] {
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
    const auto q16 = bf16_bits_of(randn((size_t)T * nq * D, 1.5f)),
               k16 = bf16_bits_of(randn((size_t)T * nkv * D, 1.f)),
               v16 = bf16_bits_of(randn((size_t)T * nkv * D, 1.f)),
               dout16 = bf16_bits_of(randn((size_t)T * nq * D, 1.f));
    const auto q = widened(q16), k = widened(k16), v = widened(v16), dout = widened(dout16);
    const unsigned tiles = (maxlen + 63) / 64;
    const int group = nq / nkv;
    const int64_t rows = (int64_t)T * nq;
    const int64_t ws_n = ((rows + 63) / 64) * 64 + std::max<int64_t>(0, 2 * (group - 1) - group) * (int64_t)T * nkv * D;

    // Forwards: fp32 inputs (fp32 out), bf16 inputs (bf16 out).
    std::vector<float> out32(q.size(), NAN), lse32(rows, NAN), lse16(rows, NAN);
    std::vector<uint16_t> out16(q.size(), 0xFFFF);
    launch(dim3(nq / HPB, n_seqs, tiles), 128 * HPB, smem_u4, sizeof(smem_u4), [&] {
        attention_mma_forward_kernel<Bf16Op, D, HPB, float>(q.data(), k.data(), v.data(), out32.data(), lse32.data(), cu.data(), nq, nkv, scale * kLog2e);
    });
    launch(dim3(nq / HPB, n_seqs, tiles), 128 * HPB, smem_u4, sizeof(smem_u4), [&] {
        attention_mma_forward_kernel<Bf16Op, D, HPB, uint16_t>(q16.data(), k16.data(), v16.data(), out16.data(), lse16.data(), cu.data(), nq, nkv, scale * kLog2e);
    });
    const bool fwd_ok =
        bf16_bits_of(out32) == out16 && std::memcmp(lse32.data(), lse16.data(), rows * sizeof(float)) == 0;

    // Backwards from the bf16 out (D = rowsum(dout * out) on the host, the same numbers for both).
    const auto out = widened(out16);
    struct Grads { std::vector<float> dq, dk, dv; };
    auto run = [&](auto qp, auto kp, auto vp, auto doutp, auto dq_kernel) {
        using In = std::remove_cv_t<std::remove_pointer_t<decltype(qp)>>;
        Grads r{std::vector<float>(q.size(), NAN), std::vector<float>(k.size(), NAN), std::vector<float>(v.size(), NAN)};
        std::vector<float> ws(ws_n, 0.f);
        for (int64_t i = 0; i < rows; ++i) { float a = 0; for (int c = 0; c < D; ++c) a += out[i * D + c] * dout[i * D + c]; ws[i] = a; }
        const Slabs slabs{r.dq.data(), ws.data() + ((rows + 63) / 64) * 64, group, (int64_t)T * nkv * D};
        launch(dim3(nkv * splits, n_seqs, tiles), 128, smem_u4, sizeof(smem_u4), [&] {
            attention_mma_dkdv_kernel<Bf16Op, D, false, In>(qp, kp, vp, doutp, lse32.data(), ws.data(), r.dk.data(), r.dv.data(), slabs, cu.data(), nq, nkv, splits, scale, scale * kLog2e);
        });
        add_slabs(r.dk.data(), r.dv.data(), slabs, splits);
        launch(dim3(nq, n_seqs, tiles), 128, smem_u4, sizeof(smem_u4), [&] {
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
