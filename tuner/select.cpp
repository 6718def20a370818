// See select.hpp.
#include "tuner/select.hpp"

namespace deft::tuner {

Variant choose_variant(const LayerDesc& desc, const CompileOptions& options) {
  if (options.variant) return *options.variant;
  return default_variant(desc);
}

}  // namespace deft::tuner
