// GEMM through cuBLAS. FLOPs 2*M*N*K; bytes 4*(M*K + K*N + M*N) (+ M*N read when beta != 0):
// compute-bound at block sizes (M = tokens >= 512), so the whole job is picking cuBLAS's mode.
//
// Row-major -> column-major: a row-major X [r, c] is the column-major X^T [c, r] with leading
// dimension c. So row-major C = op(A) op(B) is computed as the column-major
// C^T [N, M] = op(B)^T [N, K] * op(A)^T [K, M]: B goes first, A second, and each keeps its own
// transpose flag (B row-major [K, N] is column-major B^T [N, K], already op(B)^T when !trans_b).
//
// Algorithms: cuBLAS's heuristic choice throughout. Its first choice is not always its fastest: on
// an H200 (cuBLAS 13.1, 2026-11-28) another of cuBLASLt's top eight ran single bf16 products of a
// Qwen3-4B layer up to 25% faster, and every candidate that keeps K whole gave the same bits (65
// problems, bf16 and tf32). But choosing by timing inside the blocks moved a whole bf16 layer step
// by 1-2%, within run-to-run noise, at the price of host synchronisations for the tuning runs, so
// the heuristic's deterministic choice stays.
#include "cuda/gemm.cuh"

#include <climits>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/check.hpp"
#include "cuda/cublas.hpp"
#include "cuda/elementwise.cuh"
#include "cudablocks/errors.hpp"

