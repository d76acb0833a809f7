// Decoder blocks: one transformer layer that lives on a device (DESIGN §3-§4).
//
// CudaBlock is the variant (entrenar's name) that the pipeline holds; Fp32Block is its fp32
// kind: trainable fp32 weights, forward, full backward. Everything here is written against the
// Backend op interface (backend.hpp) and so runs on the CPU reference backend and on CUDA.
// The nf4 kind (frozen NF4 weights, LoRA adapters) is Nf4Block in nf4_block.hpp.
//
// ---- Parameters (ParamLayout) -----------------------------------------------------------------
// All parameters of a block live in ONE contiguous fp32 allocation, and a CudaGradWorkspace has
// exactly the same layout, so an optimizer step is one flat loop and a data-parallel all-reduce is
// one call. Segments, each starting at a multiple of 64 floats (256 bytes; the gaps are zero in
// the weights and in the gradients):
//
//   wqkv       [(n_q + 2 n_kv) d, H]  rows of q_proj, then k_proj, then v_proj (HF [out, in])
//   bqkv       [(n_q + 2 n_kv) d]     q, k, v biases            (attention_bias)
//   wo         [H, n_q d]             o_proj
//   bo         [H]                    o_proj bias               (o_proj_bias)
//   q_norm     [d], k_norm [d]                                  (qk_norm)
//   w_gate_up  [2 I, H]               rows of gate_proj, then up_proj (the swiglu_forward layout)
//   w_down     [H, I]
//   ln_in      [H]                    input_layernorm
//   ln_post    [H]                    post_attention_layernorm
//
// Because fusion concatenates rows, every Hugging Face tensor is one contiguous range of the
// allocation; ParamLayout::entries() lists (HF name, offset, shape, is_matrix) for each.
//
// ---- Forward (DESIGN §4), op calls per forward: 12 + 3 with q/k/v biases + 1 with an o bias ----
//   h = rmsnorm(x) * ln_in                       (rstd1 saved)
//   q_raw, k_raw, v = h Wq^T, h Wk^T, h Wv^T (+ biases)   three GEMMs on the row blocks of wqkv
//   q_rot, k_rot = rope(qk_norm(q_raw)), rope(qk_norm(k_raw))   (rstd_q, rstd_k saved)
//   att = attention(q_rot, k_rot, v)             (lse saved)
//   r = x + att Wo^T (+ bo)                      (x added in the GEMM's epilogue)
//   g = rmsnorm(r) * ln_post                     (rstd2 saved)
//   gate_up = g Wgu^T;  act = silu(gate) * up
//   out = r + act Wdown^T                        (r added in the GEMM's epilogue)
// Each forward also uploads positions [T] (restarting at 0 per sequence) and cu_seqlens [n + 1]
// (int32) in one host-to-device copy into block-owned memory, which the backward reuses.
//
// The backward is 23 op calls in fp32 (+ 4 with biases; grad_out joins grad_in inside the
// post-attention RMSNorm's backward, in place or not), 18 in bf16, which keeps the five
// recomputed operands instead (+ the conversions listed under Precision), all independent of the
// number of sequences. tf32 adds the transposes of its weight gradients' operands (below): two per
// gradient, one for k and v (q's made h^T), and one transpose and one GEMM per further block of
// gate_up's dY^T (Qwen3-4B: 11 transposes, 1 GEMM). q, k and v take three GEMMs
// each way because the ops take dense [T, n*d] operands; the fused wqkv rows would allow one
// GEMM once the ops accept a row stride.
//
// ---- Saved activations (kept from forward to backward), floats per token ---------------------
//   q_raw n_q d, k_raw n_kv d, v n_kv d, att n_q d, r H, gate_up 2 I, lse n_q, rstd_q n_q and
//   rstd_k n_kv (with qk_norm), rstd1 1, rstd2 1. In bf16 mode q_raw, k_raw, v, att and gate_up are
//   bf16 (half the floats), and so is d_att in the scratch (q_rot and k_rot: kept, below):
//   attention reads bf16 q, k, v and dout, and writes att in bf16 (the o projection's operand).
// The products' operands h and g (one RMSNorm each), q_rot and k_rot (one QK-norm+RoPE each) and
// act (one SwiGLU) are recomputed by the backward in fp32 and tf32, where they are fp32 and those
// passes are a small share of the step. bf16 mode keeps them in bf16 as the forward wrote them
// (H + H + I + n_q d + n_kv d values, 2 bytes each): recomputing them cost about 3% of a Qwen3-4B
// block's forward+backward there. x itself is not kept: the caller passes it again.
// saved_bytes_per_token() reports the total; for Qwen3-4B (H 2560, 32/8 heads x 128, I 9728) it
// is 129,320 bytes (about 126 KiB) per token in fp32 and tf32, 109,864 bytes (about 107 KiB) in
// bf16 (69,928 of saved activations + 39,936 of kept operands).
// Transient scratch (dead outside a call) is a second allocation: scratch_bytes_per_token()
// (Qwen3-4B: 126,976 bytes per token + the CUDA attention backward's workspace, 8,320 bytes;
// tf32 adds max(H, I, n_q d) + H floats, 49,152 bytes, for the weight gradients' k-major
// operands: tf32 tensor cores read no other layout, and dW = dY^T X has both operands token-major,
// so the backward transposes them first (Backend::transpose; cuBLAS ran the token-major products
// at about 60% of its k-major rate); the recomputed h, g and act are written transposed by their
// producers).
//
// ---- Precision ----------------------------------------------------------------------------------
// fp32 and tf32 run every product through Backend::gemm on the fp32 buffers. bf16 runs them on
// genuine bf16 operands (Backend::gemm_bf16: bf16 tensor cores, fp32 accumulation; fp32 results
// except where noted below):
//   - weights: a bf16 copy of the flat parameters (same layout, 2 bytes per parameter; Qwen3-4B:
//     100.9M parameters, 202 MB per block), made at creation and rewritten by every
//     optimizer_step inside the AdamW pass (adamw_step's param_bf16: 2 more bytes written per
//     parameter, no extra launch). The fp32 parameters stay the master copy.
//   - activations and incoming gradients that feed products are bf16: h and g from RMSNorm, act
//     from SwiGLU, q_rot and k_rot from QK-norm+RoPE are written in bf16 directly (their bf16
//     outputs; no fp32 copy exists) into the saved memory, kept for the backward (see above), att
//     by attention itself (saved so); d_gate_up by SwiGLU's backward and dq, dk by the QK-norm+RoPE
//     backward when there are no q/k biases into a bf16 scratch; dy, dr, dv (and with biases dq,
//     dk) are rounded into it right before use (Backend::to_bf16: 3 more op calls in the forward
//     with q/k/v biases, 3 in the backward, 5 with biases). Scratch per token: max(2 I, q + 2 kv)
//     + H bf16 values (Qwen3-4B: 22,016 values, 44,032 bytes; counted in scratch_bytes_per_token).
//   - gate_up, q, k (before QK-norm) and v are written by their products in bf16
//     (Backend::gemm_bf16_to_bf16) and saved so, as torch's bf16 layers keep them; a bias (or,
//     in the nf4 block, an adapter's term) is added in fp32 first and the sum rounded. Their
//     readers, SwiGLU and QK-norm + RoPE, widen them and compute in fp32; attention reads them as
//     they are. So are d_att, attention's incoming gradient, and d_act, SwiGLU's (in the nf4 block
//     with an adapter on o or down: rounded after the adapter's term is added).
//   - the other products write fp32: the residual branches and the other gradients (weight
//     gradients accumulate in fp32 into the grad workspace with beta = 1). Norms, QK-norm, RoPE,
//     softmax and SwiGLU compute in fp32; the other saved activations stay fp32.
// On the CPU backend bf16 computes the same thing (the exact products of the bf16 operands, summed
// in fp32), so it is a reference for the CUDA bf16 block up to summation order.
//
// ---- Calls ------------------------------------------------------------------------------------
// forward(x, out, seq_lens, stream): x, out float32 [T, H] on the block's device, T =
//   sum(seq_lens) <= max_tokens, every length >= 1; out must not overlap x. Positions restart at
//   0 for each sequence; attention never crosses a sequence boundary.
// backward(x, grad_out, grad_in, seq_lens, stream, grad_ws): must follow a forward of the same x
//   and seq_lens (the seq_lens are checked; x must hold the same values as in that forward). Writes
//   grad_in = dL/dx (both residual paths) and ADDS every parameter gradient into grad_ws, so
//   zero() it first and call backward repeatedly to accumulate micro-batches. grad_in may be the
//   very buffer grad_out (in-place) but must not otherwise overlap grad_out, nor overlap x.
//   Several backwards after one forward are allowed (each adds its gradients again).
// Every check happens before anything is written; a refused call changes nothing on the device.
// Calls are queued on `stream` (run inline on the CPU). The block's saved activations are shared
// by consecutive calls: order forward and backward on one stream (or synchronise between streams).
// Calls on one block from several host threads are serialised.
//
// ---- Shared activation memory (block_arena.hpp) -------------------------------------------------
// Made with a BlockArena, a block takes its scratch (fp32 and bf16) from the arena instead of
// allocating it, and with share_activations its saved activations too; the blocks sharing an arena
// must then run on one stream. A block whose saved activations are shared must have run the latest
// forward of the arena before its backward (InvalidArgumentError otherwise): a model recomputes
// each layer's forward right before its backward. activation_bytes() counts what the block owns.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cudablocks/backend.hpp"
#include "cudablocks/block_arena.hpp"
#include "cudablocks/buffer.hpp"
#include "cudablocks/config.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/optimizer.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks {

