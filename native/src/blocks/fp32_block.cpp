// The fp32 decoder block: forward and full backward on the Backend ops (see block.hpp for the
// math, the parameter layout and what is saved between forward and backward).
#include <cmath>
#include <cstring>
#include <limits>

#include "blocks/block_internal.hpp"
#include "core/checks.hpp"
#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

using namespace blocks;

namespace {

// The block's matrix products in its precision: fp32 operands through Backend::gemm (FP32, TF32),
// or (BF16) the bf16 copies of the same operands through Backend::gemm_bf16. Each operand comes
// as its fp32 pointer and its bf16 one (nullptr outside bf16 mode); conversions are explicit.
struct Products {
  const Backend& be;
  Precision prec;
  const Stream& stream;
  // bf16 mode: the weights' bf16 copy (refreshed by optimizer_step) and the bf16 operand scratch.
  const std::uint16_t* weights16;
  std::uint16_t* scratch16;
  // tf32 backward: the weight gradients' transposed operands (ScratchLayout::transposed) and
  // their floats per token.
  float* transposed;
  std::int64_t transposed_width;
  bool bf16() const { return prec == Precision::BF16; }
  // A product's bf16 operand at `offset` into the weight copy or the scratch; nullptr outside bf16 mode.
  const std::uint16_t* w16(std::int64_t offset) const { return bf16() ? weights16 + offset : nullptr; }
  std::uint16_t* s16(std::int64_t offset) const { return bf16() ? scratch16 + offset : nullptr; }
  void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, const std::uint16_t* a16,
            const float* b, const std::uint16_t* b16, float beta, float* c) const {
    if (bf16()) {
      be.gemm_bf16(ta, tb, m, n, k, 1.0f, a16, b16, beta, c, stream);
    } else {
      be.gemm(ta, tb, m, n, k, 1.0f, a, b, beta, c, prec, stream);
    }
  }
  // c = a b^T + addend: a residual added in the product's epilogue.
  void gemm_add(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, const std::uint16_t* a16,
                const float* b, const std::uint16_t* b16, const float* addend, float* c) const {
    if (bf16()) {
      be.gemm_bf16_add(false, true, m, n, k, 1.0f, a16, b16, addend, c, stream);
    } else {
      be.gemm_add(false, true, m, n, k, 1.0f, a, b, addend, c, prec, stream);
    }
  }
  // gw [out, in] += dy^T x for dy [T, out] and x [T, in]: the weight gradient of y = x W^T.
  // tf32 computes it on k-major copies (tf32 tensor cores take no other operand layout, and both
  // of these are token-major: cuBLAS ran them at about 60% of its k-major rate, and the
  // transposes cost a fraction of that). x^T goes to the start of `transposed` (unless the caller
  // says it is there already: the recomputed h, g and act are written there transposed by their
  // producers, and q, k and v share h), dY^T after it by blocks of rows that fit
  // (ScratchLayout::transposed_width_for).
  void weight_grad(std::int64_t T, std::int64_t out, std::int64_t in, const float* dy, const std::uint16_t* dy16,
                   const float* x, const std::uint16_t* x16, float* gw, bool x_transposed_there = false) const {
    if (prec != Precision::TF32) {
      gemm(true, false, out, in, T, dy, dy16, x, x16, 1.0f, gw);
      return;
    }
    if (!x_transposed_there) be.transpose(x, T, in, in, transposed, stream);
    float* dy_t = transposed + in * T;
    const std::int64_t rows = std::min(out, transposed_width - in);
    for (std::int64_t r0 = 0; r0 < out; r0 += rows) {
      const std::int64_t n = std::min(rows, out - r0);
      be.transpose(dy + r0, T, n, out, dy_t, stream);
      be.gemm(false, true, n, in, T, 1.0f, dy_t, transposed, 1.0f, gw + r0 * in, prec, stream);
    }
  }
  // y = bf16(x) in bf16 mode; nothing otherwise.
  void convert(const float* x, std::uint16_t* y, std::int64_t n) const {
    if (bf16()) be.to_bf16(x, y, n, stream);
  }
  // RMSNorm whose output only feeds products: fp32 y, or (bf16 mode) bf16 y16 directly.
  void rmsnorm(const float* x, const float* w, float* y, std::uint16_t* y16, float* rstd, std::int64_t rows,
               std::int64_t cols, float eps) const {
    if (bf16()) {
      be.rmsnorm_forward_bf16(x, w, y16, rstd, rows, cols, eps, stream);
    } else {
      be.rmsnorm_forward(x, w, y, rstd, rows, cols, eps, stream);
    }
  }
};

