// The nf4 decoder block: frozen NF4 projections dequantized into a shared per-device scratch
// right before each product (products of few tokens decode inside the GEMM kernel instead),
// optional LoRA adapters (see cudablocks/nf4_block.hpp). The rest of
// the layer (norms, QK-norm + RoPE, attention, SwiGLU, residuals) is the fp32 block's op sequence.
#include "cudablocks/nf4_block.hpp"

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <tuple>

#include "blocks/block_internal.hpp"
#include "core/checks.hpp"
#include "core/dropout_hash.hpp"
#include "core/nf4_format.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

using namespace blocks;

const char* const kNf4Projections[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
const char* const kNf4ProjectionPaths[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                            "mlp.down_proj"};

namespace {

enum Proj { kQ = 0, kK, kV, kO, kGate, kUp, kDown };

// The products of the layer: projections stacked by rows into one GEMM (gate and up: [2I, H]).
struct Group {
  int first, count;
};
constexpr Group kGroups[6] = {{kQ, 1}, {kK, 1}, {kV, 1}, {kO, 1}, {kGate, 2}, {kDown, 1}};
constexpr int kGroupQ = 0, kGroupK = 1, kGroupV = 2, kGroupO = 3, kGroupGU = 4, kGroupDown = 5;

Shape proj_shape(const TransformerConfig& c, int p) {
  const std::int64_t H = c.hidden_size, q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim,
                     I = c.intermediate_size;
  switch (p) {
    case kQ: return {q, H};
    case kK: case kV: return {kv, H};
    case kO: return {H, q};
    case kGate: case kUp: return {I, H};
    default: return {H, I};
  }
}

std::int64_t num_blocks(std::int64_t n, std::int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

// ---- the dequantization scratch shared by every nf4 block of a device ----------------------------
// Grow-only; a replaced buffer is kept (never freed) because queued work may still read it. The
// registry is never destroyed, so no device memory is released during static destruction.
struct SharedScratch {
  std::mutex mutex;
  std::map<std::string, Buffer> current;
  std::vector<Buffer> retired;
};

SharedScratch& shared_scratch() {
  static SharedScratch* registry = new SharedScratch;
  return *registry;
}

Buffer dequant_scratch(const Device& device, std::int64_t bytes) {
  SharedScratch& s = shared_scratch();
  std::lock_guard<std::mutex> lock(s.mutex);
  auto it = s.current.find(device.str());
  if (it != s.current.end() && static_cast<std::int64_t>(it->second.nbytes()) >= bytes) return it->second;
  if (it != s.current.end()) s.retired.push_back(it->second);
  Buffer b = Buffer::empty({bytes}, DType::UInt8, device);
  s.current[device.str()] = b;
  return b;
}

// The nf4 block's fp32 scratch: the fp32 block's (ScratchLayout), then dh [T, H] (backward_lora
// keeps h readable for the adapters' gradients), with LoRA of rank r the adapters' products u and
// du [T, 2r] and the gate/up block-diagonal B and its gradient [2I, 2r], with LoRA dropout a
// masked operand [T, drop_cols] (drop_cols: the largest in_features of an adapted projection).
struct Nf4ScratchLayout {
  std::int64_t dh, lora_u = -1, lora_du = -1, lora_bbd = -1, lora_dbbd = -1, lora_drop = -1, total;
  Nf4ScratchLayout(const TransformerConfig& c, std::int64_t t, std::int64_t attn_ws_floats, int lora_rank,
                   std::int64_t drop_cols) {
    Segments s;
    s.at = ScratchLayout(c, t, attn_ws_floats).total;
    dh = s.add(t, c.hidden_size);
    if (lora_rank > 0) {
      const std::int64_t r2 = 2 * static_cast<std::int64_t>(lora_rank);
      lora_u = s.add(t, r2);
      lora_du = s.add(t, r2);
      lora_bbd = s.add(2 * c.intermediate_size, r2);
      lora_dbbd = s.add(2 * c.intermediate_size, r2);
    }
    if (drop_cols > 0) lora_drop = s.add(t, drop_cols);
    total = s.at;
  }
};

// bf16 LoRA: the forward's u16 = bf16(scale x16 A^T) [T, R] of each adapted group (R: the group's
// total rank), kept after the saved activations (SavedLayout) so that backward_lora's B gradients
// read it instead of repeating that product over x16 (which recomputes the same bits): R bf16
// values per token and adapted group. Offsets in bf16 elements from the end of SavedLayout (Segments:
// aligned), -1 for a group without adapters; nothing without LoRA or outside bf16 mode.
struct KeptLoraU {
  std::int64_t at[6] = {-1, -1, -1, -1, -1, -1};
  std::int64_t per_token = 0, total = 0;  // bf16 elements
  KeptLoraU(const std::array<int, 6>& group_ranks, std::int64_t t) {
    Segments s;
    for (int g = 0; g < 6; ++g) {
      if (group_ranks[g] == 0) continue;
      at[g] = s.add(t, group_ranks[g]);
      per_token += group_ranks[g];
    }
    total = s.at;
  }
  std::int64_t floats() const { return (total + 1) / 2; }
};

std::string weight_desc(const TransformerConfig& c, int layer_idx) {
  return "layer " + std::to_string(layer_idx) + " of " + c.describe();
}

std::string step_str(std::optional<std::uint64_t> step) { return step ? std::to_string(*step) : "None"; }

}  // namespace

// ---- LoraConfig -------------------------------------------------------------------------------

void LoraConfig::validate() const {
  if (rank < 1) throw InvalidArgumentError("LoraConfig: rank must be >= 1, got " + std::to_string(rank));
  if (!(alpha > 0.0) || !std::isfinite(alpha)) {
    throw InvalidArgumentError("LoraConfig: alpha must be a positive number, got " + std::to_string(alpha));
  }
  if (!(dropout >= 0.0 && dropout < 1.0)) {
    throw InvalidArgumentError("LoraConfig: dropout must be in [0, 1), got " + std::to_string(dropout));
  }
  if (targets.empty()) throw InvalidArgumentError("LoraConfig: targets is empty; name at least one projection");
  std::string known;
  for (const char* name : kNf4Projections) known += (known.empty() ? "" : ", ") + std::string(name);
  for (std::size_t i = 0; i < targets.size(); ++i) {
    bool found = false;
    for (const char* name : kNf4Projections) found = found || targets[i] == name;
    if (!found) {
      throw InvalidArgumentError("LoraConfig: unknown target '" + targets[i] + "'; targets are any of: " + known);
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (targets[j] == targets[i]) throw InvalidArgumentError("LoraConfig: target '" + targets[i] + "' is repeated");
    }
  }
}

double LoraConfig::scale() const { return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank; }

// ---- the machinery of one call ------------------------------------------------------------------

struct Nf4Block::Impl {
  Nf4Block& b;
  const Backend& be;
  const Stream& stream;
  std::int64_t T;
  bool bf;
  std::uint8_t* wscratch;   // the dequantized weight of the current product
  float* absmax_tmp;        // fp32 absmax of a double-quantized weight
  std::uint16_t* op16;      // bf16 operand [T, max(H, q, 2I)]
  // LoRA scratch (nullptr without LoRA)
  float* u = nullptr;       // [T, 2r]
  float* du = nullptr;      // [T, 2r]
  float* bbd = nullptr;     // [2I, 2r]
  float* dbbd = nullptr;    // [2I, 2r]
  // bf16 LoRA (bf16_lora()): this call's bf16 copy of every adapter (the layout of lora_params_),
  // and the gate/up block-diagonal B in bf16. In the shared scratch, after the absmax.
  std::uint16_t* lora16 = nullptr;
  std::uint16_t* bbd16 = nullptr;
  KeptLoraU kept_u;                      // bf16 LoRA: the kept u16 slots, after SavedLayout
  std::uint16_t* kept_u_base = nullptr;  // their start (bf16 mode with LoRA)
  // LoRA dropout of this call: off without a dropout_step or with dropout 0 (the products then
  // run exactly as without dropout).
  bool dropping = false;
  std::uint64_t drop_step = 0;
  float* drop = nullptr;    // [T, largest adapted in_features]: a part's masked input or dx term

  Impl(Nf4Block& block, const Backend& backend, const Stream& s, std::int64_t tokens, const BlockMemory::Call& mem,
       std::optional<std::uint64_t> dropout_step)
      : b(block), be(backend), stream(s), T(tokens), bf(block.precision_ == Precision::BF16),
        kept_u(kept_lora_u(block)) {
    Buffer shared = dequant_scratch(b.device_, b.dequant_bytes_);
    const std::int64_t wbytes = weight_region_bytes(b);
    wscratch = shared.data_as<std::uint8_t>();
    absmax_tmp = reinterpret_cast<float*>(wscratch + wbytes);
    op16 = bf ? mem.scratch_bf16() : nullptr;
    if (b.has_lora()) {
      const Nf4ScratchLayout sl = scratch_layout(b);
      u = mem.scratch() + sl.lora_u;
      du = mem.scratch() + sl.lora_du;
      bbd = mem.scratch() + sl.lora_bbd;
      dbbd = mem.scratch() + sl.lora_dbbd;
      dropping = sl.lora_drop >= 0 && dropout_step.has_value();
      if (dropping) {
        drop_step = *dropout_step;
        drop = mem.scratch() + sl.lora_drop;
      }
      if (bf) {
        const std::int64_t saved = SavedLayout(b.config_, b.max_tokens_, b.precision_).total;
        kept_u_base = reinterpret_cast<std::uint16_t*>(mem.saved() + saved);
      }
      if (bf16_lora()) {
        lora16 = reinterpret_cast<std::uint16_t*>(wscratch + wbytes + absmax_region_bytes(b));
        bbd16 = lora16 + lora16_elements(b);
        be.to_bf16(b.lora_params_.data_as<float>(), lora16, b.lora_layout_->total_floats(), stream);
      }
    }
  }

  static Nf4ScratchLayout scratch_layout(const Nf4Block& blk) {
    return Nf4ScratchLayout(blk.config_, blk.max_tokens_, blk.attn_ws_floats_, blk.has_lora() ? blk.lora_.rank : 0,
                            dropout_cols(blk));
  }
  // The widest input of an adapted projection with dropout (0 without dropout).
  static std::int64_t dropout_cols(const Nf4Block& blk) {
    std::int64_t cols = 0;
    if (!blk.has_lora() || blk.lora_.dropout == 0.0) return cols;
    for (int p = 0; p < 7; ++p) {
      if (blk.lora_target_[p]) cols = std::max(cols, proj_shape(blk.config_, p)[1]);
    }
    return cols;
  }

  // Bytes of the largest stacked weight in the compute dtype (256-byte aligned).
  static std::int64_t weight_region_bytes(const Nf4Block& blk) {
    std::int64_t most = 0;
    for (const Group& g : kGroups) {
      std::int64_t n = 0;
      for (int p = g.first; p < g.first + g.count; ++p) n += blk.weights_[p].shape[0] * blk.weights_[p].shape[1];
      most = std::max(most, n);
    }
    const std::int64_t esize = blk.precision_ == Precision::BF16 ? 2 : 4;
    return (most * esize + 255) / 256 * 256;
  }
  // The fp32 absmax of the largest group's double-quantized weights (256-byte aligned): the fused
  // product reads all of a group's at once.
  static std::int64_t absmax_region_bytes(const Nf4Block& blk) {
    std::int64_t most = 0;
    for (const Group& g : kGroups) {
      std::int64_t blocks = 0;
      for (int p = g.first; p < g.first + g.count; ++p) {
        blocks += num_blocks(shape_numel(blk.weights_[p].shape), blk.weights_[p].blocksize);
      }
      most = std::max(most, blocks);
    }
    return (most * static_cast<std::int64_t>(sizeof(float)) + 255) / 256 * 256;
  }
  // bf16 LoRA's copy of the adapters (rounded up to 128 elements: bbd16 stays 256-byte aligned),
  // then the gate/up block-diagonal B [2I, 2r].
  static std::int64_t lora16_elements(const Nf4Block& blk) { return (blk.lora_layout_->total_floats() + 127) / 128 * 128; }
  static std::int64_t lora16_region_bytes(const Nf4Block& blk) {
    if (!blk.has_lora() || blk.precision_ != Precision::BF16) return 0;
    const std::int64_t bbd = 2 * blk.config_.intermediate_size * 2 * blk.lora_.rank;
    return (lora16_elements(blk) + bbd) * 2;
  }
  static std::int64_t scratch_bytes(const Nf4Block& blk) {
    return weight_region_bytes(blk) + absmax_region_bytes(blk) + lora16_region_bytes(blk);
  }

  // Dequantizes the group's projections, stacked by rows, into the scratch (bf16 or fp32).
  void dequantize(const Group& g) {
    const DType dt = bf ? DType::BFloat16 : DType::Float32;
    const std::int64_t esize = bf ? 2 : 4;
    std::int64_t at = 0;
    for (int p = g.first; p < g.first + g.count; ++p) {
      const Nf4Weight& w = b.weights_[p];
      const std::int64_t n = shape_numel(w.shape);
      const float* absmax = w.absmax.data_as<float>();
      if (w.double_quant()) {
        be.nf4_double_dequantize(w.qabsmax.data_as<std::uint8_t>(), w.absmax2.data_as<float>(), w.offset.data_as<float>(),
                                 w.code.data_as<float>(), num_blocks(n, w.blocksize), absmax_tmp, stream);
        absmax = absmax_tmp;
      }
      be.nf4_dequantize(w.packed.data_as<std::uint8_t>(), absmax, n, w.blocksize, wscratch + at * esize, dt, stream);
      at += n;
    }
  }
  // Products of at most kFusedTokens tokens decode NF4 inside the GEMM kernel (bf16 compute, where
  // the backend has that kernel for the weights' block size): with few tokens the staged path's
  // dequantization (2 bytes per element written, then read by cuBLAS) costs more than decoding in
  // the kernel. Measured in the CudaNf4GemmTiming test (H200): forward, every Qwen3-4B product is
  // faster fused up to 64 tokens and slower from 96 on; transposed (the input gradient), only
  // weights of at least kFusedDxElements are (gate_up's 49.8M: 0.057 ms against 0.072 at 16
  // tokens; down's 24.9M: 0.035 against 0.036; q's 10.5M: 0.022 against 0.016).
  static constexpr std::int64_t kFusedTokens = 64;
  static constexpr std::int64_t kFusedDxElements = std::int64_t{1} << 25;
  bool fused(const Group& g, bool transposed, const std::uint16_t* a16) const {
    if (!bf || T > kFusedTokens || reinterpret_cast<std::uintptr_t>(a16) % 16 != 0) return false;
    if (transposed && (rows(g) % 8 != 0 || rows(g) * cols(g) < kFusedDxElements)) return false;
    for (int p = g.first; p < g.first + g.count; ++p) {
      if (!be.nf4_gemm_fused(cols(g), b.weights_[p].blocksize, stream)) return false;
    }
    return true;
  }
  // c (fp32, + addend) or c16 (bf16, + its own values when add_c16) = a16 W^T, or transposed a16 W,
  // by the fused kernel; double-quantized absmax decoded first, the group's side by side in absmax_tmp.
  void fused_product(const Group& g, bool transposed, const std::uint16_t* a16, const float* addend, float* c,
                     std::uint16_t* c16, bool add_c16) {
    Nf4Rows parts[2];
    float* tmp = absmax_tmp;
    for (int i = 0; i < g.count; ++i) {
      const Nf4Weight& w = b.weights_[g.first + i];
      const float* absmax = w.absmax.data_as<float>();
      if (w.double_quant()) {
        const std::int64_t blocks = num_blocks(shape_numel(w.shape), w.blocksize);
        be.nf4_double_dequantize(w.qabsmax.data_as<std::uint8_t>(), w.absmax2.data_as<float>(),
                                 w.offset.data_as<float>(), w.code.data_as<float>(), blocks, tmp, stream);
        absmax = tmp;
        tmp += blocks;
      }
      parts[i] = {w.packed.data_as<std::uint8_t>(), absmax, w.shape[0]};
    }
    be.nf4_gemm_bf16(a16, parts, g.count, T, cols(g), transposed, addend, c, c16, add_c16, stream);
  }
  std::int64_t rows(const Group& g) const {
    std::int64_t n = 0;
    for (int p = g.first; p < g.first + g.count; ++p) n += b.weights_[p].shape[0];
    return n;
  }
  std::int64_t cols(const Group& g) const { return b.weights_[g.first].shape[1]; }

  // Forward: c[T, out] = a W^T (+ addend). Transposed (the input gradient): c[T, in] = a[T, out] W
  // (+ addend). addend: nullptr, c itself (accumulate) or another buffer (a residual, added in the
  // product's epilogue). a16, bf16 compute's operand: nullptr converts a into op16 first; op16
  // reuses its last contents; a saved bf16 activation is read as it is (a unused).
  void product(int group, bool transposed, const float* a, const std::uint16_t* a16, const float* addend, float* c) {
    const Group& g = kGroups[group];
    const std::int64_t out = rows(g), in = cols(g);
    const std::int64_t n = transposed ? in : out, k = transposed ? out : in;
    if (bf) {
      a16 = operand16(a, a16, k);
      if (fused(g, transposed, a16)) {
        fused_product(g, transposed, a16, addend, c, nullptr, false);
        return;
      }
    }
    dequantize(g);
    if (bf) {
      const auto* w = reinterpret_cast<const std::uint16_t*>(wscratch);
      if (addend == nullptr) {
        be.gemm_bf16(false, !transposed, T, n, k, 1.0f, a16, w, 0.0f, c, stream);
      } else {
        be.gemm_bf16_add(false, !transposed, T, n, k, 1.0f, a16, w, addend, c, stream);
      }
    } else {
      const auto* w = reinterpret_cast<const float*>(wscratch);
      if (addend == nullptr) {
        be.gemm(false, !transposed, T, n, k, 1.0f, a, w, 0.0f, c, b.precision_, stream);
      } else {
        be.gemm_add(false, !transposed, T, n, k, 1.0f, a, w, addend, c, b.precision_, stream);
      }
    }
  }

  // bf16 mode: c16 = a W^T, or transposed a W, written in bf16 (accumulate: added to c16's bf16
  // values, by gemm_bf16_to_bf16_add); a16 as for product (it must not be c16).
  void product_to_bf16(int group, bool transposed, const float* a, const std::uint16_t* a16, std::uint16_t* c16,
                       bool accumulate) {
    const Group& g = kGroups[group];
    const std::int64_t n = transposed ? cols(g) : rows(g), k = transposed ? rows(g) : cols(g);
    a16 = operand16(a, a16, k);
    if (fused(g, transposed, a16)) {
      fused_product(g, transposed, a16, nullptr, nullptr, c16, accumulate);
      return;
    }
    dequantize(g);
    const auto* w = reinterpret_cast<const std::uint16_t*>(wscratch);
    if (accumulate) {
      be.gemm_bf16_to_bf16_add(false, !transposed, T, n, k, 1.0f, a16, w, c16, stream);
    } else {
      be.gemm_bf16_to_bf16(false, !transposed, T, n, k, 1.0f, a16, w, c16, stream);
    }
  }

  // bf16 mode: c16 = a W^T + the adapter's term (+ bias), or transposed a W + the adapter's
  // input-gradient term (after the group's lora_grads). a16 as for product.
  // - bf16 LoRA without a bias: the term is written into c16 in bf16 first and the product adds
  //   itself onto it in its epilogue (the term rounded to bf16 before the sum, as PEFT rounds its
  //   LoRA output; cuBLAS may round the product too), so no fp32 result is written and read again.
  //   c16 must not be the operand; `sum` is not touched, so c16 may lie in it.
  // - Otherwise the sum is formed in fp32 in `sum` [T, n] and rounded once (c16 outside it).
  void product_sum_to_bf16(int group, bool transposed, const float* a, const std::uint16_t* a16, const float* bias,
                           float* sum, std::uint16_t* c16) {
    if (!adapted(group) && bias == nullptr) {
      product_to_bf16(group, transposed, a, a16, c16, false);
      return;
    }
    const Group& g = kGroups[group];
    const std::int64_t n = transposed ? cols(g) : rows(g), k = transposed ? rows(g) : cols(g);
    a16 = operand16(a, a16, k);
    if (bf16_lora() && bias == nullptr) {
      add_adapter(group, transposed, a16, nullptr, nullptr, c16);
      product_to_bf16(group, transposed, a, a16, c16, true);
      return;
    }
    product(group, transposed, a, a16, nullptr, sum);
    if (bf16_lora()) {
      add_adapter(group, transposed, a16, sum, bias, c16);
      return;
    }
    if (transposed) {
      lora_dx(group, sum);
    } else {
      lora_forward(group, a, a16, sum);
    }
    if (bias != nullptr) be.add_bias(sum, bias, T, n, stream);
    be.to_bf16(sum, c16, T * n, stream);
  }

  // The input gradient through the group in fp32: c[T, in] = a W (+ c when accumulating) + the
  // adapter's term du A (after the group's lora_grads). With bf16 LoRA, when not accumulating, the
  // term is written first (add_low_rank without c: no read of c in that pass) and the product adds
  // itself onto it in its epilogue. a16 as for product.
  void product_dx(int group, const float* a, const std::uint16_t* a16, bool accumulate, float* c) {
    if (bf16_lora() && adapted(group) && !accumulate) {
      add_adapter(group, true, nullptr, nullptr, nullptr, c);
      product(group, true, a, a16, c, c);
      return;
    }
    product(group, true, a, a16, accumulate ? c : nullptr, c);
    lora_dx(group, c);
  }

  // The bf16 operand [T, k] of a product: a16 itself, or (nullptr) a converted into op16.
  const std::uint16_t* operand16(const float* a, const std::uint16_t* a16, std::int64_t k) const {
    if (a16 != nullptr) return a16;
    be.to_bf16(a, op16, T * k, stream);
    return op16;
  }
  // bf16 LoRA: the group's output gradient dy [T, out] in bf16 for its adapters, converted into op16,
  // where the transposed product reads it next. nullptr otherwise (the product converts it itself).
  const std::uint16_t* grad16(int group, const float* dy) const {
    if (!bf16_lora() || !adapted(group)) return nullptr;
    return operand16(dy, nullptr, rows(kGroups[group]));
  }
  // backward_lora: the adapters' input RMSNorm(x) w [T, H] again, into `slot`: bf16 for bf16 LoRA,
  // else fp32.
  void norm_for_adapters(const float* x, const float* w, float* slot, float eps) const {
    const std::int64_t H = b.config_.hidden_size;
    if (bf16_lora()) {
      be.rmsnorm_forward_bf16(x, w, reinterpret_cast<std::uint16_t*>(slot), nullptr, T, H, eps, stream);
    } else {
      be.rmsnorm_forward(x, w, slot, nullptr, T, H, eps, stream);
    }
  }

  // The saved attention output as o's adapter reads it in fp32: itself, or (bf16 mode with dropout)
  // widened into `scratch` [T, q]. nullptr when nothing reads it (no adapter on o, or bf16 LoRA,
  // which reads the bf16 att as it is).
  const float* widened_att(const float* att, float* scratch) const {
    if (!adapted(kGroupO) || bf16_operand_only(kGroupO)) return nullptr;
    if (!bf) return att;
    const std::int64_t n = T * b.config_.num_attention_heads * b.config_.head_dim;
    be.from_bf16(reinterpret_cast<const std::uint16_t*>(att), scratch, n, stream);
    return scratch;
  }
  // SwiGLU of the saved gate_up (bf16 in bf16 mode, SavedLayout) into fp32: the forward's act and
  // the backward's d_gate_up where adapters read them.
  void swiglu_forward_saved(const float* saved, float* out, std::int64_t I) const {
    if (bf) {
      be.swiglu_forward(reinterpret_cast<const std::uint16_t*>(saved), out, T, I, stream);
    } else {
      be.swiglu_forward(saved, out, T, I, stream);
    }
  }
  // dout: fp32, or (bf16 mode) dout16, as the down product's input gradient is kept.
  void swiglu_backward_saved(const float* dout, const std::uint16_t* dout16, const float* saved, float* d_gate_up,
                             std::int64_t I) const {
    if (bf) {
      be.swiglu_backward(dout16, reinterpret_cast<const std::uint16_t*>(saved), d_gate_up, T, I, stream);
    } else {
      be.swiglu_backward(dout, saved, d_gate_up, T, I, stream);
    }
  }

  // ---- LoRA over a group: targeted parts of the group, their A rows adjacent ----
  struct LoraGroup {
    int R = 0;                   // total rank over the targeted parts
    const float* A = nullptr;    // [R, in]
    std::int64_t a_off = -1;     // offset of A in the flat allocation
    bool direct = false;         // one part covering all rows: B is the B matrix itself
  };
  LoraGroup lora_group(int group) const {
    LoraGroup lg;
    if (!b.has_lora()) return lg;
    const Group& g = kGroups[group];
    for (int p = g.first; p < g.first + g.count; ++p) {
      if (!b.lora_target_[p]) continue;
      if (lg.a_off < 0) lg.a_off = b.lora_a_[p];
      lg.R += b.lora_.rank;
    }
    if (lg.R == 0) return lg;
    lg.A = b.lora_params_.data_as<float>() + lg.a_off;
    lg.direct = g.count == 1;
    return lg;
  }
  // Whether the group has LoRA adapters.
  bool adapted(int group) const { return lora_group(group).R > 0; }
  // bf16 LoRA: in bf16 mode without dropout in this call, the adapters' products take bf16 operands
  // as the frozen ones do (the group's bf16 input and output gradient, lora16), their results are
  // rounded to bf16 once (u = scale x A^T, du = scale dy B), and their terms are added by
  // add_low_rank: written first where the result is kept in bf16 without a bias, or is an fp32
  // input gradient not accumulated (the product then adds itself onto it), else joined to the
  // product's fp32 result. With dropout the adapters compute in tf32 on the masked fp32 inputs.
  bool bf16_lora() const { return bf && !dropping; }
  // Whether the group's input is needed only in bf16: in bf16 mode the producer (norm, SwiGLU) then
  // writes the bf16 operand directly, and the backward recomputes it only for the adapters, in bf16.
  bool bf16_operand_only(int group) const { return bf && (!adapted(group) || !dropping); }
  Precision lora_prec() const { return b.precision_ == Precision::FP32 ? Precision::FP32 : Precision::TF32; }
  float scale() const { return static_cast<float>(b.lora_.scale()); }
  // Selector [r, R] for part p of the gate/up group: I_r, or [I_r | 0] / [0 | I_r] when both are targeted.
  const float* selector(int group, int p) const {
    const float* C = b.lora_consts_.data_as<float>();
    const std::int64_t r = b.lora_.rank;
    const Group& g = kGroups[group];
    int targeted = 0;
    for (int q = g.first; q < g.first + g.count; ++q) targeted += b.lora_target_[q] ? 1 : 0;
    if (targeted == 1) return C;                          // I_r
    return C + r * r + (p == g.first ? 0 : 2 * r * r);    // [I_r | 0], then [0 | I_r]
  }
  // The group's B as one [out, R] matrix (block diagonal over the stacked parts).
  const float* lora_b(int group, const LoraGroup& lg) {
    const Group& g = kGroups[group];
    const float* P = b.lora_params_.data_as<float>();
    if (lg.direct) return P + b.lora_b_[g.first];
    const std::int64_t r = b.lora_.rank;
    std::int64_t row0 = 0;
    for (int p = g.first; p < g.first + g.count; ++p) {
      const std::int64_t rows_p = b.weights_[p].shape[0];
      if (b.lora_target_[p]) {
        be.gemm(false, false, rows_p, lg.R, r, 1.0f, P + b.lora_b_[p], selector(group, p), 0.0f, bbd + row0 * lg.R,
                Precision::FP32, stream);
      } else {
        be.fill(bbd + row0 * lg.R, static_cast<std::size_t>(rows_p * lg.R), sizeof(float), 0u, stream);
      }
      row0 += rows_p;
    }
    return bbd;
  }
  // bf16 LoRA's A [R, in] and B [out, R] of the group (B as lora_b builds it, rounded to bf16).
  const std::uint16_t* lora_a16(const LoraGroup& lg) const { return lora16 + lg.a_off; }
  const std::uint16_t* lora_b16(int group, const LoraGroup& lg) {
    if (lg.direct) return lora16 + b.lora_b_[kGroups[group].first];
    be.to_bf16(lora_b(group, lg), bbd16, rows(kGroups[group]) * lg.R, stream);
    return bbd16;
  }
  // bf16 LoRA, forward: u16 [T, R] = bf16(scale x16 A^T), into the group's kept slot, where
  // backward_lora's lora_grads reads it.
  const std::uint16_t* lora_u16(int group, const LoraGroup& lg, const std::uint16_t* x16) {
    std::uint16_t* u16 = kept_u16(group);
    be.gemm_bf16_to_bf16(false, true, T, lg.R, cols(kGroups[group]), scale(), x16, lora_a16(lg), u16, stream);
    return u16;
  }
  // The group's kept u16 (KeptLoraU) in the saved memory.
  std::uint16_t* kept_u16(int group) const { return kept_u_base + kept_u.at[group]; }
  // The blocks' kept u16 slots: for bf16 mode with LoRA, the groups' total ranks.
  static KeptLoraU kept_lora_u(const Nf4Block& blk) {
    std::array<int, 6> ranks{};
    if (blk.has_lora() && blk.precision_ == Precision::BF16) {
      for (int g = 0; g < 6; ++g) {
        for (int p = kGroups[g].first; p < kGroups[g].first + kGroups[g].count; ++p) {
          ranks[g] += blk.lora_target_[p] ? blk.lora_.rank : 0;
        }
      }
    }
    return KeptLoraU(ranks, blk.max_tokens_);
  }
  // ---- LoRA dropout: per targeted part p of a group, the part's own mask on its input ----
  // out = dropout(x) of part p (x [T, in]), or out += dropout(x) with accumulate.
  void apply_dropout(int p, const float* x, float* out, bool accumulate) {
    const std::uint64_t key = dropout::key(b.lora_.seed, static_cast<std::uint64_t>(b.layer_idx_),
                                           static_cast<std::uint64_t>(p), drop_step);
    be.dropout(x, out, T * b.weights_[p].shape[1], b.lora_.dropout, key, accumulate, stream);
  }
  // Part p's columns of du [T, R] as a [T, r] matrix: du itself for a one-part group, else du
  // times the part's selector^T (exact), written into u (free once the B gradient is taken).
  const float* part_du(int group, int p, const LoraGroup& lg) {
    if (lg.R == b.lora_.rank) return du;
    be.gemm(false, true, T, b.lora_.rank, lg.R, 1.0f, du, selector(group, p), 0.0f, u, Precision::FP32, stream);
    return u;
  }

  // u[T, R] = x A^T, each part's x under its own mask when dropping. A part's own product goes
  // through du (free here), then into its columns of u by its selector (exact 0/1 products).
  void lora_u(int group, const LoraGroup& lg, const float* x) {
    const Group& g = kGroups[group];
    const std::int64_t in = cols(g), r = b.lora_.rank;
    if (!dropping) {
      be.gemm(false, true, T, lg.R, in, 1.0f, x, lg.A, 0.0f, u, lora_prec(), stream);
      return;
    }
    const bool one_part = lg.R == r;
    bool first = true;
    for (int p = g.first; p < g.first + g.count; ++p) {
      if (!b.lora_target_[p]) continue;
      apply_dropout(p, x, drop, false);
      const float* A = b.lora_params_.data_as<float>() + b.lora_a_[p];
      be.gemm(false, true, T, r, in, 1.0f, drop, A, 0.0f, one_part ? u : du, lora_prec(), stream);
      if (!one_part) {
        be.gemm(false, false, T, lg.R, r, 1.0f, du, selector(group, p), first ? 0.0f : 1.0f, u, Precision::FP32,
                stream);
      }
      first = false;
    }
  }
  // bf16 LoRA: out = c (+ bias) + the group's adapter term, in add_low_rank's one pass (out fp32,
  // possibly c, or bf16; c nullptr: the term alone). Forward: (scale x16 A^T) B^T, c [T, out];
  // transposed (the input gradient, after lora_grads): du A, c [T, in].
  template <typename Out>
  void add_adapter(int group, bool transposed, const std::uint16_t* x16, const float* c, const float* bias, Out* out) {
    const LoraGroup lg = lora_group(group);
    const Group& g = kGroups[group];
    const std::uint16_t* u16 = nullptr;
    const std::uint16_t* v16 = nullptr;
    if (lg.R > 0) {
      u16 = transposed ? reinterpret_cast<const std::uint16_t*>(du) : lora_u16(group, lg, x16);
      v16 = transposed ? lora_a16(lg) : lora_b16(group, lg);
    }
    const std::int64_t n = transposed ? cols(g) : rows(g);
    be.add_low_rank(c, bias, u16, v16, transposed ? 1 : lg.R, transposed ? n : 1, T, n, lg.R, out, stream);
  }
  // y[T, out] += scale * (x A^T) B^T (x under the masks when dropping; bf16 LoRA reads x16, the
  // group's input in bf16).
  void lora_forward(int group, const float* x, const std::uint16_t* x16, float* y) {
    const LoraGroup lg = lora_group(group);
    if (lg.R == 0) return;
    if (bf16_lora()) {
      add_adapter(group, false, x16, y, nullptr, y);
      return;
    }
    const std::int64_t out = rows(kGroups[group]);
    lora_u(group, lg, x);
    const float* B = lora_b(group, lg);
    be.gemm(false, true, T, out, lg.R, scale(), u, B, 1.0f, y, lora_prec(), stream);
  }
  // With dy [T, out] and the group's input x [T, in]: dB += scale dy^T u, dA += du^T x where
  // du = scale dy B (kept in the scratch for lora_dx); x is each part's masked x when dropping.
  // Reads x: call before x is overwritten.
  // bf16 LoRA reads x16 and dy16 (the bf16 operands) instead, u16 carrying the scale (the forward's,
  // kept): dB += dy^T u16, du16 = bf16(scale dy B) (in du's scratch), dA += du16^T x.
  void lora_grads(int group, const float* x, const std::uint16_t* x16, const float* dy, const std::uint16_t* dy16,
                  float* G) {
    const LoraGroup lg = lora_group(group);
    if (lg.R == 0) return;
    const Group& g = kGroups[group];
    const std::int64_t out = rows(g), in = cols(g), r = b.lora_.rank;
    float* dB = lg.direct ? G + b.lora_b_[g.first] : dbbd;
    const float dB_beta = lg.direct ? 1.0f : 0.0f;
    if (bf16_lora()) {
      be.gemm_bf16(true, false, out, lg.R, T, 1.0f, dy16, kept_u16(group), dB_beta, dB, stream);
      if (!lg.direct) add_part_gradients(group, lg, G);
      auto* du16 = reinterpret_cast<std::uint16_t*>(du);
      be.gemm_bf16_to_bf16(false, false, T, lg.R, out, scale(), dy16, lora_b16(group, lg), du16, stream);
      be.gemm_bf16(true, false, lg.R, in, T, 1.0f, du16, x16, 1.0f, G + lg.a_off, stream);
      return;
    }
    lora_u(group, lg, x);
    const float* B = lora_b(group, lg);
    be.gemm(true, false, out, lg.R, T, scale(), dy, u, dB_beta, dB, lora_prec(), stream);
    if (!lg.direct) add_part_gradients(group, lg, G);
    be.gemm(false, false, T, lg.R, out, scale(), dy, B, 0.0f, du, lora_prec(), stream);
    if (!dropping) {
      be.gemm(true, false, lg.R, in, T, 1.0f, du, x, 1.0f, G + lg.a_off, lora_prec(), stream);
      return;
    }
    for (int p = g.first; p < g.first + g.count; ++p) {
      if (!b.lora_target_[p]) continue;
      apply_dropout(p, x, drop, false);
      be.gemm(true, false, r, in, T, 1.0f, part_du(group, p, lg), drop, 1.0f, G + b.lora_a_[p], lora_prec(), stream);
    }
  }
  // The gradient of the block-diagonal B (dbbd [out, R]) into each targeted part's B gradient.
  void add_part_gradients(int group, const LoraGroup& lg, float* G) {
    const Group& g = kGroups[group];
    std::int64_t row0 = 0;
    for (int p = g.first; p < g.first + g.count; ++p) {
      const std::int64_t rows_p = b.weights_[p].shape[0];
      if (b.lora_target_[p]) {
        be.gemm(false, true, rows_p, b.lora_.rank, lg.R, 1.0f, dbbd + row0 * lg.R, selector(group, p), 1.0f,
                G + b.lora_b_[p], Precision::FP32, stream);
      }
      row0 += rows_p;
    }
  }
  // dx[T, in] += du A (after lora_grads of the same group); when dropping, each part's du_p A_p
  // under the part's mask.
  void lora_dx(int group, float* dx) {
    const LoraGroup lg = lora_group(group);
    if (lg.R == 0) return;
    if (bf16_lora()) {
      add_adapter(group, true, nullptr, dx, nullptr, dx);
      return;
    }
    const Group& g = kGroups[group];
    const std::int64_t in = cols(g), r = b.lora_.rank;
    if (!dropping) {
      be.gemm(false, false, T, in, lg.R, 1.0f, du, lg.A, 1.0f, dx, lora_prec(), stream);
      return;
    }
    for (int p = g.first; p < g.first + g.count; ++p) {
      if (!b.lora_target_[p]) continue;
      const float* A = b.lora_params_.data_as<float>() + b.lora_a_[p];
      be.gemm(false, false, T, in, r, 1.0f, part_du(group, p, lg), A, 0.0f, drop, lora_prec(), stream);
      apply_dropout(p, drop, dx, true);
    }
  }
};

// ---- construction -----------------------------------------------------------------------------

Nf4Block::Nf4Block(const TransformerConfig& config, int layer_idx, const Device& device, std::int64_t max_tokens,
                   Precision precision)
    : CudaBlock(config, layer_idx, device, max_tokens, precision) {}

std::shared_ptr<Nf4Block> Nf4Block::create(const TransformerConfig& config, int layer_idx, const WeightMap& dense,
                                           const Nf4WeightMap& quantized, const Device& device, std::int64_t max_tokens,
                                           const LoraConfig* lora, Precision compute, bool double_quant,
                                           std::shared_ptr<BlockArena> arena, bool share_activations) {
  const ParamLayout names(config);  // validates config
  BlockMemory::validate(device, arena, share_activations);
  if (layer_idx < 0 || layer_idx >= config.num_hidden_layers) {
    throw InvalidArgumentError("layer_idx " + std::to_string(layer_idx) + " is outside [0, " +
                               std::to_string(config.num_hidden_layers) + ") for num_hidden_layers " +
                               std::to_string(config.num_hidden_layers));
  }
  if (max_tokens <= 0 || max_tokens > std::numeric_limits<std::int32_t>::max() - 1) {
    throw InvalidArgumentError("max_tokens must be in [1, 2^31 - 2], got " + std::to_string(max_tokens));
  }
  if (lora != nullptr) lora->validate();
  const std::string where = weight_desc(config, layer_idx);

  // Names: every tensor of the layer exactly once (projections in float or in NF4), nothing else.
  for (const ParamEntry& e : names.entries()) {
    const bool in_dense = dense.count(e.name) != 0, in_q = quantized.count(e.name) != 0;
    if (!in_dense && !in_q) {
      throw InvalidArgumentError("missing weight '" + e.name + "' " + shape_str(e.shape) + " for " + where +
                                 (e.is_matrix ? " (a float array, or its bitsandbytes 4-bit entries)" : ""));
    }
    if (in_dense && in_q) throw InvalidArgumentError("weight '" + e.name + "' is given both in float and in NF4");
    if (in_q && !e.is_matrix) {
      throw InvalidArgumentError("weight '" + e.name + "' is quantized, but nf4 blocks keep norms and biases in float");
    }
    if (in_dense) {
      const HostTensor& t = dense.at(e.name);
      if (t.shape != e.shape) {
        throw ShapeError("weight '" + e.name + "' has shape " + shape_str(t.shape) + ", expected " + shape_str(e.shape) +
                         " for " + config.describe());
      }
      if (t.data == nullptr && e.numel() > 0) throw InvalidArgumentError("weight '" + e.name + "' has no data");
    }
  }
  auto unexpected = [&](const std::string& name, const std::string& shape) {
    std::string expected;
    for (const ParamEntry& e : names.entries()) expected += (expected.empty() ? "" : ", ") + e.name;
    throw InvalidArgumentError("unexpected weight '" + name + "' " + shape + " for " + config.describe() +
                               "; a layer takes exactly: " + expected + " (names relative to the layer)");
  };
  for (const auto& [name, t] : dense) {
    if (names.find(name) == nullptr) unexpected(name, shape_str(t.shape));
  }
  for (const auto& [name, w] : quantized) {
    if (names.find(name) == nullptr) unexpected(name, shape_str(w.shape));
  }

  auto block = std::make_shared<Nf4Block>(config, layer_idx, device, max_tokens, compute);
  DeviceGuard guard(device);
  const Backend& be = backend_for(device);
  Stream stream = Stream::wrap(device, 0);

  // Projections.
  for (int p = 0; p < 7; ++p) {
    const std::string name = std::string(kNf4ProjectionPaths[p]) + ".weight";
    const Shape shape = proj_shape(config, p);
    const std::int64_t n = shape_numel(shape);
    Nf4Weight& w = block->weights_[p];
    auto q = quantized.find(name);
    if (q != quantized.end()) {
      const Nf4Weight& src = q->second;
      if (src.shape != shape) {
        throw ShapeError("NF4 weight '" + name + "' has shape " + shape_str(src.shape) + ", expected " + shape_str(shape) +
                         " for " + config.describe());
      }
      if (!nf4::valid_blocksize(src.blocksize)) {
        throw InvalidArgumentError("NF4 weight '" + name + "': blocksize " + std::to_string(src.blocksize) +
                                   " is not one bitsandbytes uses (32, 64, ..., 4096)");
      }
      const std::int64_t blocks = num_blocks(n, src.blocksize);
      auto check = [&](const Buffer& buf, DType dtype, std::int64_t count, const std::string& part) {
        const std::string label = name + "." + part;
        if (!buf.defined() || (buf.numel() == 0 && count > 0)) {
          throw InvalidArgumentError("NF4 weight '" + name + "' has no " + part);
        }
        check_device(buf, device, label.c_str());
        check_dtype(buf, dtype, label.c_str());
        if (buf.numel() != count) {
          throw ShapeError("NF4 weight '" + label + "' holds " + std::to_string(buf.numel()) + " values, but shape " +
                           shape_str(shape) + " in blocks of " + std::to_string(src.blocksize) + " needs " +
                           std::to_string(count));
        }
      };
      check(src.packed, DType::UInt8, (n + 1) / 2, "packed weight");
      if (src.double_quant()) {
        check(src.qabsmax, DType::UInt8, blocks, "absmax codes");
        check(src.absmax2, DType::Float32, num_blocks(blocks, nf4::kNestedBlocksize), "nested_absmax");
        check(src.offset, DType::Float32, 1, "nested offset");
        check(src.code, DType::Float32, 256, "nested_quant_map");
      } else {
        check(src.absmax, DType::Float32, blocks, "absmax");
      }
      w = src;
      continue;
    }
    // Float: quantize on the device.
    const HostTensor& t = dense.at(name);
    w.shape = shape;
    w.blocksize = 64;
    const std::int64_t blocks = num_blocks(n, w.blocksize);
    Buffer tmp = Buffer::empty({n}, DType::Float32, device);
    tmp.copy_from_host(t.data, stream);
    w.packed = Buffer::empty({(n + 1) / 2}, DType::UInt8, device);
    Buffer absmax = Buffer::empty({blocks}, DType::Float32, device);
    be.nf4_quantize(tmp.data(), DType::Float32, n, w.blocksize, w.packed.data_as<std::uint8_t>(), absmax.data_as<float>(),
                    stream);
    if (double_quant) {
      if (!block->dequant_code_.defined() || block->dequant_code_.numel() == 0) {
        float code[256];
        for (int i = 0; i < 256; ++i) code[i] = nf4::dynamic_map(i);
        block->dequant_code_ = Buffer::empty({256}, DType::Float32, device);
        block->dequant_code_.copy_from_host(code, stream);
      }
      w.code = block->dequant_code_;
      w.offset = Buffer::empty({1}, DType::Float32, device);
      w.qabsmax = Buffer::empty({blocks}, DType::UInt8, device);
      w.absmax2 = Buffer::empty({num_blocks(blocks, nf4::kNestedBlocksize)}, DType::Float32, device);
      be.nf4_absmax_mean(absmax.data_as<float>(), blocks, w.offset.data_as<float>(), stream);
      be.nf4_double_quantize(absmax.data_as<float>(), blocks, w.offset.data_as<float>(), w.code.data_as<float>(),
                             w.qabsmax.data_as<std::uint8_t>(), w.absmax2.data_as<float>(), stream);
    } else {
      w.absmax = absmax;
    }
    stream.synchronize();  // tmp dies here
  }

  // Norm weights and biases: one fp32 allocation.
  {
    const std::int64_t H = config.hidden_size, d = config.head_dim;
    const std::int64_t q = config.num_attention_heads * d, kv = config.num_key_value_heads * d;
    std::int64_t at = 0;
    auto seg = [&](std::int64_t n) {
      const std::int64_t start = at;
      at = align_up(at + n);
      return start;
    };
    block->ln_in_ = seg(H);
    block->ln_post_ = seg(H);
    if (config.qk_norm) {
      block->q_norm_ = seg(d);
      block->k_norm_ = seg(d);
    }
    if (config.attention_bias) block->bqkv_ = seg(q + 2 * kv);
    if (config.o_proj_bias) block->bo_ = seg(H);
    std::vector<float> host(static_cast<std::size_t>(at), 0.0f);
    auto put = [&](const char* name, std::int64_t offset) {
      const HostTensor& t = dense.at(name);
      std::memcpy(host.data() + offset, t.data, static_cast<std::size_t>(shape_numel(t.shape)) * sizeof(float));
    };
    put("input_layernorm.weight", block->ln_in_);
    put("post_attention_layernorm.weight", block->ln_post_);
    if (config.qk_norm) {
      put("self_attn.q_norm.weight", block->q_norm_);
      put("self_attn.k_norm.weight", block->k_norm_);
    }
    if (config.attention_bias) {
      put("self_attn.q_proj.bias", block->bqkv_);
      put("self_attn.k_proj.bias", block->bqkv_ + q);
      put("self_attn.v_proj.bias", block->bqkv_ + q + kv);
    }
    if (config.o_proj_bias) put("self_attn.o_proj.bias", block->bo_);
    block->dense_ = Buffer::empty({at}, DType::Float32, device);
    block->dense_.copy_from_host(host.data(), stream);
  }

  // LoRA: A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), B [out, r] = 0.
  if (lora != nullptr) {
    block->lora_ = *lora;
    for (const std::string& t : lora->targets) {
      for (int p = 0; p < 7; ++p) block->lora_target_[p] = block->lora_target_[p] || t == kNf4Projections[p];
    }
    const std::int64_t r = lora->rank;
    std::vector<ParamEntry> entries;
    std::int64_t at = 0;
    auto add = [&](int p, bool is_a, bool adjacent) {
      const Shape shape = proj_shape(config, p);
      const Shape s = is_a ? Shape{r, shape[1]} : Shape{shape[0], r};
      if (!adjacent) at = align_up(at);
      const std::string name = std::string(kNf4ProjectionPaths[p]) + (is_a ? ".lora_A.weight" : ".lora_B.weight");
      entries.push_back(ParamEntry{name, at, s, true});
      (is_a ? block->lora_a_ : block->lora_b_)[p] = at;
      at += shape_numel(s);
    };
    for (int p : {kQ, kK, kV, kO}) {
      if (!block->lora_target_[p]) continue;
      add(p, true, false);
      add(p, false, false);
    }
    // gate and up: the A matrices adjacent (one [R, H] operand), then the B matrices.
    bool first_a = true;
    for (int p : {kGate, kUp}) {
      if (!block->lora_target_[p]) continue;
      add(p, true, !first_a);
      first_a = false;
    }
    for (int p : {kGate, kUp}) {
      if (block->lora_target_[p]) add(p, false, false);
    }
    if (block->lora_target_[kDown]) {
      add(kDown, true, false);
      add(kDown, false, false);
    }
    const std::int64_t total = align_up(at);
    block->lora_layout_ = std::make_shared<const ParamLayout>(entries, total);

    std::vector<float> host(static_cast<std::size_t>(total), 0.0f);
    for (int p = 0; p < 7; ++p) {
      if (!block->lora_target_[p]) continue;
      const std::int64_t in = proj_shape(config, p)[1];
      std::mt19937_64 gen(lora->seed * 1000003ull + static_cast<std::uint64_t>(layer_idx) * 7919ull +
                          static_cast<std::uint64_t>(p));
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      std::uniform_real_distribution<double> dist(-bound, bound);
      float* a = host.data() + block->lora_a_[p];
      for (std::int64_t i = 0; i < r * in; ++i) a[i] = static_cast<float>(dist(gen));
    }
    block->lora_params_ = Buffer::empty({total}, DType::Float32, device);
    block->lora_params_.copy_from_host(host.data(), stream);

    // Selectors: I_r [r, r], then [I_r | 0] and [0 | I_r] ([r, 2r] each).
    std::vector<float> sel(static_cast<std::size_t>(5 * r * r), 0.0f);
    for (std::int64_t i = 0; i < r; ++i) {
      sel[i * r + i] = 1.0f;
      sel[r * r + i * 2 * r + i] = 1.0f;
      sel[3 * r * r + i * 2 * r + r + i] = 1.0f;
    }
    block->lora_consts_ = Buffer::empty({5 * r * r}, DType::Float32, device);
    block->lora_consts_.copy_from_host(sel.data(), stream);
  }

  // Activations (the fp32 block's saved layout), scratch (Nf4ScratchLayout), the bf16 operand, indices.
  block->attn_ws_floats_ = be.attention_workspace_floats(max_tokens, static_cast<int>(config.num_attention_heads),
                                                         static_cast<int>(config.num_key_value_heads),
                                                         static_cast<int>(config.head_dim));
  ActivationNeeds needs;
  needs.saved = (SavedLayout(config, max_tokens, compute).total + Impl::kept_lora_u(*block).floats()) *
                static_cast<std::int64_t>(sizeof(float));
  needs.scratch = Impl::scratch_layout(*block).total * static_cast<std::int64_t>(sizeof(float));
  if (compute == Precision::BF16) {
    const std::int64_t H = config.hidden_size, q = config.num_attention_heads * config.head_dim;
    needs.scratch_bf16 = max_tokens * std::max({H, q, 2 * config.intermediate_size}) * 2;
  }
  block->memory_ = BlockMemory(device, needs, std::move(arena), share_activations);
  block->indices_ = Buffer::empty({2 * max_tokens + 1}, DType::Int32, device);
  block->upload_rope_inv_freq(stream);
  block->dequant_bytes_ = Impl::scratch_bytes(*block);
  dequant_scratch(device, block->dequant_bytes_);  // grows the shared scratch now, not mid-forward
  stream.synchronize();
  return block;
}

std::int64_t Nf4Block::saved_bytes_per_token() const {
  return SavedLayout::floats_per_token(config_, precision_) * static_cast<std::int64_t>(sizeof(float)) +
         2 * Impl::kept_lora_u(*this).per_token;
}

std::int64_t Nf4Block::scratch_bytes_per_token() const {
  const std::int64_t ws_per_token = (attn_ws_floats_ + max_tokens_ - 1) / max_tokens_;
  const std::int64_t bf16_bytes =
      precision_ == Precision::BF16
          ? std::max({config_.hidden_size, config_.num_attention_heads * config_.head_dim, 2 * config_.intermediate_size}) * 2
          : 0;
  const std::int64_t lora = has_lora() ? 2 * 2 * lora_.rank * 4 + Impl::dropout_cols(*this) * 4 : 0;
  return (ScratchLayout::floats_per_token(config_) + config_.hidden_size + ws_per_token) *
             static_cast<std::int64_t>(sizeof(float)) + bf16_bytes + lora;
}

std::int64_t Nf4Block::device_bytes() const {
  std::size_t total = dense_.nbytes() + lora_params_.nbytes() + lora_consts_.nbytes() + dequant_code_.nbytes() +
                      rope_inv_freq_.nbytes();
  for (const Nf4Weight& w : weights_) {
    total += w.packed.nbytes() + w.absmax.nbytes() + w.qabsmax.nbytes() + w.absmax2.nbytes() + w.offset.nbytes();
    if (w.code.data() != dequant_code_.data()) total += w.code.nbytes();
  }
  return static_cast<std::int64_t>(total);
}

std::int64_t Nf4Block::activation_bytes() const {
  return memory_.owned_bytes() + static_cast<std::int64_t>(indices_.nbytes());
}

// ---- forward ----------------------------------------------------------------------------------

void Nf4Block::forward(const Buffer& x, Buffer& out, const std::vector<std::int64_t>& seq_lens, const Stream& stream,
                       std::optional<std::uint64_t> dropout_step) {
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
  forward_dropout_step_ = dropout_step;
  mem.forward_starts();
  DeviceGuard guard(device_);
  const Backend& be = backend_for(device_);
  const TransformerConfig& c = config_;
  const std::int64_t T = batch.tokens, H = c.hidden_size, d = c.head_dim, I = c.intermediate_size;
  const int nq = static_cast<int>(c.num_attention_heads), nkv = static_cast<int>(c.num_key_value_heads);
  const std::int64_t q = nq * d, kv = nkv * d;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float* inv_freq = rope_inv_freq_.data_as<float>();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));

  upload_indices(position_indices(batch), stream);
  const std::int32_t* positions = indices_.data_as<std::int32_t>();
  const std::int32_t* cu = positions + T;
  const int n_seqs = static_cast<int>(seq_lens.size());

  Impl m(*this, be, stream, T, mem, dropout_step);
  const float* D = dense_.data_as<float>();
  const SavedLayout sl(c, max_tokens_, precision_);
  const ScratchLayout sc(c, max_tokens_, attn_ws_floats_);
  float* S = mem.saved();
  float* X = mem.scratch();
  const float* xin = x.data_as<float>();
  float* y = out.data_as<float>();

  float* h = X + sc.sh;
  const bool qkv_bf16_only =
      m.bf16_operand_only(kGroupQ) && m.bf16_operand_only(kGroupK) && m.bf16_operand_only(kGroupV);
  if (qkv_bf16_only) {
    be.rmsnorm_forward_bf16(xin, D + ln_in_, m.op16, S + sl.rstd1, T, H, eps, stream);
  } else {
    be.rmsnorm_forward(xin, D + ln_in_, h, S + sl.rstd1, T, H, eps, stream);
  }
  if (m.bf && !qkv_bf16_only) be.to_bf16(h, m.op16, T * H, stream);  // the products' operand
  const float* bias = bqkv_ >= 0 ? D + bqkv_ : nullptr;
  // q and k (before the norm) and v into their saved slots: fp32, or in bf16 mode bf16 as the
  // product writes them (onto the bf16 LoRA term; with a bias or dropout, rounded after the adapters
  // and the bias, added in fp32 in d_att, free until the backward).
  auto project_raw = [&](int group, const float* b, std::int64_t n, float* dst) {
    if (!m.bf) {
      m.product(group, false, h, m.op16, nullptr, dst);
      m.lora_forward(group, h, nullptr, dst);
      if (b != nullptr) be.add_bias(dst, b, T, n, stream);
      return;
    }
    m.product_sum_to_bf16(group, false, h, m.op16, b, X + sc.d_att, reinterpret_cast<std::uint16_t*>(dst));
  };
  project_raw(kGroupQ, bias, q, S + sl.q_raw);
  project_raw(kGroupK, bias != nullptr ? bias + q : nullptr, kv, S + sl.k_raw);
  project_raw(kGroupV, bias != nullptr ? bias + q + kv : nullptr, kv, S + sl.v);
  const bool qkn = c.qk_norm;
  const Precision prec = precision_;
  qk_norm_rope_forward_saved(be, prec, S + sl.q_raw, qkn ? D + q_norm_ : nullptr, X + sc.q_rot,
                             qkn ? S + sl.rstd_q : nullptr, positions, T, nq, static_cast<int>(d), eps, inv_freq, stream);
  qk_norm_rope_forward_saved(be, prec, S + sl.k_raw, qkn ? D + k_norm_ : nullptr, X + sc.k_rot,
                             qkn ? S + sl.rstd_k : nullptr, positions, T, nkv, static_cast<int>(d), eps, inv_freq,
                             stream);
  const AttentionShape attn{cu, n_seqs, batch.max_seqlen, T, nq, nkv, static_cast<int>(d), scale};
  attention_forward_saved(be, prec, X + sc.q_rot, X + sc.k_rot, S + sl.v, S + sl.att, S + sl.lse, attn, stream);
  float* r = S + sl.r;
  // r = x + att Wo^T. In bf16 mode attention wrote att in bf16, the product's operand; an adapter
  // on o reads it too, or with dropout an fp32 copy (in d_att's scratch, free until the backward).
  m.product(kGroupO, false, S + sl.att, saved_bf16(prec, S + sl.att), xin, r);
  m.lora_forward(kGroupO, m.widened_att(S + sl.att, X + sc.d_att), saved_bf16(prec, S + sl.att), r);
  if (bo_ >= 0) be.add_bias(r, D + bo_, T, H, stream);
  float* g = X + sc.sh;
  const bool gu_bf16_only = m.bf16_operand_only(kGroupGU);
  if (gu_bf16_only) {
    be.rmsnorm_forward_bf16(r, D + ln_post_, m.op16, S + sl.rstd2, T, H, eps, stream);
  } else {
    be.rmsnorm_forward(r, D + ln_post_, g, S + sl.rstd2, T, H, eps, stream);
  }
  // gate_up is saved in bf16 in bf16 mode (written so by its product, onto the bf16 LoRA term, or
  // rounded after the adapters with dropout).
  std::uint16_t* gate_up16 = reinterpret_cast<std::uint16_t*>(S + sl.gate_up);
  if (gu_bf16_only) {
    m.product_sum_to_bf16(kGroupGU, false, nullptr, m.op16, nullptr, X + sc.d_gate_up, gate_up16);
  } else if (m.bf) {
    float* gate_up = X + sc.d_gate_up;
    m.product(kGroupGU, false, g, nullptr, nullptr, gate_up);
    m.lora_forward(kGroupGU, g, nullptr, gate_up);
    be.to_bf16(gate_up, gate_up16, T * 2 * I, stream);
  } else {
    m.product(kGroupGU, false, g, m.op16, nullptr, S + sl.gate_up);
    m.lora_forward(kGroupGU, g, nullptr, S + sl.gate_up);
  }
  float* act = X + sc.act;
  const bool down_bf16_only = m.bf16_operand_only(kGroupDown);
  if (down_bf16_only) {
    be.swiglu_forward(gate_up16, m.op16, T, I, stream);
  } else {
    m.swiglu_forward_saved(S + sl.gate_up, act, I);
  }
  m.product(kGroupDown, false, act, down_bf16_only ? m.op16 : nullptr, r, y);  // y = r + act Wdown^T
  m.lora_forward(kGroupDown, act, down_bf16_only ? m.op16 : nullptr, y);
  forward_seq_lens_ = seq_lens;
  mem.forward_done(seq_lens);
  set_last_stream(stream);
}