// "fp32", "tf32", "bf16" <-> Precision; InvalidArgumentError for anything else.
Precision precision_from_name(const std::string& name);
std::string precision_name(Precision precision);

// A host fp32 array (row-major, contiguous) handed to a block; the block copies it.
struct HostTensor {
  Shape shape;
  const float* data = nullptr;
};
using WeightMap = std::map<std::string, HostTensor>;

struct ParamEntry {
  std::string name;     // Hugging Face name relative to the layer, e.g. "self_attn.q_proj.weight"
  std::int64_t offset;  // in floats, into the flat parameter (and gradient) allocation
  Shape shape;          // as Hugging Face stores it ([out, in] for matrices)
  bool is_matrix;       // a projection weight (weight decay usually applies) vs a bias or norm weight
  std::int64_t numel() const { return shape_numel(shape); }
};

class ParamLayout {
 public:
  explicit ParamLayout(const TransformerConfig& config);
  // A layout of explicit entries (the LoRA adapters of an nf4 block); fused offsets stay -1.
  ParamLayout(std::vector<ParamEntry> entries, std::int64_t total_floats);

  const std::vector<ParamEntry>& entries() const { return entries_; }
  const ParamEntry* find(const std::string& name) const;  // nullptr when absent
  std::int64_t total_floats() const { return total_; }    // including alignment gaps
  // Same entries at the same offsets (blocks of equal configs share gradient workspaces).
  bool operator==(const ParamLayout& other) const;
  std::string describe() const;  // e.g. "12 tensors, 1.2M floats"

