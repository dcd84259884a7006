// Every fastmf op schema, in one place, and the Python module init.
//
// The schemas are device-neutral: each device registers its kernels with
// TORCH_LIBRARY_IMPL(fastmf, <Device>, m) in csrc/<device>/<family>.{cpp,cu}, one file per
// op family (pointwise, pairwise, topk, embedding_bag) and the same file names on every device, and
// PyTorch's dispatcher picks one by the tensors' device. The exact meaning of every op is
// written out in plain PyTorch in fastmf/ops/reference/<family>.py. The int loss and
// optimizer arguments are the codes of csrc/codes.h; the fused steps' flat arguments become
// the bundles of csrc/args.h at the op boundary (csrc/ops.h).
//
// A new family adds its schema block here, csrc/cpu/<family>.cpp and
// csrc/cuda/<family>.cu, and its checks in csrc/checks.h. One op has no kernel of its own:
// pooled_rank_steps (csrc/pooled_steps.cpp) is a loop over the other ops, registered for
// both devices from that one file.
#ifndef FASTMF_NO_PYTHON
#include <Python.h>
#endif
#include <torch/library.h>

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <string>

TORCH_LIBRARY(fastmf, m) {
  // The CUDA kernels never synchronise with the host, so instead of raising on a bad id or
  // a non-finite target they skip it and record the first such error on the device (see
  // csrc/cuda/errors.cu). This synchronises `device`, raises the recorded error (same type
  // and message as the CPU kernels) and clears it. CUDA builds only; never inside a graph.
  m.def("check_device_errors(int device) -> ()");
  // prediction[b] = global_mean + user_bias[users[b]] + item_bias[items[b]]
  //                 + <user_factors[users[b]], item_factors[items[b]]>
  m.def(
      "mf_forward(Tensor users, Tensor items, Tensor user_factors, Tensor item_factors, "
      "Tensor? user_bias, Tensor? item_bias, float global_mean) -> Tensor");
  // Per-sample gradient rows of the dot product: (grad_out[b] * item_factors[items[b]],
  // grad_out[b] * user_factors[users[b]]), each (B, K). Bias gradients equal grad_out.
  m.def(
      "mf_backward(Tensor grad_out, Tensor users, Tensor items, Tensor user_factors, "
      "Tensor item_factors) -> (Tensor, Tensor)");
  // mf_backward's rows summed into the tables' dense gradients, as scatter_rows sums them:
  // grad_P (U, K) with grad_P[u] = sum over b with users[b] == u of grad_out[b] *
  // item_factors[items[b]], in b order from zero; grad_Q (I, K) likewise. The (B, K) rows
  // are never formed.
  m.def(
      "mf_backward_dense(Tensor grad_out, Tensor users, Tensor items, Tensor user_factors, "
      "Tensor item_factors) -> (Tensor, Tensor)");
  // Exact sparse Adagrad: sum the grad rows of each unique id (in order of occurrence),
  // then one update per unique row. weight (N, K) or (N,); state like weight, or (N,)
  // when rowwise.
  m.def(
      "sparse_adagrad_update(Tensor(a!) weight, Tensor(b!) state, Tensor ids, Tensor grad_rows, "
      "float lr, float eps, bool rowwise) -> ()");
  // Sparse SGD: weight[id] -= lr * (sum of the grad rows of id), once per unique id.
  m.def("sparse_sgd_update(Tensor(a!) weight, Tensor ids, Tensor grad_rows, float lr) -> ()");
  // Fused forward + loss gradient + backward + optimizer update; returns the mean loss
  // (data term + reg term) as a 0-d tensor. loss: a Loss code (mse, huber with delta
  // kHuberDelta, bce with logits); optimizer: an Optimizer code (sgd, adagrad, row-wise
  // adagrad); lr, eps, reg finite and >= 0. States are None for sgd. Biases are both
  // present or both None. No two tables or states may share memory.
  m.def(
      "train_step(Tensor(a!) user_factors, Tensor(b!) item_factors, Tensor(c!)? user_bias, "
      "Tensor(d!)? item_bias, Tensor(e!)? user_factors_state, Tensor(f!)? item_factors_state, "
      "Tensor(g!)? user_bias_state, Tensor(h!)? item_bias_state, Tensor users, Tensor items, "
      "Tensor targets, float global_mean, int loss, float reg, int optimizer, float lr, "
      "float eps, Tensor? weights=None) -> Tensor");
  // The pairwise (implicit-feedback) fused step: each sample is (user, positive item,
  // negative item); x = b_i - b_j + <P[u], Q[i] - Q[j]>. loss: a PairwiseLoss code (bpr:
  // mean softplus(-x)).
  // reg * mean_b(||P[u]||^2 + ||Q[i]||^2 + ||Q[j]||^2 + b_i^2 + b_j^2). Positive and
  // negative gradients of an item row are summed before its one update; user_bias (which
  // cancels in x) is left untouched.
  m.def(
      "train_step_pairwise(Tensor(a!) user_factors, Tensor(b!) item_factors, "
      "Tensor(c!)? user_bias, Tensor(d!)? item_bias, Tensor(e!)? user_factors_state, "
      "Tensor(f!)? item_factors_state, Tensor(g!)? user_bias_state, "
      "Tensor(h!)? item_bias_state, Tensor users, Tensor pos_items, Tensor neg_items, "
      "int loss, float reg, int optimizer, float lr, float eps, Tensor? weights=None) -> Tensor");
  // train_step_pairwise against num_negatives (>= 1) uniform negatives per positive, drawn
  // in the op: negative k of sample b is uniform over the items outside user u's row
  // pos_indices[pos_indptr[u]:pos_indptr[u + 1]] (sorted, distinct; CSR of the positives),
  // counter-based in (seed, step, b * num_negatives + k), so the same on every backend and
  // thread count (fastmf/ops/reference/sampling.py sample_negatives). Then exactly
  // train_step_pairwise with users and pos_items repeat_interleave'd num_negatives times.
  m.def(
      "train_step_pairwise_sampled(Tensor(a!) user_factors, Tensor(b!) item_factors, "
      "Tensor(c!)? user_bias, Tensor(d!)? item_bias, Tensor(e!)? user_factors_state, "
      "Tensor(f!)? item_factors_state, Tensor(g!)? user_bias_state, "
      "Tensor(h!)? item_bias_state, Tensor users, Tensor pos_items, Tensor pos_indptr, "
      "Tensor pos_indices, int num_negatives, int seed, int step, int loss, float reg, "
      "int optimizer, float lr, float eps, Tensor? weights=None) -> Tensor");
  // train_step_pairwise_sampled on each run of batch_size (>= 1) positives in turn: slice
  // t = [t * batch_size, (t + 1) * batch_size) of users, pos_items (and weights) at step
  // step + t. Returns the steps' losses, (ceil(len(users) / batch_size),). Every id, weight
  // and row pointer the steps read is checked before the first one runs, so bad input in
  // any slice writes nothing (on the CPU; CUDA records errors on the device as the step
  // does). One call per epoch instead of one per batch: no per-batch dispatch or Python.
  // `order` ((n,) int32/int64 positions in [0, len(users)), repeats allowed): the run is
  // users[order], pos_items[order] (and weights[order]), its n positives in that order,
  // read without a gathered copy (an epoch's shuffle); every input is still checked whole.
  m.def(
      "train_steps_pairwise_sampled(Tensor(a!) user_factors, Tensor(b!) item_factors, "
      "Tensor(c!)? user_bias, Tensor(d!)? item_bias, Tensor(e!)? user_factors_state, "
      "Tensor(f!)? item_factors_state, Tensor(g!)? user_bias_state, "
      "Tensor(h!)? item_bias_state, Tensor users, Tensor pos_items, Tensor pos_indptr, "
      "Tensor pos_indices, int num_negatives, int batch_size, int seed, int step, int loss, "
      "float reg, int optimizer, float lr, float eps, Tensor? weights=None, "
      "Tensor? order=None) -> Tensor");
  // train_step on the positives, each a row labelled 1, and num_negatives (>= 1) uniform
  // negatives per positive, each a row labelled 0, drawn in the op as
  // train_step_pairwise_sampled draws them. Exactly train_step on users ++
  // users.repeat_interleave(num_negatives), pos_items ++ negatives, ones ++ zeros
  // (fastmf/ops/reference/pointwise.py train_step_sampled); loss is a Loss code (bce for
  // implicit feedback).
  m.def(
      "train_step_sampled(Tensor(a!) user_factors, Tensor(b!) item_factors, "
      "Tensor(c!)? user_bias, Tensor(d!)? item_bias, Tensor(e!)? user_factors_state, "
      "Tensor(f!)? item_factors_state, Tensor(g!)? user_bias_state, "
      "Tensor(h!)? item_bias_state, Tensor users, Tensor pos_items, Tensor pos_indptr, "
      "Tensor pos_indices, int num_negatives, int seed, int step, float global_mean, "
      "int loss, float reg, int optimizer, float lr, float eps, Tensor? weights=None) -> Tensor");
  // train_step_sampled on each run of batch_size (>= 1) positives in turn, as
  // train_steps_pairwise_sampled runs train_step_pairwise_sampled: slice t at step + t,
  // every input checked before the first step, the run read through `order` when given;
  // returns the steps' losses.
  m.def(
      "train_steps_sampled(Tensor(a!) user_factors, Tensor(b!) item_factors, "
      "Tensor(c!)? user_bias, Tensor(d!)? item_bias, Tensor(e!)? user_factors_state, "
      "Tensor(f!)? item_factors_state, Tensor(g!)? user_bias_state, "
      "Tensor(h!)? item_bias_state, Tensor users, Tensor pos_items, Tensor pos_indptr, "
      "Tensor pos_indices, int num_negatives, int batch_size, int seed, int step, "
      "float global_mean, int loss, float reg, int optimizer, float lr, float eps, "
      "Tensor? weights=None, Tensor? order=None) -> Tensor");
  // The sampling family (fastmf/ops/reference/sampling.py): the uniform negatives of the
  // sampled steps on their own (NegativeSampler.sample_step, for the models that score them
  // outside those steps). (B, num_negatives) int64: entry (b, k) is the item
  // train_step_pairwise_sampled draws for pair b * num_negatives + k at (seed, step), from
  // users[b]'s row of the positives' CSR (pos_indptr (U + 1,), pos_indices). `op` names the
  // caller in the error messages, as the reference's and the Numba kernel's argument does.
  m.def(
      "sample_negatives(Tensor users, Tensor pos_indptr, Tensor pos_indices, int num_items, "
      "int num_negatives, int seed, int step, str op) -> Tensor");
  // An epoch's order (fastmf/ops/reference/sampling.py permutation): `out` (n,) int32/int64
  // filled with a uniformly random permutation of 0..n-1, counter-based in `seed`, the same
  // on every backend. Fisher-Yates: out = 0..n-1, then for i in [0, n - 1) swap out[i] with
  // out[j], j = i + floor(splitmix64(key ^ i) * (n - i) / 2^64), key =
  // permutation_key(seed) (csrc/counter_hash.h). A serial pass, so CPU kernels only: a
  // model on the GPU draws it on the host and copies it, as it did torch.randperm's.
  m.def("permutation(Tensor(a!) out, int seed) -> ()");

  // Exact top-k of item_bias[i] + <queries[b], item_factors[i]> per query: (scores (B, k),
  // indices (B, k) int64), best first, ties to the lower index; exclude_* is a CSR of items
  // to leave out per query, candidates restricts the items; short rows pad with -inf / -1.
  m.def(
      "topk_scores(Tensor queries, Tensor item_factors, Tensor? item_bias, int k, "
      "Tensor? exclude_indptr, Tensor? exclude_indices, Tensor? candidates) -> (Tensor, Tensor)");

  // The embedding_bag family (fastmf/ops/reference/embedding_bag.py). Bags are CSR: bag b is
  // indices[offsets[b]:offsets[b + 1]] (offsets (B+1,), same int dtype as indices); pooling
  // is a Pooling code; weight float32/float64/float16/bfloat16, everything computed in the
  // accumulation type (float64 for float64 tables, else float32), sums in index order.
  // out[b] = sum_j w_j weight[indices[j]] (w_j = per_sample_weights[j] or 1; MEAN: / size):
  // (B, K) in the accumulation type.
  m.def(
      "embedding_bag_forward(Tensor weight, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int pooling) -> Tensor");
  // grad_rows[j] = w_j grad_output[bag(j)] (MEAN: / size): (L, K) in grad_output's dtype.
  m.def(
      "embedding_bag_backward(Tensor grad_output, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int pooling) -> Tensor");
  // The dense gradient of a row gather (what index_select's backward forms): out[ids[j]] +=
  // rows[j] for j in order, from zero, in the accumulation type, then cast to rows' dtype;
  // out (num_rows,) or (num_rows, K) like rows. Kernels in csrc/{cpu,cuda}/embedding_bag.*
  // (the CUDA one runs sparse_update's step on a zero table).
  m.def("scatter_rows(Tensor ids, Tensor rows, int num_rows) -> Tensor");
  // The bags of a batch's distinct rows of a CSR matrix (indptr (R+1,), indices and weights
  // (nnz,)): distinct (D,) int64 ascending, inverse (n,) int64 with distinct[inverse] ==
  // ids, then the rows' entries one after the other in distinct's order as bags:
  // bag_indices (T,) like indices, bag_offsets (D+1,) like indices (0 ... T), bag_weights
  // (T,) like weights. What a model with side features pools for a step (fastmf.models'
  // Hybrid: each distinct user or item once, as the bag of its feature rows).
  m.def(
      "unique_bags(Tensor ids, Tensor indptr, Tensor indices, Tensor weights) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The exact deduplicated sparse step: per unique id the sum of its grad_rows in order of
  // occurrence, then one update of the row and its states (optimizer: any Optimizer code;
  // weight_decay_mode: a WeightDecay code; step >= 1 counts this step; float16/bfloat16
  // tables are written back rounded to nearest or, with stochastic_rounding, by the
  // counter-based rounding keyed by (seed, step)). weight (N, K) or (N,).
  m.def(
      "sparse_update(Tensor(a!) weight, Tensor(b!)? state1, Tensor(c!)? state2, Tensor ids, "
      "Tensor grad_rows, int optimizer, float lr, float eps, float beta1, float beta2, "
      "float weight_decay, int weight_decay_mode, int step, int seed, "
      "bool stochastic_rounding) -> ()");
  // sparse_update(weight, state1, state2, indices, embedding_bag_backward(grad_output, ...))
  // without forming the (L, K) gradient rows.
  m.def(
      "embedding_bag_backward_update(Tensor(a!) weight, Tensor(b!)? state1, Tensor(c!)? state2, "
      "Tensor grad_output, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "int pooling, int optimizer, float lr, float eps, float beta1, float beta2, "
      "float weight_decay, int weight_decay_mode, int step, int seed, "
      "bool stochastic_rounding) -> ()");
  // embedding_bag_backward_update of two tables over the same bags (a table and its bias
  // column, both pooled by the same bags): the bags are read and grouped once. The tables
  // have the same number of rows and share the optimizer settings; each has its own
  // gradient, states, step, seed and rounding.
  m.def(
      "embedding_bag_backward_update_pair(Tensor(a!) weight, Tensor(b!)? state1, "
      "Tensor(c!)? state2, Tensor grad_output, Tensor(d!) weight_b, Tensor(e!)? state1_b, "
      "Tensor(f!)? state2_b, Tensor grad_output_b, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int pooling, int optimizer, float lr, float eps, "
      "float beta1, float beta2, float weight_decay, int weight_decay_mode, int step, "
      "int seed, bool stochastic_rounding, int step_b, int seed_b, "
      "bool stochastic_rounding_b) -> ()");
  // Ranking steps of two-sided pooled embeddings (fastmf/ops/reference/pooled.py): for each
  // run of batch_size ids of users/pos_items in turn (the t-th at draw step t), the uniform
  // negatives of sample_negatives(users, pos_indptr, pos_indices, num_items, num_negatives,
  // seed, t), each side's distinct ids pooled from its CSR bags (indptr, indices, weights)
  // by its table and bias column (N, 1), the loss ("bpr" or "bce", each positive weighted
  // by weights, plus reg times the squared pooled outputs over B) and one
  // embedding_bag_backward_update_pair per side with the shared optimizer settings; steps,
  // seeds, stochastic_rounding: the first step and the rounding of the user table, user bias,
  // item table and item bias, in that order (step + t at run t). Returns the runs' losses.
  m.def(
      "pooled_rank_steps(Tensor(a!) user_table, Tensor(b!)? user_table_state1, "
      "Tensor(c!)? user_table_state2, Tensor(d!) user_bias, Tensor(e!)? user_bias_state1, "
      "Tensor(f!)? user_bias_state2, Tensor(g!) item_table, Tensor(h!)? item_table_state1, "
      "Tensor(i!)? item_table_state2, Tensor(j!) item_bias, Tensor(k!)? item_bias_state1, "
      "Tensor(l!)? item_bias_state2, Tensor user_indptr, Tensor user_indices, "
      "Tensor user_weights, Tensor item_indptr, Tensor item_indices, Tensor item_weights, "
      "Tensor users, Tensor pos_items, Tensor? weights, Tensor pos_indptr, "
      "Tensor pos_indices, int num_items, int num_negatives, int batch_size, int seed, "
      "str loss, float reg, int optimizer, float lr, float eps, float beta1, float beta2, "
      "float weight_decay, int weight_decay_mode, int[] steps, int[] seeds, "
      "int[] stochastic_rounding) -> Tensor");
}

#ifndef FASTMF_NO_PYTHON
namespace fastmf {
// "avx2" or "baseline" (csrc/cpu/isa.h, defined in csrc/cpu/register.cpp). Weak: a library
// built without the CPU kernels (tests/cuda_emulation) has none, and build_info says "none".
[[gnu::weak]] const char* cpu_isa();
// csrc/cuda/errors.cu: `value` formatted by the CUDA translation units' host code. Weak: a
// build without CUDA has none.
namespace cuda {
[[gnu::weak]] std::string format_probe(long long value);
}
}  // namespace fastmf

namespace {

// The number every error message is formatted with, as this translation unit's c10::str
// writes it. A compiler whose libstdc++ is newer than the one the process loads (a
// toolset GCC that links the newer parts statically) can leave a library whose ostreams
// write integers as nothing and crash on doubles; fastmf/_extension.py compares the
// probes with the expected text and refuses such a build at import.
constexpr long long kFormatProbe = -1234567890123LL;

PyObject* build_info(PyObject*, PyObject*) {
#ifdef FASTMF_WITH_CUDA
  const bool with_cuda = true;
  const char* cuda_version = FASTMF_CUDA_VERSION;
#else
  const bool with_cuda = false;
  const char* cuda_version = "";
#endif
#if AT_PARALLEL_OPENMP && defined(_OPENMP)
  const bool with_openmp = true;
#else
  const bool with_openmp = false;
#endif
  const std::string probe = c10::str(kFormatProbe);
  const std::string cuda_probe = fastmf::cuda::format_probe != nullptr
                                     ? fastmf::cuda::format_probe(kFormatProbe)
                                     : probe;
  return Py_BuildValue(
      "{s:s,s:O,s:O,s:s,s:i,s:s,s:s,s:s}", "torch_version", FASTMF_TORCH_VERSION, "cpu",
      Py_True, "cuda", with_cuda ? Py_True : Py_False, "cuda_version", cuda_version,
      "openmp", with_openmp ? 1 : 0, "cpu_isa",
      fastmf::cpu_isa != nullptr ? fastmf::cpu_isa() : "none", "format_probe",
      probe.c_str(), "format_probe_cuda", cuda_probe.c_str());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this extension was built with."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastmf native kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
#endif  // FASTMF_NO_PYTHON
