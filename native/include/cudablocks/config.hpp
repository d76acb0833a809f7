// The shape of a decoder transformer, as a block needs it.
//
// Filled from a Hugging Face config.json by python/cudablocks/config.py
// (TransformerConfig.from_pretrained / from_dict), which maps each model type's spelling onto
// these fields; C++ code can also fill it directly and call validate().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

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
  double rope_theta = 10000.0;
  // RoPE scaling, transformers' rope_type: "default" (none) or "llama3" (Llama 3.1 and later). The
  // four numbers below are llama3's (factor, low_freq_factor, high_freq_factor,
  // original_max_position_embeddings) and are ignored by "default".
  std::string rope_type = "default";
  double rope_factor = 1.0;
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 4.0;
  std::int64_t rope_original_max_position_embeddings = 0;
  bool attention_bias = false;           // q_proj, k_proj, v_proj have biases (Qwen2: always)
  bool o_proj_bias = false;              // o_proj has a bias (Qwen3/Llama with attention_bias)
  bool qk_norm = false;                  // per-head RMSNorm of q and k before RoPE (Qwen3)
  bool tie_word_embeddings = false;

  // Throws InvalidArgumentError for non-positive sizes, heads that do not divide, an odd
  // head_dim, a negative eps, a non-positive theta or llama3 numbers out of range (factor >= 1,
  // 0 < low_freq_factor < high_freq_factor, original_max_position_embeddings > 0);
  // UnsupportedOperationError for a model_type other than qwen3, qwen2 and llama, or a rope_type
  // other than default and llama3.
  void validate() const;

  // The rotary embedding's inverse frequencies [head_dim / 2], in fp32 as transformers computes
  // them: inv_freq[i] = 1 / theta^(2i / head_dim), then (llama3) rescaled per frequency. Pair
  // (i, i + head_dim/2) of a head at position p rotates by the angle fp32(p * inv_freq[i]).
  // Validates first.
  std::vector<float> rope_inv_freq() const;

  // "qwen3(hidden 2560, heads 32/8 x 128, intermediate 9728, ...)"
  std::string describe() const;
};

}  // namespace cudablocks