  // Offsets of the fused segments (in floats); -1 for an absent optional segment.
  std::int64_t wqkv = -1, bqkv = -1, wo = -1, bo = -1, q_norm = -1, k_norm = -1;
  std::int64_t w_gate_up = -1, w_down = -1, ln_in = -1, ln_post = -1;

 private:
  std::vector<ParamEntry> entries_;
  std::int64_t total_ = 0;
};

// Parameter gradients of one block layout, in one contiguous fp32 allocation laid out like the
// parameters (ParamLayout). Starts zeroed; backward adds into it. Shareable between blocks of
// the same layout and device (lowest memory: step each block right after its backward).
class CudaGradWorkspace {
 public:
  CudaGradWorkspace(std::shared_ptr<const ParamLayout> layout, const Device& device, const Stream& stream);

  const ParamLayout& layout() const { return *layout_; }
  const std::shared_ptr<const ParamLayout>& layout_ptr() const { return layout_; }
  const Device& device() const { return flat_.device(); }
  const Buffer& flat() const { return flat_; }  // [total_floats]
  // The stream of the latest write (zero or a backward); reads order after it.
  const Stream& last_stream() const { return last_stream_; }
  void set_last_stream(const Stream& stream) { last_stream_ = stream; }

  void zero(const Stream& stream);
  // Copies all total_floats() gradients to host memory (waits for `stream`).
  void download(float* host, const Stream& stream) const;

