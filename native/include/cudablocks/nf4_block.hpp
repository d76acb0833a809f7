// The nf4 kind of CudaBlock (DESIGN §3-§5): frozen 4-bit NormalFloat weights in bitsandbytes'
// format, optional LoRA adapters trained through them (QLoRA).
//
// ---- Resident memory (device_bytes) ---------------------------------------------------------------
// Per projection (q, k, v, o, gate, up, down): the packed nibbles [(n + 1) / 2] uint8 and the fp32
// absmax [ceil(n / blocksize)], or with double quantization the uint8 absmax codes, their fp32
// scales [ceil(blocks / 256)] and offset [1] (the 256-value code is shared by the block). One fp32
// allocation for the norm weights and biases; one fp32 allocation for the LoRA adapters. Never a
// float copy of a projection: Qwen3-4B is about 57 MB per layer (52 MB with double quantization).
//
// ---- Forward: the fp32 block's math and op sequence (block.hpp), with each product -------------
//   y = x W^T:  W is dequantized into a transient scratch shared by every nf4 block of the device
//   (process-wide, grow-only: the largest product's weight, gate and up stacked as [2I, H] so that
//   one GEMM writes the swiglu layout; 100 MB bf16 / 200 MB fp32 at Qwen3-4B), then
//     compute "bf16": gemm_bf16 on bf16(x) and the bf16 weight (nf4_dequantize straight to bf16),
//       with the fp32 block's bf16-mode storage (block.hpp, Precision): gate_up, q and k written
//       and saved in bf16. Without LoRA dropout every group gets bf16(x) straight from the RMSNorm
//       or SwiGLU before it (no fp32 copy), and backward_lora recomputes an input only for the
//       adapters, in bf16;
//     compute "fp32"/"tf32": gemm in that precision on the fp32 weight.
//   Few tokens (at most 64, compute "bf16", a device with the fused kernel: an sm_90a build on an
//   H100/H200): the product decodes W inside the GEMM kernel instead (Backend::nf4_gemm_bf16),
//   with the same bf16 values and no scratch; the input-gradient products do so on the largest
//   weights only (see nf4_block.cpp's Impl::fused for the measured crossover).
//   The scratch is reused by the next product, so blocks of one device must not run concurrently
//   on different streams (their work is ordered on one stream in the pipeline).
//   LoRA (PEFT): y += scale * (x A^T) B^T, scale = alpha / r (alpha / sqrt(r) with use_rslora).
//   gate and up, whose outputs are the two column halves of gate_up [T, 2I], take their adapters as
//   one product: x [A_gate; A_up]^T (A_gate and A_up are adjacent in the allocation) times a
//   block-diagonal [2I, 2r] B built per call from B_gate and B_up with exact 0/1 selector GEMMs.
//     compute "bf16" without dropout: bf16 operands as for the frozen products (x and dy as those
//       read them, A and B rounded to bf16 per call, in the device's shared scratch),
//       u = bf16(scale x A^T) and du = bf16(scale dy B) rounded once (PEFT in bf16 rounds them
//       too), fp32 accumulation; the term u B^T (du A in the input gradient) is formed by
//       Backend::add_low_rank: where the result is kept in bf16 without a bias, written there in
//       bf16 first and the frozen product adds itself onto it in its epilogue (PEFT too rounds its
//       LoRA output before the sum); likewise in fp32 for an input gradient not accumulated;
//       otherwise joined to the product's fp32 result in one pass that also adds the bias and
//       rounds once where the result is kept in bf16.
//     otherwise (fp32/tf32 compute, or LoRA dropout): fp32 operands, gemm at the block's precision
//       (tf32 for bf16 compute).
//
// ---- backward_lora ------------------------------------------------------------------------------
// dL/dx through the frozen weights (dequantize again, dX = dY W), both residual paths, the
// attention/norm/RoPE/SwiGLU backward of the fp32 block, and the adapters' gradients ADDED into a
// LoRA gradient workspace (a CudaGradWorkspace of lora_layout(): one contiguous allocation).
// Saved activations are those of the fp32 block, plus with bf16 compute and LoRA each adapted
// product's u = bf16(scale x A^T) (its adapters' total rank of bf16 values per token), which the
// B gradients read. Norm weights stay frozen.
//
// ---- LoRA dropout (PEFT's lora_dropout) ----------------------------------------------------------
// With LoraConfig.dropout = p > 0, a forward given a dropout_step computes each adapted projection
// as y = x W^T + scale * (dropout(x) A^T) B^T: the adapter sees its input with a mask of its own
// (q, k and v share x but not their masks; so do gate and up, whose adapter products then run per
// projection and meet in the [T, 2r] product through the exact 0/1 selectors), kept elements
// multiplied by 1 / (1 - p). The frozen product never sees the mask. The mask of projection j of
// this layer is a pure function of (LoraConfig.seed, layer_idx, j, dropout_step, token row,
// feature): the hash documented in src/core/dropout_hash.hpp (Backend::dropout draws it), so the
// backends agree bit for bit and nothing is stored: backward_lora, given the same dropout_step as
// the latest forward (else InvalidArgumentError), draws the masks again for dA = du^T dropout(x)
// and for the adapters' part of dx, masked in turn. The caller picks a dropout_step per
// micro-batch (the classify trainer: from the optimizer step and the micro-batch's index), so a
// resumed run draws the masks of the original. No dropout_step (inference), or dropout 0, runs the
// products without any mask, exactly as a block without dropout. Dropout needs one more fp32
// scratch of [T, largest adapted in_features] (a part's masked input, then its masked dx term).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cudablocks/block.hpp"

