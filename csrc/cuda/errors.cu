// Bad ids and non-finite targets on the GPU.
//
// The CPU kernels read every id on the host and raise before touching memory. A CUDA kernel
// cannot raise, and reading the ids back (or a flag) after every op would be a host
// synchronisation inside each training step, which costs a round trip per step and makes
// the step impossible to capture in a CUDA graph. So on the GPU:
//
//   * every kernel checks each id against its table's row count and never dereferences a
//     bad one: mf_forward returns NaN for that sample, mf_backward a zero gradient row,
//     and the update ops and the fused steps (train_step, train_step_pairwise) leave the
//     sample out of every update (the fused steps return a NaN loss; train_step also
//     drops samples with a NaN/inf target); topk_scores leaves a bad exclude or
//     candidate id out, and reads a bad exclude_indptr only as far as
//     exclude_indices goes; the embedding_bag family (embedding_bag.cu) returns NaN for
//     a bag with a bad id and leaves a bad id out of sparse_update and
//     embedding_bag_backward_update, and with bad offsets returns an all-NaN forward, all-zero
//     backward rows, and a fused step that writes nothing;
//   * the first such error is written to a per-device record in device memory;
//   * `torch.ops.fastmf.check_device_errors(device)` (fastmf.ops.check_device_errors in
//     Python) synchronises the device, and raises the recorded error with the same type
//     and message as the CPU kernels (IndexError for ids, ValueError for targets), then
//     clears it. Call it where a sync is cheap: after an epoch, before evaluating, in
//     tests. Data that is validated once when it is moved to the GPU never trips it.
//
// Which error is reported when there are several differs from the CPU kernels. The CPU
// kernels raise for the first argument that has a bad value, in their check order (users,
// then items, then targets; exclude_indptr, then exclude, then candidates), and for ids
// report the smallest negative id, else the largest (csrc/checks.h report_id_range). Here
// the first record to land wins (an atomicCAS): some bad value of some argument of the
// first op that met one, not necessarily the one the CPU would name. Reporting the CPU's
// choice would need every error's op, argument, value and limit to be compared and kept
// as one unit; with 64-bit atomics only that takes either a lock or a record per argument
// plus a generation count per launch, for a path that only runs on bad data. The type of
// the error (IndexError / ValueError) and the op named are the same, and every value
// reported is a real bad value of the named argument.
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>

#include <array>
#include <atomic>
#include <cstring>
#include <string>

#include "../checks.h"
#include "common.cuh"

