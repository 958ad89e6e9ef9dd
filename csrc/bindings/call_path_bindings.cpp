// The per-call entry of Communicator.all_to_all(_v): one crossing from
// Python. Checks the arguments (the ValueErrors of alltoall/ops/validation.py,
// raised before any communication), picks the algorithm, releases the GIL
// and runs the exchange with its autograd node (ops/exchange_autograd.h).
//
// What needs Python stays there (alltoall/ops/communicator.py): check=True's
// collective agreement (these calls return None when it is on, read from
// `check` or ALLTOALL_CHECK), async_op's handles and torch.compile's op.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/python.h>

#include <cctype>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings/register.h"
#include "ops/call_path.h"
#include "ops/exchange_autograd.h"

namespace py = pybind11;

namespace alltoall::bindings {

namespace {

using ops::Algorithm;
using ops::CallPath;
using Splits = std::vector<int64_t>;

std::string type_name(py::handle object) { return py::str(py::type::handle_of(object).attr("__name__")); }

// consistency.enabled: the explicit flag, else ALLTOALL_CHECK (1, true, yes
// or on). Python's os.environ writes through to the C environment.
bool check_requested(py::handle check) {
  if (!check.is_none()) {
    const int truth = PyObject_IsTrue(check.ptr());
    if (truth < 0) throw py::error_already_set();
    return truth == 1;
  }
  const char* raw = std::getenv("ALLTOALL_CHECK");
  if (raw == nullptr) return false;
  std::string value(raw);
  const auto first = value.find_first_not_of(" \t\n\r\f\v");
  if (first == std::string::npos) return false;
  value = value.substr(first, value.find_last_not_of(" \t\n\r\f\v") - first + 1);
  for (char& c : value) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return value == "1" || value == "true" || value == "yes" || value == "on";
}

// validation.check_tensor.
const at::Tensor& tensor_arg(py::handle x, const char* op) {
  if (!THPVariable_Check(x.ptr())) throw py::value_error(std::string(op) + ": expected a torch.Tensor, got " + type_name(x));
  const at::Tensor& tensor = THPVariable_Unpack(x.ptr());
  if (tensor.dim() == 0) {
    throw py::value_error(std::string(op) + ": the input is a 0-d tensor; it needs a dim 0 to split among ranks");
  }
  return tensor;
}

// validation.check_algorithm's first half (the second is CallPath::resolve).
Algorithm algorithm_arg(py::handle algorithm) {
  if (PyUnicode_Check(algorithm.ptr())) {
    if (PyUnicode_CompareWithASCIIString(algorithm.ptr(), "auto") == 0) return Algorithm::kAuto;
    if (PyUnicode_CompareWithASCIIString(algorithm.ptr(), "flat") == 0) return Algorithm::kFlat;
    if (PyUnicode_CompareWithASCIIString(algorithm.ptr(), "hierarchical") == 0) return Algorithm::kHierarchical;
  }
  throw py::value_error("algorithm=" + std::string(py::repr(algorithm)) + " is not one of auto, flat, hierarchical");
}

// validation.splits_to_list: ints (anything int() accepts), or a 1-d integer
// tensor on any device.
Splits splits_arg(py::handle splits, const char* name, const CallPath& path, int64_t rows, const char* op) {
  Splits values;
  if (THPVariable_Check(splits.ptr())) {
    const at::Tensor& tensor = THPVariable_Unpack(splits.ptr());
    if (tensor.dim() != 1 || !at::isIntegralType(tensor.scalar_type(), /*includeBool=*/false)) {
      throw py::value_error(std::string(op) + ": " + name + " must be a 1-d integer tensor, got " +
                            std::string(py::str(splits.attr("dtype"))) + " of shape " +
                            ops::shape_repr(tensor.sizes()));
    }
    const at::Tensor longs = tensor.to(at::kCPU, at::kLong).contiguous();
    const int64_t* data = longs.const_data_ptr<int64_t>();
    values.assign(data, data + longs.numel());
  } else if (PyList_CheckExact(splits.ptr()) || PyTuple_CheckExact(splits.ptr())) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(splits.ptr());
    PyObject** items = PySequence_Fast_ITEMS(splits.ptr());
    values.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (PyLong_CheckExact(items[i])) {
        const long long v = PyLong_AsLongLong(items[i]);
        if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
        values.push_back(v);
      } else {
        try {
          values.push_back(py::int_(py::reinterpret_borrow<py::object>(items[i])).cast<int64_t>());
        } catch (py::error_already_set& error) {
          if (!error.matches(PyExc_TypeError)) throw;
          throw py::value_error(std::string(op) + ": " + name + " must be a sequence of ints or a tensor, got " +
                                type_name(splits));
        }
      }
    }
  } else {
    try {
      for (py::handle item : py::iter(py::reinterpret_borrow<py::object>(splits))) {
        values.push_back(py::int_(py::reinterpret_borrow<py::object>(item)).cast<int64_t>());
      }
    } catch (py::error_already_set& error) {
      if (!error.matches(PyExc_TypeError)) throw;
      throw py::value_error(std::string(op) + ": " + name + " must be a sequence of ints or a tensor, got " +
                            type_name(splits));
    }
  }
  path.check_splits(values, name, rows, op);
  return values;
}