 private:
  std::shared_ptr<const ParamLayout> layout_;
  Buffer flat_;
  Stream last_stream_;
};

// AdamW moments of one block layout: exp_avg and exp_avg_sq, each one contiguous fp32 allocation
// laid out like the parameters, zeroed when made. To and from the host with the layout's names.
class GpuBlockOptimizerState {
 public:
  GpuBlockOptimizerState(std::shared_ptr<const ParamLayout> layout, const Device& device, const Stream& stream);
  const ParamLayout& layout() const { return *layout_; }
  const Device& device() const { return exp_avg_.device(); }
  Buffer& exp_avg() { return exp_avg_; }
  Buffer& exp_avg_sq() { return exp_avg_sq_; }
  const Buffer& exp_avg() const { return exp_avg_; }
  const Buffer& exp_avg_sq() const { return exp_avg_sq_; }

 private:
  std::shared_ptr<const ParamLayout> layout_;
  Buffer exp_avg_, exp_avg_sq_;
};

// The squared global L2 norm of a set of gradient workspaces (of any blocks, later the head and
// embeddings too), summed on the device into one float that optimizer steps read for clipping.
// Nothing is read back unless asked (value()).
class GradNorm {
 public:
  explicit GradNorm(const Device& device);
  // sum_squares() = the sum of every squared gradient in `workspaces` and in the float32
  // `buffers` (gradients kept outside workspaces: the head's, the embeddings'; each starting on a
  // 16-byte boundary), queued on `stream`.
  void compute(const std::vector<const CudaGradWorkspace*>& workspaces, const Stream& stream,
               const std::vector<Buffer>& buffers = {});
  const Buffer& sum_squares() const { return sum_squares_; }  // float32 [1] on the device
  // sqrt(sum_squares()) once the work queued on `stream` is done (a host synchronisation).
  float value(const Stream& stream) const;

 private:
  Buffer sum_squares_;
};

// The block variant. Calls a kind does not support throw UnsupportedOperationError and change
// nothing.
class CudaBlock {
 public:
  virtual ~CudaBlock() = default;
  CudaBlock(const CudaBlock&) = delete;
  CudaBlock& operator=(const CudaBlock&) = delete;

  virtual const char* kind() const = 0;  // "fp32" or "nf4"
  const TransformerConfig& config() const { return config_; }
  int layer_idx() const { return layer_idx_; }
  const Device& device() const { return device_; }
  std::int64_t max_tokens() const { return max_tokens_; }
  Precision precision() const { return precision_; }
  // The stream of the block's latest queued work (forward, backward); download_weights without a
  // stream orders after it. The legacy default stream before any call.
  Stream last_stream() const;

  // dropout_step: the LoRA dropout masks of a training step (nullopt: no dropout); blocks without
  // LoRA dropout ignore it.
  virtual void forward(const Buffer& x, Buffer& out, const std::vector<std::int64_t>& seq_lens, const Stream& stream,
                       std::optional<std::uint64_t> dropout_step = std::nullopt) = 0;
  virtual void backward(const Buffer& x, const Buffer& grad_out, Buffer& grad_in,
                        const std::vector<std::int64_t>& seq_lens, const Stream& stream,
                        CudaGradWorkspace& grad_ws);
  // A new zeroed gradient workspace for this block's layout.
  virtual std::shared_ptr<CudaGradWorkspace> new_grad_workspace(const Stream& stream) const;
  // The parameter layout (names, offsets, shapes) of download_weights and the gradients.
  virtual std::shared_ptr<const ParamLayout> param_layout() const;
  // Copies all parameters (param_layout()->total_floats() floats) to host memory.
  virtual void download_weights(float* host, const Stream& stream) const;

