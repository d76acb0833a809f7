#include "cudablocks/config.hpp"

#include <cmath>

#include "cudablocks/errors.hpp"

namespace cudablocks {

void TransformerConfig::validate() const {
  if (model_type != "qwen3" && model_type != "qwen2" && model_type != "llama") {
    throw UnsupportedOperationError("model_type '" + model_type +
                                    "' is not supported: cudablocks implements qwen3, qwen2 and llama decoder layers");
  }
  auto positive = [](std::int64_t value, const char* name) {
    if (value <= 0) throw InvalidArgumentError(std::string(name) + " must be positive, got " + std::to_string(value));
  };
  positive(hidden_size, "hidden_size");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  positive(intermediate_size, "intermediate_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(vocab_size, "vocab_size");
  positive(max_position_embeddings, "max_position_embeddings");
  if (num_attention_heads % num_key_value_heads != 0) {
    throw InvalidArgumentError("num_attention_heads (" + std::to_string(num_attention_heads) +
                               ") must be a multiple of num_key_value_heads (" + std::to_string(num_key_value_heads) + ")");
  }
  if (head_dim % 2 != 0) {
    throw InvalidArgumentError("head_dim must be even for rotary embeddings, got " + std::to_string(head_dim));
  }
  const std::int64_t int_limit = 1 << 30;
  if (num_attention_heads > int_limit || head_dim > int_limit || hidden_size > int_limit ||
      intermediate_size > int_limit) {
    throw InvalidArgumentError("sizes must be below 2^30: " + describe());
  }
  if (!(rms_norm_eps >= 0.0) || !std::isfinite(rms_norm_eps)) {
    throw InvalidArgumentError("rms_norm_eps must be finite and >= 0, got " + std::to_string(rms_norm_eps));
  }
  if (!(rope_theta > 0.0) || !std::isfinite(rope_theta)) {
    throw InvalidArgumentError("rope_theta must be finite and positive, got " + std::to_string(rope_theta));
  }
}

std::string TransformerConfig::describe() const {
  return model_type + "(hidden " + std::to_string(hidden_size) + ", heads " + std::to_string(num_attention_heads) +
         "/" + std::to_string(num_key_value_heads) + " x " + std::to_string(head_dim) + ", intermediate " +
         std::to_string(intermediate_size) + (attention_bias ? ", qkv bias" : "") + (o_proj_bias ? ", o bias" : "") +
         (qk_norm ? ", qk_norm" : "") + ")";
}

}  // namespace cudablocks