py::object wrap(at::Tensor tensor) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(tensor))); }

py::list to_list(const Splits& values) {
  py::list out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = py::int_(values[i]);
  return out;
}

// The checked arguments of one equal-split call.
struct Equal {
  const at::Tensor& input;
  Algorithm algorithm;
  std::shared_ptr<const ops::Exchanger> exchanger;
};

Equal equal_call(const CallPath& path, py::handle x, py::handle algorithm) {
  const at::Tensor& input = tensor_arg(x, "all_to_all");
  path.check_divisible(input, "all_to_all");
  const Algorithm requested = algorithm_arg(algorithm);
  const int64_t bytes_per_peer = input.numel() * static_cast<int64_t>(input.element_size()) / path.group_size();
  const Algorithm resolved = path.resolve(requested, bytes_per_peer);
  return {input, resolved, path.exchanger(resolved, requested)};
}

// The checked arguments of one uneven call.
struct Uneven {
  const at::Tensor& input;
  Splits input_splits;
  std::optional<Splits> output_splits;
  Algorithm algorithm;
  std::shared_ptr<const ops::Exchanger> exchanger;
};

Uneven uneven_call(const CallPath& path, py::handle x, py::handle input_splits, py::handle output_splits,
                   py::handle algorithm) {
  const at::Tensor& input = tensor_arg(x, "all_to_all_v");
  Splits ins = splits_arg(input_splits, "input_splits", path, input.size(0), "all_to_all_v");
  std::optional<Splits> outs;
  if (!output_splits.is_none()) outs = splits_arg(output_splits, "output_splits", path, -1, "all_to_all_v");
  const Algorithm requested = algorithm_arg(algorithm);
  const Algorithm resolved = path.resolve(requested, std::nullopt);
  return {input, std::move(ins), std::move(outs), resolved, path.exchanger(resolved, requested)};
}

py::object all_to_all(const CallPath& path, py::handle x, py::handle algorithm, py::handle check) {
  if (check_requested(check)) return py::none();
  Equal call = equal_call(path, x, algorithm);
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = ops::all_to_all_autograd(call.exchanger, call.input);
  }
  return wrap(std::move(out));
}

py::object all_to_all_v(const CallPath& path, py::handle x, py::handle input_splits, py::handle output_splits,
                        py::handle algorithm, py::handle check) {
  if (check_requested(check)) return py::none();
  Uneven call = uneven_call(path, x, input_splits, output_splits, algorithm);
  std::pair<at::Tensor, Splits> result;
  {
    py::gil_scoped_release no_gil;
    result = ops::all_to_all_v_autograd(call.exchanger, call.input, call.input_splits, call.output_splits);
  }
  if (call.output_splits) return wrap(std::move(result.first));
  return py::make_tuple(wrap(std::move(result.first)), to_list(result.second));
}