namespace cudablocks {

// The seven projections an nf4 block quantizes, in this order; "q_proj" ... "down_proj" are also
// the LoRA target names.
extern const char* const kNf4Projections[7];        // "q_proj", ..., "down_proj"
extern const char* const kNf4ProjectionPaths[7];    // "self_attn.q_proj", ..., "mlp.down_proj"

struct LoraConfig {
  int rank = 8;
  double alpha = 8.0;
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  bool use_rslora = false;
  double dropout = 0.0;
  std::uint64_t seed = 0;
  // InvalidArgumentError for rank < 1, alpha <= 0 (or not finite), dropout outside [0, 1), an
  // unknown or repeated target, no targets.
  void validate() const;
  double scale() const;  // alpha / rank, or alpha / sqrt(rank)
};

// One projection already in NF4 (e.g. from a bitsandbytes checkpoint), its buffers on the block's
// device. absmax (float32 [blocks]) without double quantization; else qabsmax (uint8 [blocks]),
// absmax2 (float32 [ceil(blocks / 256)]), offset (float32 [1]) and code (float32 [256]).
struct Nf4Weight {
  Shape shape;  // [out, in]
  int blocksize = 64;
  Buffer packed, absmax, qabsmax, absmax2, offset, code;
  bool double_quant() const { return qabsmax.defined() && qabsmax.numel() > 0; }
};
using Nf4WeightMap = std::map<std::string, Nf4Weight>;

class Nf4Block final : public CudaBlock {
 public:
  // `dense`: float tensors by HF name relative to the layer (norm weights, biases, and any
  // projection given in float: quantized on the device, blocksize 64, double-quantized when
  // double_quant). `quantized`: projections already in NF4, by "<path>.weight". Every projection
  // exactly once; names and shapes checked as for the fp32 block. lora: nullptr for none. arena,
  // share_activations: as for the fp32 block (the scratch includes the LoRA products' scratch).
  static std::shared_ptr<Nf4Block> create(const TransformerConfig& config, int layer_idx, const WeightMap& dense,
                                          const Nf4WeightMap& quantized, const Device& device, std::int64_t max_tokens,
                                          const LoraConfig* lora, Precision compute, bool double_quant,
                                          std::shared_ptr<BlockArena> arena = nullptr, bool share_activations = false);

  const char* kind() const override { return "nf4"; }
  void forward(const Buffer& x, Buffer& out, const std::vector<std::int64_t>& seq_lens, const Stream& stream,
               std::optional<std::uint64_t> dropout_step = std::nullopt) override;
  std::int64_t saved_bytes_per_token() const override;
  std::int64_t scratch_bytes_per_token() const override;
  std::int64_t device_bytes() const override;
  std::int64_t activation_bytes() const override;

  bool has_lora() const { return lora_layout_ != nullptr; }
  const LoraConfig& lora_config() const { return lora_; }
  // The projection as stored (buffers on the device).
  const Nf4Weight& weight(int projection) const { return weights_[projection]; }

  void require_lora(const std::string& call) const override;
  std::shared_ptr<const ParamLayout> lora_layout() const override;
  // The backward through the masks of `dropout_step`, which must be the latest forward's when the
  // block has dropout (InvalidArgumentError otherwise).
  void backward_lora(const Buffer& x, const Buffer& grad_out, Buffer& grad_in,
                     const std::vector<std::int64_t>& seq_lens, const Stream& stream, CudaGradWorkspace& lora_ws,
                     std::optional<std::uint64_t> dropout_step = std::nullopt) override;
  std::shared_ptr<CudaGradWorkspace> new_lora_grad_workspace(const Stream& stream) const override;
  std::shared_ptr<GpuBlockOptimizerState> init_lora_optimizer_state(const Stream& stream) const override;
  void lora_optimizer_step(GpuBlockOptimizerState& state, const AdamWHyper& hyper, const Stream& stream,
                           const CudaGradWorkspace& lora_ws, const GradNorm* grad_norm) override;
  void download_lora_weights(float* host, const Stream& stream) const override;
  void upload_lora_weights(const WeightMap& weights, const Stream& stream) override;

  // Use create().
  Nf4Block(const TransformerConfig& config, int layer_idx, const Device& device, std::int64_t max_tokens,
           Precision precision);

  struct Impl;  // the forward/backward machinery (nf4_block.cpp)

 private:
  friend struct Impl;
  Nf4Weight weights_[7];
  Buffer dequant_code_;  // the double-quantization code (float32 [256]) when a float weight was double-quantized
  Buffer dense_;         // norm weights and biases (fp32)
  std::int64_t ln_in_ = -1, ln_post_ = -1, q_norm_ = -1, k_norm_ = -1, bqkv_ = -1, bo_ = -1;
  std::int64_t dequant_bytes_ = 0;  // this block's need in the shared dequantization scratch

  LoraConfig lora_;
  std::shared_ptr<const ParamLayout> lora_layout_;  // nullptr without LoRA
  Buffer lora_params_;   // [lora total] fp32
  Buffer lora_consts_;   // selector matrices for the gate/up adapter product
  bool lora_target_[7] = {false, false, false, false, false, false, false};
  std::int64_t lora_a_[7] = {-1, -1, -1, -1, -1, -1, -1}, lora_b_[7] = {-1, -1, -1, -1, -1, -1, -1};

  // Saved activations (the fp32 block's SavedLayout, then KeptLoraU in nf4_block.cpp), fp32 scratch
  // (Nf4ScratchLayout there) and, with bf16 compute, the bf16 operand of the products: its own or an arena's.
  BlockMemory memory_;
  std::int64_t attn_ws_floats_ = 0;

  std::mutex mutex_;
  std::vector<std::int64_t> forward_seq_lens_;
  std::optional<std::uint64_t> forward_dropout_step_;  // of the latest forward
};

}  // namespace cudablocks
