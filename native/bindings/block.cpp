// TransformerConfig, BlockArena, CudaBlock (the fp32 and nf4 kinds) and CudaGradWorkspace.
#include <cmath>
#include <optional>
#include <set>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.hpp"
#include "cudablocks/block.hpp"
#include "cudablocks/block_arena.hpp"
#include "cudablocks/config.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/nf4_block.hpp"

namespace cudablocks::python {

namespace {

// An int, or a sequence of ints (numpy integers included), as a list of lengths.
std::vector<std::int64_t> to_seq_lens(const py::object& obj) {
  auto as_int = [](const py::handle& item) -> std::int64_t {
    if (py::isinstance<py::bool_>(item) || !PyIndex_Check(item.ptr())) {
      throw InvalidArgumentError("seq_lens must be an int or a list of ints, got an element " +
                                 std::string(py::repr(item)));
    }
    return py::reinterpret_steal<py::object>(PyNumber_Index(item.ptr())).cast<std::int64_t>();
  };
  if (PyIndex_Check(obj.ptr()) && !py::isinstance<py::bool_>(obj)) return {as_int(obj)};
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj)) {
    throw InvalidArgumentError("seq_lens must be an int or a list of ints, got " + std::string(py::repr(obj)));
  }
  std::vector<std::int64_t> lens;
  for (const py::handle& item : obj.cast<py::sequence>()) lens.push_back(as_int(item));
  return lens;
}

// A numpy float32 copy of the flat host data, sliced into {HF name: array} (views of one array).
py::dict named_arrays(const ParamLayout& layout, const std::function<void(float*)>& download) {
  py::array_t<float> flat(layout.total_floats());
  float* dst = flat.mutable_data();
  {
    py::gil_scoped_release release;
    download(dst);
  }
  py::dict result;
  for (const ParamEntry& e : layout.entries()) {
    py::slice range(e.offset, e.offset + e.numel(), 1);
    result[py::str(e.name)] = flat[range].attr("reshape")(py::cast(e.shape));
  }
  return result;
}

py::list layout_list(const ParamLayout& layout) {
  py::list rows;
  for (const ParamEntry& e : layout.entries()) {
    rows.append(py::make_tuple(e.name, e.offset, py::tuple(py::cast(e.shape)), e.is_matrix));
  }
  return rows;
}

Stream block_stream(const py::object& stream, const Device& device) {
  return stream.is_none() ? default_stream(device) : stream.cast<Stream>();
}

py::dict config_dict(const TransformerConfig& c) {
  py::dict d;
  d["model_type"] = c.model_type;
  d["hidden_size"] = c.hidden_size;
  d["num_attention_heads"] = c.num_attention_heads;
  d["num_key_value_heads"] = c.num_key_value_heads;
  d["head_dim"] = c.head_dim;
  d["intermediate_size"] = c.intermediate_size;
  d["num_hidden_layers"] = c.num_hidden_layers;
  d["vocab_size"] = c.vocab_size;
  d["max_position_embeddings"] = c.max_position_embeddings;
  d["rms_norm_eps"] = c.rms_norm_eps;
  d["rope_theta"] = c.rope_theta;
  d["rope_type"] = c.rope_type;
  d["rope_factor"] = c.rope_factor;
  d["rope_low_freq_factor"] = c.rope_low_freq_factor;
  d["rope_high_freq_factor"] = c.rope_high_freq_factor;
  d["rope_original_max_position_embeddings"] = c.rope_original_max_position_embeddings;
  d["attention_bias"] = c.attention_bias;
  d["o_proj_bias"] = c.o_proj_bias;
  d["qk_norm"] = c.qk_norm;
  d["tie_word_embeddings"] = c.tie_word_embeddings;
  return d;
}

