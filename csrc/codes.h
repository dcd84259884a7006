// The op vocabulary: loss and optimizer codes, defined once for C++ and CUDA. They travel
// through the flat op schemas as plain ints; fastmf/ops/codes.py defines the same codes for
// Python, and a test parses the enum lines below (keep one enum per line) to prove that the
// two agree. Kernels name these enums, never a bare number.
#pragma once

#include <cstdint>
#include <type_traits>

namespace fastmf {

enum class Loss : int64_t { kMse = 0, kHuber = 1, kBce = 2 };
enum class PairwiseLoss : int64_t { kBpr = 0, kHinge = 1 };
enum class Optimizer : int64_t { kSgd = 0, kAdagrad = 1, kRowwiseAdagrad = 2, kAdam = 3, kRowwiseAdam = 4 };
enum class Pooling : int64_t { kSum = 0, kMean = 1 };
enum class WeightDecay : int64_t { kNone = 0, kL2 = 1, kDecoupled = 2 };
constexpr double kHuberDelta = 1.0;

// Every code of an enum, in code order: the one list the checks and the dispatch read.
template <auto... kCodes>
struct CodeList {
  static constexpr int64_t size = sizeof...(kCodes);
};

template <typename E>
struct AllCodes;
template <>
struct AllCodes<Loss> {
  using type = CodeList<Loss::kMse, Loss::kHuber, Loss::kBce>;
  static constexpr const char* what = "loss";
};
template <>
struct AllCodes<PairwiseLoss> {
  using type = CodeList<PairwiseLoss::kBpr, PairwiseLoss::kHinge>;
  static constexpr const char* what = "pairwise loss";
};
// The fused MF steps (train_step, train_step_pairwise) apply the first three optimizers
// only (fastmf.ops.codes.STEP_OPTIMIZERS); the Adams belong to the embedding_bag family.
template <>
struct AllCodes<Optimizer> {
  using type = CodeList<Optimizer::kSgd, Optimizer::kAdagrad, Optimizer::kRowwiseAdagrad>;
  static constexpr const char* what = "optimizer";
};

template <>
struct AllCodes<Pooling> {
  using type = CodeList<Pooling::kSum, Pooling::kMean>;
  static constexpr const char* what = "pooling";
};
template <>
struct AllCodes<WeightDecay> {
  using type = CodeList<WeightDecay::kNone, WeightDecay::kL2, WeightDecay::kDecoupled>;
  static constexpr const char* what = "weight_decay_mode";
};

// The optimizers of the embedding_bag family (sparse_update, embedding_bag_backward_update):
// every Optimizer, the Adams included. A code list of its own, so the fused MF steps keep
// theirs (AllCodes<Optimizer>) and their messages.
struct RowOptimizerCodes {
  using type = CodeList<Optimizer::kSgd, Optimizer::kAdagrad, Optimizer::kRowwiseAdagrad,
                        Optimizer::kAdam, Optimizer::kRowwiseAdam>;
  static constexpr const char* what = "optimizer";
};

template <typename E>
constexpr int64_t num_codes() {
  return AllCodes<E>::type::size;
}

// The user-facing names, as fastmf.ops.codes.names() spells them.
inline const char* name(Optimizer code) {
  switch (code) {
    case Optimizer::kSgd: return "sgd";
    case Optimizer::kAdagrad: return "adagrad";
    case Optimizer::kRowwiseAdagrad: return "rowwise_adagrad";
    case Optimizer::kAdam: return "adam";
    case Optimizer::kRowwiseAdam: return "rowwise_adam";
  }
  return "unknown";
}

namespace detail {
template <typename E, typename F, auto kFirst, auto... kRest>
decltype(auto) dispatch_code(E code, F& f, CodeList<kFirst, kRest...>) {
  if constexpr (sizeof...(kRest) == 0) {
    // The op boundary checked the code (check_code), so the last one left is the one.
    return f(std::integral_constant<E, kFirst>{});
  } else {
    if (code == kFirst) return f(std::integral_constant<E, kFirst>{});
    return dispatch_code(code, f, CodeList<kRest...>{});
  }
}
}  // namespace detail

// Calls f(std::integral_constant<E, code>{}): a runtime code becomes a compile-time constant
// for the kernel template, as AT_DISPATCH does for dtypes. `code` must have passed
// check_code (csrc/checks.h).
//   dispatch_code(optimizer, [&](auto opt) { step<decltype(opt)::value>(...); });
template <typename E, typename F>
decltype(auto) dispatch_code(E code, F&& f) {
  return detail::dispatch_code(code, f, typename AllCodes<E>::type{});
}

// The same over another list of E's codes (`Codes::type`), e.g. RowOptimizerCodes.
template <typename Codes, typename E, typename F>
decltype(auto) dispatch_code_in(E code, F&& f) {
  return detail::dispatch_code(code, f, typename Codes::type{});
}

}  // namespace fastmf
