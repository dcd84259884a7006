// Everything the AVX2-built families include from outside fastmf's own CPU code, included by
// csrc/cpu/avx2/<family>.cpp before its target("avx2") pragma so that all of it is compiled
// for the x86-64 baseline (csrc/cpu/isa.h says why). A family that includes a new outside
// header adds it here too.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <emmintrin.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../args.h"
#include "../../checks.h"
#include "../../codes.h"
#include "../../counter_hash.h"
#include "../../negative_sampling.h"
#include "../../ops.h"
