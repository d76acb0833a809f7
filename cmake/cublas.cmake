# Finds cuBLAS: from the CUDA toolkit when it has it, else from the `nvidia-cublas` wheel
# (site-packages/nvidia/cu13). Defines the target cudablocks::cublas, CUDABLOCKS_CUBLAS_RUNPATH
# (what the installed module needs to find libcublas at run time) and CUDABLOCKS_CUBLAS_TEST_RPATH
# (for the gtest binaries, which stay in the build tree: pip's isolated build environment, where
# the wheel was found, is gone after the build, so they also look in the interpreter's own
# site-packages, where the runtime dependency lands).

# The module lives in site-packages/cudablocks/, the wheel's libraries in site-packages/nvidia/cu13/lib.
set(CUDABLOCKS_CUBLAS_RUNPATH "$ORIGIN/../nvidia/cu13/lib")

add_library(cudablocks::cublas INTERFACE IMPORTED)
if(TARGET CUDA::cublas)
  target_link_libraries(cudablocks::cublas INTERFACE CUDA::cublas CUDA::cublasLt)
  list(APPEND CUDABLOCKS_CUBLAS_RUNPATH "${CUDAToolkit_LIBRARY_DIR}")
  message(STATUS "cudablocks: cuBLAS from the CUDA toolkit (${CUDAToolkit_LIBRARY_DIR})")
  return()
endif()

find_package(Python COMPONENTS Interpreter REQUIRED)
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import sysconfig; print(sysconfig.get_path('platlib'))"
  OUTPUT_VARIABLE python_platlib OUTPUT_STRIP_TRAILING_WHITESPACE)
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import nvidia.cu13 as m; print(list(m.__path__)[0])"
  OUTPUT_VARIABLE cublas_wheel_root OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE cublas_wheel_missing ERROR_QUIET)
if(cublas_wheel_missing OR NOT EXISTS "${cublas_wheel_root}/lib/libcublas.so.13")
  message(FATAL_ERROR "cuBLAS not found: the CUDA toolkit has none and the nvidia-cublas wheel is not "
                      "installed for ${Python_EXECUTABLE} (pip install nvidia-cublas==13.1.2.11)")
endif()
target_include_directories(cudablocks::cublas INTERFACE "${cublas_wheel_root}/include")
target_link_libraries(cudablocks::cublas INTERFACE
  "${cublas_wheel_root}/lib/libcublas.so.13" "${cublas_wheel_root}/lib/libcublasLt.so.13")
set(CUDABLOCKS_CUBLAS_TEST_RPATH "${python_platlib}/nvidia/cu13/lib" "${cublas_wheel_root}/lib")
message(STATUS "cudablocks: cuBLAS from the nvidia-cublas wheel (${cublas_wheel_root})")
