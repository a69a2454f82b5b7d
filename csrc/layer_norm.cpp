// LayerNorm over the last dimension, and the residual add a transformer block runs just before it, in one pass.
//
// A ViT block spends as long in its two LayerNorms and two residual adds as in its sparse MLP once the matrix
// products are block-sparse: each is a pass over the whole (tokens x width) activation, and ATen's bfloat16 LayerNorm
// runs at a third of the memory's speed. Here each row (token) is one work item: its sum x + residual rounded to the
// dtype and stored, then mean and variance in float from the stored values (two passes over a row in L1, so the
// variance is exact to float rounding, not a running sum of squares), then (x - mean) * rstd * weight + bias rounded
// to the dtype. A row is computed by one thread, so results are the same bit for bit whatever the thread count.
//
// layer_norm(x, weight, bias, eps)                     -> LayerNorm(x)
// add_layer_norm(x, residual, weight, bias, eps)       -> (x + residual, LayerNorm(x + residual))
//
// AVX-512 where the CPU has it (avx512_float.h); a portable loop elsewhere.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "avx512_float.h"

namespace {

using superblock::first_lanes;
using superblock::load16;
using superblock::store16;

// x + residual as stored in the dtype (rounded to bfloat16 for bfloat16), or x alone, for lanes `lanes` at c.
template <typename T>
SUPERBLOCK_AVX512_FLOAT inline __m512 summed16(const T* x, const T* residual, T* sum_out, int64_t c, __mmask16 lanes) {
  const __m512 v = load16(x + c, lanes);
  if (!residual) return v;
  const __m512 s = superblock::as_stored(sum_out, _mm512_add_ps(v, load16(residual + c, lanes)));
  store16(sum_out + c, s, lanes);
  return s;
}

// The row's lanes at c minus the mean, zero in the lanes past its end. (A function, not a lambda: a lambda does not
// take its enclosing function's target attribute, and the file must build for CPUs without AVX-512.)
template <typename T>
SUPERBLOCK_AVX512_FLOAT inline __m512 centred(const T* row, int64_t c, __mmask16 lanes, __m512 mean) {
  return _mm512_maskz_sub_ps(lanes, load16(row + c, lanes), mean);
}

// One row: sum_out = x + residual (when residual is given; otherwise sum_out is x itself and is not written), then
// out = LayerNorm(sum_out) with weight and bias (as float). Each reduction keeps four accumulators, so its
// loop is four chains of adds instead of one long one.
template <typename T>
SUPERBLOCK_AVX512_FLOAT void row_avx512(const T* x, const T* residual, T* sum_out, const float* weight,
                                        const float* bias, T* out, int64_t width, float eps) {
  const __mmask16 all = 0xffff;
  __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
  int64_t c = 0;
  for (; c + 64 <= width; c += 64) {
    t0 = _mm512_add_ps(t0, summed16(x, residual, sum_out, c, all));
    t1 = _mm512_add_ps(t1, summed16(x, residual, sum_out, c + 16, all));
    t2 = _mm512_add_ps(t2, summed16(x, residual, sum_out, c + 32, all));
    t3 = _mm512_add_ps(t3, summed16(x, residual, sum_out, c + 48, all));
  }
  for (; c < width; c += 16) t0 = _mm512_add_ps(t0, summed16(x, residual, sum_out, c, first_lanes(width - c)));
  const __m512 mean = _mm512_set1_ps(
      _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(t0, t1), _mm512_add_ps(t2, t3))) / float(width));
  const T* source = residual ? sum_out : x;
  __m512 q0 = _mm512_setzero_ps(), q1 = q0, q2 = q0, q3 = q0;
  for (c = 0; c + 64 <= width; c += 64) {
    const __m512 d0 = centred(source, c, all, mean), d1 = centred(source, c + 16, all, mean),
                 d2 = centred(source, c + 32, all, mean), d3 = centred(source, c + 48, all, mean);
    q0 = _mm512_fmadd_ps(d0, d0, q0);
    q1 = _mm512_fmadd_ps(d1, d1, q1);
    q2 = _mm512_fmadd_ps(d2, d2, q2);
    q3 = _mm512_fmadd_ps(d3, d3, q3);
  }
  for (; c < width; c += 16) {
    const __m512 d = centred(source, c, first_lanes(width - c), mean);
    q0 = _mm512_fmadd_ps(d, d, q0);
  }
  const float variance = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(q0, q1), _mm512_add_ps(q2, q3))) / float(width);
  const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(variance + eps));
  for (c = 0; c < width; c += 16) {
    const __mmask16 lanes = first_lanes(width - c);
    const __m512 normed = _mm512_mul_ps(centred(source, c, lanes, mean), rstd);
    store16(out + c, _mm512_fmadd_ps(normed, load16(weight + c, lanes), load16(bias + c, lanes)), lanes);
  }
}

