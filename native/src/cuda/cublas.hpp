// cuBLAS for the CUDA backend: status checking and one handle per device (cuBLAS and cuBLASLt).
//
// Handles: created lazily, one per device, with a 32 MiB workspace per (device, stream) set on
// every call (cuBLAS resets the workspace when the stream changes, and two streams must not share
// one workspace while their GEMMs may overlap). A CublasCall holds the device's mutex while it is
// alive, so the stream and workspace it sets cannot be changed by another thread before its
// cuBLAS calls are enqueued. Handles and workspaces are leaked on purpose: destroying a handle
// from a static destructor can run after the CUDA context has been torn down, and crash.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <mutex>

namespace cudablocks::cuda {

[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* operation, const char* file, int line);

inline void check_cublas(cublasStatus_t status, const char* operation, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(status, operation, file, line);
}

// The current device's handle, bound to `stream` and to that stream's workspace, locked for the
// lifetime of this object (keep it short: the enqueueing of one operation).
class CublasCall {
 public:
  explicit CublasCall(cudaStream_t stream);
  CublasCall(const CublasCall&) = delete;
  CublasCall& operator=(const CublasCall&) = delete;
  cublasHandle_t handle() const { return handle_; }
  // The device's cuBLASLt handle and this stream's workspace, for cublasLtMatmul (which takes the
  // workspace per call).
  cublasLtHandle_t lt_handle() const { return lt_handle_; }
  void* workspace() const { return workspace_; }
  std::size_t workspace_bytes() const { return workspace_bytes_; }

 private:
  std::unique_lock<std::mutex> lock_;
  cublasHandle_t handle_ = nullptr;
  cublasLtHandle_t lt_handle_ = nullptr;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
};

}  // namespace cudablocks::cuda

// cuBLAS status -> CudaError naming the status (cublasGetStatusName), the call and the source line.
#define CUDABLOCKS_CUBLAS_CHECK(expr) ::cudablocks::cuda::check_cublas((expr), #expr, __FILE__, __LINE__)
