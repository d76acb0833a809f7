// CUDABLOCKS_HD marks a function that both backends compile: host and device code under nvcc,
// plain inline host code in the CPU-only build. The format and hash headers that must give the
// CPU and CUDA backends identical bits use it.
#pragma once

#if defined(__CUDACC__)
#define CUDABLOCKS_HD __host__ __device__ __forceinline__
#else
#define CUDABLOCKS_HD inline
#endif