template <typename T>
void row_portable(const T* x, const T* residual, T* sum_out, const T* weight, const T* bias, T* out, int64_t width,
                  float eps) {
  const T* source = x;
  if (residual) {
    for (int64_t c = 0; c < width; ++c) sum_out[c] = T(float(x[c]) + float(residual[c]));
    source = sum_out;
  }
  float total = 0.f;
  for (int64_t c = 0; c < width; ++c) total += float(source[c]);
  const float mean = total / float(width);
  float squares = 0.f;
  for (int64_t c = 0; c < width; ++c) squares += (float(source[c]) - mean) * (float(source[c]) - mean);
  const float rstd = 1.f / std::sqrt(squares / float(width) + eps);
  for (int64_t c = 0; c < width; ++c) {
    out[c] = T((float(source[c]) - mean) * rstd * float(weight[c]) + (bias ? float(bias[c]) : 0.f));
  }
}

template <typename T>
void rows(const at::Tensor& x, const at::Tensor* residual, at::Tensor* sum, const at::Tensor& weight,
          const c10::optional<at::Tensor>& bias, at::Tensor& out, double eps) {
  const int64_t width = x.size(-1), count = width == 0 ? 0 : x.numel() / width;
  const T* x_data = x.const_data_ptr<T>();
  const T* residual_data = residual ? residual->const_data_ptr<T>() : nullptr;
  T* sum_data = sum ? sum->mutable_data_ptr<T>() : nullptr;
  const T* weight_data = weight.const_data_ptr<T>();
  const T* bias_data = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  T* out_data = out.mutable_data_ptr<T>();
  const bool vector = superblock::has_avx512();
  // The vector path reads weight and bias as float, widened once here rather than once per row.
  std::vector<float> weight_float(vector ? width : 0), bias_float(vector ? width : 0, 0.f);
  for (int64_t c = 0; vector && c < width; ++c) {
    weight_float[c] = float(weight_data[c]);
    if (bias_data) bias_float[c] = float(bias_data[c]);
  }
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * width;
      const T* res = residual_data ? residual_data + o : nullptr;
      T* s = sum_data ? sum_data + o : nullptr;
      if (vector) {
        row_avx512<T>(x_data + o, res, s, weight_float.data(), bias_float.data(), out_data + o, width, float(eps));
      } else {
        row_portable<T>(x_data + o, res, s, weight_data, bias_data, out_data + o, width, float(eps));
      }
    }
  });
}

void check_operands(const char* op, const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": expected an input of at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": float32 or bfloat16 input expected, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.scalar_type() == x.scalar_type(), op,
              ": weight must be one ", x.scalar_type(), " value per element of the last dimension (", x.size(-1), ")");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == x.size(-1) &&
                                    bias->scalar_type() == x.scalar_type()),
              op, ": bias must be like the weight");
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : bias;
}

at::Tensor layer_norm(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      double eps) {
  check_operands("layer_norm", input, weight, bias);
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  auto out = at::empty_like(x);
  const auto b = contiguous(bias);
  if (x.scalar_type() == at::kFloat) {
    rows<float>(x, nullptr, nullptr, w, b, out, eps);
  } else {
    rows<at::BFloat16>(x, nullptr, nullptr, w, b, out, eps);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& input, const at::Tensor& residual,
                                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                  double eps) {
  check_operands("add_layer_norm", input, weight, bias);
  TORCH_CHECK(residual.sizes() == input.sizes() && residual.scalar_type() == input.scalar_type(),
              "add_layer_norm: the residual must have the input's shape and dtype, got ", residual.sizes(), " ",
              residual.scalar_type(), " for ", input.sizes(), " ", input.scalar_type());
  const at::Tensor x = input.contiguous(), r = residual.contiguous(), w = weight.contiguous();
  auto sum = at::empty_like(x), out = at::empty_like(x);
  const auto b = contiguous(bias);
  if (x.scalar_type() == at::kFloat) {
    rows<float>(x, &r, &sum, w, b, out, eps);
  } else {
    rows<at::BFloat16>(x, &r, &sum, w, b, out, eps);
  }
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(superblock, m) {
  m.def("layer_norm(Tensor input, Tensor weight, Tensor? bias, float eps) -> Tensor");
  m.def("add_layer_norm(Tensor input, Tensor residual, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(superblock, CPU, m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("add_layer_norm", &add_layer_norm);
}