// ---- backward_lora ------------------------------------------------------------------------------

void Nf4Block::backward_lora(const Buffer& x, const Buffer& grad_out, Buffer& grad_in,
                             const std::vector<std::int64_t>& seq_lens, const Stream& stream,
                             CudaGradWorkspace& lora_ws, std::optional<std::uint64_t> dropout_step) {
  require_lora("backward_lora");
  const Batch batch = check_backward("backward_lora", "lora_ws", config_, device_, max_tokens_, x, grad_out, grad_in,
                                     seq_lens, stream, lora_ws, *lora_layout_, [&] {
    return "lora_ws (" + lora_ws.layout().describe() + ") was made for other LoRA adapters than this block's (" +
           lora_layout_->describe() + "); make one with block.new_lora_grad_workspace()";
  });

  std::lock_guard<std::mutex> lock(mutex_);
  if (forward_seq_lens_.empty()) {
    throw InvalidArgumentError("backward_lora needs a forward first: call forward(x, out, seq_lens) with the same x and "
                               "seq_lens, then backward_lora");
  }
  if (forward_seq_lens_ != seq_lens) {
    throw InvalidArgumentError("backward_lora seq_lens " + lens_str(seq_lens) + " differ from those of the latest forward " +
                               lens_str(forward_seq_lens_) + "; run forward on this batch first");
  }
  if (lora_.dropout > 0.0 && dropout_step != forward_dropout_step_) {
    throw InvalidArgumentError("backward_lora dropout_step " + step_str(dropout_step) +
                               " differs from that of the latest forward (" + step_str(forward_dropout_step_) +
                               "): the LoRA dropout masks must be the forward's");
  }
  const BlockMemory::Call mem(memory_);
  mem.check_saved(seq_lens, "backward_lora");

  DeviceGuard guard(device_);
  const Backend& be = backend_for(device_);
  const TransformerConfig& c = config_;
  const std::int64_t T = batch.tokens, H = c.hidden_size, d = c.head_dim, I = c.intermediate_size;
  const int nq = static_cast<int>(c.num_attention_heads), nkv = static_cast<int>(c.num_key_value_heads);
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float* inv_freq = rope_inv_freq_.data_as<float>();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const std::int32_t* positions = indices_.data_as<std::int32_t>();
  const std::int32_t* cu = positions + T;
  const int n_seqs = static_cast<int>(seq_lens.size());

  Impl m(*this, be, stream, T, mem, dropout_step);
  const float* D = dense_.data_as<float>();
  float* G = lora_ws.flat().data_as<float>();
  const SavedLayout sl(c, max_tokens_, precision_);
  const ScratchLayout sc(c, max_tokens_, attn_ws_floats_);
  const Nf4ScratchLayout nsc = Impl::scratch_layout(*this);
  float* S = mem.saved();
  float* X = mem.scratch();
  const float* xin = x.data_as<float>();
  const float* dy = grad_out.data_as<float>();
  float* dx = grad_in.data_as<float>();
  const float* r = S + sl.r;

  // MLP: out = r + swiglu(g Wgu^T) Wdown^T. The adapters' inputs g and act are recomputed only for
  // the groups that have adapters (bf16 LoRA: in bf16, in the fp32 slots).
  const auto* gate_up16 = reinterpret_cast<const std::uint16_t*>(S + sl.gate_up);
  float* g = X + sc.sh;
  auto* g16 = reinterpret_cast<std::uint16_t*>(g);
  if (m.adapted(kGroupGU)) m.norm_for_adapters(r, D + ln_post_, g, eps);
  float* act = X + sc.act;
  auto* act16 = reinterpret_cast<std::uint16_t*>(act);
  const std::uint16_t* dy16 = nullptr;
  if (m.adapted(kGroupDown)) {
    if (m.bf16_lora()) {
      be.swiglu_forward(gate_up16, act16, T, I, stream);
    } else {
      m.swiglu_forward_saved(S + sl.gate_up, act, I);
    }
    dy16 = m.grad16(kGroupDown, dy);
    m.lora_grads(kGroupDown, act, act16, dy, dy16, G);
  }
  // d_act = dy Wdown (+ the adapter's term). In bf16 mode SwiGLU's backward reads it in bf16: written
  // so by the product (onto the bf16 LoRA term with an adapter) into act's fp32 slot (act was last
  // read by the adapter's gradients), or, with an adapter and dropout, rounded after the fp32 sum in
  // that slot into a buffer SwiGLU's backward does not write (d_gate_up's slot when that output goes
  // to op16, else op16).
  float* d_act = act;
  float* d_gu = X + sc.d_gate_up;
  const bool gu_bf16_only = m.bf16_operand_only(kGroupGU);
  const std::uint16_t* d_act16 = nullptr;
  if (m.bf) {
    std::uint16_t* dst = !m.adapted(kGroupDown) || m.bf16_lora() ? reinterpret_cast<std::uint16_t*>(d_act)
                         : gu_bf16_only                           ? reinterpret_cast<std::uint16_t*>(d_gu)
                                                                  : m.op16;
    m.product_sum_to_bf16(kGroupDown, true, dy, dy16, nullptr, d_act, dst);
    d_act16 = dst;
  } else {
    m.product_dx(kGroupDown, dy, nullptr, false, d_act);
  }
  if (gu_bf16_only) {
    be.swiglu_backward(d_act16, gate_up16, m.op16, T, I, stream);
    m.lora_grads(kGroupGU, g, g16, d_gu, m.op16, G);
  } else {
    m.swiglu_backward_saved(d_act, d_act16, S + sl.gate_up, d_gu, I);
    m.lora_grads(kGroupGU, g, nullptr, d_gu, nullptr, G);
  }
  float* dg = X + sc.sh;
  m.product_dx(kGroupGU, d_gu, gu_bf16_only ? m.op16 : nullptr, false, dg);  // dg = d_gu Wgu (+ du A)
  // dr = dy + rmsnorm_backward(dg) (grad_in may be grad_out): grad_in carries dr from here on; in
  // bf16 mode the same pass writes dr in bf16 into op16 (free since dg's product), o's operands.
  std::uint16_t* dr16 = m.bf ? m.op16 : nullptr;
  be.rmsnorm_backward(dg, r, D + ln_post_, S + sl.rstd2, dy, dx, dr16, nullptr, T, H, stream);  // frozen norm

  // Attention: r = x + att Wo^T (+ bo).
  m.lora_grads(kGroupO, m.widened_att(S + sl.att, X + sc.d_att), saved_bf16(precision_, S + sl.att), dx, dr16, G);
  // d_att = dr Wo (+ the adapter's term): in bf16 mode attention reads it in bf16, written so by the
  // product (onto the bf16 LoRA term with an adapter), or with an adapter and dropout rounded after
  // the fp32 sum into op16, free until dq's product.
  float* d_att = X + sc.d_att;
  const float* d_att_in = d_att;
  if (m.bf) {
    std::uint16_t* dst = m.adapted(kGroupO) && !m.bf16_lora() ? m.op16 : reinterpret_cast<std::uint16_t*>(d_att);
    m.product_sum_to_bf16(kGroupO, true, dx, dr16, nullptr, d_att, dst);
    d_att_in = reinterpret_cast<const float*>(dst);
  } else {
    m.product_dx(kGroupO, dx, nullptr, false, d_att);
  }
  const bool qkn = c.qk_norm;
  float* q_rot = X + sc.q_rot;
  float* k_rot = X + sc.k_rot;
  const Precision prec = precision_;
  qk_norm_rope_forward_saved(be, prec, S + sl.q_raw, qkn ? D + q_norm_ : nullptr, q_rot,
                             qkn ? S + sl.rstd_q : nullptr, positions, T, nq, static_cast<int>(d), eps, inv_freq, stream);
  qk_norm_rope_forward_saved(be, prec, S + sl.k_raw, qkn ? D + k_norm_ : nullptr, k_rot,
                             qkn ? S + sl.rstd_k : nullptr, positions, T, nkv, static_cast<int>(d), eps, inv_freq,
                             stream);
  float* dq_rot = X + sc.dq_rot;
  float* dk_rot = X + sc.dk_rot;
  float* dv = X + sc.dv;
  const AttentionShape attn{cu, n_seqs, batch.max_seqlen, T, nq, nkv, static_cast<int>(d), scale};
  attention_backward_saved(be, prec, q_rot, k_rot, S + sl.v, S + sl.att, d_att_in, S + sl.lse, dq_rot, dk_rot, dv,
                           X + sc.attn_ws, attn, stream);
  // dq and dk: fp32, or bf16 where only bf16 products read them (the norms and biases are frozen):
  // then written so, in their fp32 slots, and no conversion follows.
  float* dq = d_att;
  float* dk = q_rot;
  std::uint16_t* dq16 = m.bf16_operand_only(kGroupQ) ? reinterpret_cast<std::uint16_t*>(dq) : nullptr;
  std::uint16_t* dk16 = m.bf16_operand_only(kGroupK) ? reinterpret_cast<std::uint16_t*>(dk) : nullptr;
  qk_norm_rope_backward_saved(be, prec, dq_rot, S + sl.q_raw, qkn ? D + q_norm_ : nullptr,
                              qkn ? S + sl.rstd_q : nullptr, dq, dq16, nullptr, positions, T, nq,
                              static_cast<int>(d), inv_freq, stream);
  qk_norm_rope_backward_saved(be, prec, dk_rot, S + sl.k_raw, qkn ? D + k_norm_ : nullptr,
                              qkn ? S + sl.rstd_k : nullptr, dk, dk16, nullptr, positions, T, nkv,
                              static_cast<int>(d), inv_freq, stream);
  float* h = X + sc.sh;
  auto* h16 = reinterpret_cast<std::uint16_t*>(h);
  if (m.adapted(kGroupQ) || m.adapted(kGroupK) || m.adapted(kGroupV)) m.norm_for_adapters(xin, D + ln_in_, h, eps);
  float* dh = X + nsc.dh;  // h stays readable for the adapters' gradients
  // dh = sum over q, k, v of dy W (+ the adapter's term), each dy in bf16 once (dq16, dk16, or op16).
  const std::tuple<int, const float*, const std::uint16_t*> qkv[3] = {
      {kGroupQ, dq, dq16}, {kGroupK, dk, dk16}, {kGroupV, dv, nullptr}};
  for (const auto& [group, dproj, written16] : qkv) {
    const std::uint16_t* dproj16 = written16 != nullptr ? written16 : m.grad16(group, dproj);
    m.lora_grads(group, h, h16, dproj, dproj16, G);
    m.product_dx(group, dproj, dproj16, group != kGroupQ, dh);
  }
  be.rmsnorm_backward(dh, xin, D + ln_in_, S + sl.rstd1, dx, dx, nullptr, nullptr, T, H, stream);
  lora_ws.set_last_stream(stream);
  set_last_stream(stream);
}

