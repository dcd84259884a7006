// float32 instantiation of the sparse update kernels (segment_update_impl.cuh).
#include "segment_update_impl.cuh"

namespace fastmf::cuda {
template void run_segment_update<float>(SegmentArgs<float>, bool, const at::Tensor&);
}  // namespace fastmf::cuda