// bf16 mode only: the products' bf16 operands that the forward computes anyway, kept after the
// saved activations (SavedLayout) so that the backward reads them instead of recomputing them
// (offsets in bf16 elements from the end of SavedLayout): h and g [T, H] (two RMSNorms), act [T, I]
// (one SwiGLU, the largest pass: it reads gate_up [T, 2 I]), q_rot [T, n_q d] and k_rot [T, n_kv d]
// (two QK-norm+RoPE passes). Qwen3-4B: 19,968 values, 39,936 bytes per token.
struct KeptOperands {
  std::int64_t h, g, act, q_rot, k_rot, total;
  KeptOperands(const TransformerConfig& c, std::int64_t t) {
    Widths w(c);
    Segments s;  // kAlign elements apart: 128-byte aligned
    h = s.add(t, w.H);
    g = s.add(t, w.H);
    act = s.add(t, w.I);
    q_rot = s.add(t, w.q);
    k_rot = s.add(t, w.kv);
    total = s.at;
  }
  static std::int64_t elements_per_token(const TransformerConfig& c) {
    Widths w(c);
    return 2 * w.H + w.I + w.q + w.kv;
  }
};

// The kept operands of one call: bf16 pointers into the saved memory in bf16 mode (nullptr
// otherwise, where they are recomputed in fp32 into the scratch instead).
struct Kept {
  KeptOperands layout;
  std::uint16_t* base;
  Kept(Precision precision, float* saved, const SavedLayout& sl, const TransformerConfig& c, std::int64_t t)
      : layout(c, t),
        base(precision == Precision::BF16 ? reinterpret_cast<std::uint16_t*>(saved + sl.total) : nullptr) {}
  std::uint16_t* at(std::int64_t offset) const { return base != nullptr ? base + offset : nullptr; }
  // QK-norm+RoPE's output as the helpers pass it (fp32 pointer type, bf16 bits in bf16 mode):
  // the kept slot in bf16 mode, else `scratch`.
  float* rotated(std::int64_t offset, float* scratch) const {
    return base != nullptr ? reinterpret_cast<float*>(at(offset)) : scratch;
  }
};

// The fp32 block's scratch: ScratchLayout with, in tf32, room for the weight gradients' transposed
// operands (Products::weight_grad).
ScratchLayout fp32_scratch_layout(const TransformerConfig& c, std::int64_t t, std::int64_t attn_ws_floats,
                                  Precision precision) {
  return ScratchLayout(c, t, attn_ws_floats, ScratchLayout::transposed_width_for(c, precision));
}

// Floats of saved memory per max_tokens rows (with bf16 mode's kept operands).
std::int64_t saved_floats(const TransformerConfig& c, std::int64_t t, Precision precision) {
  const std::int64_t saved = SavedLayout(c, t, precision).total;
  return precision == Precision::BF16 ? saved + (KeptOperands(c, t).total + 1) / 2 : saved;
}

}  // namespace

// ---- construction -----------------------------------------------------------------------------

Fp32Block::Fp32Block(const TransformerConfig& config, int layer_idx, const Device& device, std::int64_t max_tokens,
                     Precision precision)
    : CudaBlock(config, layer_idx, device, max_tokens, precision) {}

