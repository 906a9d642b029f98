// Argument checks shared by every backend of every op: one message format, one place.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#define OV_CHECK_DIM(t, n, name) \
  TORCH_CHECK((t).dim() == (n), name ": expected a ", n, "-d tensor, got shape ", (t).sizes())
#define OV_CHECK_DTYPE(t, dt, name) \
  TORCH_CHECK((t).scalar_type() == (dt), name ": expected dtype ", dt, ", got ", (t).scalar_type())
#define OV_CHECK_SAME_DEVICE(a, b, an, bn) \
  TORCH_CHECK((a).device() == (b).device(), an " and " bn " must be on one device, got ", \
              (a).device(), " and ", (b).device())
