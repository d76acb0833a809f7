// C++ exceptions become the Python classes of cudablocks.errors, with the same message.
#include "bindings.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::python {

void bind_errors(py::module_& m) {
  (void)m;
  py::register_exception_translator([](std::exception_ptr error) {
    if (!error) return;
    auto raise = [](const char* cls, const std::exception& e) {
      py::object type = py::module_::import("cudablocks.errors").attr(cls);
      PyErr_SetString(type.ptr(), e.what());
    };
    try {
      std::rethrow_exception(error);
    } catch (const ShapeError& e) {
      raise("ShapeError", e);
    } catch (const DtypeError& e) {
      raise("DtypeError", e);
    } catch (const DeviceError& e) {
      raise("DeviceError", e);
    } catch (const InvalidArgumentError& e) {
      raise("InvalidArgumentError", e);
    } catch (const OutOfMemoryError& e) {
      raise("OutOfMemoryError", e);
    } catch (const CudaError& e) {
      raise("CudaError", e);
    } catch (const UnsupportedOperationError& e) {
      raise("UnsupportedOperationError", e);
    } catch (const Error& e) {
      raise("CudaBlocksError", e);
    }
  });
}

}  // namespace cudablocks::python