std::shared_ptr<Fp32Block> Fp32Block::create(const TransformerConfig& config, int layer_idx, const WeightMap& weights,
                                             const Device& device, std::int64_t max_tokens, Precision precision,
                                             std::shared_ptr<BlockArena> arena, bool share_activations) {
  auto layout = std::make_shared<const ParamLayout>(config);  // validates config
  BlockMemory::validate(device, arena, share_activations);
  if (layer_idx < 0 || layer_idx >= config.num_hidden_layers) {
    throw InvalidArgumentError("layer_idx " + std::to_string(layer_idx) + " is outside [0, " +
                               std::to_string(config.num_hidden_layers) + ") for num_hidden_layers " +
                               std::to_string(config.num_hidden_layers));
  }
  if (max_tokens <= 0 || max_tokens > std::numeric_limits<std::int32_t>::max() - 1) {
    throw InvalidArgumentError("max_tokens must be in [1, 2^31 - 2], got " + std::to_string(max_tokens));
  }
  // Weights: every expected tensor with its shape, nothing else.
  for (const ParamEntry& e : layout->entries()) {
    auto it = weights.find(e.name);
    if (it == weights.end()) {
      throw InvalidArgumentError("missing weight '" + e.name + "' " + shape_str(e.shape) + " for layer " +
                                 std::to_string(layer_idx) + " of " + config.describe());
    }
    if (it->second.shape != e.shape) {
      throw ShapeError("weight '" + e.name + "' has shape " + shape_str(it->second.shape) + ", expected " +
                       shape_str(e.shape) + " for " + config.describe());
    }
    if (it->second.data == nullptr && e.numel() > 0) throw InvalidArgumentError("weight '" + e.name + "' has no data");
  }
  for (const auto& [name, tensor] : weights) {
    if (layout->find(name) == nullptr) {
      std::string expected;
      for (const ParamEntry& e : layout->entries()) expected += (expected.empty() ? "" : ", ") + e.name;
      throw InvalidArgumentError("unexpected weight '" + name + "' " + shape_str(tensor.shape) + " for " +
                                 config.describe() + "; a layer takes exactly: " + expected +
                                 " (names relative to the layer)");
    }
  }

  auto block = std::make_shared<Fp32Block>(config, layer_idx, device, max_tokens, precision);
  block->layout_ = layout;
  DeviceGuard guard(device);
  const Backend& backend = backend_for(device);
  block->attn_ws_floats_ = backend.attention_workspace_floats(max_tokens, static_cast<int>(config.num_attention_heads),
                                                              static_cast<int>(config.num_key_value_heads),
                                                              static_cast<int>(config.head_dim));
  block->params_ = Buffer::empty({layout->total_floats()}, DType::Float32, device);
  ActivationNeeds needs;
  needs.saved = saved_floats(config, max_tokens, precision) * static_cast<std::int64_t>(sizeof(float));
  needs.scratch = fp32_scratch_layout(config, max_tokens, block->attn_ws_floats_, precision).total *
                  static_cast<std::int64_t>(sizeof(float));
  if (precision == Precision::BF16) {
    block->params_bf16_ = Buffer::empty({layout->total_floats()}, DType::BFloat16, device);
    needs.scratch_bf16 = Bf16ScratchLayout(config, max_tokens).total * 2;
  }
  block->memory_ = BlockMemory(device, needs, std::move(arena), share_activations);
  block->indices_ = Buffer::empty({2 * max_tokens + 1}, DType::Int32, device);

  std::vector<float> host(static_cast<std::size_t>(layout->total_floats()), 0.0f);
  for (const ParamEntry& e : layout->entries()) {
    std::memcpy(host.data() + e.offset, weights.at(e.name).data, static_cast<std::size_t>(e.numel()) * sizeof(float));
  }
  Stream stream = Stream::wrap(device, 0);
  block->params_.copy_from_host(host.data(), stream);
  block->upload_rope_inv_freq(stream);
  if (precision == Precision::BF16) {
    backend.to_bf16(block->params_.data_as<float>(), block->params_bf16_.data_as<std::uint16_t>(),
                    layout->total_floats(), stream);
  }
  stream.synchronize();  // later work may come on any stream
  return block;
}

std::int64_t Fp32Block::saved_bytes_per_token() const {
  const std::int64_t bytes = SavedLayout::floats_per_token(config_, precision_) * static_cast<std::int64_t>(sizeof(float));
  return precision_ == Precision::BF16 ? bytes + 2 * KeptOperands::elements_per_token(config_) : bytes;
}