namespace fastmf::cuda {
namespace {

// One record per device: a module-scope __device__ variable lives once in each device's
// copy of the module, needs no allocation (so it is safe during graph capture) and is
// zero-initialised when the module loads.
__device__ ErrorRecord g_error_record;

constexpr int kMaxDevices = 64;
std::array<std::atomic<ErrorRecord*>, kMaxDevices> g_record_address{};

const char* op_name(int op) {
  switch (op) {
    case kOpMfForward: return "mf_forward";
    case kOpMfBackward: return "mf_backward";
    case kOpSparseAdagrad: return "sparse_adagrad_update";
    case kOpSparseSgd: return "sparse_sgd_update";
    case kOpTrainStep: return "train_step";
    case kOpTrainStepPairwise: return "train_step_pairwise";
    case kOpTopk: return "topk_scores";
    case kOpEmbeddingBagForward: return "embedding_bag_forward";
    case kOpEmbeddingBagBackward: return "embedding_bag_backward";
    case kOpSparseUpdate: return "sparse_update";
    case kOpEmbeddingBagBackwardUpdate: return "embedding_bag_backward_update";
    case kOpTrainStepPairwiseSampled: return "train_step_pairwise_sampled";
    case kOpTrainStepSampled: return "train_step_sampled";
    case kOpSampleNegatives: return "sample_negatives";
    default: return "unknown op";
  }
}

const char* arg_name(int arg) {
  switch (arg) {
    case kArgUsers: return "users";
    case kArgItems: return "items";
    case kArgIds: return "ids";
    case kArgTargets: return "targets";
    case kArgNegItems: return "neg_items";
    case kArgExclude: return "exclude";
    case kArgCandidates: return "candidates";
    case kArgIndices: return "indices";
    default: return "unknown argument";
  }
}

void check_device_errors(int64_t device) {
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(),
                    "fastmf.check_device_errors: no CUDA device ", device);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                  c10::cuda::CaptureStatus::None,
              "fastmf.check_device_errors synchronises the device and cannot run while a "
              "CUDA graph is being captured; call it outside the captured region");
  ErrorRecord* rec = error_record();
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  ErrorRecord host{};
  C10_CUDA_CHECK(cudaMemcpy(&host, rec, sizeof(ErrorRecord), cudaMemcpyDeviceToHost));
  if (host.code == 0) return;
  C10_CUDA_CHECK(cudaMemset(rec, 0, sizeof(ErrorRecord)));
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  const int code = static_cast<int>(host.code - 1);
  const int op = code / kNumErrorArgs, arg = code % kNumErrorArgs;
  if (arg == kArgTargets) {
    double value;
    std::memcpy(&value, &host.value, sizeof(value));
    TORCH_CHECK_VALUE(false, "fastmf.", op_name(op), ": targets contains a non-finite value (",
                      value, ")");
  }
  if (arg == kArgWeights) {  // csrc/checks.h check_weight_values
    double value;
    std::memcpy(&value, &host.value, sizeof(value));
    TORCH_CHECK_VALUE(false, "fastmf.", op_name(op), ": weights must be finite and >= 0, got ",
                      value);
  }
  TORCH_CHECK_VALUE(arg != kArgIndptrSpan, "fastmf.", op_name(op), ": exclude_indptr spans [",
                    host.value, ", ", host.limit, ") but exclude_indices has ", host.position,
                    " entries");
  TORCH_CHECK_VALUE(arg != kArgIndptrOrder, "fastmf.", op_name(op),
                    ": exclude_indptr must be non-decreasing, got ", host.value, " then ",
                    host.limit, " at query ", host.position);
  // csrc/checks.h report_bad_row (without the length of pos_indices, which the record
  // has no room for) and report_no_negative.
  TORCH_CHECK_VALUE(arg != kArgPosRow, "fastmf.", op_name(op), ": pos_indptr gives user ",
                    host.position, " the row [", host.value, ", ", host.limit,
                    "), not an ordered range within [0, len(pos_indices)]");
  TORCH_CHECK_VALUE(arg != kArgNoNegative, "fastmf.", op_name(op), ": user ", host.value,
                    " has ", host.position, " positives of ", host.limit,
                    " items; no item is left to sample as a negative");
  // The messages of csrc/checks.h check_offsets_values.
  TORCH_CHECK_VALUE(arg != kArgOffsetsStart, "fastmf.", op_name(op),
                    ": offsets must start at 0, got offsets[0] = ", host.value);
  TORCH_CHECK_VALUE(arg != kArgOffsetsOrder, "fastmf.", op_name(op),
                    ": offsets must be non-decreasing, got ", host.value, " then ", host.limit,
                    " at offsets[", host.position, "], offsets[", host.position + 1, "]");
  TORCH_CHECK_VALUE(arg != kArgOffsetsEnd || host.value < host.limit, "fastmf.", op_name(op),
                    ": offsets[", host.position, "] = ", host.value,
                    " is past the end of indices (", host.limit, " ids)");
  TORCH_CHECK_VALUE(arg != kArgOffsetsEnd, "fastmf.", op_name(op),
                    ": the last offset must equal the number of indices (", host.limit,
                    "), got offsets[", host.position, "] = ", host.value);
  TORCH_CHECK_INDEX(false, "fastmf.", op_name(op), ": ", arg_name(arg), " id ", host.value,
                    " out of range [0, ", host.limit, ")");
}

}  // namespace

// csrc/fastmf.cpp build_info: `value` as the host code of the .cu files formats it. That
// code is compiled by nvcc's host compiler (-ccbin), which may differ from the one that
// built the .cpp files.
std::string format_probe(long long value) { return c10::str(value); }

void check_device_id_range(const char* op, const char* name, const at::Tensor& ids,
                           int64_t num_rows) {
  if (ids.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(ids);
  const at::Tensor host = at::stack({lo, hi}).to(at::kLong).cpu();
  const int64_t* range = host.const_data_ptr<int64_t>();
  report_id_range(op, name, range[0], range[1], num_rows);
}

ErrorRecord* error_record() {
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "fastmf: CUDA device ", device,
              " is beyond the ", kMaxDevices, " devices fastmf supports");
  ErrorRecord* rec = g_record_address[device].load(std::memory_order_acquire);
  if (rec == nullptr) {
    void* address = nullptr;
    C10_CUDA_CHECK(cudaGetSymbolAddress(&address, g_error_record));
    rec = static_cast<ErrorRecord*>(address);
    g_record_address[device].store(rec, std::memory_order_release);
  }
  return rec;
}

}  // namespace fastmf::cuda

// The op takes no tensor, so no backend key can select it: CompositeImplicitAutograd is
// the kernel PyTorch runs for tensor-less ops.
TORCH_LIBRARY_IMPL(fastmf, CompositeImplicitAutograd, m) {
  m.impl("check_device_errors", &fastmf::cuda::check_device_errors);
}
