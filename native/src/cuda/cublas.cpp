#include "cuda/cublas.hpp"

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "cuda/check.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/memory.hpp"

namespace cudablocks::cuda {

namespace {

constexpr std::size_t kWorkspaceBytes = std::size_t(32) << 20;  // what cuBLAS advises for Hopper

struct DeviceHandle {
  std::mutex mutex;  // held by a CublasCall
  cublasHandle_t handle = nullptr;
  cublasLtHandle_t lt_handle = nullptr;
  std::map<cudaStream_t, std::shared_ptr<Allocation>> workspaces;
};

std::mutex table_mutex;
std::map<int, DeviceHandle*>& table() {
  static auto* t = new std::map<int, DeviceHandle*>;  // leaked on purpose (see cublas.hpp)
  return *t;
}

}  // namespace

void throw_cublas_error(cublasStatus_t status, const char* operation, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  const std::string where = std::string(base ? base + 1 : file) + ":" + std::to_string(line);
  throw CudaError(std::string("cuBLAS error ") + cublasGetStatusName(status) + " (" + cublasGetStatusString(status) +
                  ") in " + operation + " [" + where + "]");
}

CublasCall::CublasCall(cudaStream_t stream) {
  int device = 0;
  CUDABLOCKS_CUDA_CHECK(cudaGetDevice(&device));
  DeviceHandle* entry = nullptr;
  {
    std::lock_guard<std::mutex> guard(table_mutex);
    DeviceHandle*& slot = table()[device];
    if (slot == nullptr) slot = new DeviceHandle;
    entry = slot;
  }
  lock_ = std::unique_lock<std::mutex>(entry->mutex);
  if (entry->handle == nullptr) {
    cublasHandle_t handle = nullptr;
    CUDABLOCKS_CUBLAS_CHECK(cublasCreate(&handle));
    // Default math: no TF32 unless a call's compute type asks for it (Precision::TF32).
    CUDABLOCKS_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
    entry->handle = handle;
  }
  if (entry->lt_handle == nullptr) {  // on its own: a failed creation is retried by the next call
    cublasLtHandle_t lt = nullptr;
    CUDABLOCKS_CUBLAS_CHECK(cublasLtCreate(&lt));
    entry->lt_handle = lt;
  }
  auto& workspace = entry->workspaces[stream];
  if (!workspace) workspace = Allocation::create(Device(DeviceType::CUDA, device), kWorkspaceBytes);
  // cublasSetStream resets the workspace to cuBLAS's own pool: set ours after it, every call.
  CUDABLOCKS_CUBLAS_CHECK(cublasSetStream(entry->handle, stream));
  CUDABLOCKS_CUBLAS_CHECK(cublasSetWorkspace(entry->handle, workspace->data(), workspace->bytes()));
  handle_ = entry->handle;
  lt_handle_ = entry->lt_handle;
  workspace_ = workspace->data();
  workspace_bytes_ = workspace->bytes();
}

}  // namespace cudablocks::cuda
