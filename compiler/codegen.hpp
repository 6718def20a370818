// Codegen entry points used inside libdeft (the public one is deft::generate_source).
#pragma once

#include <string>

#include "deft/ir.hpp"

namespace deft {

std::string generate_source(const LayerDesc& desc, const Variant& variant);

}  // namespace deft
