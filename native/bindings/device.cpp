// Device, CudaStream, CudaEvent, device queries and memory statistics.
#include <pybind11/stl.h>

#include "bindings.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/memory.hpp"

namespace cudablocks::python {

void bind_device(py::module_& m) {
  py::class_<Device>(m, "Device", "A compute device: \"cpu\", or \"cuda:N\" for the N-th CUDA GPU.")
      .def(py::init(&Device::parse), py::arg("spec"))
      .def_property_readonly("type", [](const Device& d) { return d.is_cpu() ? "cpu" : "cuda"; })
      .def_property_readonly("index", &Device::index)
      .def_property_readonly("name", &Device::name, "The device's model name.")
      .def_property_readonly("total_memory", &Device::total_memory, "Bytes of memory on the device.")
      .def_property_readonly("free_memory", &Device::free_memory, "Bytes free now.")
      .def("__str__", &Device::str)
      .def("__repr__", [](const Device& d) { return "Device(\"" + d.str() + "\")"; })
      .def("__eq__", [](const Device& a, const Device& b) { return a == b; })
      .def("__hash__", [](const Device& d) { return std::hash<std::string>()(d.str()); });
  py::implicitly_convertible<py::str, Device>();

  m.def("cuda_device_count", &cuda_device_count,
        "Number of CUDA devices visible (0 without a driver or GPU, or when built without CUDA).");
  m.def("cuda_backend_built", &cuda_backend_built, "Whether this build includes the CUDA backend.");

  py::class_<MemoryStats>(m, "MemoryStats", "Bytes held by cudablocks allocations on one device.")
      .def_readonly("allocated_bytes", &MemoryStats::allocated_bytes)
      .def_readonly("peak_bytes", &MemoryStats::peak_bytes)
      .def_readonly("allocations", &MemoryStats::allocations)
      .def("__repr__", [](const MemoryStats& s) {
        return "MemoryStats(allocated_bytes=" + std::to_string(s.allocated_bytes) +
               ", peak_bytes=" + std::to_string(s.peak_bytes) + ", allocations=" + std::to_string(s.allocations) + ")";
      });
  m.def("memory_stats", &memory_stats, py::arg("device"), "Memory held by cudablocks on `device`.");
  m.def("reset_peak_memory", &reset_peak_memory, py::arg("device"));

  py::class_<Event>(m, "CudaEvent", "A point in a stream's work; no-op on the CPU.")
      .def(py::init<const Device&, bool>(), py::arg("device"), py::arg("timing") = false)
      .def_property_readonly("device", &Event::device)
      .def("synchronize", &Event::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("query", &Event::query)
      .def("elapsed_ms_since", &Event::elapsed_ms_since, py::arg("start"));

  py::class_<Stream>(m, "CudaStream",
                     "An ordered queue of device work. On the CPU, work runs inline and this is a no-op.")
      .def(py::init<const Device&>(), py::arg("device"))
      .def_static("wrap", &Stream::wrap, py::arg("device"), py::arg("handle"),
                  "A stream owned elsewhere (e.g. torch.cuda.current_stream().cuda_stream); 0 is the "
                  "legacy default stream.")
      .def_property_readonly("device", &Stream::device)
      .def_property_readonly("handle", [](const Stream& s) { return reinterpret_cast<std::uintptr_t>(s.handle()); })
      .def("synchronize", &Stream::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("record", [](const Stream& s, std::optional<Event> event) {
            Event e = event ? *event : Event(s.device());
            s.record(e);
            return e;
          }, py::arg("event") = py::none(), "Records `event` (a new one if None) and returns it.")
      .def("wait", &Stream::wait, py::arg("event"))
      .def("__repr__", [](const Stream& s) {
        return "CudaStream(" + s.device().str() + ", handle=" + std::to_string(reinterpret_cast<std::uintptr_t>(s.handle())) + ")";
      });
}

}  // namespace cudablocks::python
