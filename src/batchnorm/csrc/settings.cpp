// Settings read from the environment by the kernels (each once, by its caller).
#include <c10/util/Exception.h>

#include <cstdlib>

#include "ops.h"

namespace batchnorm_cpu {

size_t megabytes_setting(const char* name, size_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long long megabytes = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && megabytes >= 0, name, " must be a non-negative integer "
                    "(MiB), got '", value, "'");
  return static_cast<size_t>(megabytes) << 20;
}

}  // namespace batchnorm_cpu
