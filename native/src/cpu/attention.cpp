// Causal GQA attention over packed sequences, CPU reference. See attention.hpp for the contract.
//
// The loops follow the math directly, one query row at a time:
//   forward : scores s_j = scale * q_i.k_j (j <= i), m = max s, p_j = exp(s_j - m),
//             out_i = sum_j p_j v_j / sum_j p_j,  lse_i = m + log(sum_j p_j)
//   backward: p_j = exp(scale * q_i.k_j - lse_i), D_i = dout_i.out_i,
//             ds_j = p_j (dout_i.v_j - D_i),
//             dq_i += scale ds_j k_j,  dk_j += scale ds_j q_i,  dv_j += p_j dout_i
// Every dot product and sum accumulates in double; results are rounded to fp32 once at the end.
#include "cpu/attention.hpp"
#include "cudablocks/errors.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace cudablocks::cpu {
namespace {

void check_args(const int32_t* cu_seqlens, int n_seqs, int64_t total_tokens, int n_q_heads,
                int n_kv_heads, int head_dim) {
    auto fail = [](const std::string& msg) {
        throw InvalidArgumentError("attention (cpu): " + msg);
    };
    if (n_seqs < 0) fail("n_seqs must be >= 0, got " + std::to_string(n_seqs));
    if (total_tokens < 0) fail("total_tokens must be >= 0, got " + std::to_string(total_tokens));
    if (n_q_heads <= 0 || n_kv_heads <= 0 || n_q_heads % n_kv_heads != 0)
        fail("n_q_heads (" + std::to_string(n_q_heads) + ") must be a positive multiple of n_kv_heads (" +
             std::to_string(n_kv_heads) + ")");
    if (head_dim <= 0) fail("head_dim must be > 0, got " + std::to_string(head_dim));
    if (n_seqs == 0) {
        if (total_tokens != 0) fail("no sequences but total_tokens = " + std::to_string(total_tokens));
        return;
    }
    if (cu_seqlens == nullptr) fail("cu_seqlens is null");
    if (cu_seqlens[0] != 0) fail("cu_seqlens[0] must be 0, got " + std::to_string(cu_seqlens[0]));
    for (int s = 0; s < n_seqs; ++s)
        if (cu_seqlens[s + 1] < cu_seqlens[s])
            fail("cu_seqlens must be non-decreasing (sequence " + std::to_string(s) + ")");
    if (cu_seqlens[n_seqs] != total_tokens)
        fail("cu_seqlens[n_seqs] = " + std::to_string(cu_seqlens[n_seqs]) +
             " does not match total_tokens = " + std::to_string(total_tokens));
}

}  // namespace

int64_t attention_backward_workspace_floats(int64_t, int, int, int) { return 0; }

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                       const int32_t* cu_seqlens, int n_seqs, int /*max_seqlen*/, int64_t total_tokens,
                       int n_q_heads, int n_kv_heads, int head_dim, float scale) {
    check_args(cu_seqlens, n_seqs, total_tokens, n_q_heads, n_kv_heads, head_dim);
    const int group = n_q_heads / n_kv_heads;
    const int64_t q_stride = (int64_t)n_q_heads * head_dim;   // floats per token row of q / out
    const int64_t kv_stride = (int64_t)n_kv_heads * head_dim; // floats per token row of k / v
    std::vector<double> p;     // scores, then probabilities, of one query row
    std::vector<double> acc(head_dim);

    for (int s = 0; s < n_seqs; ++s) {
        const int64_t start = cu_seqlens[s];
        const int len = cu_seqlens[s + 1] - cu_seqlens[s];
        p.resize(len);
        for (int h = 0; h < n_q_heads; ++h) {
            const int kvh = h / group;
            for (int i = 0; i < len; ++i) {
                const float* qi = q + (start + i) * q_stride + (int64_t)h * head_dim;
                // scores against keys 0..i of this sequence (causal)
                double m = -std::numeric_limits<double>::infinity();
                for (int j = 0; j <= i; ++j) {
                    const float* kj = k + (start + j) * kv_stride + (int64_t)kvh * head_dim;
                    double dot = 0.0;
                    for (int c = 0; c < head_dim; ++c) dot += (double)qi[c] * (double)kj[c];
                    p[j] = dot * (double)scale;
                    if (p[j] > m) m = p[j];
                }
                // softmax numerator and normalizer
                double sum = 0.0;
                for (int j = 0; j <= i; ++j) {
                    p[j] = std::exp(p[j] - m);
                    sum += p[j];
                }
                // weighted sum of values
                for (int c = 0; c < head_dim; ++c) acc[c] = 0.0;
                for (int j = 0; j <= i; ++j) {
                    const float* vj = v + (start + j) * kv_stride + (int64_t)kvh * head_dim;
                    for (int c = 0; c < head_dim; ++c) acc[c] += p[j] * (double)vj[c];
                }
                float* oi = out + (start + i) * q_stride + (int64_t)h * head_dim;
                for (int c = 0; c < head_dim; ++c) oi[c] = (float)(acc[c] / sum);
                lse[(start + i) * n_q_heads + h] = (float)(m + std::log(sum));
            }
        }
    }
}