void bind_config(py::module_& m) {
  py::class_<TransformerConfig>(m, "TransformerConfig",
                                "The shape of a decoder transformer (qwen3, qwen2 or llama). Build it with "
                                "TransformerConfig.from_pretrained(dir) or from_dict(config_json_dict).")
      .def(py::init([](const std::string& model_type, std::int64_t hidden_size, std::int64_t num_attention_heads,
                       std::int64_t num_key_value_heads, std::int64_t head_dim, std::int64_t intermediate_size,
                       std::int64_t num_hidden_layers, std::int64_t vocab_size, std::int64_t max_position_embeddings,
                       double rms_norm_eps, double rope_theta, const std::string& rope_type, double rope_factor,
                       double rope_low_freq_factor, double rope_high_freq_factor,
                       std::int64_t rope_original_max_position_embeddings, bool attention_bias, bool o_proj_bias,
                       bool qk_norm, bool tie_word_embeddings) {
             TransformerConfig c;
             c.model_type = model_type;
             c.hidden_size = hidden_size;
             c.num_attention_heads = num_attention_heads;
             c.num_key_value_heads = num_key_value_heads;
             c.head_dim = head_dim;
             c.intermediate_size = intermediate_size;
             c.num_hidden_layers = num_hidden_layers;
             c.vocab_size = vocab_size;
             c.max_position_embeddings = max_position_embeddings;
             c.rms_norm_eps = rms_norm_eps;
             c.rope_theta = rope_theta;
             c.rope_type = rope_type;
             c.rope_factor = rope_factor;
             c.rope_low_freq_factor = rope_low_freq_factor;
             c.rope_high_freq_factor = rope_high_freq_factor;
             c.rope_original_max_position_embeddings = rope_original_max_position_embeddings;
             c.attention_bias = attention_bias;
             c.o_proj_bias = o_proj_bias;
             c.qk_norm = qk_norm;
             c.tie_word_embeddings = tie_word_embeddings;
             c.validate();
             return c;
           }),
           py::kw_only(), py::arg("model_type"), py::arg("hidden_size"), py::arg("num_attention_heads"),
           py::arg("num_key_value_heads"), py::arg("head_dim"), py::arg("intermediate_size"),
           py::arg("num_hidden_layers"), py::arg("vocab_size"), py::arg("max_position_embeddings"),
           py::arg("rms_norm_eps") = 1e-6, py::arg("rope_theta") = 10000.0, py::arg("rope_type") = "default",
           py::arg("rope_factor") = 1.0, py::arg("rope_low_freq_factor") = 1.0, py::arg("rope_high_freq_factor") = 4.0,
           py::arg("rope_original_max_position_embeddings") = 0, py::arg("attention_bias") = false,
           py::arg("o_proj_bias") = false, py::arg("qk_norm") = false, py::arg("tie_word_embeddings") = false,
           "Every field explicit (keyword-only); validated. Most users want from_pretrained / from_dict.")
      .def_static("from_dict", [](const py::object& d) { return py::module_::import("cudablocks.config").attr("config_from_dict")(d); },
                  py::arg("config"), "From a Hugging Face config.json dict (transformers 4 or 5 spelling).")
      .def_static("from_pretrained", [](const py::object& path) {
            return py::module_::import("cudablocks.config").attr("config_from_pretrained")(path);
          }, py::arg("path"), "Reads `path`/config.json (or `path` itself when it is a .json file).")
      .def_readwrite("model_type", &TransformerConfig::model_type)
      .def_readwrite("hidden_size", &TransformerConfig::hidden_size)
      .def_readwrite("num_attention_heads", &TransformerConfig::num_attention_heads)
      .def_readwrite("num_key_value_heads", &TransformerConfig::num_key_value_heads)
      .def_readwrite("head_dim", &TransformerConfig::head_dim)
      .def_readwrite("intermediate_size", &TransformerConfig::intermediate_size)
      .def_readwrite("num_hidden_layers", &TransformerConfig::num_hidden_layers)
      .def_readwrite("vocab_size", &TransformerConfig::vocab_size)
      .def_readwrite("max_position_embeddings", &TransformerConfig::max_position_embeddings)
      .def_readwrite("rms_norm_eps", &TransformerConfig::rms_norm_eps)
      .def_readwrite("rope_theta", &TransformerConfig::rope_theta)
      .def_readwrite("rope_type", &TransformerConfig::rope_type,
                     "RoPE scaling: \"default\" (none) or \"llama3\" (the rope_* numbers below apply to llama3 only).")
      .def_readwrite("rope_factor", &TransformerConfig::rope_factor)
      .def_readwrite("rope_low_freq_factor", &TransformerConfig::rope_low_freq_factor)
      .def_readwrite("rope_high_freq_factor", &TransformerConfig::rope_high_freq_factor)
      .def_readwrite("rope_original_max_position_embeddings", &TransformerConfig::rope_original_max_position_embeddings)
      .def_readwrite("attention_bias", &TransformerConfig::attention_bias,
                     "q_proj, k_proj and v_proj have biases (always for qwen2).")
      .def_readwrite("o_proj_bias", &TransformerConfig::o_proj_bias,
                     "o_proj has a bias (qwen3 and llama with attention_bias).")
      .def_readwrite("qk_norm", &TransformerConfig::qk_norm, "Per-head RMSNorm of q and k before RoPE (qwen3).")
      .def_readwrite("tie_word_embeddings", &TransformerConfig::tie_word_embeddings)
      .def("validate", &TransformerConfig::validate)
      .def("rope_inv_freq", [](const TransformerConfig& c) {
            const std::vector<float> inv_freq = c.rope_inv_freq();
            return py::array_t<float>(static_cast<py::ssize_t>(inv_freq.size()), inv_freq.data());
          }, "RoPE's inverse frequencies, float32 [head_dim // 2], as transformers computes them (llama3 scaling "
             "applied): the pair (i, i + head_dim // 2) at position p rotates by float32(p * inv_freq[i]).")
      .def("to_dict", &config_dict)
      .def("__eq__", [](const TransformerConfig& a, const py::object& b) {
            if (!py::isinstance<TransformerConfig>(b)) return false;
            return config_dict(a).equal(config_dict(b.cast<TransformerConfig>()));
          })
      .def("__repr__", [](const TransformerConfig& c) {
            std::string text = "TransformerConfig(";
            bool first = true;
            for (auto item : config_dict(c)) {
              text += (first ? "" : ", ") + std::string(py::str(item.first)) + "=" + std::string(py::repr(item.second));
              first = false;
            }
            return text + ")";
          })
      .def(py::pickle([](const TransformerConfig& c) { return config_dict(c); },
                      [](const py::dict& d) {
                        TransformerConfig c;
                        c.model_type = d["model_type"].cast<std::string>();
                        c.hidden_size = d["hidden_size"].cast<std::int64_t>();
                        c.num_attention_heads = d["num_attention_heads"].cast<std::int64_t>();
                        c.num_key_value_heads = d["num_key_value_heads"].cast<std::int64_t>();
                        c.head_dim = d["head_dim"].cast<std::int64_t>();
                        c.intermediate_size = d["intermediate_size"].cast<std::int64_t>();
                        c.num_hidden_layers = d["num_hidden_layers"].cast<std::int64_t>();
                        c.vocab_size = d["vocab_size"].cast<std::int64_t>();
                        c.max_position_embeddings = d["max_position_embeddings"].cast<std::int64_t>();
                        c.rms_norm_eps = d["rms_norm_eps"].cast<double>();
                        c.rope_theta = d["rope_theta"].cast<double>();
                        c.rope_type = d["rope_type"].cast<std::string>();
                        c.rope_factor = d["rope_factor"].cast<double>();
                        c.rope_low_freq_factor = d["rope_low_freq_factor"].cast<double>();
                        c.rope_high_freq_factor = d["rope_high_freq_factor"].cast<double>();
                        c.rope_original_max_position_embeddings =
                            d["rope_original_max_position_embeddings"].cast<std::int64_t>();
                        c.attention_bias = d["attention_bias"].cast<bool>();
                        c.o_proj_bias = d["o_proj_bias"].cast<bool>();
                        c.qk_norm = d["qk_norm"].cast<bool>();
                        c.tie_word_embeddings = d["tie_word_embeddings"].cast<bool>();
                        return c;
                      }));
}