std::int64_t Fp32Block::scratch_bytes_per_token() const {
  const std::int64_t ws_per_token = (attn_ws_floats_ + max_tokens_ - 1) / max_tokens_;
  const std::int64_t bf16_bytes =
      precision_ == Precision::BF16 ? Bf16ScratchLayout::elements_per_token(config_) * 2 : 0;
  return (ScratchLayout::floats_per_token(config_, ScratchLayout::transposed_width_for(config_, precision_)) +
          ws_per_token) * static_cast<std::int64_t>(sizeof(float)) +
         bf16_bytes;
}

std::int64_t Fp32Block::device_bytes() const {
  return static_cast<std::int64_t>(params_.nbytes() + params_bf16_.nbytes() + rope_inv_freq_.nbytes());
}

std::int64_t Fp32Block::activation_bytes() const {
  return memory_.owned_bytes() + static_cast<std::int64_t>(indices_.nbytes());
}

std::shared_ptr<CudaGradWorkspace> Fp32Block::new_grad_workspace(const Stream& stream) const {
  return std::make_shared<CudaGradWorkspace>(layout_, device_, stream);
}

void Fp32Block::download_weights(float* host, const Stream& stream) const {
  if (stream.device() != device_) {
    throw DeviceError("download_weights of a block on " + device_.str() + " with a stream of " + stream.device().str());
  }
  params_.copy_to_host(host, stream);
}

// ---- checks -----------------------------------------------------------------------------------

// ---- forward ----------------------------------------------------------------------------------

