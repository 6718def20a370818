// Variant selection policy: an explicit variant from the options, else (later) a matching
// tuning record, else the heuristic default. Never tunes by itself.
#pragma once

#include "deft/deft.hpp"

namespace deft::tuner {

Variant choose_variant(const LayerDesc& desc, const CompileOptions& options);

}  // namespace deft::tuner
