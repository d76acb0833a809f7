"""Type stubs for the native module cudablocks._core."""

import os
from typing import Any

import numpy as np

class Device:
    def __init__(self, spec: str) -> None: ...
    @property
    def type(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def total_memory(self) -> int: ...
    @property
    def free_memory(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

DeviceLike = Device | str

def cuda_device_count() -> int: ...
def cuda_backend_built() -> bool: ...

class MemoryStats:
    @property
    def allocated_bytes(self) -> int: ...
    @property
    def peak_bytes(self) -> int: ...
    @property
    def allocations(self) -> int: ...

def memory_stats(device: DeviceLike) -> MemoryStats: ...
def reset_peak_memory(device: DeviceLike) -> None: ...

class CudaEvent:
    def __init__(self, device: DeviceLike, timing: bool = False) -> None: ...
    @property
    def device(self) -> Device: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool: ...
    def elapsed_ms_since(self, start: CudaEvent) -> float: ...

class CudaStream:
    def __init__(self, device: DeviceLike) -> None: ...
    @staticmethod
    def wrap(device: DeviceLike, handle: int) -> CudaStream: ...
    @property
    def device(self) -> Device: ...
    @property
    def handle(self) -> int: ...
    def synchronize(self) -> None: ...
    def record(self, event: CudaEvent | None = None) -> CudaEvent: ...
    def wait(self, event: CudaEvent) -> None: ...

class GpuBuffer:
    @staticmethod
    def from_numpy(array: np.ndarray, device: DeviceLike, stream: CudaStream | None = None) -> GpuBuffer: ...
    @staticmethod
    def empty(shape: int | tuple[int, ...] | list[int], dtype: str = "float32", device: DeviceLike = ...) -> GpuBuffer: ...
    @staticmethod
    def zeros(
        shape: int | tuple[int, ...] | list[int],
        dtype: str = "float32",
        device: DeviceLike = ...,
        stream: CudaStream | None = None,
    ) -> GpuBuffer: ...
    @staticmethod
    def from_dlpack(tensor: Any, stream: CudaStream | None = None) -> GpuBuffer: ...
    def to_numpy(self, stream: CudaStream | None = None) -> np.ndarray: ...
    def fill(self, value: float, stream: CudaStream | None = None) -> None: ...
    def copy_from(self, src: GpuBuffer, stream: CudaStream | None = None) -> None: ...
    def copy_from_numpy(self, array: np.ndarray, stream: CudaStream | None = None) -> None: ...
    def view(self, offset: int, shape: int | tuple[int, ...] | list[int]) -> GpuBuffer: ...
    def reshape(self, shape: int | tuple[int, ...] | list[int]) -> GpuBuffer: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> Device: ...
    @property
    def ndim(self) -> int: ...
    @property
    def numel(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def data_ptr(self) -> int: ...
    stream: CudaStream
    def __len__(self) -> int: ...
    def __dlpack__(
        self,
        *,
        stream: int | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...

def rmsnorm_forward(
    x: GpuBuffer,
    weight: GpuBuffer,
    out: GpuBuffer,
    eps: float = 1e-6,
    stream: CudaStream | None = None,
    *,
    rstd: GpuBuffer | None = None,
) -> None: ...
def rmsnorm_backward(
    dy: GpuBuffer,
    x: GpuBuffer,
    weight: GpuBuffer,
    rstd: GpuBuffer,
    dx: GpuBuffer,
    dweight: GpuBuffer,
    accumulate_dx: bool = False,
    stream: CudaStream | None = None,
) -> None: ...
def gemm(
    a: GpuBuffer,
    b: GpuBuffer,
    out: GpuBuffer,
    trans_b: bool = False,
    beta: float = 0.0,
    precision: str = "fp32",
    stream: CudaStream | None = None,
    *,
    trans_a: bool = False,
) -> None: ...
def dropout(
    x: GpuBuffer,
    out: GpuBuffer,
    p: float,
    key: int,
    *,
    accumulate: bool = False,
    stream: CudaStream | None = None,
) -> None: ...

# The classification head.
def embedding_forward(ids: GpuBuffer, table: GpuBuffer, out: GpuBuffer, stream: CudaStream | None = None) -> None: ...
def embedding_backward(
    grad_out: GpuBuffer,
    rows: GpuBuffer,
    offsets: GpuBuffer,
    order: GpuBuffer,
    grad_table: GpuBuffer,
    stream: CudaStream | None = None,
) -> None: ...
def pool_forward(
    x: GpuBuffer, cu_seqlens: GpuBuffer, out: GpuBuffer, mode: str = "last", stream: CudaStream | None = None
) -> None: ...
def pool_backward(
    dout: GpuBuffer, cu_seqlens: GpuBuffer, dx: GpuBuffer, mode: str = "last", stream: CudaStream | None = None
) -> None: ...
def cross_entropy(
    logits: GpuBuffer,
    labels: GpuBuffer,
    loss_sum: GpuBuffer,
    dlogits: GpuBuffer | None = None,
    probs: GpuBuffer | None = None,
    class_weights: GpuBuffer | None = None,
    grad_scale: float = 1.0,
    stream: CudaStream | None = None,
) -> None: ...
def adamw_step(
    param: GpuBuffer,
    grad: GpuBuffer,
    exp_avg: GpuBuffer,
    exp_avg_sq: GpuBuffer,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    stream: CudaStream | None = None,
    *,
    grad_norm: GradNorm | None = None,
    max_grad_norm: float = ...,
) -> None: ...

# NF4 (bitsandbytes' 4-bit format); cudablocks.nf4 is the API built on these.
def nf4_code() -> np.ndarray: ...
def nf4_dynamic_map() -> np.ndarray: ...
def nf4_valid_blocksize(blocksize: int) -> bool: ...
def nf4_quantize(
    x: GpuBuffer, blocksize: int, packed: GpuBuffer, absmax: GpuBuffer, stream: CudaStream | None = None
) -> None: ...
def nf4_dequantize(
    packed: GpuBuffer, absmax: GpuBuffer, blocksize: int, out: GpuBuffer, stream: CudaStream | None = None
) -> None: ...
def nf4_double_quantize(
    absmax: GpuBuffer,
    code: GpuBuffer,
    offset: GpuBuffer,
    compute_offset: bool,
    qabsmax: GpuBuffer,
    absmax2: GpuBuffer,
    stream: CudaStream | None = None,
) -> None: ...
def nf4_double_dequantize(
    qabsmax: GpuBuffer,
    absmax2: GpuBuffer,
    offset: GpuBuffer,
    code: GpuBuffer,
    absmax: GpuBuffer,
    stream: CudaStream | None = None,
) -> None: ...

class TransformerConfig:
    def __init__(
        self,
        *,
        model_type: str,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        intermediate_size: int,
        num_hidden_layers: int,
        vocab_size: int,
        max_position_embeddings: int,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_type: str = "default",
        rope_factor: float = 1.0,
        rope_low_freq_factor: float = 1.0,
        rope_high_freq_factor: float = 4.0,
        rope_original_max_position_embeddings: int = 0,
        attention_bias: bool = False,
        o_proj_bias: bool = False,
        qk_norm: bool = False,
        tie_word_embeddings: bool = False,
    ) -> None: ...
    @staticmethod
    def from_dict(config: dict[str, Any]) -> TransformerConfig: ...
    @staticmethod
    def from_pretrained(path: str | os.PathLike[str]) -> TransformerConfig: ...
    model_type: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max_position_embeddings: int
    attention_bias: bool
    o_proj_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    def validate(self) -> None: ...
    def rope_inv_freq(self) -> np.ndarray: ...
    def to_dict(self) -> dict[str, Any]: ...

ParamLayoutRow = tuple[str, int, tuple[int, ...], bool]

class BlockArena:
    def __init__(self, device: DeviceLike) -> None: ...
    @property
    def device(self) -> Device: ...
    @property
    def nbytes(self) -> int: ...

class CudaBlock:
    @staticmethod
    def fp32(
        config: TransformerConfig,
        layer_idx: int,
        weights: dict[str, np.ndarray],
        device: DeviceLike,
        max_tokens: int,
        precision: str = "fp32",
        *,
        arena: BlockArena | None = None,
        share_activations: bool = False,
    ) -> CudaBlock: ...
    @staticmethod
    def nf4(
        config: TransformerConfig,
        layer_idx: int,
        weights: dict[str, Any],
        device: DeviceLike,
        max_tokens: int,
        lora: Any | None = None,
        compute: str = "bf16",
        double_quant: bool = False,
        *,
        arena: BlockArena | None = None,
        share_activations: bool = False,
    ) -> CudaBlock: ...
    @property
    def kind(self) -> str: ...
    @property
    def device_bytes(self) -> int: ...
    @property
    def activation_bytes(self) -> int: ...
    @property
    def has_lora(self) -> bool: ...
    @property
    def lora_layout(self) -> list[ParamLayoutRow]: ...
    @property
    def layer_idx(self) -> int: ...
    @property
    def config(self) -> TransformerConfig: ...
    @property
    def device(self) -> Device: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def precision(self) -> str: ...
    @property
    def saved_bytes_per_token(self) -> int: ...
    @property
    def scratch_bytes_per_token(self) -> int: ...
    @property
    def param_layout(self) -> list[ParamLayoutRow]: ...
    def forward(
        self,
        x: GpuBuffer,
        out: GpuBuffer,
        seq_lens: int | list[int],
        stream: CudaStream | None = None,
        *,
        dropout_step: int | None = None,
    ) -> None: ...
    def backward(
        self,
        x: GpuBuffer,
        grad_out: GpuBuffer,
        grad_in: GpuBuffer,
        seq_lens: int | list[int],
        stream: CudaStream | None = None,
        grad_ws: CudaGradWorkspace | None = None,
    ) -> None: ...
    def new_grad_workspace(self, stream: CudaStream | None = None) -> CudaGradWorkspace: ...
    def download_weights(self, stream: CudaStream | None = None) -> dict[str, np.ndarray]: ...
    def init_optimizer_state(self, stream: CudaStream | None = None) -> GpuBlockOptimizerState: ...
    def optimizer_step(
        self,
        state: GpuBlockOptimizerState,
        step: int,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        stream: CudaStream | None = None,
        grad_ws: CudaGradWorkspace | None = None,
        *,
        grad_norm: GradNorm | None = None,
        max_grad_norm: float = ...,
        decay_norms_and_biases: bool = False,
    ) -> None: ...
    def new_lora_grad_workspace(self, stream: CudaStream | None = None) -> CudaGradWorkspace: ...
    def backward_lora(
        self,
        x: GpuBuffer,
        grad_out: GpuBuffer,
        grad_in: GpuBuffer,
        seq_lens: int | list[int],
        stream: CudaStream | None = None,
        lora_ws: CudaGradWorkspace | None = None,
        *,
        dropout_step: int | None = None,
    ) -> None: ...
    def init_lora_optimizer_state(self, stream: CudaStream | None = None) -> GpuBlockOptimizerState: ...
    def lora_optimizer_step(
        self,
        state: GpuBlockOptimizerState,
        step: int,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        stream: CudaStream | None = None,
        lora_ws: CudaGradWorkspace | None = None,
        *,
        grad_norm: GradNorm | None = None,
        max_grad_norm: float = ...,
    ) -> None: ...
    def download_lora_weights(self, stream: CudaStream | None = None) -> dict[str, np.ndarray]: ...
    def upload_lora_weights(self, weights: dict[str, Any], stream: CudaStream | None = None) -> None: ...

class CudaGradWorkspace:
    def __init__(self, block: CudaBlock, stream: CudaStream | None = None) -> None: ...
    def zero_(self, stream: CudaStream | None = None) -> None: ...
    def to_numpy(self, stream: CudaStream | None = None) -> dict[str, np.ndarray]: ...
    @property
    def buffer(self) -> GpuBuffer: ...
    @property
    def device(self) -> Device: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def param_layout(self) -> list[ParamLayoutRow]: ...

class GpuBlockOptimizerState:
    def to_numpy(self, stream: CudaStream | None = None) -> dict[str, np.ndarray]: ...
    def load_numpy(self, arrays: dict[str, np.ndarray], stream: CudaStream | None = None) -> None: ...
    @property
    def device(self) -> Device: ...

class GradNorm:
    def __init__(self, device: DeviceLike) -> None: ...
    def compute(
        self,
        workspaces: list[CudaGradWorkspace],
        stream: CudaStream | None = None,
        buffers: list[GpuBuffer] | tuple[GpuBuffer, ...] = (),
    ) -> None: ...
    def value(self, stream: CudaStream | None = None) -> float: ...
    @property
    def buffer(self) -> GpuBuffer: ...