// {name: float array} as a WeightMap of float32 C-contiguous copies kept alive in `keep`; names in
// `skip` are left out.
WeightMap float_weights(const py::dict& weights, std::vector<py::array>& keep, const std::set<std::string>& skip = {}) {
  py::module_ np = py::module_::import("numpy");
  WeightMap map;
  for (auto item : weights) {
    if (!py::isinstance<py::str>(item.first)) {
      throw InvalidArgumentError("weight names must be str, got " + std::string(py::repr(item.first)));
    }
    const std::string name = item.first.cast<std::string>();
    if (skip.count(name) != 0) continue;
    py::object value = py::reinterpret_borrow<py::object>(item.second);
    if (!py::isinstance<py::array>(value)) {
      throw DtypeError("weight '" + name + "' must be a numpy array (float32, bfloat16 or float16), got " +
                       std::string(py::str(py::type::of(value).attr("__name__"))));
    }
    const std::string dtype = py::str(value.attr("dtype").attr("name"));
    if (dtype != "float32" && dtype != "bfloat16" && dtype != "float16" && dtype != "float64") {
      throw DtypeError("weight '" + name + "' has dtype " + dtype + "; give float32, bfloat16 (ml_dtypes) or float16");
    }
    py::array array = np.attr("ascontiguousarray")(value, "float32");
    map[name] = HostTensor{Shape(array.shape(), array.shape() + array.ndim()), static_cast<const float*>(array.data())};
    keep.push_back(std::move(array));
  }
  return map;
}

std::shared_ptr<CudaBlock> make_fp32(const TransformerConfig& config, int layer_idx, const py::dict& weights,
                                     const Device& device, std::int64_t max_tokens, const std::string& precision,
                                     std::shared_ptr<BlockArena> arena, bool share_activations) {
  const Precision prec = precision_from_name(precision);
  BlockMemory::validate(device, arena, share_activations);  // before converting the weights
  std::vector<py::array> keep;
  const WeightMap map = float_weights(weights, keep);
  py::gil_scoped_release release;
  return Fp32Block::create(config, layer_idx, map, device, max_tokens, prec, std::move(arena), share_activations);
}

LoraConfig lora_from_python(const py::object& obj) {
  LoraConfig c;
  auto get = [&](const char* name) {
    if (!py::hasattr(obj, name)) {
      throw InvalidArgumentError("lora must be a cudablocks.LoraConfig (it has no '" + std::string(name) + "'), got " +
                                 std::string(py::repr(obj)));
    }
    return obj.attr(name);
  };
  c.rank = get("rank").cast<int>();
  c.alpha = get("alpha").cast<double>();
  py::object targets = get("targets");
  if (py::isinstance<py::str>(targets)) {
    c.targets = {targets.cast<std::string>()};
  } else {
    c.targets.clear();
    for (const py::handle& t : targets) {
      if (!py::isinstance<py::str>(t)) {
        throw InvalidArgumentError("LoraConfig: targets must be names like 'q_proj', got " + std::string(py::repr(t)));
      }
      c.targets.push_back(t.cast<std::string>());
    }
  }
  c.use_rslora = get("use_rslora").cast<bool>();
  c.dropout = get("dropout").cast<double>();
  c.seed = get("seed").cast<std::uint64_t>();
  return c;
}

bool is_uint8(const py::handle& value) {
  if (!py::hasattr(value, "dtype")) return false;
  const std::string dtype = py::str(value.attr("dtype"));
  return dtype == "uint8" || dtype == "torch.uint8";
}

