// The shape of a decoder transformer, as a block needs it.
//
// Filled from a Hugging Face config.json by python/cudablocks/config.py
// (TransformerConfig.from_pretrained / from_dict), which maps each model type's spelling onto
// these fields; C++ code can also fill it directly and call validate().
#pragma once

#include <cstdint>
#include <string>

namespace cudablocks {

struct TransformerConfig {
  std::string model_type = "qwen3";      // "qwen3", "qwen2" or "llama"
  std::int64_t hidden_size = 0;          // H
  std::int64_t num_attention_heads = 0;  // n_q
  std::int64_t num_key_value_heads = 0;  // n_kv (divides n_q)
  std::int64_t head_dim = 0;             // d (even); taken from the config when given, never derived then
  std::int64_t intermediate_size = 0;    // I
  std::int64_t num_hidden_layers = 0;
  std::int64_t vocab_size = 0;
  std::int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;           // default (unscaled) rotary embedding only
  bool attention_bias = false;           // q_proj, k_proj, v_proj have biases (Qwen2: always)
  bool o_proj_bias = false;              // o_proj has a bias (Qwen3/Llama with attention_bias)
  bool qk_norm = false;                  // per-head RMSNorm of q and k before RoPE (Qwen3)
  bool tie_word_embeddings = false;

  // Throws InvalidArgumentError for non-positive sizes, heads that do not divide, an odd
  // head_dim, a negative eps or a non-positive theta; UnsupportedOperationError for a model_type
  // other than qwen3, qwen2 and llama.
  void validate() const;

  // "qwen3(hidden 2560, heads 32/8 x 128, intermediate 9728, ...)"
  std::string describe() const;
};

}  // namespace cudablocks