void attention_backward(const float* q, const float* k, const float* v, const float* out,
                        const float* dout, const float* lse, float* dq, float* dk, float* dv,
                        float* /*workspace*/, const int32_t* cu_seqlens, int n_seqs,
                        int /*max_seqlen*/, int64_t total_tokens, int n_q_heads, int n_kv_heads,
                        int head_dim, float scale) {
    check_args(cu_seqlens, n_seqs, total_tokens, n_q_heads, n_kv_heads, head_dim);
    const int group = n_q_heads / n_kv_heads;
    const int64_t q_stride = (int64_t)n_q_heads * head_dim;
    const int64_t kv_stride = (int64_t)n_kv_heads * head_dim;
    // dk and dv collect contributions from every query row (and every query head of the group),
    // so they accumulate in double for the whole batch and are rounded once at the end.
    std::vector<double> dk_acc((size_t)(total_tokens * kv_stride), 0.0);
    std::vector<double> dv_acc((size_t)(total_tokens * kv_stride), 0.0);
    std::vector<double> dq_acc(head_dim);

    for (int s = 0; s < n_seqs; ++s) {
        const int64_t start = cu_seqlens[s];
        const int len = cu_seqlens[s + 1] - cu_seqlens[s];
        for (int h = 0; h < n_q_heads; ++h) {
            const int kvh = h / group;
            for (int i = 0; i < len; ++i) {
                const int64_t qoff = (start + i) * q_stride + (int64_t)h * head_dim;
                const float* qi = q + qoff;
                const float* oi = out + qoff;
                const float* doi = dout + qoff;
                const double lse_i = lse[(start + i) * n_q_heads + h];
                double D = 0.0;  // rowsum(dout * out) = sum_j p_j dP_j
                for (int c = 0; c < head_dim; ++c) D += (double)doi[c] * (double)oi[c];
                for (int c = 0; c < head_dim; ++c) dq_acc[c] = 0.0;

                for (int j = 0; j <= i; ++j) {
                    const int64_t kvoff = (start + j) * kv_stride + (int64_t)kvh * head_dim;
                    const float* kj = k + kvoff;
                    const float* vj = v + kvoff;
                    double qk = 0.0, dp = 0.0;
                    for (int c = 0; c < head_dim; ++c) {
                        qk += (double)qi[c] * (double)kj[c];
                        dp += (double)doi[c] * (double)vj[c];
                    }
                    const double p = std::exp(qk * (double)scale - lse_i);
                    const double ds = p * (dp - D) * (double)scale;  // includes the chain rule through scale
                    double* dkj = dk_acc.data() + kvoff;
                    double* dvj = dv_acc.data() + kvoff;
                    for (int c = 0; c < head_dim; ++c) {
                        dq_acc[c] += ds * (double)kj[c];
                        dkj[c] += ds * (double)qi[c];
                        dvj[c] += p * (double)doi[c];
                    }
                }
                for (int c = 0; c < head_dim; ++c) dq[qoff + c] = (float)dq_acc[c];
            }
        }
    }
    for (size_t i = 0; i < dk_acc.size(); ++i) {
        dk[i] = (float)dk_acc[i];
        dv[i] = (float)dv_acc[i];
    }
}

}  // namespace cudablocks::cpu