namespace cudablocks::cuda {

namespace {

cublasComputeType_t compute_type(Precision precision) {
  switch (precision) {
    case Precision::FP32: return CUBLAS_COMPUTE_32F;             // with CUBLAS_DEFAULT_MATH: IEEE fp32
    case Precision::TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;   // tf32 multiply, fp32 accumulate
    case Precision::BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;   // bf16 multiply, fp32 accumulate
  }
  throw InvalidArgumentError("gemm: unknown precision");
}

int as_int(std::int64_t v, const char* name) {
  if (v < 0 || v > INT_MAX) throw InvalidArgumentError(std::string("gemm: ") + name + " = " + std::to_string(v) + " is out of cuBLAS's int range");
  return static_cast<int>(v);
}

// C = beta * C for an empty K (C not read when beta == 0).
void scale_c(std::int64_t m, std::int64_t n, float beta, float* c, cudaStream_t stream) {
  if (beta == 0.0f) {
    CUDABLOCKS_CUDA_CHECK(cudaMemsetAsync(c, 0, sizeof(float) * static_cast<std::size_t>(m) * n, stream));
  } else if (beta != 1.0f) {
    CublasCall call(stream);
    CUDABLOCKS_CUBLAS_CHECK(cublasSscal_64(call.handle(), m * n, &beta, c, 1));
  }
}

// The row-major mapping onto column-major cuBLAS (see the top of this file): B comes first, and
// each operand's op and stored row length.
struct ColumnMajor {
  cublasOperation_t op_a, op_b;
  int ld_a, ld_b;
  ColumnMajor(bool trans_a, bool trans_b, int M, int N, int K)
      : op_a(trans_a ? CUBLAS_OP_T : CUBLAS_OP_N),
        op_b(trans_b ? CUBLAS_OP_T : CUBLAS_OP_N),
        ld_a(trans_a ? M : K),
        ld_b(trans_b ? K : N) {}
};

// The shared cublasGemmEx call.
void gemm_ex(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const void* a, const void* b,
             cudaDataType_t ab_type, float beta, void* c, cudaDataType_t c_type, cublasComputeType_t compute,
             cudaStream_t stream) {
  CublasCall call(stream);
  const ColumnMajor cm(trans_a, trans_b, M, N, K);
  CUDABLOCKS_CUBLAS_CHECK(cublasGemmEx(call.handle(), cm.op_b, cm.op_a, N, M, K, &alpha, b, ab_type, cm.ld_b, a,
                                       ab_type, cm.ld_a, &beta, c, c_type, N, compute, CUBLAS_GEMM_DEFAULT));
}

// ---- cuBLASLt: D = alpha op(A) op(B) + C with C and D distinct (cublasGemmEx has one C) ----

// The largest power of two (<= 256) dividing the address: cuBLASLt's algorithms state the
// alignment they need, and its heuristics assume 256 bytes unless told otherwise.
int alignment(const void* p) {
  const auto v = reinterpret_cast<std::uintptr_t>(p);
  int a = 256;
  while (a > 1 && v % static_cast<std::uintptr_t>(a) != 0) a /= 2;
  return a;
}

template <class T, cublasStatus_t (*Destroy)(T)>
struct LtObject {  // RAII for the cuBLASLt descriptors
  T value = nullptr;
  LtObject() = default;
  LtObject(const LtObject&) = delete;
  LtObject& operator=(const LtObject&) = delete;
  ~LtObject() {
    if (value != nullptr) Destroy(value);
  }
};
using MatmulDesc = LtObject<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using Layout = LtObject<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using Preference = LtObject<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

// The heuristic's first choice, per problem (shape, types, alignments); asked once, then reused.
// std::nullopt: cuBLASLt has no algorithm for it (unusual alignments), remembered as well.
using AlgoKey = std::tuple<int, int, int, bool, bool, int, int, int, int, int, int, int>;
std::mutex algo_mutex;
std::map<AlgoKey, std::optional<cublasLtMatmulAlgo_t>>& algo_cache() {
  static auto* cache = new std::map<AlgoKey, std::optional<cublasLtMatmulAlgo_t>>;  // leaked, as the handles
  return *cache;
}

// Row-major d[M, N] = alpha op(a) op(b) + c (see the top of this file for the mapping). Returns
// false, having queued nothing, when cuBLASLt has no algorithm for the problem.
bool lt_gemm_add(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const void* a, const void* b,
                 cudaDataType_t ab_type, const float* c, float* d, cublasComputeType_t compute, cudaStream_t stream) {
  CublasCall call(stream);
  const ColumnMajor cm(trans_a, trans_b, M, N, K);
  MatmulDesc desc;
  CUDABLOCKS_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.value, compute, CUDA_R_32F));
  CUDABLOCKS_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.value, CUBLASLT_MATMUL_DESC_TRANSA, &cm.op_b, sizeof(cm.op_b)));
  CUDABLOCKS_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.value, CUBLASLT_MATMUL_DESC_TRANSB, &cm.op_a, sizeof(cm.op_a)));
  // Column-major: D^T [N, M] = op(B)^T [N, K] op(A)^T [K, M]; layouts give each matrix as stored.
  Layout lb, la, lc;
  CUDABLOCKS_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb.value, ab_type, trans_b ? K : N, trans_b ? N : K, cm.ld_b));
  CUDABLOCKS_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la.value, ab_type, trans_a ? M : K, trans_a ? K : M, cm.ld_a));
  CUDABLOCKS_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc.value, CUDA_R_32F, N, M, N));

  const int align_b = alignment(b), align_a = alignment(a), align_c = alignment(c), align_d = alignment(d);
  int device = 0;
  CUDABLOCKS_CUDA_CHECK(cudaGetDevice(&device));
  const AlgoKey key{M, N, K, trans_a, trans_b, static_cast<int>(ab_type), static_cast<int>(compute),
                    align_a, align_b, align_c, align_d, device};
  std::optional<cublasLtMatmulAlgo_t> algo;
  bool found = false;
  {
    std::lock_guard<std::mutex> guard(algo_mutex);
    auto it = algo_cache().find(key);
    if (it != algo_cache().end()) {
      algo = it->second;
      found = true;
    }
  }
  if (!found) {
    Preference pref;
    CUDABLOCKS_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.value));
    const std::size_t ws = call.workspace_bytes();
    const std::uint32_t aligns[4] = {static_cast<std::uint32_t>(align_b), static_cast<std::uint32_t>(align_a),
                                     static_cast<std::uint32_t>(align_c), static_cast<std::uint32_t>(align_d)};
    CUDABLOCKS_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.value, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                                 &ws, sizeof(ws)));
    const cublasLtMatmulPreferenceAttributes_t attrs[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; ++i) {
      CUDABLOCKS_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.value, attrs[i], &aligns[i], sizeof(aligns[i])));
    }
    cublasLtMatmulHeuristicResult_t result;
    std::memset(&result, 0, sizeof(result));
    int count = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(call.lt_handle(), desc.value, lb.value, la.value,
                                                                 lc.value, lc.value, pref.value, 1, &result, &count);
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) CUDABLOCKS_CUBLAS_CHECK(status);
    if (status == CUBLAS_STATUS_SUCCESS && count > 0) algo = result.algo;
    std::lock_guard<std::mutex> guard(algo_mutex);
    // Packed batches vary M from step to step: the cache is bounded (cleared when full; a miss
    // costs one heuristic query).
    if (algo_cache().size() >= 4096) algo_cache().clear();
    algo_cache()[key] = algo;
  }
  if (!algo) return false;
  const float beta = 1.0f;
  CUDABLOCKS_CUBLAS_CHECK(cublasLtMatmul(call.lt_handle(), desc.value, &alpha, b, lb.value, a, la.value, &beta, c,
                                         lc.value, d, lc.value, &*algo, call.workspace(), call.workspace_bytes(),
                                         stream));
  return true;
}