// An nf4 block from float weights and/or bitsandbytes 4-bit entries (or cudablocks.nf4.Nf4Tensor values).
std::shared_ptr<CudaBlock> make_nf4(const TransformerConfig& config, int layer_idx, const py::dict& weights,
                                    const Device& device, std::int64_t max_tokens, const py::object& lora,
                                    const std::string& compute, bool double_quant, std::shared_ptr<BlockArena> arena,
                                    bool share_activations) {
  const Precision prec = precision_from_name(compute);
  BlockMemory::validate(device, arena, share_activations);  // before quantizing anything
  LoraConfig lora_config;
  if (!lora.is_none()) {
    lora_config = lora_from_python(lora);
    lora_config.validate();
  }
  py::module_ nf4 = py::module_::import("cudablocks.nf4");
  py::object tensor_class = nf4.attr("Nf4Tensor");
  Nf4WeightMap quantized;
  std::set<std::string> consumed;
  for (const char* path : kNf4ProjectionPaths) {
    const std::string w = std::string(path) + ".weight";
    const std::string state_key = w + ".quant_state.bitsandbytes__nf4";
    py::object t = py::none();
    if (weights.contains(w) && py::isinstance(weights[py::str(w)], tensor_class)) {
      t = weights[py::str(w)];
    } else if (weights.contains(state_key) || (weights.contains(w) && is_uint8(weights[py::str(w)]))) {
      t = tensor_class.attr("from_bnb_state_dict")(weights, std::string(path) + ".", device);
    }
    if (t.is_none()) continue;
    Nf4Weight nw;
    for (const py::handle& dim : t.attr("shape")) nw.shape.push_back(dim.cast<std::int64_t>());
    nw.blocksize = t.attr("blocksize").cast<int>();
    auto buffer = [&](const char* name) {
      py::object b = t.attr(name);
      return b.is_none() ? Buffer() : b.cast<PyBuffer>().buffer;
    };
    nw.packed = buffer("packed");
    if (t.attr("double_quant").cast<bool>()) {
      nw.qabsmax = buffer("qabsmax");
      nw.absmax2 = buffer("absmax2");
      nw.offset = buffer("offset_buffer");
      nw.code = buffer("nested_quant_map");
    } else {
      nw.absmax = buffer("absmax");
    }
    quantized[w] = nw;
    for (auto item : weights) {
      const std::string key = py::str(item.first);
      if (key == w || key.rfind(w + ".", 0) == 0) consumed.insert(key);
    }
  }
  std::vector<py::array> keep;
  const WeightMap dense = float_weights(weights, keep, consumed);
  py::gil_scoped_release release;
  return Nf4Block::create(config, layer_idx, dense, quantized, device, max_tokens, lora.is_none() ? nullptr : &lora_config,
                          prec, double_quant, std::move(arena), share_activations);
}

// The dropout_step keyword of forward and backward_lora: None, or an int in [0, 2^64).
std::optional<std::uint64_t> dropout_step_arg(const py::object& step) {
  if (step.is_none()) return std::nullopt;
  return to_uint64(step, "dropout_step");
}

std::shared_ptr<CudaGradWorkspace> lora_workspace(const CudaBlock& self, const py::object& stream_arg) {
  self.require_lora("new_lora_grad_workspace");
  const Stream stream = block_stream(stream_arg, self.device());
  py::gil_scoped_release release;
  auto ws = self.new_lora_grad_workspace(stream);
  if (stream_arg.is_none()) stream.synchronize();
  return ws;
}

void bind_arena(py::module_& m) {
  py::class_<BlockArena, std::shared_ptr<BlockArena>>(
      m, "BlockArena",
      "Activation memory shared by the blocks of one device, which run one at a time: blocks made with "
      "arena=... take their transient scratch from it (and with share_activations=True their saved "
      "activations too), so N layers need about one layer's activation memory. Each region grows to the "
      "largest block registered. Blocks sharing an arena must run on one stream. With shared activations, "
      "run a block's forward again right before its backward (a model recomputes each layer from the top); "
      "otherwise backward raises InvalidArgumentError.")
      .def(py::init<const Device&>(), py::arg("device"))
      .def_property_readonly("device", &BlockArena::device)
      .def_property_readonly("nbytes", &BlockArena::nbytes, "Device bytes of all its regions together.")
      .def("__repr__", [](const BlockArena& a) {
            return "BlockArena(" + a.device().str() + ", " + std::to_string(a.nbytes()) + " bytes)";
          });
}

