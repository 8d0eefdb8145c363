// esgdm._C.StepPlan: the optimizer's plain step with its per-tensor host work in C++.
//
// A plain step of an optimizer whose buckets the compiled kernels step ("cpu", "cuda")
// needs, per tensor: that the parameter is still the one the buckets were built for,
// with the same memory and layout; its .grad, present and laid out like it; and the
// kernel's pointers.  Done in Python (or through pybind's conversion of five lists of
// tensors per bucket) that is about half a microsecond per tensor: at thousands of small
// tensors the host, not the kernel, set the step's speed.  A plan holds the tensors of
// every bucket as C++ vectors, built once per layout (esgdm/store.py rebuilds it when
// the buckets are rebuilt), and a step is one call, step(groups, hparams, grad_scale,
// found_inf, flags, seed), which
//
//   * checks that every parameter is unchanged (the same objects in the same groups, the
//     same data pointer, dtype, device, sizes and strides): else it returns 1, and the
//     caller re-syncs its buckets;
//   * takes every gradient, which must be there with its parameter's dtype, device, sizes
//     and strides: else it returns 2, and the caller takes the general path, which steps
//     or refuses what the plan cannot;
//   * checks the per-step arguments of every bucket, then runs every bucket's kernel and
//     returns 0.  Nothing is written unless it returns 0.
//
// Buckets of a kernel that C++ cannot launch (the Triton backend: a Python launch) are
// the plan's too, as "launch buckets": the plan checks and gathers their gradients like
// the others, writes the gradients' addresses into the bucket's address table (the
// launcher's int64 [n, width] table; uploaded only when an address changed) and leaves
// the launch to the caller, which then calls release().
//
// Calls from several threads take turns (the gathered gradients are the plan's, for the
// length of one call); no gradient is held after a call returns, except, on a step with
// launch buckets, until release() (the caller orders such step-launch-release sequences
// across its threads).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "esgdm_common.h"

// A hint to load a cache line ahead of its use (rw 1: it will be written).
#if defined(__GNUC__) || defined(__clang__)
#define ESGDM_PREFETCH(p, rw) __builtin_prefetch((p), (rw))
#else
#define ESGDM_PREFETCH(p, rw) ((void)(p))
#endif

