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

  std::vector<float> host(static_cast<std::size_t>(layout->total_floats()), 0.0f);
  for (const ParamEntry& e : layout->entries()) {
    std::memcpy(host.data() + e.offset, weights.at(e.name).data, static_cast<std::size_t>(e.numel()) * sizeof(float));
  }
  Stream stream = Stream::wrap(device, 0);
  block->params_.copy_from_host(host.data(), stream);
  stream.synchronize();  // later work may come on any stream
  return block;
}

std::int64_t Fp32Block::saved_bytes_per_token() const {
  return SavedLayout::floats_per_token(config_) * static_cast<std::int64_t>(sizeof(float));
}

std::int64_t Fp32Block::scratch_bytes_per_token() const {
  const std::int64_t ws_per_token = (attn_ws_floats_ + max_tokens_ - 1) / max_tokens_;
  return (ScratchLayout::floats_per_token(config_) + ws_per_token) * static_cast<std::int64_t>(sizeof(float));
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

  float* h = X + sc.sh;
  be.rmsnorm_forward(xin, W + pl.ln_in, h, S + sl.rstd1, T, H, eps, stream);
  be.gemm(false, true, T, q, H, 1.0f, h, wq, 0.0f, S + sl.q_raw, prec, stream);
  be.gemm(false, true, T, kv, H, 1.0f, h, wk, 0.0f, S + sl.k_raw, prec, stream);
  be.gemm(false, true, T, kv, H, 1.0f, h, wv, 0.0f, S + sl.v, prec, stream);
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
                       nq, nkv, static_cast<int>(d), scale, stream);
  float* r = S + sl.r;
  be.gemm(false, true, T, H, q, 1.0f, S + sl.att, W + pl.wo, 0.0f, r, prec, stream);
  if (pl.bo >= 0) be.add_bias(r, W + pl.bo, T, H, stream);
  be.add(xin, r, r, T * H, stream);
  float* g = X + sc.sh;
  be.rmsnorm_forward(r, W + pl.ln_post, g, S + sl.rstd2, T, H, eps, stream);
  be.gemm(false, true, T, 2 * I, H, 1.0f, g, W + pl.w_gate_up, 0.0f, S + sl.gate_up, prec, stream);
  float* act = X + sc.act;
  be.swiglu_forward(S + sl.gate_up, act, T, I, stream);
  be.gemm(false, true, T, H, I, 1.0f, act, W + pl.w_down, 0.0f, y, prec, stream);
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

  // MLP: out = r + swiglu(g Wgu^T) Wdown^T.
  float* g = X + sc.sh;
  be.rmsnorm_forward(r, W + pl.ln_post, g, nullptr, T, H, eps, stream);
  float* act = X + sc.act;
  be.swiglu_forward(S + sl.gate_up, act, T, I, stream);
  be.gemm(true, false, H, I, T, 1.0f, dy, act, 1.0f, G + pl.w_down, prec, stream);       // dWdown += dy^T act
  float* d_act = act;
  be.gemm(false, false, T, I, H, 1.0f, dy, W + pl.w_down, 0.0f, d_act, prec, stream);   // d_act = dy Wdown
  float* d_gu = X + sc.d_gate_up;
  be.swiglu_backward(d_act, S + sl.gate_up, d_gu, T, I, stream);
  be.gemm(true, false, 2 * I, H, T, 1.0f, d_gu, g, 1.0f, G + pl.w_gate_up, prec, stream);  // dWgu += d_gu^T g
  float* dg = X + sc.sh;
  be.gemm(false, false, T, H, 2 * I, 1.0f, d_gu, W + pl.w_gate_up, 0.0f, dg, prec, stream);  // dg = d_gu Wgu
  // dr = dy + rmsnorm_backward(dg): grad_in carries dr from here on.
  if (!in_place) grad_in.copy_from(grad_out, stream);
  be.rmsnorm_backward(dg, r, W + pl.ln_post, S + sl.rstd2, dx, G + pl.ln_post, T, H, true, stream);

  // Attention: r = x + att Wo^T (+ bo).
  if (pl.bo >= 0) be.bias_backward(dx, G + pl.bo, T, H, stream);
  be.gemm(true, false, H, q, T, 1.0f, dx, S + sl.att, 1.0f, G + pl.wo, prec, stream);  // dWo += dr^T att
  float* d_att = X + sc.d_att;
  be.gemm(false, false, T, q, H, 1.0f, dx, W + pl.wo, 0.0f, d_att, prec, stream);       // d_att = dr Wo
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
                        n_seqs, batch.max_seqlen, T, nq, nkv, static_cast<int>(d), scale, stream);
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
  float* h = X + sc.sh;
  be.rmsnorm_forward(xin, W + pl.ln_in, h, nullptr, T, H, eps, stream);
  be.gemm(true, false, q, H, T, 1.0f, dq, h, 1.0f, gwq, prec, stream);
  be.gemm(true, false, kv, H, T, 1.0f, dk, h, 1.0f, gwk, prec, stream);
  be.gemm(true, false, kv, H, T, 1.0f, dv, h, 1.0f, gwv, prec, stream);
  float* dh = h;  // h is dead once the weight gradients are queued
  be.gemm(false, false, T, H, q, 1.0f, dq, wq, 0.0f, dh, prec, stream);
  be.gemm(false, false, T, H, kv, 1.0f, dk, wk, 1.0f, dh, prec, stream);
  be.gemm(false, false, T, H, kv, 1.0f, dv, wv, 1.0f, dh, prec, stream);
  be.rmsnorm_backward(dh, xin, W + pl.ln_in, S + sl.rstd1, dx, G + pl.ln_in, T, H, true, stream);
  grad_ws.set_last_stream(stream);
  set_last_stream(stream);
}

}  // namespace cudablocks
