// bf16 operands on the CPU reference backend: conversion, and the bf16-operand GEMM.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// y[i] = bf16 bits of x[i], round to nearest even (core/float_bits.hpp).
void to_bf16(const float* x, std::uint16_t* y, std::int64_t n);

// y[i] = the value of the bf16 bits x[i] (exact).
void from_bf16(const std::uint16_t* x, float* y, std::int64_t n);

// gemm (cpu/gemm.hpp) on bf16 operands: the operands are widened to fp32 (exact) and multiplied
// by the fp32 GEMM. Every bf16 x bf16 product is exact in fp32, so this is the CUDA tensor-core
// product up to the order of the fp32 sums.
void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
               const std::uint16_t* a, const std::uint16_t* b, float beta, float* c);

}  // namespace cudablocks::cpu