  // Zeroed AdamW moments for this block's parameters.
  virtual std::shared_ptr<GpuBlockOptimizerState> init_optimizer_state(const Stream& stream) const;
  // One AdamW step (cudablocks/optimizer.hpp) over every parameter from the gradients in grad_ws.
  // Weight decay applies to the projection matrices, and to norm weights and biases too when
  // decay_norms_and_biases. With grad_norm (computed over this block's grad_ws and any others),
  // gradients are clipped to hyper.max_grad_norm inside the step, and a non-finite norm skips the
  // step. A fixed number of launches (one per run of equally decayed tensors, at most 7), no host
  // synchronisation. Hyperparameters are validated before anything runs.
  virtual void optimizer_step(GpuBlockOptimizerState& state, const AdamWHyper& hyper, const Stream& stream,
                              const CudaGradWorkspace& grad_ws, const GradNorm* grad_norm,
                              bool decay_norms_and_biases);

  // Activation memory the block keeps from forward to backward, per token of max_tokens, and its
  // transient scratch (including the attention backward's workspace) per token of max_tokens.
  virtual std::int64_t saved_bytes_per_token() const { return 0; }
  virtual std::int64_t scratch_bytes_per_token() const { return 0; }
  // Device bytes of the block's resident parameters (weights in their stored form, norms, biases,
  // LoRA adapters, a bf16 weight copy): what stays on the device however many tokens it runs.
  virtual std::int64_t device_bytes() const { return 0; }
  // Device bytes of everything else the block owns: activations, scratch and index buffers for
  // max_tokens, less what it takes from a BlockArena (NF4 blocks also share a per-device
  // dequantization scratch, not counted here).
  virtual std::int64_t activation_bytes() const { return 0; }

  // Throws UnsupportedOperationError naming `call` (backward, new_grad_workspace, param_layout,
  // download_weights, init_optimizer_state, optimizer_step) and what to use instead, unless the
  // block trains all its weights (fp32). Bindings call it before converting arguments.
  virtual void require_full_training(const std::string& call) const;

  // ---- LoRA (nf4 blocks made with a LoraConfig; see nf4_block.hpp) ----
  // Throws UnsupportedOperationError naming `call` unless the block has LoRA adapters.
  virtual void require_lora(const std::string& call) const;
  // Names (PEFT's, relative to the layer), offsets and shapes of the adapters' flat allocation.
  virtual std::shared_ptr<const ParamLayout> lora_layout() const;
  // dropout_step: as in forward, and the latest forward's when the block has dropout.
  virtual void backward_lora(const Buffer& x, const Buffer& grad_out, Buffer& grad_in,
                             const std::vector<std::int64_t>& seq_lens, const Stream& stream,
                             CudaGradWorkspace& lora_ws, std::optional<std::uint64_t> dropout_step = std::nullopt);
  virtual std::shared_ptr<CudaGradWorkspace> new_lora_grad_workspace(const Stream& stream) const;
  virtual std::shared_ptr<GpuBlockOptimizerState> init_lora_optimizer_state(const Stream& stream) const;
  virtual void lora_optimizer_step(GpuBlockOptimizerState& state, const AdamWHyper& hyper, const Stream& stream,
                                   const CudaGradWorkspace& lora_ws, const GradNorm* grad_norm);
  // All lora_layout()->total_floats() floats to host memory, and named tensors back (any subset
  // of the layout's names; everything is validated before anything is written).
  virtual void download_lora_weights(float* host, const Stream& stream) const;
  virtual void upload_lora_weights(const WeightMap& weights, const Stream& stream);

 protected:
  CudaBlock(const TransformerConfig& config, int layer_idx, const Device& device, std::int64_t max_tokens,
            Precision precision);
  [[noreturn]] void unsupported(const std::string& call, const std::string& instead) const;

  void set_last_stream(const Stream& stream);
  // Uploads config_.rope_inv_freq() into rope_inv_freq_ (the create functions call it once).
  void upload_rope_inv_freq(const Stream& stream);
  // Uploads a forward's positions and cu_seqlens into indices_ on `stream`. On a CUDA device the
  // copy goes through pinned host memory: from pageable memory cudaMemcpyAsync cost the host about
  // 0.17 ms per call (H200), which the GPU waits out whenever it is idle when the forward starts.
  void upload_indices(const std::vector<std::int32_t>& idx, const Stream& stream);