// d = alpha op(A) op(B) + addend: cublasGemmEx with beta 1 when the addend is d itself, else
// cuBLASLt; where it has no algorithm, the product then a separate add.
void gemm_add_any(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                  const void* a, const void* b, cudaDataType_t ab_type, const float* addend, float* d,
                  cublasComputeType_t compute, cudaStream_t stream) {
  const int M = as_int(m, "m"), N = as_int(n, "n"), K = as_int(k, "k");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // the product is zero: d = addend
    if (addend != d) {
      CUDABLOCKS_CUDA_CHECK(cudaMemcpyAsync(d, addend, sizeof(float) * static_cast<std::size_t>(m) * n,
                                            cudaMemcpyDeviceToDevice, stream));
    }
    return;
  }
  if (addend == d) {
    gemm_ex(trans_a, trans_b, M, N, K, alpha, a, b, ab_type, 1.0f, d, CUDA_R_32F, compute, stream);
  } else if (!lt_gemm_add(trans_a, trans_b, M, N, K, alpha, a, b, ab_type, addend, d, compute, stream)) {
    gemm_ex(trans_a, trans_b, M, N, K, alpha, a, b, ab_type, 0.0f, d, CUDA_R_32F, compute, stream);
    add(addend, d, d, m * n, stream);
  }
}

// c = bf16(alpha op(a) op(b)), or with accumulate that added to c's values (beta 1 in cuBLAS's
// epilogue).
void product_to_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                     const std::uint16_t* a, const std::uint16_t* b, bool accumulate, std::uint16_t* c,
                     cudaStream_t stream) {
  const int M = as_int(m, "m"), N = as_int(n, "n"), K = as_int(k, "k");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: zeros, or c + 0 = c
    if (!accumulate) {
      CUDABLOCKS_CUDA_CHECK(cudaMemsetAsync(c, 0, static_cast<std::size_t>(m * n) * sizeof(std::uint16_t), stream));
    }
    return;
  }
  const float beta = accumulate ? 1.0f : 0.0f;
  gemm_ex(trans_a, trans_b, M, N, K, alpha, a, b, CUDA_R_16BF, beta, c, CUDA_R_16BF, CUBLAS_COMPUTE_32F, stream);
}

}  // namespace

void gemm_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
              const float* b, const float* addend, float* c, Precision precision, cudaStream_t stream) {
  gemm_add_any(trans_a, trans_b, m, n, k, alpha, a, b, CUDA_R_32F, addend, c, compute_type(precision), stream);
}

void gemm_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                   const std::uint16_t* a, const std::uint16_t* b, const float* addend, float* c, cudaStream_t stream) {
  gemm_add_any(trans_a, trans_b, m, n, k, alpha, a, b, CUDA_R_16BF, addend, c, CUBLAS_COMPUTE_32F, stream);
}

void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
               const std::uint16_t* a, const std::uint16_t* b, float beta, float* c, cudaStream_t stream) {
  const int M = as_int(m, "m"), N = as_int(n, "n"), K = as_int(k, "k");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    scale_c(m, n, beta, c, stream);
    return;
  }
  gemm_ex(trans_a, trans_b, M, N, K, alpha, a, b, CUDA_R_16BF, beta, c, CUDA_R_32F, CUBLAS_COMPUTE_32F, stream);
}

void gemm_bf16_to_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                       const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c, cudaStream_t stream) {
  product_to_bf16(trans_a, trans_b, m, n, k, alpha, a, b, false, c, stream);
}

void gemm_bf16_to_bf16_add(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                           const std::uint16_t* a, const std::uint16_t* b, std::uint16_t* c, cudaStream_t stream) {
  product_to_bf16(trans_a, trans_b, m, n, k, alpha, a, b, true, c, stream);
}

void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
          const float* b, float beta, float* c, Precision precision, cudaStream_t stream) {
  const int M = as_int(m, "m"), N = as_int(n, "n"), K = as_int(k, "k");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // op(A) op(B) is zero: C = beta * C (C not read when beta == 0)
    scale_c(m, n, beta, c, stream);
    return;
  }
  gemm_ex(trans_a, trans_b, M, N, K, alpha, a, b, CUDA_R_32F, beta, c, CUDA_R_32F, compute_type(precision), stream);
}

}  // namespace cudablocks::cuda
