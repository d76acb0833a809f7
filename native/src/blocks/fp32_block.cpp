// The fp32 decoder block: forward and full backward on the Backend ops (see block.hpp for the
// math, the parameter layout and what is saved between forward and backward).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/checks.hpp"
#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

namespace {

constexpr std::int64_t kAlign = 64;  // floats between activation segments
std::int64_t align_up(std::int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

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

// The saved activations' offsets; widths documented in block.hpp.
struct SavedLayout {
  std::int64_t q_raw, k_raw, v, att, r, gate_up, lse, rstd_q, rstd_k, rstd1, rstd2, total;
  SavedLayout(const TransformerConfig& c, std::int64_t t) {
    Widths w(c);
    Segments s;
    q_raw = s.add(t, w.q);
    k_raw = s.add(t, w.kv);
    v = s.add(t, w.kv);
    att = s.add(t, w.q);
    r = s.add(t, w.H);
    gate_up = s.add(t, 2 * w.I);
    lse = s.add(t, w.nq);
    rstd_q = c.qk_norm ? s.add(t, w.nq) : -1;
    rstd_k = c.qk_norm ? s.add(t, w.nkv) : -1;
    rstd1 = s.add(t, 1);
    rstd2 = s.add(t, 1);
    total = s.at;
  }
  static std::int64_t floats_per_token(const TransformerConfig& c) {
    Widths w(c);
    return 2 * w.q + 2 * w.kv + w.H + 2 * w.I + w.nq + (c.qk_norm ? w.nq + w.nkv : 0) + 2;
  }
};

// Scratch: sh [T, H] (h, g, dg, dh), then a union region used by the attention phase
// (q_rot, k_rot, d_att, dq_rot, dk_rot, dv) or by the MLP phase (act / d_act, d_gate_up), then
// the attention backward's workspace.
struct ScratchLayout {
  std::int64_t sh, q_rot, k_rot, d_att, dq_rot, dk_rot, dv, act, d_gate_up, attn_ws, total;
  ScratchLayout(const TransformerConfig& c, std::int64_t t, std::int64_t attn_ws_floats) {
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
    total = s.at;
  }
  static std::int64_t floats_per_token(const TransformerConfig& c) {
    Widths w(c);
    return w.H + std::max(3 * w.q + 3 * w.kv, 3 * w.I);
  }
};

// bf16 mode: the bf16 operands of the GEMMs (in bf16 elements), converted right before use.
//   a [T, max(H, q)]           h, att, g (the activation side of the forward products and of dW)
//   b [T, max(2I, q + 2kv)]    act, then d_gate_up; dq | dk | dv (each segment aligned)
//   c [T, H]                   dy, then dr (the incoming gradients)
struct Bf16ScratchLayout {
  std::int64_t a, b, dk, dv, c, total;
  Bf16ScratchLayout(const TransformerConfig& cfg, std::int64_t t) {
    Widths w(cfg);
    Segments s;
    a = s.add(t, std::max(w.H, w.q));
    b = s.at;
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
    return std::max(w.H, w.q) + std::max(2 * w.I, w.q + 2 * w.kv) + w.H;
  }
};

std::string lens_str(const std::vector<std::int64_t>& lens) {
  std::string text = "[";
  const std::size_t shown = std::min<std::size_t>(lens.size(), 8);
  for (std::size_t i = 0; i < shown; ++i) text += (i ? ", " : "") + std::to_string(lens[i]);
  if (lens.size() > shown) text += ", ... (" + std::to_string(lens.size()) + " sequences)";
  return text + "]";
}

bool overlaps(const Buffer& a, const Buffer& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return false;
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// The block's matrix products in its precision: fp32 operands through Backend::gemm (FP32, TF32),
// or (BF16) the bf16 copies of the same operands through Backend::gemm_bf16. Each operand comes
// as its fp32 pointer and its bf16 one (nullptr outside bf16 mode); conversions are explicit.
struct Products {
  const Backend& be;
  Precision prec;
  const Stream& stream;
  bool bf16() const { return prec == Precision::BF16; }
  void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, const std::uint16_t* a16,
            const float* b, const std::uint16_t* b16, float beta, float* c) const {
    if (bf16()) {
      be.gemm_bf16(ta, tb, m, n, k, 1.0f, a16, b16, beta, c, stream);
    } else {
      be.gemm(ta, tb, m, n, k, 1.0f, a, b, beta, c, prec, stream);
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

}  // namespace

// ---- construction -----------------------------------------------------------------------------

Fp32Block::Fp32Block(const TransformerConfig& config, int layer_idx, const Device& device, std::int64_t max_tokens,
                     Precision precision)
    : CudaBlock(config, layer_idx, device, max_tokens, precision) {}

std::shared_ptr<Fp32Block> Fp32Block::create(const TransformerConfig& config, int layer_idx, const WeightMap& weights,
                                             const Device& device, std::int64_t max_tokens, Precision precision) {
  auto layout = std::make_shared<const ParamLayout>(config);  // validates config
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
  block->saved_ = Buffer::empty({SavedLayout(config, max_tokens).total}, DType::Float32, device);
  block->scratch_ =
      Buffer::empty({ScratchLayout(config, max_tokens, block->attn_ws_floats_).total}, DType::Float32, device);
  block->indices_ = Buffer::empty({2 * max_tokens + 1}, DType::Int32, device);
  if (precision == Precision::BF16) {
    block->params_bf16_ = Buffer::empty({layout->total_floats()}, DType::BFloat16, device);
    block->scratch_bf16_ = Buffer::empty({Bf16ScratchLayout(config, max_tokens).total}, DType::BFloat16, device);
  }

  std::vector<float> host(static_cast<std::size_t>(layout->total_floats()), 0.0f);
  for (const ParamEntry& e : layout->entries()) {
    std::memcpy(host.data() + e.offset, weights.at(e.name).data, static_cast<std::size_t>(e.numel()) * sizeof(float));
  }
  Stream stream = Stream::wrap(device, 0);
  block->params_.copy_from_host(host.data(), stream);
  if (precision == Precision::BF16) {
    backend.to_bf16(block->params_.data_as<float>(), block->params_bf16_.data_as<std::uint16_t>(),
                    layout->total_floats(), stream);
  }
  stream.synchronize();  // later work may come on any stream
  return block;
}

std::int64_t Fp32Block::saved_bytes_per_token() const {
  return SavedLayout::floats_per_token(config_) * static_cast<std::int64_t>(sizeof(float));
}

std::int64_t Fp32Block::scratch_bytes_per_token() const {
  const std::int64_t ws_per_token = (attn_ws_floats_ + max_tokens_ - 1) / max_tokens_;
  const std::int64_t bf16_bytes =
      precision_ == Precision::BF16 ? Bf16ScratchLayout::elements_per_token(config_) * 2 : 0;
  return (ScratchLayout::floats_per_token(config_) + ws_per_token) * static_cast<std::int64_t>(sizeof(float)) +
         bf16_bytes;
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

Fp32Block::Batch Fp32Block::check_batch(const std::vector<std::int64_t>& seq_lens, const char* call) const {
  if (seq_lens.empty()) throw InvalidArgumentError(std::string(call) + ": seq_lens is empty; give at least one sequence");
  Batch batch;
  batch.cu_seqlens.reserve(seq_lens.size() + 1);
  batch.cu_seqlens.push_back(0);
  for (std::size_t i = 0; i < seq_lens.size(); ++i) {
    const std::int64_t len = seq_lens[i];
    if (len <= 0) {
      throw InvalidArgumentError(std::string(call) + ": seq_lens[" + std::to_string(i) + "] is " + std::to_string(len) +
                                 "; every sequence needs at least one token (seq_lens " + lens_str(seq_lens) + ")");
    }
    if (len > max_tokens_ - batch.tokens) {
      std::int64_t total = 0;
      for (std::int64_t l : seq_lens) total += std::max<std::int64_t>(l, 0);
      throw InvalidArgumentError(std::string(call) + ": seq_lens " + lens_str(seq_lens) + " add up to " +
                                 std::to_string(total) + " tokens, more than this block's max_tokens " +
                                 std::to_string(max_tokens_) + "; split the batch or make the block with a larger max_tokens");
    }
    batch.tokens += len;
    batch.max_seqlen = std::max(batch.max_seqlen, static_cast<int>(len));
    batch.cu_seqlens.push_back(static_cast<std::int32_t>(batch.tokens));
  }
  return batch;
}

void Fp32Block::check_activation(const Buffer& b, std::int64_t tokens, const char* name) const {
  check_device(b, device_, name);
  check_dtype(b, DType::Float32, name);
  if (b.ndim() != 2 || b.shape()[1] != config_.hidden_size) {
    throw ShapeError(std::string(name) + " must have shape [tokens, " + std::to_string(config_.hidden_size) +
                     "] (hidden_size " + std::to_string(config_.hidden_size) + "), got " + b.describe());
  }
  if (b.shape()[0] != tokens) {
    throw ShapeError(std::string(name) + " must have shape [" + std::to_string(tokens) + ", " +
                     std::to_string(config_.hidden_size) + "] like x, got " + b.describe());
  }
}

void Fp32Block::check_input(const Buffer& x, const Batch& batch, const std::vector<std::int64_t>& seq_lens) const {
  check_activation(x, x.ndim() == 2 ? x.shape()[0] : -1, "x");
  if (x.shape()[0] != batch.tokens) {
    throw InvalidArgumentError("seq_lens " + lens_str(seq_lens) + " add up to " + std::to_string(batch.tokens) +
                               " tokens but x has " + std::to_string(x.shape()[0]) + " rows (" + x.describe() +
                               "); seq_lens must add up to the rows of x");
  }
}

// ---- forward ----------------------------------------------------------------------------------

void Fp32Block::forward(const Buffer& x, Buffer& out, const std::vector<std::int64_t>& seq_lens, const Stream& stream) {
  if (stream.device() != device_) {
    throw DeviceError("forward of a block on " + device_.str() + " with a stream of " + stream.device().str());
  }
  const Batch batch = check_batch(seq_lens, "forward");
  check_input(x, batch, seq_lens);
  check_activation(out, batch.tokens, "out");
  if (overlaps(x, out)) throw InvalidArgumentError("forward: out must not overlap x (the backward needs x)");

  std::lock_guard<std::mutex> lock(mutex_);
  forward_seq_lens_.clear();
  DeviceGuard guard(device_);
  const Backend& be = backend_for(device_);
  const TransformerConfig& c = config_;
  const ParamLayout& pl = *layout_;
  const std::int64_t T = batch.tokens, H = c.hidden_size, d = c.head_dim, I = c.intermediate_size;
  const int nq = static_cast<int>(c.num_attention_heads), nkv = static_cast<int>(c.num_key_value_heads);
  const std::int64_t q = nq * d, kv = nkv * d;
  const float eps = static_cast<float>(c.rms_norm_eps), theta = static_cast<float>(c.rope_theta);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const Precision prec = precision_;

  // Positions (restarting per sequence) then cu_seqlens, in one upload.
  std::vector<std::int32_t> idx(static_cast<std::size_t>(T) + batch.cu_seqlens.size());
  for (std::size_t s = 0; s + 1 < batch.cu_seqlens.size(); ++s) {
    for (std::int32_t t = batch.cu_seqlens[s]; t < batch.cu_seqlens[s + 1]; ++t) idx[t] = t - batch.cu_seqlens[s];
  }
  std::copy(batch.cu_seqlens.begin(), batch.cu_seqlens.end(), idx.begin() + T);
  indices_.view(0, {static_cast<std::int64_t>(idx.size())}).copy_from_host(idx.data(), stream);
  const std::int32_t* positions = indices_.data_as<std::int32_t>();
  const std::int32_t* cu = positions + T;
  const int n_seqs = static_cast<int>(seq_lens.size());

  const float* W = params_.data_as<float>();
  const float* wq = W + pl.wqkv;
  const float* wk = wq + q * H;
  const float* wv = wk + kv * H;
  const SavedLayout sl(c, max_tokens_);
  const ScratchLayout sc(c, max_tokens_, attn_ws_floats_);
  float* S = saved_.data_as<float>();
  float* X = scratch_.data_as<float>();
  const float* xin = x.data_as<float>();
  float* y = out.data_as<float>();
  // bf16 mode: weight copies (refreshed by optimizer_step) and operand scratch; nullptr otherwise.
  const Products mm{be, prec, stream};
  const bool bf = mm.bf16();
  const std::uint16_t* W16 = bf ? params_bf16_.data_as<std::uint16_t>() : nullptr;
  std::uint16_t* B16 = bf ? scratch_bf16_.data_as<std::uint16_t>() : nullptr;
  const Bf16ScratchLayout bl(c, max_tokens_);
  auto w16 = [&](std::int64_t offset) { return bf ? W16 + offset : nullptr; };
  auto s16 = [&](std::int64_t offset) { return bf ? B16 + offset : nullptr; };
  const std::uint16_t* wq16 = w16(pl.wqkv);
  const std::uint16_t* wk16 = w16(pl.wqkv + q * H);
  const std::uint16_t* wv16 = w16(pl.wqkv + (q + kv) * H);

  float* h = X + sc.sh;
  std::uint16_t* h16 = s16(bl.a);
  mm.rmsnorm(xin, W + pl.ln_in, h, h16, S + sl.rstd1, T, H, eps);
  mm.gemm(false, true, T, q, H, h, h16, wq, wq16, 0.0f, S + sl.q_raw);
  mm.gemm(false, true, T, kv, H, h, h16, wk, wk16, 0.0f, S + sl.k_raw);
  mm.gemm(false, true, T, kv, H, h, h16, wv, wv16, 0.0f, S + sl.v);
  if (pl.bqkv >= 0) {
    be.add_bias(S + sl.q_raw, W + pl.bqkv, T, q, stream);
    be.add_bias(S + sl.k_raw, W + pl.bqkv + q, T, kv, stream);
    be.add_bias(S + sl.v, W + pl.bqkv + q + kv, T, kv, stream);
  }
  const bool qkn = c.qk_norm;
  be.qk_norm_rope_forward(S + sl.q_raw, qkn ? W + pl.q_norm : nullptr, X + sc.q_rot, qkn ? S + sl.rstd_q : nullptr,
                          positions, T, nq, static_cast<int>(d), eps, theta, stream);
  be.qk_norm_rope_forward(S + sl.k_raw, qkn ? W + pl.k_norm : nullptr, X + sc.k_rot, qkn ? S + sl.rstd_k : nullptr,
                          positions, T, nkv, static_cast<int>(d), eps, theta, stream);
  be.attention_forward(X + sc.q_rot, X + sc.k_rot, S + sl.v, S + sl.att, S + sl.lse, cu, n_seqs, batch.max_seqlen, T,
                       nq, nkv, static_cast<int>(d), scale, precision_, stream);
  float* r = S + sl.r;
  std::uint16_t* att16 = s16(bl.a);  // h16 is dead once the q/k/v products are queued
  mm.convert(S + sl.att, att16, T * q);
  mm.gemm(false, true, T, H, q, S + sl.att, att16, W + pl.wo, w16(pl.wo), 0.0f, r);
  if (pl.bo >= 0) be.add_bias(r, W + pl.bo, T, H, stream);
  be.add(xin, r, r, T * H, stream);
  float* g = X + sc.sh;
  std::uint16_t* g16 = s16(bl.a);
  mm.rmsnorm(r, W + pl.ln_post, g, g16, S + sl.rstd2, T, H, eps);
  mm.gemm(false, true, T, 2 * I, H, g, g16, W + pl.w_gate_up, w16(pl.w_gate_up), 0.0f, S + sl.gate_up);
  float* act = X + sc.act;
  std::uint16_t* act16 = s16(bl.b);
  if (bf) {
    be.swiglu_forward_bf16(S + sl.gate_up, act16, T, I, stream);
  } else {
    be.swiglu_forward(S + sl.gate_up, act, T, I, stream);
  }
  mm.gemm(false, true, T, H, I, act, act16, W + pl.w_down, w16(pl.w_down), 0.0f, y);
  be.add(r, y, y, T * H, stream);
  forward_seq_lens_ = seq_lens;
  set_last_stream(stream);
}

// ---- backward ---------------------------------------------------------------------------------

void Fp32Block::backward(const Buffer& x, const Buffer& grad_out, Buffer& grad_in,
                         const std::vector<std::int64_t>& seq_lens, const Stream& stream, CudaGradWorkspace& grad_ws) {
  if (stream.device() != device_) {
    throw DeviceError("backward of a block on " + device_.str() + " with a stream of " + stream.device().str());
  }
  const Batch batch = check_batch(seq_lens, "backward");
  check_input(x, batch, seq_lens);
  check_activation(grad_out, batch.tokens, "grad_out");
  check_activation(grad_in, batch.tokens, "grad_in");
  if (grad_ws.device() != device_) {
    throw DeviceError("grad_ws is on " + grad_ws.device().str() + " but the block is on " + device_.str());
  }
  if (!(grad_ws.layout() == *layout_)) {
    throw InvalidArgumentError("grad_ws (" + grad_ws.layout().describe() + ") was made for another layer shape than this block's " +
                               config_.describe() + " (" + layout_->describe() + "); make one with CudaGradWorkspace(block)");
  }
  if (overlaps(grad_in, x)) throw InvalidArgumentError("backward: grad_in must not overlap x");
  const bool in_place = grad_in.data() == grad_out.data();
  if (!in_place && overlaps(grad_in, grad_out)) {
    throw InvalidArgumentError("backward: grad_in must be grad_out itself or not overlap it");
  }
  if (overlaps(grad_in, grad_ws.flat()) || overlaps(grad_out, grad_ws.flat())) {
    throw InvalidArgumentError("backward: grad_in and grad_out must not overlap grad_ws");
  }

  std::lock_guard<std::mutex> lock(mutex_);
  if (forward_seq_lens_.empty()) {
    throw InvalidArgumentError("backward needs a forward first: call forward(x, out, seq_lens) with the same x and seq_lens, then backward");
  }
  if (forward_seq_lens_ != seq_lens) {
    throw InvalidArgumentError("backward seq_lens " + lens_str(seq_lens) + " differ from those of the latest forward " +
                               lens_str(forward_seq_lens_) + "; run forward on this batch first");
  }

  DeviceGuard guard(device_);
  const Backend& be = backend_for(device_);
  const TransformerConfig& c = config_;
  const ParamLayout& pl = *layout_;
  const std::int64_t T = batch.tokens, H = c.hidden_size, d = c.head_dim, I = c.intermediate_size;
  const int nq = static_cast<int>(c.num_attention_heads), nkv = static_cast<int>(c.num_key_value_heads);
  const std::int64_t q = nq * d, kv = nkv * d;
  const float eps = static_cast<float>(c.rms_norm_eps), theta = static_cast<float>(c.rope_theta);
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
  const SavedLayout sl(c, max_tokens_);
  const ScratchLayout sc(c, max_tokens_, attn_ws_floats_);
  float* S = saved_.data_as<float>();
  float* X = scratch_.data_as<float>();
  const float* xin = x.data_as<float>();
  const float* dy = grad_out.data_as<float>();
  float* dx = grad_in.data_as<float>();
  const float* r = S + sl.r;
  // bf16 mode: weight copies and operand scratch (see forward); nullptr otherwise.
  const Products mm{be, prec, stream};
  const bool bf = mm.bf16();
  const std::uint16_t* W16 = bf ? params_bf16_.data_as<std::uint16_t>() : nullptr;
  std::uint16_t* B16 = bf ? scratch_bf16_.data_as<std::uint16_t>() : nullptr;
  const Bf16ScratchLayout bl(c, max_tokens_);
  auto w16 = [&](std::int64_t offset) { return bf ? W16 + offset : nullptr; };
  auto s16 = [&](std::int64_t offset) { return bf ? B16 + offset : nullptr; };

  // MLP: out = r + swiglu(g Wgu^T) Wdown^T.
  float* g = X + sc.sh;
  std::uint16_t* g16 = s16(bl.a);
  mm.rmsnorm(r, W + pl.ln_post, g, g16, nullptr, T, H, eps);
  float* act = X + sc.act;
  std::uint16_t* act16 = s16(bl.b);
  if (bf) {
    be.swiglu_forward_bf16(S + sl.gate_up, act16, T, I, stream);
  } else {
    be.swiglu_forward(S + sl.gate_up, act, T, I, stream);
  }
  std::uint16_t* dy16 = s16(bl.c);
  mm.convert(dy, dy16, T * H);
  mm.gemm(true, false, H, I, T, dy, dy16, act, act16, 1.0f, G + pl.w_down);                 // dWdown += dy^T act
  float* d_act = act;
  mm.gemm(false, false, T, I, H, dy, dy16, W + pl.w_down, w16(pl.w_down), 0.0f, d_act);  // d_act = dy Wdown
  float* d_gu = X + sc.d_gate_up;
  std::uint16_t* d_gu16 = s16(bl.b);  // act16 is dead once dWdown is queued
  if (bf) {
    be.swiglu_backward_bf16(d_act, S + sl.gate_up, d_gu16, T, I, stream);
  } else {
    be.swiglu_backward(d_act, S + sl.gate_up, d_gu, T, I, stream);
  }
  mm.gemm(true, false, 2 * I, H, T, d_gu, d_gu16, g, g16, 1.0f, G + pl.w_gate_up);  // dWgu += d_gu^T g
  float* dg = X + sc.sh;
  mm.gemm(false, false, T, H, 2 * I, d_gu, d_gu16, W + pl.w_gate_up, w16(pl.w_gate_up), 0.0f, dg);  // dg = d_gu Wgu
  // dr = dy + rmsnorm_backward(dg): grad_in carries dr from here on.
  if (!in_place) grad_in.copy_from(grad_out, stream);
  be.rmsnorm_backward(dg, r, W + pl.ln_post, S + sl.rstd2, dx, G + pl.ln_post, T, H, true, stream);

  // Attention: r = x + att Wo^T (+ bo).
  if (pl.bo >= 0) be.bias_backward(dx, G + pl.bo, T, H, stream);
  std::uint16_t* dr16 = s16(bl.c);  // dy16 is dead
  mm.convert(dx, dr16, T * H);
  std::uint16_t* att16 = s16(bl.a);  // g16 is dead
  mm.convert(S + sl.att, att16, T * q);
  mm.gemm(true, false, H, q, T, dx, dr16, S + sl.att, att16, 1.0f, G + pl.wo);       // dWo += dr^T att
  float* d_att = X + sc.d_att;
  mm.gemm(false, false, T, q, H, dx, dr16, W + pl.wo, w16(pl.wo), 0.0f, d_att);  // d_att = dr Wo
  const bool qkn = c.qk_norm;
  float* q_rot = X + sc.q_rot;
  float* k_rot = X + sc.k_rot;
  // Recompute the rotated q and k (their rstd values are rewritten with the same numbers).
  be.qk_norm_rope_forward(S + sl.q_raw, qkn ? W + pl.q_norm : nullptr, q_rot,
                          qkn ? S + sl.rstd_q : nullptr, positions, T, nq, static_cast<int>(d), eps,
                          theta, stream);
  be.qk_norm_rope_forward(S + sl.k_raw, qkn ? W + pl.k_norm : nullptr, k_rot,
                          qkn ? S + sl.rstd_k : nullptr, positions, T, nkv, static_cast<int>(d), eps,
                          theta, stream);
  float* dq_rot = X + sc.dq_rot;
  float* dk_rot = X + sc.dk_rot;
  float* dv = X + sc.dv;
  be.attention_backward(q_rot, k_rot, S + sl.v, S + sl.att, d_att, S + sl.lse, dq_rot, dk_rot, dv, X + sc.attn_ws, cu,
                        n_seqs, batch.max_seqlen, T, nq, nkv, static_cast<int>(d), scale, precision_, stream);
  float* dq = d_att;  // d_att and q_rot are dead after the attention backward
  float* dk = q_rot;
  be.qk_norm_rope_backward(dq_rot, S + sl.q_raw, qkn ? W + pl.q_norm : nullptr, qkn ? S + sl.rstd_q : nullptr, dq,
                           qkn ? G + pl.q_norm : nullptr, positions, T, nq, static_cast<int>(d), theta, stream);
  be.qk_norm_rope_backward(dk_rot, S + sl.k_raw, qkn ? W + pl.k_norm : nullptr, qkn ? S + sl.rstd_k : nullptr, dk,
                           qkn ? G + pl.k_norm : nullptr, positions, T, nkv, static_cast<int>(d), theta, stream);
  if (pl.bqkv >= 0) {
    be.bias_backward(dq, G + pl.bqkv, T, q, stream);
    be.bias_backward(dk, G + pl.bqkv + q, T, kv, stream);
    be.bias_backward(dv, G + pl.bqkv + q + kv, T, kv, stream);
  }
  std::uint16_t* dq16 = s16(bl.b);
  std::uint16_t* dk16 = s16(bl.dk);
  std::uint16_t* dv16 = s16(bl.dv);
  mm.convert(dq, dq16, T * q);
  mm.convert(dk, dk16, T * kv);
  mm.convert(dv, dv16, T * kv);
  float* h = X + sc.sh;
  std::uint16_t* h16 = s16(bl.a);  // att16 is dead
  mm.rmsnorm(xin, W + pl.ln_in, h, h16, nullptr, T, H, eps);
  mm.gemm(true, false, q, H, T, dq, dq16, h, h16, 1.0f, gwq);
  mm.gemm(true, false, kv, H, T, dk, dk16, h, h16, 1.0f, gwk);
  mm.gemm(true, false, kv, H, T, dv, dv16, h, h16, 1.0f, gwv);
  float* dh = h;  // h is dead once the weight gradients are queued
  const std::uint16_t* wq16 = w16(pl.wqkv);
  const std::uint16_t* wk16 = w16(pl.wqkv + q * H);
  const std::uint16_t* wv16 = w16(pl.wqkv + (q + kv) * H);
  mm.gemm(false, false, T, H, q, dq, dq16, wq, wq16, 0.0f, dh);
  mm.gemm(false, false, T, H, kv, dk, dk16, wk, wk16, 1.0f, dh);
  mm.gemm(false, false, T, H, kv, dv, dv16, wv, wv16, 1.0f, dh);
  be.rmsnorm_backward(dh, xin, W + pl.ln_in, S + sl.rstd1, dx, G + pl.ln_in, T, H, true, stream);
  grad_ws.set_last_stream(stream);
  set_last_stream(stream);
}

}  // namespace cudablocks
