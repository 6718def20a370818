// CPU reference of deform_conv2d forward in double (torchvision semantics), for tests and
// examples. All tensors are contiguous in the description's layout (see deft/ir.hpp);
// mask and bias may be null when the description has none.
#pragma once

#include "deft/ir.hpp"

namespace deft::ref {

void deform_conv2d_forward(const LayerDesc& d, const double* input, const double* offset,
                           const double* mask, const double* weight, const double* bias,
                           double* output);

// Bilinear sample of one channel plane (h x w, element (y, x) at plane[y*row + x*col]) with
// torchvision's rules: zero outside (-1, h) x (-1, w), corners outside the image read zero.
double sample_bilinear(const double* plane, int64_t h, int64_t w, int64_t row, int64_t col,
                       double y, double x);

}  // namespace deft::ref