// The cost model's pick, from alltoall.ops.selection.ModelSelector.choose.
CallPath::Model model_of(py::object selector) {
  if (selector.is_none()) return {};
  // The callable may be the last reference to Python objects: drop it
  // under the GIL, from whichever thread lets the CallPath go.
  std::shared_ptr<py::object> choose(new py::object(selector.attr("choose")), [](py::object* object) {
    py::gil_scoped_acquire gil;
    delete object;
  });
  return [choose](int64_t bytes_per_peer) {
    py::gil_scoped_acquire gil;
    const std::string name = py::str((*choose)(bytes_per_peer));
    return name == "hierarchical" ? Algorithm::kHierarchical : Algorithm::kFlat;
  };
}

}  // namespace

void register_call_path(py::module_& m) {
  py::class_<CallPath, std::shared_ptr<CallPath>>(
      m, "CallPath",
      "A Communicator's per-call path: checks, algorithm choice, exchange and autograd in one call.")
      .def(py::init([](int64_t group_size, std::vector<int64_t> node_sizes, std::optional<int64_t> hierarchical_up_to,
                       std::shared_ptr<ops::Exchanger> flat, std::shared_ptr<ops::Exchanger> hierarchical,
                       py::object model) {
             CallPath::Options options{group_size, std::move(node_sizes), hierarchical_up_to, model_of(model)};
             return std::make_shared<CallPath>(std::move(options), std::move(flat), std::move(hierarchical));
           }),
           py::arg("group_size"), py::arg("node_sizes"), py::arg("hierarchical_up_to"), py::arg("flat"),
           py::arg("hierarchical") = nullptr, py::arg("model") = py::none(),
           "model: an object whose choose(bytes_per_peer) gives 'flat' or 'hierarchical' (the cost model), "
           "called once per size; None for the fixed rule (hierarchical_up_to).")
      .def("all_to_all", &all_to_all, py::arg("x"), py::arg("algorithm") = "auto", py::arg("check") = py::none(),
           "Communicator.all_to_all; None when check is on (the caller agrees first, then passes check=False).")
      .def("all_to_all_v", &all_to_all_v, py::arg("x"), py::arg("input_splits"), py::arg("output_splits") = py::none(),
           py::arg("algorithm") = "auto", py::arg("check") = py::none(),
           "Communicator.all_to_all_v: the output, or (output, splits) when output_splits is None; None when "
           "check is on.")
      .def(
          "validate",
          [](const CallPath& path, py::handle x, py::handle algorithm) {
            return ops::algorithm_name(equal_call(path, x, algorithm).algorithm);
          },
          py::arg("x"), py::arg("algorithm") = "auto", "The checks of all_to_all; returns the concrete algorithm.")
      .def(
          "validate_v",
          [](const CallPath& path, py::handle x, py::handle input_splits, py::handle output_splits,
             py::handle algorithm) {
            auto call = uneven_call(path, x, input_splits, output_splits, algorithm);
            py::object outs = call.output_splits ? py::object(to_list(*call.output_splits)) : py::none();
            return py::make_tuple(ops::algorithm_name(call.algorithm), to_list(call.input_splits), outs);
          },
          py::arg("x"), py::arg("input_splits"), py::arg("output_splits") = py::none(), py::arg("algorithm") = "auto",
          "The checks of all_to_all_v; returns (algorithm, input_splits, output_splits or None) as lists.")
      .def(
          "resolve",
          [](const CallPath& path, py::handle algorithm, std::optional<int64_t> bytes_per_peer) {
            return ops::algorithm_name(path.resolve(algorithm_arg(algorithm), bytes_per_peer));
          },
          py::arg("algorithm"), py::arg("bytes_per_peer") = py::none(),
          "What 'algorithm' runs as for an equal split of bytes_per_peer (None: uneven).");
}

}  // namespace alltoall::bindings