namespace esgdm {

namespace {

// Whether `a` holds the values of `b` (an inline loop: tensors have few dimensions, and
// a call to memcmp per comparison showed in the profile).
inline bool same_values(at::IntArrayRef a, const c10::SmallVector<int64_t, 5>& b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < b.size(); ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

// Asks for the heap objects that gather() reads of the tensors ahead of `i`, a chain of
// dependent loads that after a forward and backward pass are all cache misses: the
// parameters' TensorImpl 16 ahead, their storage and autograd metadata 8 ahead (from the
// TensorImpl asked for before), the gradient's TensorImpl 4 ahead and its storage 2 ahead.
inline void prefetch_ahead(const std::vector<at::Tensor>& params, int64_t i, int64_t end) {
  if (i + 16 < end) {
    const char* impl = reinterpret_cast<const char*>(params[i + 16].unsafeGetTensorImpl());
    ESGDM_PREFETCH(impl, 0);
    ESGDM_PREFETCH(impl + 64, 0);
    ESGDM_PREFETCH(impl + 128, 0);
  }
  if (i + 8 < end) {
    const c10::TensorImpl* impl = params[i + 8].unsafeGetTensorImpl();
    ESGDM_PREFETCH(impl->unsafe_storage().unsafeGetStorageImpl(), 0);
    ESGDM_PREFETCH(impl->autograd_meta(), 0);
  }
  if (i + 4 < end) {
    const at::Tensor& g = params[i + 4].unsafeGetTensorImpl()->grad();
    if (g.defined()) {
      const char* gi = reinterpret_cast<const char*>(g.unsafeGetTensorImpl());
      ESGDM_PREFETCH(gi, 0);
      ESGDM_PREFETCH(gi + 64, 0);
      ESGDM_PREFETCH(gi + 128, 0);
    }
  }
  if (i + 2 < end) {
    const at::Tensor& g = params[i + 2].unsafeGetTensorImpl()->grad();
    if (g.defined()) ESGDM_PREFETCH(g.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 0);
  }
}

// What a parameter's memory looked like when the plan was built.
struct Layout {
  const void* data;
  at::ScalarType dtype;
  at::Device device;
  c10::SmallVector<int64_t, 5> sizes;  // (inline storage: no further heap object to read)
  c10::SmallVector<int64_t, 5> strides;

  explicit Layout(const at::Tensor& t)
      : data(t.data_ptr()),
        dtype(t.scalar_type()),
        device(t.device()),
        sizes(t.sizes().begin(), t.sizes().end()),
        strides(t.strides().begin(), t.strides().end()) {}

  // Whether `t` has this dtype, device, sizes and strides (a plain strided tensor).  A
  // tensor subclass that dispatches to Python (a DTensor, a FakeTensor, ...) is not: its
  // sizes may be Python's to answer, which this code, run without the GIL, must not ask
  // for; the general path refuses it.  (A strided tensor without storage that is not
  // one of those makes data_ptr() below throw: an error, not a crash.)
  bool like(const at::Tensor& t) const {
    return !dispatches_to_python(t) && t.scalar_type() == dtype && t.layout() == at::kStrided && !t.is_neg() &&
           t.device() == device && same_values(t.sizes(), sizes) && same_values(t.strides(), strides);
  }

  // Whether `t` is still this memory with this layout.
  bool same(const at::Tensor& t) const { return like(t) && t.data_ptr() == data; }
};

struct PlanBucket {
  std::vector<at::Tensor> params, exp_avgs, exp_avg_ds, qscales, buffers;
  std::vector<Layout> layouts;
  TensorPtrs ptrs;  // taken once (grads: by gather)
  // The gradients' memory, held for the length of one call: tensor i's storage where it
  // is not the previous tensor's (one entry for gradients that are views of one buffer).
  std::vector<c10::Storage> held;
  at::Tensor scalars, index;
  bool quantized = false;
  // A launch bucket's address table (its launcher's, on the device), a host copy of it,
  // the columns that hold each gradient's address, and the addresses the table holds.
  at::Tensor table, host;
  std::vector<int64_t> grad_columns;
  std::vector<const void*> uploaded;

  bool launched() const { return table.defined(); }

  // The kernel's arguments: with `ptrs`, the gradients' pointers from the plan's table
  // (`grads` empty); without, the tensors of `grads`.
  StepArgs args(at::TensorList grads, const at::Tensor& hparams, const at::Tensor& grad_scale,
                const at::Tensor& found_inf, int64_t flags, int64_t seed, const TensorPtrs* table) const {
    StepArgs a = make_step_args(params, grads, exp_avgs, exp_avg_ds, scalars, index, hparams,
                                grad_scale, found_inf, flags, seed);
    a.quantized = quantized;
    if (quantized) a.qscales = qscales;
    a.ptrs = table;
    return a;
  }
};

std::vector<at::Tensor> tensors(const pybind11::handle& seq) {
  return pybind11::cast<std::vector<at::Tensor>>(seq);
}

class StepPlan {
 public:
  // groups: each param group's list of parameters, in order; buckets: one tuple per
  // bucket (params, exp_avgs, exp_avg_ds, qscales or None, scalars, index, buffers,
  // launch or None), the index the bucket's full table (every tensor stepped), buffers
  // the flat state buffers the state views are views of: held, so that the pointers
  // taken from the views stay valid even if a view is pointed elsewhere
  // (``opt.state[p]["exp_avg"].data = t``).  launch: None for a bucket the plan's
  // kernels step, else (table, host, grad_columns) of a launch bucket: its launcher's
  // int64 [n, width] address table, a CPU tensor with the same values, and the columns
  // to write each tensor's gradient address into.
  StepPlan(const pybind11::list& groups, const pybind11::list& buckets) {
    for (const pybind11::handle& g : groups) {
      std::vector<pybind11::object> ids;
      for (const pybind11::handle& p : pybind11::cast<pybind11::list>(g)) {
        ids.push_back(pybind11::reinterpret_borrow<pybind11::object>(p));
      }
      groups_.push_back(std::move(ids));
    }
    for (const pybind11::handle& item : buckets) {
      auto t = pybind11::cast<pybind11::tuple>(item);
      TORCH_CHECK(t.size() == 8, "StepPlan: a bucket is (params, exp_avgs, exp_avg_ds, qscales, "
                  "scalars, index, buffers, launch)");
      PlanBucket b;
      b.params = tensors(t[0]);
      b.exp_avgs = tensors(t[1]);
      b.exp_avg_ds = tensors(t[2]);
      b.quantized = !t[3].is_none();
      if (b.quantized) b.qscales = tensors(t[3]);
      b.scalars = pybind11::cast<at::Tensor>(t[4]);
      b.index = pybind11::cast<at::Tensor>(t[5]);
      b.buffers = tensors(t[6]);
      for (const at::Tensor& p : b.params) {
        TORCH_CHECK(p.defined() && p.layout() == at::kStrided && !p.is_neg() &&
                        p.is_non_overlapping_and_dense(),
                    "StepPlan: every parameter must be a dense strided tensor");
        b.layouts.emplace_back(p);
      }
      // Everything but the gradients checked once, as esgdm._C.step checks it (with the
      // parameters standing in for gradients of their own layout).
      check_step_args(b.args(b.params, at::Tensor(), at::Tensor(), at::Tensor(), 0, 0, nullptr),
                      /*tables=*/false, /*per_tensor=*/true);
      for (size_t i = 0; i < b.params.size(); ++i) {
        b.ptrs.params.push_back(b.params[i].data_ptr());
        b.ptrs.exp_avgs.push_back(b.exp_avgs[i].data_ptr());
        b.ptrs.exp_avg_ds.push_back(b.exp_avg_ds[i].data_ptr());
        if (b.quantized) b.ptrs.qscales.push_back(b.qscales[i].data_ptr());
        b.ptrs.numels.push_back(b.params[i].numel());
      }
      if (!b.params.empty()) {
        const at::Device device = b.params[0].device();
        check_table(b.scalars, "scalars", at::kDouble, kNumScalarColumns, -1, device);
        check_table(b.index, "index", at::kInt, 2, static_cast<int64_t>(b.params.size()), device);
      }
      if (!t[7].is_none()) add_launch(b, pybind11::cast<pybind11::tuple>(t[7]));
      buckets_.push_back(std::move(b));
    }
  }

  // One plain step: 0 when it stepped; else, with nothing written, kChanged (a parameter
  // is no longer what the plan was built for) or kGeneral (a gradient is missing or not
  // laid out like its parameter).  Calls from several threads take turns.
  int64_t step(const pybind11::list& groups, const std::vector<at::Tensor>& hparams,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               int64_t flags, int64_t seed) {
    TORCH_CHECK(hparams.size() == buckets_.size(), "StepPlan.step: got ", hparams.size(),
                " hparams tables for ", buckets_.size(), " buckets");
    if (!same_groups(groups)) return kChanged;  // (with the GIL: it reads Python lists)
    const at::Tensor scale = grad_scale.value_or(at::Tensor());
    const at::Tensor inf = found_inf.value_or(at::Tensor());
    pybind11::gil_scoped_release no_gil;  // (before waiting for the lock: no deadlock)
    std::lock_guard<std::mutex> lock(mutex_);
    struct Release {  // the gradients are not held past the call (but see launches_)
      StepPlan* plan;
      bool keep = false;
      ~Release() {
        if (!keep) plan->release();
      }
    } release_at_exit{this};
    const int64_t status = gather();
    if (status != kReady) return status;
    std::vector<StepArgs> args;
    args.reserve(buckets_.size());
    for (size_t k = 0; k < buckets_.size(); ++k) {
      args.push_back(buckets_[k].args({}, hparams[k], scale, inf, flags, seed, &buckets_[k].ptrs));
      check_step_args(args.back(), /*tables=*/true, /*per_tensor=*/false);  // before any write
    }
    for (PlanBucket& b : buckets_) {  // (first: an upload that fails has written nothing)
      if (b.launched()) refresh_table(b);
    }
    for (size_t k = 0; k < buckets_.size(); ++k) {
      if (!buckets_[k].launched()) run_step(args[k]);
    }
    release_at_exit.keep = launches_ > 0;  // the caller launches, then calls release()
    return kReady;
  }

  // Lets go of the gradients' memory (after a step with launch buckets: once they are
  // launched; otherwise the step itself calls it).  On ATen's threads: gradients of their
  // own allocation are one atomic decrement each, which at thousands of tensors shows.
  void release() {
    for (PlanBucket& b : buckets_) {
      at::parallel_for(0, static_cast<int64_t>(b.held.size()), kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          // (the storages' lines left the caches during the step: ask for them ahead)
          if (i + 16 < hi && b.held[i + 16]) ESGDM_PREFETCH(b.held[i + 16].unsafeGetStorageImpl(), 1);
          if (b.held[i]) b.held[i] = c10::Storage();
          b.ptrs.grads[i] = nullptr;
        }
      });
    }
  }