// ---- LoRA: layout, workspaces, optimizer, weights -------------------------------------------------

void Nf4Block::require_lora(const std::string& call) const {
  if (!has_lora()) {
    throw UnsupportedOperationError(call + " is not supported by this nf4 block: it has no LoRA adapters; make it "
                                           "with CudaBlock.nf4(..., lora=cudablocks.LoraConfig(rank=..., alpha=..., "
                                           "targets=(...)))");
  }
}

std::shared_ptr<const ParamLayout> Nf4Block::lora_layout() const {
  require_lora("lora_layout");
  return lora_layout_;
}

std::shared_ptr<CudaGradWorkspace> Nf4Block::new_lora_grad_workspace(const Stream& stream) const {
  require_lora("new_lora_grad_workspace");
  return std::make_shared<CudaGradWorkspace>(lora_layout_, device_, stream);
}

std::shared_ptr<GpuBlockOptimizerState> Nf4Block::init_lora_optimizer_state(const Stream& stream) const {
  require_lora("init_lora_optimizer_state");
  if (stream.device() != device_) {
    throw DeviceError("init_lora_optimizer_state of a block on " + device_.str() + " with a stream of " +
                      stream.device().str());
  }
  return std::make_shared<GpuBlockOptimizerState>(lora_layout_, device_, stream);
}