void Fp32Block::forward(const Buffer& x, Buffer& out, const std::vector<std::int64_t>& seq_lens, const Stream& stream,
                        std::optional<std::uint64_t>) {  // no LoRA, no dropout
  if (stream.device() != device_) {
    throw DeviceError("forward of a block on " + device_.str() + " with a stream of " + stream.device().str());
  }
  const Batch batch = check_batch(seq_lens, max_tokens_, "forward");
  check_input(x, config_, device_, batch, seq_lens);
  check_activation(out, config_, device_, batch.tokens, "out");
  if (overlaps(x, out)) throw InvalidArgumentError("forward: out must not overlap x (the backward needs x)");

  std::lock_guard<std::mutex> lock(mutex_);
  BlockMemory::Call mem(memory_);  // with an arena: holds it until the work is queued
  forward_seq_lens_.clear();
  mem.forward_starts();
  DeviceGuard guard(device_);
  const Backend& be = backend_for(device_);
  const TransformerConfig& c = config_;
  const ParamLayout& pl = *layout_;
  const std::int64_t T = batch.tokens, H = c.hidden_size, d = c.head_dim, I = c.intermediate_size;
  const int nq = static_cast<int>(c.num_attention_heads), nkv = static_cast<int>(c.num_key_value_heads);
  const std::int64_t q = nq * d, kv = nkv * d;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float* inv_freq = rope_inv_freq_.data_as<float>();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const Precision prec = precision_;

  // Positions (restarting per sequence) then cu_seqlens, in one upload.
  upload_indices(position_indices(batch), stream);
  const std::int32_t* positions = indices_.data_as<std::int32_t>();
  const std::int32_t* cu = positions + T;
  const int n_seqs = static_cast<int>(seq_lens.size());

  const float* W = params_.data_as<float>();
  const float* wq = W + pl.wqkv;
  const float* wk = wq + q * H;
  const float* wv = wk + kv * H;
  const SavedLayout sl(c, max_tokens_, precision_);
  const ScratchLayout sc = fp32_scratch_layout(c, max_tokens_, attn_ws_floats_, precision_);
  float* S = mem.saved();
  float* X = mem.scratch();
  const float* xin = x.data_as<float>();
  float* y = out.data_as<float>();
  const Products mm{be, prec, stream, params_bf16_.data_as<std::uint16_t>(), mem.scratch_bf16(), nullptr, 0};
  const Kept kept(prec, S, sl, c, max_tokens_);
  const std::uint16_t* wq16 = mm.w16(pl.wqkv);
  const std::uint16_t* wk16 = mm.w16(pl.wqkv + q * H);
  const std::uint16_t* wv16 = mm.w16(pl.wqkv + (q + kv) * H);

  float* h = X + sc.sh;
  std::uint16_t* h16 = kept.at(kept.layout.h);
  mm.rmsnorm(xin, W + pl.ln_in, h, h16, S + sl.rstd1, T, H, eps);
  const float* bias = pl.bqkv >= 0 ? W + pl.bqkv : nullptr;
  // q and k (before the norm) and v into their saved slots: fp32, or in bf16 mode bf16 as the
  // product writes them (rounded after the bias, which is added in fp32 in d_att, free until the
  // backward).
  auto project_raw = [&](const float* w, const std::uint16_t* w16, const float* b, std::int64_t n, float* dst) {
    if (!mm.bf16()) {
      mm.gemm(false, true, T, n, H, h, nullptr, w, nullptr, 0.0f, dst);
      if (b != nullptr) be.add_bias(dst, b, T, n, stream);
      return;
    }
    std::uint16_t* dst16 = reinterpret_cast<std::uint16_t*>(dst);
    if (b == nullptr) {
      be.gemm_bf16_to_bf16(false, true, T, n, H, 1.0f, h16, w16, dst16, stream);
      return;
    }
    float* sum = X + sc.d_att;
    mm.gemm(false, true, T, n, H, h, h16, w, w16, 0.0f, sum);
    be.add_bias(sum, b, T, n, stream);
    be.to_bf16(sum, dst16, T * n, stream);
  };
  project_raw(wq, wq16, bias, q, S + sl.q_raw);
  project_raw(wk, wk16, bias != nullptr ? bias + q : nullptr, kv, S + sl.k_raw);
  project_raw(wv, wv16, bias != nullptr ? bias + q + kv : nullptr, kv, S + sl.v);
  const bool qkn = c.qk_norm;
  float* q_rot = kept.rotated(kept.layout.q_rot, X + sc.q_rot);
  float* k_rot = kept.rotated(kept.layout.k_rot, X + sc.k_rot);
  qk_norm_rope_forward_saved(be, prec, S + sl.q_raw, qkn ? W + pl.q_norm : nullptr, q_rot,
                             qkn ? S + sl.rstd_q : nullptr, positions, T, nq, static_cast<int>(d), eps, inv_freq, stream);
  qk_norm_rope_forward_saved(be, prec, S + sl.k_raw, qkn ? W + pl.k_norm : nullptr, k_rot,
                             qkn ? S + sl.rstd_k : nullptr, positions, T, nkv, static_cast<int>(d), eps, inv_freq,
                             stream);
  const AttentionShape attn{cu, n_seqs, batch.max_seqlen, T, nq, nkv, static_cast<int>(d), scale};
  attention_forward_saved(be, prec, q_rot, k_rot, S + sl.v, S + sl.att, S + sl.lse, attn, stream);
  float* r = S + sl.r;
  const std::uint16_t* att16 = saved_bf16(prec, S + sl.att);  // bf16 mode: attention wrote att in bf16
  mm.gemm_add(T, H, q, S + sl.att, att16, W + pl.wo, mm.w16(pl.wo), xin, r);  // r = x + att Wo^T
  if (pl.bo >= 0) be.add_bias(r, W + pl.bo, T, H, stream);
  float* g = X + sc.sh;
  std::uint16_t* g16 = kept.at(kept.layout.g);
  mm.rmsnorm(r, W + pl.ln_post, g, g16, S + sl.rstd2, T, H, eps);
  float* act = X + sc.act;
  std::uint16_t* act16 = kept.at(kept.layout.act);
  if (mm.bf16()) {
    std::uint16_t* gate_up16 = reinterpret_cast<std::uint16_t*>(S + sl.gate_up);
    be.gemm_bf16_to_bf16(false, true, T, 2 * I, H, 1.0f, g16, mm.w16(pl.w_gate_up), gate_up16, stream);
    be.swiglu_forward(gate_up16, act16, T, I, stream);
  } else {
    mm.gemm(false, true, T, 2 * I, H, g, nullptr, W + pl.w_gate_up, nullptr, 0.0f, S + sl.gate_up);
    be.swiglu_forward(S + sl.gate_up, act, T, I, stream);
  }
  mm.gemm_add(T, H, I, act, act16, W + pl.w_down, mm.w16(pl.w_down), r, y);  // y = r + act Wdown^T
  forward_seq_lens_ = seq_lens;
  mem.forward_done(seq_lens);
  set_last_stream(stream);
}