void bind_block_class(py::module_& m) {
  py::class_<CudaBlock, std::shared_ptr<CudaBlock>>(
      m, "CudaBlock",
      "One decoder layer living on a device. Make one with CudaBlock.fp32(...) (trainable fp32 weights) or "
      "CudaBlock.nf4(...) (frozen NF4 weights, optional LoRA adapters); see DESIGN §3-§5.")
      .def_static("fp32", &make_fp32, py::arg("config"), py::arg("layer_idx"), py::arg("weights"), py::arg("device"),
                  py::arg("max_tokens"), py::arg("precision") = "fp32", py::kw_only(),
                  py::arg("arena") = nullptr, py::arg("share_activations") = false,
                  "An fp32 block from {HF name relative to the layer: numpy array} (float32, bfloat16 or float16), "
                  "with activation memory for up to max_tokens packed tokens. precision: \"fp32\", \"tf32\" or "
                  "\"bf16\" for the matrix products. arena: a BlockArena of the same device to take the scratch "
                  "from (and the saved activations with share_activations=True), instead of allocating it.")
      .def_property_readonly("kind", &CudaBlock::kind)
      .def_property_readonly("layer_idx", &CudaBlock::layer_idx)
      .def_property_readonly("config", &CudaBlock::config)
      .def_property_readonly("device", &CudaBlock::device)
      .def_property_readonly("max_tokens", &CudaBlock::max_tokens)
      .def_property_readonly("precision", [](const CudaBlock& b) { return precision_name(b.precision()); })
      .def_property_readonly("saved_bytes_per_token", &CudaBlock::saved_bytes_per_token,
                             "Activation bytes kept from forward to backward, per token.")
      .def_property_readonly("scratch_bytes_per_token", &CudaBlock::scratch_bytes_per_token,
                             "Transient scratch bytes per token of max_tokens.")
      .def_static("nf4", &make_nf4, py::arg("config"), py::arg("layer_idx"), py::arg("weights"), py::arg("device"),
                  py::arg("max_tokens"), py::arg("lora") = py::none(), py::arg("compute") = "bf16",
                  py::arg("double_quant") = false, py::kw_only(), py::arg("arena") = nullptr,
                  py::arg("share_activations") = false,
                  "An nf4 block: frozen NF4 projections (bitsandbytes' format), optional LoRA adapters. weights: "
                  "{HF name relative to the layer: array}: float projections are quantized on `device` (blocksize 64, "
                  "double-quantized with double_quant); a projection may instead come as its bitsandbytes 4-bit "
                  "entries ('<proj>.weight' uint8, '.absmax', '.quant_map', '.nested_*', '.quant_state.bitsandbytes__nf4') "
                  "or as a cudablocks.nf4.Nf4Tensor. Norm weights and biases in float. lora: None or a "
                  "cudablocks.LoraConfig. compute: \"bf16\" (default), \"tf32\" or \"fp32\" for the products. arena, "
                  "share_activations: as for CudaBlock.fp32.")
      .def_property_readonly("device_bytes", &CudaBlock::device_bytes,
                             "Device bytes of the resident parameters (nf4: packed weights, scales, norms, biases, LoRA).")
      .def_property_readonly("activation_bytes", &CudaBlock::activation_bytes,
                             "Device bytes of the activations, scratch and indices the block holds for max_tokens "
                             "(not what it takes from a BlockArena).")
      .def_property_readonly("has_lora", [](const CudaBlock& b) {
            auto* nf4 = dynamic_cast<const Nf4Block*>(&b);
            return nf4 != nullptr && nf4->has_lora();
          })
      .def_property_readonly("lora_layout", [](const CudaBlock& b) {
            b.require_lora("lora_layout");
            return layout_list(*b.lora_layout());
          }, "[(PEFT name relative to the layer, offset in floats, shape, True)] of the LoRA adapters' flat allocation.")
      .def("new_lora_grad_workspace", &lora_workspace, py::arg("stream") = py::none(),
           "A zeroed CudaGradWorkspace for the LoRA adapters (one contiguous allocation).")
      .def("backward_lora", [](CudaBlock& self, const PyBuffer& x, const PyBuffer& grad_out, PyBuffer& grad_in,
                               const py::object& seq_lens, const py::object& stream_arg, CudaGradWorkspace* lora_ws,
                               const py::object& dropout_step) {
            self.require_lora("backward_lora");
            if (lora_ws == nullptr) {
              throw InvalidArgumentError("backward_lora needs lora_ws: make one with block.new_lora_grad_workspace()");
            }
            const std::optional<std::uint64_t> step = dropout_step_arg(dropout_step);
            const std::vector<std::int64_t> lens = to_seq_lens(seq_lens);
            run_queued(stream_arg, {&grad_in}, [&](const Stream& stream) {
              self.backward_lora(x.buffer, grad_out.buffer, grad_in.buffer, lens, stream, *lora_ws, step);
            });
          }, py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), py::arg("seq_lens"), py::arg("stream") = py::none(),
          py::arg("lora_ws") = nullptr, py::kw_only(), py::arg("dropout_step") = py::none(),
          "After forward(x, ..., seq_lens, dropout_step=...): grad_in = dL/dx (through the frozen weights and the "
          "adapters); the LoRA gradients are ADDED into lora_ws. With LoRA dropout, dropout_step must be the "
          "forward's (InvalidArgumentError otherwise): the masks are drawn again from it.")
      .def("init_lora_optimizer_state", [](const CudaBlock& self, const py::object& stream_arg) {
            self.require_lora("init_lora_optimizer_state");
            const Stream stream = block_stream(stream_arg, self.device());
            py::gil_scoped_release release;
            auto state = self.init_lora_optimizer_state(stream);
            if (stream_arg.is_none()) stream.synchronize();
            return state;
          }, py::arg("stream") = py::none(), "Zeroed AdamW moments for the LoRA adapters.")
      .def("lora_optimizer_step", [](CudaBlock& self, GpuBlockOptimizerState& state, std::int64_t step, float lr,
                                     float beta1, float beta2, float eps, float weight_decay,
                                     const py::object& stream_arg, const CudaGradWorkspace* lora_ws,
                                     const GradNorm* grad_norm, float max_grad_norm) {
            self.require_lora("lora_optimizer_step");
            if (lora_ws == nullptr) throw InvalidArgumentError("lora_optimizer_step needs lora_ws, the gradients to apply");
            const AdamWHyper hyper = adamw_hyper(step, lr, beta1, beta2, eps, weight_decay, max_grad_norm);
            const Stream stream = stream_arg.is_none() ? lora_ws->last_stream() : stream_arg.cast<Stream>();
            py::gil_scoped_release release;
            self.lora_optimizer_step(state, hyper, stream, *lora_ws, grad_norm);
          }, py::arg("state"), py::arg("step"), py::arg("lr"), py::arg("beta1") = 0.9f, py::arg("beta2") = 0.999f,
          py::arg("eps") = 1e-8f, py::arg("weight_decay") = 0.01f, py::arg("stream") = py::none(),
          py::arg("lora_ws") = nullptr, py::kw_only(), py::arg("grad_norm") = nullptr,
          py::arg("max_grad_norm") = INFINITY,
          "One AdamW step over every LoRA adapter (torch.optim.AdamW; weight decay on all of them), clipped with "
          "grad_norm as optimizer_step.")
      .def("download_lora_weights", [](const CudaBlock& self, const py::object& stream_arg) {
            self.require_lora("download_lora_weights");
            auto layout = self.lora_layout();
            const Stream stream = stream_arg.is_none() ? self.last_stream() : stream_arg.cast<Stream>();
            return named_arrays(*layout, [&](float* dst) { self.download_lora_weights(dst, stream); });
          }, py::arg("stream") = py::none(),
          "{PEFT name relative to the layer ('self_attn.q_proj.lora_A.weight', ...): float32 numpy array}.")
      .def("upload_lora_weights", [](CudaBlock& self, const py::dict& weights, const py::object& stream_arg) {
            self.require_lora("upload_lora_weights");
            std::vector<py::array> keep;
            const WeightMap map = float_weights(weights, keep);
            // Default: ordered after the block's latest work (which may read the adapters).
            const Stream stream = stream_arg.is_none() ? self.last_stream() : stream_arg.cast<Stream>();
            py::gil_scoped_release release;
            self.upload_lora_weights(map, stream);
            stream.synchronize();
          }, py::arg("weights"), py::arg("stream") = py::none(),
          "Sets LoRA adapters from {PEFT name relative to the layer: array} (any subset; all checked first).")
      .def_property_readonly("param_layout", [](const CudaBlock& b) { return layout_list(*b.param_layout()); },
                             "[(HF name, offset in floats, shape, is_matrix)] of the flat parameters and gradients.")
      .def("forward", [](CudaBlock& self, const PyBuffer& x, PyBuffer& out, const py::object& seq_lens,
                         const py::object& stream_arg, const py::object& dropout_step) {
            const std::optional<std::uint64_t> step = dropout_step_arg(dropout_step);
            const std::vector<std::int64_t> lens = to_seq_lens(seq_lens);
            run_queued(stream_arg, {&out}, [&](const Stream& stream) {
              self.forward(x.buffer, out.buffer, lens, stream, step);
            });
          }, py::arg("x"), py::arg("out"), py::arg("seq_lens"), py::arg("stream") = py::none(), py::kw_only(),
          py::arg("dropout_step") = py::none(),
          "out = layer(x) for packed sequences x, out float32 [sum(seq_lens), hidden]. Saves what backward needs. "
          "dropout_step (an int in [0, 2^64), or None): for an nf4 block with LoRA dropout, the training step whose "
          "masks the adapters' inputs get (a pure function of LoraConfig.seed, the layer, the projection, the step, "
          "the token row and the feature; see cudablocks.lora); None runs without dropout (inference). Blocks without "
          "LoRA dropout ignore it.")
      .def("backward", [](CudaBlock& self, const PyBuffer& x, const PyBuffer& grad_out, PyBuffer& grad_in,
                          const py::object& seq_lens, const py::object& stream_arg, CudaGradWorkspace* grad_ws) {
            self.require_full_training("backward");
            if (grad_ws == nullptr) {
              throw InvalidArgumentError("backward needs grad_ws: make one with cudablocks.CudaGradWorkspace(block)");
            }
            const std::vector<std::int64_t> lens = to_seq_lens(seq_lens);
            run_queued(stream_arg, {&grad_in}, [&](const Stream& stream) {
              self.backward(x.buffer, grad_out.buffer, grad_in.buffer, lens, stream, *grad_ws);
            });
          }, py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), py::arg("seq_lens"), py::arg("stream") = py::none(),
          py::arg("grad_ws") = nullptr,
          "After forward(x, ..., seq_lens): grad_in = dL/dx; every parameter gradient is ADDED into grad_ws.")
      .def("new_grad_workspace", [](const CudaBlock& self, const py::object& stream_arg) {
            const Stream stream = block_stream(stream_arg, self.device());
            py::gil_scoped_release release;
            auto ws = self.new_grad_workspace(stream);
            if (stream_arg.is_none()) stream.synchronize();
            return ws;
          }, py::arg("stream") = py::none(), "A zeroed CudaGradWorkspace for this block's parameters.")
      .def("download_weights", [](const CudaBlock& self, const py::object& stream_arg) {
            self.require_full_training("download_weights");
            auto layout = self.param_layout();
            const Stream stream = stream_arg.is_none() ? self.last_stream() : stream_arg.cast<Stream>();
            return named_arrays(*layout, [&](float* dst) { self.download_weights(dst, stream); });
          }, py::arg("stream") = py::none(), "{HF name relative to the layer: float32 numpy array}, after the work queued on `stream` "
          "(default: the stream of the block's latest call).")
      .def("init_optimizer_state", [](const CudaBlock& self, const py::object& stream_arg) {
            self.require_full_training("init_optimizer_state");
            const Stream stream = block_stream(stream_arg, self.device());
            py::gil_scoped_release release;
            auto state = self.init_optimizer_state(stream);
            if (stream_arg.is_none()) stream.synchronize();
            return state;
          }, py::arg("stream") = py::none(), "Zeroed AdamW moments (GpuBlockOptimizerState) for every parameter.")
      .def("optimizer_step", [](CudaBlock& self, GpuBlockOptimizerState& state, std::int64_t step, float lr, float beta1,
                                float beta2, float eps, float weight_decay, const py::object& stream_arg,
                                const CudaGradWorkspace* grad_ws, const GradNorm* grad_norm, float max_grad_norm,
                                bool decay_norms_and_biases) {
            self.require_full_training("optimizer_step");
            if (grad_ws == nullptr) throw InvalidArgumentError("optimizer_step needs grad_ws, the gradients to apply");
            const AdamWHyper hyper = adamw_hyper(step, lr, beta1, beta2, eps, weight_decay, max_grad_norm);
            const Stream stream = stream_arg.is_none() ? grad_ws->last_stream() : stream_arg.cast<Stream>();
            py::gil_scoped_release release;
            self.optimizer_step(state, hyper, stream, *grad_ws, grad_norm, decay_norms_and_biases);
          }, py::arg("state"), py::arg("step"), py::arg("lr"), py::arg("beta1") = 0.9f, py::arg("beta2") = 0.999f,
          py::arg("eps") = 1e-8f, py::arg("weight_decay") = 0.01f, py::arg("stream") = py::none(),
          py::arg("grad_ws") = nullptr, py::kw_only(), py::arg("grad_norm") = nullptr,
          py::arg("max_grad_norm") = INFINITY, py::arg("decay_norms_and_biases") = false,
          "One AdamW step, exactly as torch.optim.AdamW (step counts from 1). Weight decay applies to the "
          "projection matrices (and to norms and biases with decay_norms_and_biases). With grad_norm (a GradNorm "
          "computed over this block's grad_ws and any others) gradients are clipped to max_grad_norm in the same "
          "pass, and a non-finite norm skips the step (GradNorm.value() tells). No host synchronisation.")
      .def("__repr__", [](const CudaBlock& b) {
            return "CudaBlock." + std::string(b.kind()) + "(layer " + std::to_string(b.layer_idx()) + ", " +
                   b.config().describe() + ", " + b.device().str() + ", max_tokens " + std::to_string(b.max_tokens()) +
                   ", precision " + precision_name(b.precision()) + ")";
          });
}