void Nf4Block::lora_optimizer_step(GpuBlockOptimizerState& state, const AdamWHyper& hyper, const Stream& stream,
                                   const CudaGradWorkspace& lora_ws, const GradNorm* grad_norm) {
  require_lora("lora_optimizer_step");
  check_optimizer_step("lora_optimizer_step", "lora_ws", "other adapters", "; use init_lora_optimizer_state()", device_,
                       *lora_layout_, hyper, stream, state, lora_ws, grad_norm);
  std::lock_guard<std::mutex> lock(mutex_);
  DeviceGuard guard(device_);
  // Every adapter decays alike (torch.optim.AdamW over PEFT's parameters); the gaps stay zero.
  backend_for(device_).adamw_step(lora_params_.data_as<float>(), lora_ws.flat().data_as<float>(),
                                  state.exp_avg().data_as<float>(), state.exp_avg_sq().data_as<float>(),
                                  lora_layout_->total_floats(), hyper,
                                  grad_norm != nullptr ? grad_norm->sum_squares().data_as<float>() : nullptr, nullptr,
                                  stream);
  set_last_stream(stream);
}

void Nf4Block::download_lora_weights(float* host, const Stream& stream) const {
  require_lora("download_lora_weights");
  if (stream.device() != device_) {
    throw DeviceError("download_lora_weights of a block on " + device_.str() + " with a stream of " +
                      stream.device().str());
  }
  lora_params_.copy_to_host(host, stream);
}

