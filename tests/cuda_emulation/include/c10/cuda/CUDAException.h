#pragma once
#include <stdexcept>
#include <cuda_runtime.h>
#define C10_CUDA_CHECK(expr)                                                   \
  do {                                                                         \
    if ((expr) != cudaSuccess) throw std::runtime_error("emulated CUDA call failed"); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