  TransformerConfig config_;
  int layer_idx_;
  Device device_;
  std::int64_t max_tokens_;
  Precision precision_;
  Buffer rope_inv_freq_;  // float32 [head_dim / 2] on device_: the RoPE op's inverse frequencies
  Buffer indices_;        // int32 on device_: positions [max_tokens], cu_seqlens [max_tokens + 1]

 private:
  mutable std::mutex last_stream_mutex_;
  Stream last_stream_;
  // upload_indices' pinned staging (allocated at the first upload) and the event recorded after its
  // copy, which the next upload waits for before rewriting the staging.
  std::shared_ptr<std::int32_t> indices_staging_;
  std::optional<Event> indices_copied_;
};

class Fp32Block final : public CudaBlock {
 public:
  // Validates config (InvalidArgumentError / UnsupportedOperationError), the weights (every
  // ParamLayout name present with its shape: InvalidArgumentError for a missing or unexpected
  // tensor, ShapeError for a misshaped one, naming it and both shapes), layer_idx and max_tokens
  // (1 .. 2^31 - 1); uploads the weights and allocates saved activations and scratch for
  // max_tokens. Returns once the weights are on the device. With an arena (on the block's device,
  // else DeviceError) the scratch comes from it, and with share_activations the saved activations
  // too (share_activations without an arena: InvalidArgumentError).
  static std::shared_ptr<Fp32Block> create(const TransformerConfig& config, int layer_idx, const WeightMap& weights,
                                           const Device& device, std::int64_t max_tokens, Precision precision,
                                           std::shared_ptr<BlockArena> arena = nullptr, bool share_activations = false);

  const char* kind() const override { return "fp32"; }
  void require_full_training(const std::string&) const override {}
  void forward(const Buffer& x, Buffer& out, const std::vector<std::int64_t>& seq_lens, const Stream& stream,
               std::optional<std::uint64_t> dropout_step = std::nullopt) override;
  void backward(const Buffer& x, const Buffer& grad_out, Buffer& grad_in, const std::vector<std::int64_t>& seq_lens,
                const Stream& stream, CudaGradWorkspace& grad_ws) override;
  std::shared_ptr<CudaGradWorkspace> new_grad_workspace(const Stream& stream) const override;
  std::shared_ptr<const ParamLayout> param_layout() const override { return layout_; }
  void download_weights(float* host, const Stream& stream) const override;
  std::shared_ptr<GpuBlockOptimizerState> init_optimizer_state(const Stream& stream) const override;
  void optimizer_step(GpuBlockOptimizerState& state, const AdamWHyper& hyper, const Stream& stream,
                      const CudaGradWorkspace& grad_ws, const GradNorm* grad_norm,
                      bool decay_norms_and_biases) override;
  std::int64_t saved_bytes_per_token() const override;
  std::int64_t scratch_bytes_per_token() const override;
  std::int64_t device_bytes() const override;
  std::int64_t activation_bytes() const override;

  const Buffer& params() const { return params_; }  // the flat parameter allocation

  // Use create().
  Fp32Block(const TransformerConfig& config, int layer_idx, const Device& device, std::int64_t max_tokens,
            Precision precision);

 private:
  std::shared_ptr<const ParamLayout> layout_;
  Buffer params_;    // [layout total]
  // bf16 mode only (empty otherwise): bf16 copy of params_ (same layout; made at creation,
  // rewritten by every optimizer_step in the AdamW pass).
  Buffer params_bf16_;
  // Saved activations (SavedLayout, and in bf16 mode the kept bf16 operands after them),
  // transient scratch (ScratchLayout) and, in bf16 mode, the backward's bf16 gradient operands
  // (Bf16ScratchLayout), for max_tokens: its own or an arena's.
  BlockMemory memory_;
  std::int64_t attn_ws_floats_ = 0;

  std::mutex mutex_;
  std::vector<std::int64_t> forward_seq_lens_;  // of the latest forward; empty before the first
};

}  // namespace cudablocks