void Nf4Block::upload_lora_weights(const WeightMap& weights, const Stream& stream) {
  require_lora("upload_lora_weights");
  if (stream.device() != device_) {
    throw DeviceError("upload_lora_weights of a block on " + device_.str() + " with a stream of " + stream.device().str());
  }
  for (const auto& [name, t] : weights) {
    const ParamEntry* e = lora_layout_->find(name);
    if (e == nullptr) {
      std::string expected;
      for (const ParamEntry& x : lora_layout_->entries()) expected += (expected.empty() ? "" : ", ") + x.name;
      throw InvalidArgumentError("upload_lora_weights: unexpected tensor '" + name + "'; this block's adapters are: " +
                                 expected);
    }
    if (t.shape != e->shape) {
      throw ShapeError("upload_lora_weights: '" + name + "' has shape " + shape_str(t.shape) + ", expected " +
                       shape_str(e->shape));
    }
    if (t.data == nullptr) throw InvalidArgumentError("upload_lora_weights: '" + name + "' has no data");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  DeviceGuard guard(device_);
  for (const auto& [name, t] : weights) {
    const ParamEntry* e = lora_layout_->find(name);
    lora_params_.view(e->offset, e->shape).copy_from_host(t.data, stream);
  }
  set_last_stream(stream);
}

}  // namespace cudablocks