// ---- backward ---------------------------------------------------------------------------------

void Fp32Block::backward(const Buffer& x, const Buffer& grad_out, Buffer& grad_in,
                         const std::vector<std::int64_t>& seq_lens, const Stream& stream, CudaGradWorkspace& grad_ws) {
  const Batch batch = check_backward("backward", "grad_ws", config_, device_, max_tokens_, x, grad_out, grad_in,
                                     seq_lens, stream, grad_ws, *layout_, [&] {
    return "grad_ws (" + grad_ws.layout().describe() + ") was made for another layer shape than this block's " +
           config_.describe() + " (" + layout_->describe() + "); make one with CudaGradWorkspace(block)";
  });

  std::lock_guard<std::mutex> lock(mutex_);
  if (forward_seq_lens_.empty()) {
    throw InvalidArgumentError("backward needs a forward first: call forward(x, out, seq_lens) with the same x and seq_lens, then backward");
  }
  if (forward_seq_lens_ != seq_lens) {
    throw InvalidArgumentError("backward seq_lens " + lens_str(seq_lens) + " differ from those of the latest forward " +
                               lens_str(forward_seq_lens_) + "; run forward on this batch first");
  }
  const BlockMemory::Call mem(memory_);
  mem.check_saved(seq_lens, "backward");

  DeviceGuard guard(device_);
  const Backend& be = backend_for(device_);
  const TransformerConfig& c = config_;
  const ParamLayout& pl = *layout_;
  const std::int64_t T = batch.tokens, H = c.hidden_size, d = c.head_dim, I = c.intermediate_size;
  const int nq = static_cast<int>(c.num_attention_heads), nkv = static_cast<int>(c.num_key_value_heads);
  const std::int64_t q = nq * d, kv = nkv * d;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float* inv_freq = rope_inv_freq_.data_as<float>();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const Precision prec = precision_;
  const std::int32_t* positions = indices_.data_as<std::int32_t>();  // uploaded by the forward
  const std::int32_t* cu = positions + T;
  const int n_seqs = static_cast<int>(seq_lens.size());

  const float* W = params_.data_as<float>();
  const float* wq = W + pl.wqkv;
  const float* wk = wq + q * H;
  const float* wv = wk + kv * H;
  float* G = grad_ws.flat().data_as<float>();
  float* gwq = G + pl.wqkv;
  float* gwk = gwq + q * H;
  float* gwv = gwk + kv * H;
  const SavedLayout sl(c, max_tokens_, precision_);
  const ScratchLayout sc = fp32_scratch_layout(c, max_tokens_, attn_ws_floats_, precision_);
  float* S = mem.saved();
  float* X = mem.scratch();
  const float* xin = x.data_as<float>();
  const float* dy = grad_out.data_as<float>();
  float* dx = grad_in.data_as<float>();
  const float* r = S + sl.r;
  const Products mm{be,
                    prec,
                    stream,
                    params_bf16_.data_as<std::uint16_t>(),
                    mem.scratch_bf16(),
                    X + sc.transposed,
                    sc.transposed_width};
  const Bf16ScratchLayout bl(c, max_tokens_);

  // MLP: out = r + swiglu(g Wgu^T) Wdown^T. g and act: kept by the forward in bf16 mode,
  // recomputed otherwise.
  const Kept kept(prec, S, sl, c, max_tokens_);
  float* g = X + sc.sh;
  const std::uint16_t* g16 = kept.at(kept.layout.g);
  float* act = X + sc.act;
  const std::uint16_t* act16 = kept.at(kept.layout.act);
  const std::uint16_t* gate_up16 = reinterpret_cast<const std::uint16_t*>(S + sl.gate_up);  // bf16 mode
  // tf32 writes them transposed, each right before its weight gradient (the k-major operand).
  const bool tf32 = prec == Precision::TF32;
  if (prec == Precision::FP32) {
    be.rmsnorm_forward(r, W + pl.ln_post, g, nullptr, T, H, eps, stream);
    be.swiglu_forward(S + sl.gate_up, act, T, I, stream);
  }
  std::uint16_t* dy16 = mm.s16(bl.c);
  mm.convert(dy, dy16, T * H);
  if (tf32) be.swiglu_forward_transposed(S + sl.gate_up, mm.transposed, T, I, stream);
  mm.weight_grad(T, H, I, dy, dy16, act, act16, G + pl.w_down, tf32);  // dWdown += dy^T act
  // d_act = dy Wdown: in bf16 mode written in bf16 (into act's unused fp32 slot), as SwiGLU's
  // backward reads it.
  float* d_act = act;
  float* d_gu = X + sc.d_gate_up;
  std::uint16_t* d_gu16 = mm.s16(bl.b);
  if (mm.bf16()) {
    auto* d_act16 = reinterpret_cast<std::uint16_t*>(d_act);
    be.gemm_bf16_to_bf16(false, false, T, I, H, 1.0f, dy16, mm.w16(pl.w_down), d_act16, stream);
    be.swiglu_backward(d_act16, gate_up16, d_gu16, T, I, stream);
  } else {
    mm.gemm(false, false, T, I, H, dy, nullptr, W + pl.w_down, nullptr, 0.0f, d_act);
    be.swiglu_backward(d_act, S + sl.gate_up, d_gu, T, I, stream);
  }
  if (tf32) be.rmsnorm_forward_transposed(r, W + pl.ln_post, S + sl.rstd2, mm.transposed, T, H, stream);
  mm.weight_grad(T, 2 * I, H, d_gu, d_gu16, g, g16, G + pl.w_gate_up, tf32);  // dWgu += d_gu^T g
  float* dg = X + sc.sh;
  mm.gemm(false, false, T, H, 2 * I, d_gu, d_gu16, W + pl.w_gate_up, mm.w16(pl.w_gate_up), 0.0f, dg);  // dg = d_gu Wgu
  // dr = dy + rmsnorm_backward(dg) (grad_in may be grad_out): grad_in carries dr from here on; in
  // bf16 mode the same pass writes dr in bf16 too (where dy16 was: dead).
  std::uint16_t* dr16 = mm.s16(bl.c);
  be.rmsnorm_backward(dg, r, W + pl.ln_post, S + sl.rstd2, dy, dx, dr16, G + pl.ln_post, T, H, stream);

  // Attention: r = x + att Wo^T (+ bo).
  if (pl.bo >= 0) be.bias_backward(dx, G + pl.bo, T, H, stream);
  const std::uint16_t* att16 = saved_bf16(prec, S + sl.att);
  mm.weight_grad(T, H, q, dx, dr16, S + sl.att, att16, G + pl.wo);  // dWo += dr^T att
  // d_att = dr Wo: in bf16 mode written in bf16, as attention reads it.
  float* d_att = X + sc.d_att;
  if (mm.bf16()) {
    be.gemm_bf16_to_bf16(false, false, T, q, H, 1.0f, dr16, mm.w16(pl.wo), reinterpret_cast<std::uint16_t*>(d_att),
                         stream);
  } else {
    mm.gemm(false, false, T, q, H, dx, nullptr, W + pl.wo, nullptr, 0.0f, d_att);
  }
  const bool qkn = c.qk_norm;
  // The rotated q and k: kept in bf16 mode, recomputed otherwise (their rstd values are rewritten
  // with the same numbers).
  const float* q_rot = kept.rotated(kept.layout.q_rot, X + sc.q_rot);
  const float* k_rot = kept.rotated(kept.layout.k_rot, X + sc.k_rot);
  if (!mm.bf16()) {
    be.qk_norm_rope_forward(S + sl.q_raw, qkn ? W + pl.q_norm : nullptr, X + sc.q_rot, qkn ? S + sl.rstd_q : nullptr,
                            positions, T, nq, static_cast<int>(d), eps, inv_freq, stream);
    be.qk_norm_rope_forward(S + sl.k_raw, qkn ? W + pl.k_norm : nullptr, X + sc.k_rot, qkn ? S + sl.rstd_k : nullptr,
                            positions, T, nkv, static_cast<int>(d), eps, inv_freq, stream);
  }
  float* dq_rot = X + sc.dq_rot;
  float* dk_rot = X + sc.dk_rot;
  float* dv = X + sc.dv;
  const AttentionShape attn{cu, n_seqs, batch.max_seqlen, T, nq, nkv, static_cast<int>(d), scale};
  attention_backward_saved(be, prec, q_rot, k_rot, S + sl.v, S + sl.att, d_att, S + sl.lse, dq_rot, dk_rot, dv,
                           X + sc.attn_ws, attn, stream);
  float* dq = d_att;  // d_att and the q_rot scratch are dead after the attention backward
  float* dk = X + sc.q_rot;
  std::uint16_t* dq16 = mm.s16(bl.b);
  std::uint16_t* dk16 = mm.s16(bl.dk);
  std::uint16_t* dv16 = mm.s16(bl.dv);
  // In bf16 mode without biases dq and dk only feed bf16 products: written in bf16 directly.
  const bool qk_to16 = mm.bf16() && pl.bqkv < 0;
  qk_norm_rope_backward_saved(be, prec, dq_rot, S + sl.q_raw, qkn ? W + pl.q_norm : nullptr,
                              qkn ? S + sl.rstd_q : nullptr, dq, qk_to16 ? dq16 : nullptr,
                              qkn ? G + pl.q_norm : nullptr, positions, T, nq, static_cast<int>(d), inv_freq, stream);
  qk_norm_rope_backward_saved(be, prec, dk_rot, S + sl.k_raw, qkn ? W + pl.k_norm : nullptr,
                              qkn ? S + sl.rstd_k : nullptr, dk, qk_to16 ? dk16 : nullptr,
                              qkn ? G + pl.k_norm : nullptr, positions, T, nkv, static_cast<int>(d), inv_freq, stream);
  if (pl.bqkv >= 0) {
    be.bias_backward(dq, G + pl.bqkv, T, q, stream);
    be.bias_backward(dk, G + pl.bqkv + q, T, kv, stream);
    be.bias_backward(dv, G + pl.bqkv + q + kv, T, kv, stream);
  }
  if (!qk_to16) {
    mm.convert(dq, dq16, T * q);
    mm.convert(dk, dk16, T * kv);
  }
  mm.convert(dv, dv16, T * kv);
  float* h = X + sc.sh;
  const std::uint16_t* h16 = kept.at(kept.layout.h);
  if (prec == Precision::FP32) be.rmsnorm_forward(xin, W + pl.ln_in, h, nullptr, T, H, eps, stream);
  if (tf32) be.rmsnorm_forward_transposed(xin, W + pl.ln_in, S + sl.rstd1, mm.transposed, T, H, stream);
  mm.weight_grad(T, q, H, dq, dq16, h, h16, gwq, tf32);
  mm.weight_grad(T, kv, H, dk, dk16, h, h16, gwk, true);  // h^T there for all three
  mm.weight_grad(T, kv, H, dv, dv16, h, h16, gwv, true);
  float* dh = h;  // h is dead once the weight gradients are queued
  const std::uint16_t* wq16 = mm.w16(pl.wqkv);
  const std::uint16_t* wk16 = mm.w16(pl.wqkv + q * H);
  const std::uint16_t* wv16 = mm.w16(pl.wqkv + (q + kv) * H);
  mm.gemm(false, false, T, H, q, dq, dq16, wq, wq16, 0.0f, dh);
  mm.gemm(false, false, T, H, kv, dk, dk16, wk, wk16, 1.0f, dh);
  mm.gemm(false, false, T, H, kv, dv, dv16, wv, wv16, 1.0f, dh);
  be.rmsnorm_backward(dh, xin, W + pl.ln_in, S + sl.rstd1, dx, dx, nullptr, G + pl.ln_in, T, H, stream);
  grad_ws.set_last_stream(stream);
  set_last_stream(stream);
}

}  // namespace cudablocks
