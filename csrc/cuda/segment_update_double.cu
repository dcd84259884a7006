// float64 instantiation of the sparse update kernels (segment_update_impl.cuh).
#include "segment_update_impl.cuh"

namespace fastmf::cuda {
template void run_segment_update<double>(SegmentArgs<double>, bool, const at::Tensor&);
}  // namespace fastmf::cuda
