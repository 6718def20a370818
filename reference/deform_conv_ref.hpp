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

namespace deft::ref {

// Gradients of deform_conv2d_forward (act must be none) in double, by the chain rule written
// out per sampling point: for each output pixel, tap and channel, the column gradient
// g = sum_k weight[k, c, tap] * grad_output[k] is scattered into the four corners of grad_input
// (weight * mask * bilinear weight), reduced into grad_mask (g * sample) and grad_offset
// (g * mask * d sample / d position; torchvision's rules: a corner outside the image reads
// zero, a point outside (-1, h) x (-1, w) or at a NaN position has zero value and gradient).
// Any output pointer may be null (skipped); the others are overwritten.
void deform_conv2d_backward(const LayerDesc& d, const double* input, const double* offset,
                            const double* mask, const double* weight, const double* grad_output,
                            double* grad_input, double* grad_offset, double* grad_mask,
                            double* grad_weight, double* grad_bias);

// Bilinear sample and its derivatives with respect to y and x (torchvision's rules).
struct SampleGrad {
  double value = 0, dy = 0, dx = 0;
};
SampleGrad sample_bilinear_grad(const double* plane, int64_t h, int64_t w, int64_t row,
                                int64_t col, double y, double x);

}  // namespace deft::ref
