// Python sequences of tensors read by esgdm._C's entry points without pybind's list
// conversion.  pybind turns a list into a std::vector<at::Tensor>, one owning reference
// per tensor, and drops them when the call returns: about 40 ns per tensor and list, for
// the Python-owned tensors of a model, as much as a Python loop over them.
#pragma once

#include <torch/extension.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace esgdm {

// A list or tuple of tensors read in place: THPVariable_Unpack gives each item's
// at::Tensor.  For calls that hold the GIL throughout.
class TensorSeq {
 public:
  TensorSeq(const pybind11::handle& seq, const char* what)
      : fast_(pybind11::reinterpret_steal<pybind11::object>(PySequence_Fast(seq.ptr(), what))) {
    if (!fast_) throw pybind11::error_already_set();
    items_ = PySequence_Fast_ITEMS(fast_.ptr());
    n_ = static_cast<int64_t>(PySequence_Fast_GET_SIZE(fast_.ptr()));
    for (int64_t i = 0; i < n_; ++i) {
      TORCH_CHECK_TYPE(THPVariable_Check(items_[i]), what, ": item ", i, " is a ",
                       Py_TYPE(items_[i])->tp_name, ", not a tensor");
    }
  }
  int64_t size() const { return n_; }
  const at::Tensor& operator[](int64_t i) const { return THPVariable_Unpack(items_[i]); }
  PyObject* item(int64_t i) const { return items_[i]; }

 private:
  pybind11::object fast_;  // a list or tuple holding the items (a new one for other sequences)
  PyObject** items_ = nullptr;
  int64_t n_ = 0;
};

// A sequence of tensors as a std::vector<at::Tensor> of borrowed references (c10's
// MaybeOwned borrows: no reference count changes per tensor), for the kernels' argument
// lists, which may be read without the GIL: a tuple copy of the sequence keeps every
// tensor alive while this object lives, whatever another thread does to the caller's
// list meanwhile.  Made and destroyed with the GIL held.
class BorrowedTensors {
 public:
  BorrowedTensors(const pybind11::handle& seq, const char* what)
      : tuple_(pybind11::reinterpret_steal<pybind11::object>(PySequence_Tuple(seq.ptr()))) {
    if (!tuple_) throw pybind11::error_already_set();
    const Py_ssize_t n = PyTuple_GET_SIZE(tuple_.ptr());
    for (Py_ssize_t i = 0; i < n; ++i) {  // (every check before the first borrow)
      PyObject* item = PyTuple_GET_ITEM(tuple_.ptr(), i);
      TORCH_CHECK_TYPE(THPVariable_Check(item), what, "[", i, "] is a ", Py_TYPE(item)->tp_name,
                       ", not a tensor");
    }
    tensors_.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      tensors_.push_back(
          c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(PyTuple_GET_ITEM(tuple_.ptr(), i))));
    }
  }
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;

  const std::vector<at::Tensor>& tensors() const { return tensors_; }

 private:
  pybind11::object tuple_;
  std::vector<at::Tensor> tensors_;
};

}  // namespace esgdm
