#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

namespace {

constexpr std::int64_t kAlign = 64;  // floats (256 bytes) between fused segments

std::int64_t align_up(std::int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

ParamLayout::ParamLayout(const TransformerConfig& c) {
  c.validate();
  const std::int64_t H = c.hidden_size, d = c.head_dim, q = c.num_attention_heads * d,
                     kv = c.num_key_value_heads * d, I = c.intermediate_size;
  std::int64_t at = 0;
  // A fused segment of consecutive HF tensors; returns its offset.
  auto segment = [&](std::initializer_list<std::pair<const char*, Shape>> parts, bool is_matrix) {
    at = align_up(at);
    const std::int64_t start = at;
    for (const auto& [name, shape] : parts) {
      entries_.push_back(ParamEntry{name, at, shape, is_matrix});
      at += shape_numel(shape);
    }
    return start;
  };
  wqkv = segment({{"self_attn.q_proj.weight", {q, H}},
                  {"self_attn.k_proj.weight", {kv, H}},
                  {"self_attn.v_proj.weight", {kv, H}}}, true);
  if (c.attention_bias) {
    bqkv = segment({{"self_attn.q_proj.bias", {q}}, {"self_attn.k_proj.bias", {kv}}, {"self_attn.v_proj.bias", {kv}}},
                   false);
  }
  wo = segment({{"self_attn.o_proj.weight", {H, q}}}, true);
  if (c.o_proj_bias) bo = segment({{"self_attn.o_proj.bias", {H}}}, false);
  if (c.qk_norm) {
    q_norm = segment({{"self_attn.q_norm.weight", {d}}}, false);
    k_norm = segment({{"self_attn.k_norm.weight", {d}}}, false);
  }
  w_gate_up = segment({{"mlp.gate_proj.weight", {I, H}}, {"mlp.up_proj.weight", {I, H}}}, true);
  w_down = segment({{"mlp.down_proj.weight", {H, I}}}, true);
  ln_in = segment({{"input_layernorm.weight", {H}}}, false);
  ln_post = segment({{"post_attention_layernorm.weight", {H}}}, false);
  total_ = align_up(at);
}

ParamLayout::ParamLayout(std::vector<ParamEntry> entries, std::int64_t total_floats)
    : entries_(std::move(entries)), total_(total_floats) {}

const ParamEntry* ParamLayout::find(const std::string& name) const {
  for (const ParamEntry& e : entries_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

bool ParamLayout::operator==(const ParamLayout& other) const {
  if (total_ != other.total_ || entries_.size() != other.entries_.size()) return false;
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    const ParamEntry &a = entries_[i], &b = other.entries_[i];
    if (a.name != b.name || a.offset != b.offset || a.shape != b.shape) return false;
  }
  return true;
}

std::string ParamLayout::describe() const {
  return std::to_string(entries_.size()) + " tensors, " + std::to_string(total_) + " floats";
}

}  // namespace cudablocks