void bind_grad_workspace(py::module_& m) {
  py::class_<CudaGradWorkspace, std::shared_ptr<CudaGradWorkspace>>(
      m, "CudaGradWorkspace",
      "Parameter gradients of a block layout in one contiguous float32 allocation (laid out like the "
      "parameters). Zeroed when made; backward adds into it. Any block of the same config and device may use it.")
      .def(py::init([](const CudaBlock& block, const py::object& stream_arg) {
             const Stream stream = block_stream(stream_arg, block.device());
             py::gil_scoped_release release;
             auto ws = block.new_grad_workspace(stream);
             if (stream_arg.is_none()) stream.synchronize();
             return ws;
           }),
           py::arg("block"), py::arg("stream") = py::none())
      .def("zero_", [](CudaGradWorkspace& self, const py::object& stream_arg) {
            const Stream stream = stream_arg.is_none() ? self.last_stream() : stream_arg.cast<Stream>();
            py::gil_scoped_release release;
            self.zero(stream);
          }, py::arg("stream") = py::none(),
          "Sets every gradient to 0, ordered on `stream` (default: the stream of its latest write).")
      .def("to_numpy", [](const CudaGradWorkspace& self, const py::object& stream_arg) {
            const Stream stream = stream_arg.is_none() ? self.last_stream() : stream_arg.cast<Stream>();
            return named_arrays(self.layout(), [&](float* dst) { self.download(dst, stream); });
          }, py::arg("stream") = py::none(), "{HF name: float32 numpy array} once the queued work is done.")
      .def_property_readonly("buffer", [](const CudaGradWorkspace& self) { return PyBuffer{self.flat(), self.last_stream()}; },
                             "The flat float32 gradient buffer [total] (same memory).")
      .def_property_readonly("device", &CudaGradWorkspace::device)
      .def_property_readonly("nbytes", [](const CudaGradWorkspace& self) { return self.flat().nbytes(); })
      .def_property_readonly("param_layout", [](const CudaGradWorkspace& self) { return layout_list(self.layout()); })
      .def("__repr__", [](const CudaGradWorkspace& self) {
            return "CudaGradWorkspace(" + self.layout().describe() + " on " + self.device().str() + ")";
          });

  py::class_<GpuBlockOptimizerState, std::shared_ptr<GpuBlockOptimizerState>>(
      m, "GpuBlockOptimizerState",
      "AdamW moments of one block, laid out like its parameters. to_numpy()/load_numpy() exchange them as "
      "{'exp_avg.<name>': array, 'exp_avg_sq.<name>': array} (safetensors-ready); a restored state gives a "
      "bitwise-identical next step.")
      .def("to_numpy", [](const GpuBlockOptimizerState& self, const py::object& stream_arg) {
            const Stream stream = block_stream(stream_arg, self.device());
            py::dict result;
            for (auto [prefix, buffer] : {std::pair{"exp_avg.", &self.exp_avg()}, std::pair{"exp_avg_sq.", &self.exp_avg_sq()}}) {
              py::dict part = named_arrays(self.layout(), [&](float* dst) { buffer->copy_to_host(dst, stream); });
              for (auto item : part) result[py::str(prefix + item.first.cast<std::string>())] = item.second;
            }
            return result;
          }, py::arg("stream") = py::none())
      .def("load_numpy", [](GpuBlockOptimizerState& self, const py::dict& arrays, const py::object& stream_arg) {
            const Stream stream = block_stream(stream_arg, self.device());
            const ParamLayout& layout = self.layout();
            std::vector<float> host[2] = {std::vector<float>(layout.total_floats(), 0.0f),
                                          std::vector<float>(layout.total_floats(), 0.0f)};
            const char* prefixes[2] = {"exp_avg.", "exp_avg_sq."};
            for (int k = 0; k < 2; ++k) {
              for (const ParamEntry& e : layout.entries()) {
                const std::string key = prefixes[k] + e.name;
                if (!arrays.contains(key)) throw InvalidArgumentError("optimizer state: '" + key + "' is missing");
                py::array_t<float, py::array::c_style | py::array::forcecast> a(arrays[py::str(key)]);
                const Shape shape(a.shape(), a.shape() + a.ndim());
                if (shape != e.shape) {
                  throw ShapeError("optimizer state: '" + key + "' has shape " + shape_str(shape) + ", expected " +
                                   shape_str(e.shape));
                }
                std::copy(a.data(), a.data() + e.numel(), host[k].begin() + e.offset);
              }
            }
            if (arrays.size() != 2 * layout.entries().size()) {
              throw InvalidArgumentError("optimizer state: " + std::to_string(arrays.size()) + " arrays given, expected " +
                                         std::to_string(2 * layout.entries().size()) + " (exp_avg.* and exp_avg_sq.* of each tensor)");
            }
            py::gil_scoped_release release;
            self.exp_avg().copy_from_host(host[0].data(), stream);
            self.exp_avg_sq().copy_from_host(host[1].data(), stream);
            stream.synchronize();  // the host vectors die here
          }, py::arg("arrays"), py::arg("stream") = py::none(),
          "Restores moments saved by to_numpy(); every tensor must be present with its shape.")
      .def_property_readonly("device", &GpuBlockOptimizerState::device);

  py::class_<GradNorm, std::shared_ptr<GradNorm>>(
      m, "GradNorm",
      "The global L2 norm of several gradient workspaces, kept on the device for clipping inside optimizer_step.")
      .def(py::init<const Device&>(), py::arg("device"))
      .def("compute", [](GradNorm& self, const std::vector<const CudaGradWorkspace*>& workspaces,
                         const py::object& stream_arg, const std::vector<const PyBuffer*>& buffers) {
            const Stream stream = block_stream(stream_arg, self.sum_squares().device());
            std::vector<Buffer> extra;
            for (const PyBuffer* b : buffers) {
              if (b == nullptr) throw InvalidArgumentError("GradNorm.compute: a buffer is None");
              extra.push_back(b->buffer);
            }
            py::gil_scoped_release release;
            self.compute(workspaces, stream, extra);
          }, py::arg("workspaces"), py::arg("stream") = py::none(), py::arg("buffers") = py::tuple(),
          "Sums the squares of every gradient in `workspaces` and in `buffers` (float32 GpuBuffers of gradients "
          "kept outside workspaces, e.g. the head's and the embeddings'; each starting on a 16-byte boundary) on "
          "the device (no host synchronisation).")
      .def("value", [](const GradNorm& self, const py::object& stream_arg) {
            const Stream stream = block_stream(stream_arg, self.sum_squares().device());
            py::gil_scoped_release release;
            return self.value(stream);
          }, py::arg("stream") = py::none(), "The norm as a float (waits for the work queued on `stream`).")
      .def_property_readonly("buffer", [](const GradNorm& self) {
            return PyBuffer{self.sum_squares(), default_stream(self.sum_squares().device())};
          }, "The squared norm as a float32 [1] device buffer.");
}

}  // namespace

void bind_block(py::module_& m) {
  bind_config(m);
  bind_arena(m);
  bind_block_class(m);
  bind_grad_workspace(m);
}

}  // namespace cudablocks::python
