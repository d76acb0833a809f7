#include "cudablocks/config.hpp"

#include <cmath>
#include <vector>

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
  if (rope_type == "llama3") {
    if (!(rope_factor >= 1.0) || !std::isfinite(rope_factor)) {
      throw InvalidArgumentError("llama3 RoPE scaling: factor must be finite and >= 1, got " +
                                 std::to_string(rope_factor));
    }
    if (!(rope_low_freq_factor > 0.0) || !(rope_high_freq_factor > rope_low_freq_factor) ||
        !std::isfinite(rope_high_freq_factor)) {
      throw InvalidArgumentError("llama3 RoPE scaling: needs 0 < low_freq_factor < high_freq_factor (finite), got " +
                                 std::to_string(rope_low_freq_factor) + " and " +
                                 std::to_string(rope_high_freq_factor));
    }
    if (rope_original_max_position_embeddings <= 0) {
      throw InvalidArgumentError("llama3 RoPE scaling: original_max_position_embeddings must be positive, got " +
                                 std::to_string(rope_original_max_position_embeddings));
    }
  } else if (rope_type != "default") {
    throw UnsupportedOperationError("rope_type '" + rope_type + "' is not supported: cudablocks implements the " +
                                    "default and llama3 rotary embeddings");
  }
}

// Every step rounds to fp32 as torch does (a Python number meeting an fp32 tensor becomes an fp32
// operand), so the result matches transformers bit for bit; keep the expressions unfused (no FMA
// contraction, which x86-64 builds without -march do not do anyway).
std::vector<float> TransformerConfig::rope_inv_freq() const {
  validate();
  const int half = static_cast<int>(head_dim / 2);
  std::vector<float> inv_freq(static_cast<std::size_t>(half));
  // Default RoPE: 1 / (theta ** (arange(0, d, 2).float() / d)). The power is taken in double and
  // rounded once (correctly rounded; torch's vectorised powf is off by one ulp for a few (theta, d)).
  const float theta = static_cast<float>(rope_theta);
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    const float power = static_cast<float>(std::pow(static_cast<double>(theta), static_cast<double>(exponent)));
    inv_freq[i] = 1.0f / power;
  }
  if (rope_type != "llama3") return inv_freq;

  // llama3 (transformers' _compute_llama3_parameters): with wavelen = 2 pi / f, frequencies whose
  // wavelength exceeds original / low_freq_factor are divided by factor, those below
  // original / high_freq_factor are kept, and the band between blends the two:
  //   s = (original / wavelen - low) / (high - low),  f' = (1 - s) * f / factor + s * f.
  const float factor = static_cast<float>(rope_factor);
  const float low = static_cast<float>(rope_low_freq_factor);
  const double original = static_cast<double>(rope_original_max_position_embeddings);
  const float low_freq_wavelen = static_cast<float>(original / rope_low_freq_factor);    // Python floats, then fp32
  const float high_freq_wavelen = static_cast<float>(original / rope_high_freq_factor);
  const float band = static_cast<float>(rope_high_freq_factor - rope_low_freq_factor);
  const float two_pi = static_cast<float>(2.0 * 3.14159265358979323846);
  for (float& f : inv_freq) {
    const float wavelen = (1.0f / f) * two_pi;  // torch computes `number / tensor` as reciprocal(tensor) * number
    if (wavelen > low_freq_wavelen) {
      f = f / factor;
    } else if (!(wavelen < high_freq_wavelen)) {
      const float s = ((1.0f / wavelen) * static_cast<float>(original) - low) / band;
      f = (1.0f - s) * f / factor + s * f;
    }
  }
  return inv_freq;
}

std::string TransformerConfig::describe() const {
  return model_type + "(hidden " + std::to_string(hidden_size) + ", heads " + std::to_string(num_attention_heads) +
         "/" + std::to_string(num_key_value_heads) + " x " + std::to_string(head_dim) + ", intermediate " +
         std::to_string(intermediate_size) + (attention_bias ? ", qkv bias" : "") + (o_proj_bias ? ", o bias" : "") +
         (qk_norm ? ", qk_norm" : "") + (rope_type == "llama3" ? ", llama3 rope" : "") + ")";
}

}  // namespace cudablocks