  int64_t launches() const { return launches_; }

  int64_t size() const {
    int64_t n = 0;
    for (const PlanBucket& b : buckets_) n += static_cast<int64_t>(b.params.size());
    return n;
  }

  static constexpr int64_t kGrain = 512;  // tensors per chunk of the parallel checks
  static constexpr int64_t kReady = 0;
  static constexpr int64_t kChanged = 1;
  static constexpr int64_t kGeneral = 2;

 private:
  // Whether `groups` holds the very parameter objects the plan was built for.
  bool same_groups(const pybind11::list& groups) const {
    if (groups.size() != groups_.size()) return false;
    for (size_t g = 0; g < groups_.size(); ++g) {
      PyObject* list = groups[g].ptr();
      if (!PyList_Check(list) || static_cast<size_t>(PyList_GET_SIZE(list)) != groups_[g].size()) {
        return false;
      }
      for (size_t k = 0; k < groups_[g].size(); ++k) {
        if (PyList_GET_ITEM(list, k) != groups_[g][k].ptr()) return false;
      }
    }
    return true;
  }

  // Every parameter unchanged and every gradient like its parameter: the gradients'
  // pointers taken and their memory held (PlanBucket::held).  Reads several heap objects
  // per tensor (the parameter, its storage, its autograd metadata, the gradient and its
  // storage): memory latency, not arithmetic, so it is spread over ATen's threads
  // (chunks of kGrain tensors).
  int64_t gather() {
    std::atomic<int64_t> status{kReady};
    for (PlanBucket& b : buckets_) {
      const int64_t n = static_cast<int64_t>(b.params.size());
      b.held.resize(b.params.size());
      b.ptrs.grads.resize(b.params.size());
      at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
        int64_t found = kReady;
        const c10::StorageImpl* last = nullptr;
        for (int64_t i = lo; i < hi; ++i) {
          prefetch_ahead(b.params, i, hi);
          if (!b.layouts[i].same(b.params[i])) {
            found = kChanged;
            break;
          }
          // (TensorImpl::grad: Tensor::grad() would also ask whether p is a leaf, to warn)
          const at::Tensor& g = b.params[i].unsafeGetTensorImpl()->grad();
          if (!g.defined() || !b.layouts[i].like(g)) {
            found = kGeneral;
            break;
          }
          b.ptrs.grads[i] = g.data_ptr();  // (throws, rather than crashes, without storage)
          const c10::Storage& storage = g.unsafeGetTensorImpl()->unsafe_storage();
          if (storage.unsafeGetStorageImpl() != last) {  // one reference per buffer, not per view
            last = storage.unsafeGetStorageImpl();
            b.held[i] = storage;
          }
        }
        if (found != kReady) {  // kChanged wins over kGeneral: the buckets must be rebuilt
          int64_t seen = status.load();
          while (seen != kChanged && !status.compare_exchange_weak(seen, found)) {
          }
        }
      });
    }
    return status.load();
  }

  // A launch bucket's table (see the constructor): checked once.
  void add_launch(PlanBucket& b, const pybind11::tuple& launch) {
    TORCH_CHECK(launch.size() == 3, "StepPlan: a launch is (table, host, grad_columns)");
    b.table = pybind11::cast<at::Tensor>(launch[0]);
    b.host = pybind11::cast<at::Tensor>(launch[1]);
    b.grad_columns = pybind11::cast<std::vector<int64_t>>(launch[2]);
    const int64_t n = static_cast<int64_t>(b.params.size());
    TORCH_CHECK(!b.params.empty(), "StepPlan: a launch bucket without tensors");
    TORCH_CHECK(b.table.scalar_type() == at::kLong && b.table.dim() == 2 && b.table.size(0) == n &&
                    b.table.is_contiguous() && b.table.device() == b.params[0].device(),
                "StepPlan: a launch table must be a contiguous int64 [", n, ", width] tensor on ",
                b.params[0].device());
    TORCH_CHECK(b.host.scalar_type() == at::kLong && b.host.sizes() == b.table.sizes() &&
                    b.host.is_contiguous() && b.host.is_cpu(),
                "StepPlan: a launch table's host copy must be a contiguous int64 CPU tensor of its shape");
    for (int64_t c : b.grad_columns) {
      TORCH_CHECK(c >= 0 && c < b.table.size(1), "StepPlan: gradient column ", c, " is not a column of the ",
                  "launch table");
    }
    b.uploaded.assign(b.params.size(), nullptr);  // (what the table holds is unknown: upload)
    ++launches_;
  }

  // Writes the gathered gradients' addresses into a launch bucket's table where they
  // differ from what it holds: usually they do not (the caching allocators hand the same
  // blocks back), and nothing is copied.
  static void refresh_table(PlanBucket& b) {
    if (b.uploaded == b.ptrs.grads) return;
    const int64_t width = b.host.size(1);
    int64_t* rows = b.host.data_ptr<int64_t>();
    for (size_t i = 0; i < b.ptrs.grads.size(); ++i) {
      const auto address = static_cast<int64_t>(reinterpret_cast<uintptr_t>(b.ptrs.grads[i]));
      for (int64_t c : b.grad_columns) rows[static_cast<int64_t>(i) * width + c] = address;
    }
    if (b.table.is_cuda()) {
      // From a fresh pinned buffer: an earlier copy may still be reading the last one
      // (the caching host allocator keeps a buffer until the copies that read it are done).
      at::Tensor pinned = at::empty(b.host.sizes(), b.host.options().pinned_memory(true));
      pinned.copy_(b.host);
      b.table.copy_(pinned, /*non_blocking=*/true);  // ordered after the earlier launches
    } else if (!b.table.is_same(b.host)) {
      b.table.copy_(b.host);
    }
    b.uploaded = b.ptrs.grads;
  }

  std::vector<std::vector<pybind11::object>> groups_;
  std::vector<PlanBucket> buckets_;
  int64_t launches_ = 0;  // launch buckets
  std::mutex mutex_;  // one step at a time: the gradients gathered are the plan's
};

}  // namespace

void register_plan(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<StepPlan>(m, "StepPlan",
                       "StepPlan(groups, buckets): an optimizer's plain step over buckets the "
                       "compiled kernels step, with the per-tensor host work in C++ "
                       "(csrc/esgdm_plan.cpp).")
      .def(py::init<const py::list&, const py::list&>(), py::arg("groups"), py::arg("buckets"))
      .def("step", &StepPlan::step, py::arg("groups"), py::arg("hparams"), py::arg("grad_scale"),
           py::arg("found_inf"), py::arg("flags"), py::arg("seed"),
           "step(groups, hparams, grad_scale, found_inf, flags, seed) -> 0 (stepped), 1 (a "
           "parameter changed) or 2 (a gradient missing or not laid out like its parameter: "
           "take the general path); nothing is written unless 0. groups: each param group's "
           "list of parameters; hparams: one table per bucket.  With launch buckets, 0 means "
           "their tables are ready: launch them, then call release().")
      .def("release", &StepPlan::release, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "release(): lets go of the gradients a step with launch buckets held for their launch.")
      .def_property_readonly("launches", &StepPlan::launches, "how many buckets the caller launches")
      .def("__len__", &StepPlan::size);
}

}  // namespace esgdm
