// Internals shared by the fp32 and nf4 blocks (not installed): the saved-activation and scratch
// layouts (documented in cudablocks/block.hpp) and the argument checks of forward/backward.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::blocks {

constexpr std::int64_t kAlign = 64;  // floats between activation segments
inline std::int64_t align_up(std::int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Widths (floats per token) of the saved activations and of the scratch buffers.
struct Widths {
  std::int64_t H, q, kv, I, nq, nkv;
  explicit Widths(const TransformerConfig& c)
      : H(c.hidden_size), q(c.num_attention_heads * c.head_dim), kv(c.num_key_value_heads * c.head_dim),
        I(c.intermediate_size), nq(c.num_attention_heads), nkv(c.num_key_value_heads) {}
};

// Offsets (in floats) of the [max_tokens, width] segments of one allocation.
struct Segments {
  std::int64_t at = 0;
  std::int64_t add(std::int64_t tokens, std::int64_t width) {
    const std::int64_t start = at;
    at = align_up(at + tokens * width);
    return start;
  }
};

// The saved activations' offsets; widths documented in block.hpp. In bf16 mode q_raw, k_raw, v and
// gate_up hold bf16 values (n of them per token in the space of n / 2 floats, rounded up).
struct SavedLayout {
  std::int64_t q_raw, k_raw, v, att, r, gate_up, lse, rstd_q, rstd_k, rstd1, rstd2, total;
  SavedLayout(const TransformerConfig& c, std::int64_t t, Precision precision) {
    Widths w(c);
    Segments s;
    q_raw = s.add(t, floats_for(w.q, precision));
    k_raw = s.add(t, floats_for(w.kv, precision));
    v = s.add(t, floats_for(w.kv, precision));
    att = s.add(t, floats_for(w.q, precision));
    r = s.add(t, w.H);
    gate_up = s.add(t, floats_for(2 * w.I, precision));
    lse = s.add(t, w.nq);
    rstd_q = c.qk_norm ? s.add(t, w.nq) : -1;
    rstd_k = c.qk_norm ? s.add(t, w.nkv) : -1;
    rstd1 = s.add(t, 1);
    rstd2 = s.add(t, 1);
    total = s.at;
  }
  static std::int64_t floats_per_token(const TransformerConfig& c, Precision precision) {
    Widths w(c);
    return 2 * floats_for(w.q, precision) + 2 * floats_for(w.kv, precision) + w.H +
           floats_for(2 * w.I, precision) + w.nq + (c.qk_norm ? w.nq + w.nkv : 0) + 2;
  }
  // Floats holding n values of an activation kept in bf16 in bf16 mode (rounded up: never short).
  static std::int64_t floats_for(std::int64_t n, Precision precision) {
    return precision == Precision::BF16 ? (n + 1) / 2 : n;
  }
};

// A saved activation that bf16 mode keeps in bf16 (SavedLayout), as a product's bf16 operand;
// nullptr in the other modes.
inline const std::uint16_t* saved_bf16(Precision precision, const float* saved) {
  return precision == Precision::BF16 ? reinterpret_cast<const std::uint16_t*>(saved) : nullptr;
}

// QK-norm + RoPE of q or k as the forward saved it (SavedLayout: bf16 bits in bf16 mode), into y
// as attention reads it: fp32, or in bf16 mode bf16 bits (the tensor cores' operand, rounded once).
inline void qk_norm_rope_forward_saved(const Backend& be, Precision precision, const float* raw, const float* w,
                                       float* y, float* rstd, const std::int32_t* positions, std::int64_t tokens,
                                       int heads, int head_dim, float eps, const float* inv_freq,
                                       const Stream& stream) {
  if (precision == Precision::BF16) {
    be.qk_norm_rope_forward(reinterpret_cast<const std::uint16_t*>(raw), w, reinterpret_cast<std::uint16_t*>(y),
                            rstd, positions, tokens, heads, head_dim, eps, inv_freq, stream);
  } else {
    be.qk_norm_rope_forward(raw, w, y, rstd, positions, tokens, heads, head_dim, eps, inv_freq, stream);
  }
}
// The backward into dx (fp32), or in bf16 mode into dx16 instead when it is given (dx then unused).
inline void qk_norm_rope_backward_saved(const Backend& be, Precision precision, const float* dy, const float* raw,
                                        const float* w, const float* rstd, float* dx, std::uint16_t* dx16, float* dw,
                                        const std::int32_t* positions, std::int64_t tokens, int heads, int head_dim,
                                        const float* inv_freq, const Stream& stream) {
  if (precision == Precision::BF16 && dx16 != nullptr) {
    be.qk_norm_rope_backward(dy, reinterpret_cast<const std::uint16_t*>(raw), w, rstd, dx16, dw, positions, tokens,
                             heads, head_dim, inv_freq, stream);
  } else if (precision == Precision::BF16) {
    be.qk_norm_rope_backward(dy, reinterpret_cast<const std::uint16_t*>(raw), w, rstd, dx, dw, positions, tokens,
                             heads, head_dim, inv_freq, stream);
  } else {
    be.qk_norm_rope_backward(dy, raw, w, rstd, dx, dw, positions, tokens, heads, head_dim, inv_freq, stream);
  }
}

// Attention on the rotated q, k, on v, out and dout as the blocks keep them: fp32, or bf16 bits in
// bf16 mode (out: the saved attention output, the o projection's operand; dout: its gradient as the
// product before writes it).
struct AttentionShape {
  const std::int32_t* cu_seqlens;
  int n_seqs, max_seqlen;
  std::int64_t tokens;
  int n_q_heads, n_kv_heads, head_dim;
  float scale;
};
inline void attention_forward_saved(const Backend& be, Precision precision, const float* q, const float* k,
                                    const float* v, float* out, float* lse, const AttentionShape& a,
                                    const Stream& stream) {
  if (precision == Precision::BF16) {
    be.attention_forward(reinterpret_cast<const std::uint16_t*>(q), reinterpret_cast<const std::uint16_t*>(k),
                         reinterpret_cast<const std::uint16_t*>(v), reinterpret_cast<std::uint16_t*>(out), lse,
                         a.cu_seqlens, a.n_seqs, a.max_seqlen, a.tokens, a.n_q_heads, a.n_kv_heads, a.head_dim,
                         a.scale, stream);
  } else {
    be.attention_forward(q, k, v, out, lse, a.cu_seqlens, a.n_seqs, a.max_seqlen, a.tokens, a.n_q_heads,
                         a.n_kv_heads, a.head_dim, a.scale, precision, stream);
  }
}
inline void attention_backward_saved(const Backend& be, Precision precision, const float* q, const float* k,
                                     const float* v, const float* out, const float* dout, const float* lse, float* dq,
                                     float* dk, float* dv, float* workspace, const AttentionShape& a,
                                     const Stream& stream) {
  if (precision == Precision::BF16) {
    be.attention_backward(reinterpret_cast<const std::uint16_t*>(q), reinterpret_cast<const std::uint16_t*>(k),
                          reinterpret_cast<const std::uint16_t*>(v), reinterpret_cast<const std::uint16_t*>(out),
                          reinterpret_cast<const std::uint16_t*>(dout), lse, dq, dk, dv, workspace, a.cu_seqlens,
                          a.n_seqs, a.max_seqlen, a.tokens, a.n_q_heads, a.n_kv_heads, a.head_dim, a.scale, stream);
  } else {
    be.attention_backward(q, k, v, out, dout, lse, dq, dk, dv, workspace, a.cu_seqlens, a.n_seqs, a.max_seqlen,
                          a.tokens, a.n_q_heads, a.n_kv_heads, a.head_dim, a.scale, precision, stream);
  }
}

// Scratch: sh [T, H] (h, g, dg, dh), then a union region used by the attention phase
// (q_rot, k_rot, d_att, dq_rot, dk_rot, dv) or by the MLP phase (act / d_act, d_gate_up), then
// the attention backward's workspace, then (tf32 weight gradients only, else empty) the room for
// their transposed operands: transposed_width floats per token (see transposed_width_for).
struct ScratchLayout {
  std::int64_t sh, q_rot, k_rot, d_att, dq_rot, dk_rot, dv, act, d_gate_up, attn_ws, transposed, total;
  std::int64_t transposed_width;  // floats per token of `transposed`
  // The fp32 block in tf32 computes dW = dY^T X on k-major copies X^T and dY^T: X^T (at most
  // max(H, I, q) rows) then dY^T by blocks of rows that fit after it, at least H of them (the dY
  // of down and o have H columns; those of q, k and v fit whole, gate_up's in blocks of up to
  // max(H, I, q) rows).
  static std::int64_t transposed_width_for(const TransformerConfig& c, Precision precision) {
    Widths w(c);
    return precision == Precision::TF32 ? std::max({w.H, w.I, w.q}) + w.H : 0;
  }
  ScratchLayout(const TransformerConfig& c, std::int64_t t, std::int64_t attn_ws_floats,
                std::int64_t transposed_floats_per_token = 0)
      : transposed_width(transposed_floats_per_token) {
    Widths w(c);
    Segments s;
    sh = s.add(t, w.H);
    const std::int64_t union_start = s.at;
    q_rot = s.add(t, w.q);
    k_rot = s.add(t, w.kv);
    d_att = s.add(t, w.q);
    dq_rot = s.add(t, w.q);
    dk_rot = s.add(t, w.kv);
    dv = s.add(t, w.kv);
    const std::int64_t attention_end = s.at;
    s.at = union_start;
    act = s.add(t, w.I);
    d_gate_up = s.add(t, 2 * w.I);
    s.at = std::max(s.at, attention_end);
    attn_ws = s.add(1, attn_ws_floats);
    transposed = s.add(t, transposed_floats_per_token);
    total = s.at;
  }
  static std::int64_t floats_per_token(const TransformerConfig& c, std::int64_t transposed_floats_per_token = 0) {
    Widths w(c);
    return w.H + std::max(3 * w.q + 3 * w.kv, 3 * w.I) + transposed_floats_per_token;
  }
};

// bf16 mode: the backward's bf16 gradient operands of the GEMMs (in bf16 elements), written by
// their producers or converted right before use (the forward's operands h, g, act, q_rot and k_rot
// are kept with the saved activations; att is saved in bf16 by attention itself).
//   b [T, max(2I, q + 2kv)]    d_gate_up; dq | dk | dv (each segment aligned)
//   c [T, H]                   dy, then dr (the incoming gradients)
struct Bf16ScratchLayout {
  std::int64_t b, dk, dv, c, total;
  Bf16ScratchLayout(const TransformerConfig& cfg, std::int64_t t) {
    Widths w(cfg);
    Segments s;
    b = 0;
    const std::int64_t qkv_end = align_up(align_up(b + t * w.q) + align_up(t * w.kv) + t * w.kv);
    dk = align_up(b + t * w.q);
    dv = dk + align_up(t * w.kv);
    s.add(t, 2 * w.I);
    s.at = std::max(s.at, qkv_end);
    c = s.add(t, w.H);
    total = s.at;
  }
  static std::int64_t elements_per_token(const TransformerConfig& cfg) {
    Widths w(cfg);
    return std::max(2 * w.I, w.q + 2 * w.kv) + w.H;
  }
};

inline std::string lens_str(const std::vector<std::int64_t>& lens) {
  std::string text = "[";
  const std::size_t shown = std::min<std::size_t>(lens.size(), 8);
  for (std::size_t i = 0; i < shown; ++i) text += (i ? ", " : "") + std::to_string(lens[i]);
  if (lens.size() > shown) text += ", ... (" + std::to_string(lens.size()) + " sequences)";
  return text + "]";
}

inline bool overlaps(const Buffer& a, const Buffer& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return false;
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// A validated seq_lens.
struct Batch {
  std::int64_t tokens = 0;
  int max_seqlen = 0;
  std::vector<std::int32_t> cu_seqlens;
};

// seq_lens: non-empty, every length >= 1, total <= max_tokens (InvalidArgumentError naming `call`).
Batch check_batch(const std::vector<std::int64_t>& seq_lens, std::int64_t max_tokens, const char* call);
// b: float32 [tokens, hidden_size] on `device`.
void check_activation(const Buffer& b, const TransformerConfig& config, const Device& device, std::int64_t tokens,
                      const char* name);
// x as check_activation with rows == batch.tokens (InvalidArgumentError naming seq_lens otherwise).
void check_input(const Buffer& x, const TransformerConfig& config, const Device& device, const Batch& batch,
                 const std::vector<std::int64_t>& seq_lens);
// The checks of a backward before anything is written (the errors name `call` and `ws_name`):
// the stream and every buffer on `device`, x / grad_out / grad_in shaped for seq_lens, the
// gradient workspace on `device` and made for `layout` (`mismatch()` is the error otherwise),
// grad_in not overlapping x and either grad_out itself or disjoint from it, neither overlapping
// the workspace. Returns the validated batch.
Batch check_backward(const char* call, const char* ws_name, const TransformerConfig& config, const Device& device,
                     std::int64_t max_tokens, const Buffer& x, const Buffer& grad_out, const Buffer& grad_in,
                     const std::vector<std::int64_t>& seq_lens, const Stream& stream, const CudaGradWorkspace& ws,
                     const ParamLayout& layout, const std::function<std::string()>& mismatch);
// The checks of an optimizer step before anything is written: valid hyperparameters, the stream,
// state, workspace and grad_norm on `device`, state and workspace made for `layout` (the errors
// name `call` and `ws_name`, say the state was made for `other` (a description such as "other
// adapters") and end the state's with `state_hint`).
void check_optimizer_step(const char* call, const char* ws_name, const char* other, const char* state_hint,
                          const Device& device, const ParamLayout& layout, const AdamWHyper& hyper,
                          const Stream& stream, const GpuBlockOptimizerState& state, const CudaGradWorkspace& ws,
                          const GradNorm* grad_norm);
// Positions (restarting at 0 per sequence) then cu_seqlens, as one int32 host array.
std::vector<std::int32_t> position_indices(const Batch& batch);

}  // namespace cudablocks::blocks
