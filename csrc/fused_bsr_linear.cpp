// The fused block-sparse Linear for CPUs: y = x @ W.T + bias, with W stored as its kept blocks only.
//
// Work is split into (tile of tokens, output block-row) items. Each item accumulates one brgemm per kept block of
// its row, reading the input's column-block in place (leading dimension = the input's row stride, no gather), into
// a float tile, then adds the bias and writes its output tile in the output dtype. With `gather`, an item whose
// row keeps several blocks first copies their input columns side by side into a small panel and runs one brgemm
// over all of them (the row's blocks are stored one after the other, so they already form one K x blocksize
// operand): fewer, longer products for a copy that stays in cache. Which is faster depends on the CPU and the shape,
// so the caller measures both. Every item is computed by one thread from start to end, so the result is the same
// bit for bit whatever the thread count.
//
// The weight blocks come from fused_pack_blocks below: each block transposed (in x out, the brgemm "B" operand),
// and for bfloat16/float16, where oneDNN's micro-kernel runs on this CPU, in its pair-interleaved (VNNI) layout.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

using at::native::cpublas::brgemm;

// Round-to-nearest-even float -> bfloat16 bits, written without branches so the compiler vectorizes the loop.
inline uint16_t to_bfloat16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return nan ? uint16_t(0x7fc0) : uint16_t(rounded);
}

template <typename T>
inline void store_row(T* out, const float* acc, const T* bias, int64_t count) {
  for (int64_t c = 0; c < count; ++c) {
    out[c] = T(acc[c] + (bias ? float(bias[c]) : 0.f));
  }
}

template <>
inline void store_row<at::BFloat16>(at::BFloat16* out, const float* acc, const at::BFloat16* bias, int64_t count) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  const uint16_t* bias_bits = reinterpret_cast<const uint16_t*>(bias);
  for (int64_t c = 0; c < count; ++c) {
    float b = 0.f;
    if (bias_bits) {
      const uint32_t widened = uint32_t(bias_bits[c]) << 16;
      std::memcpy(&b, &widened, sizeof(b));
    }
    bits[c] = to_bfloat16_bits(acc[c] + b);
  }
}

// Whether oneDNN's brgemm micro-kernel takes pair-interleaved blocks of this dtype on this CPU (probed once).
bool vnni_runs(at::ScalarType dtype) {
  auto probe = [](auto zero) {
    using T = decltype(zero);
    std::vector<T> a(16 * 16, T(0.f)), b(16 * 16, T(0.f));
    std::vector<float> c(16 * 16);
    try {
      brgemm(16, 16, 16, 16, 16, 16, false, a.data(), b.data(), c.data(), true);
      at::native::cpublas::brgemm_release(true);
      return true;
    } catch (const std::exception&) {
      return false;
    }
  };
  static const bool bfloat16 = probe(at::BFloat16(0.f));
  static const bool half = probe(at::Half(0.f));
  if (dtype == at::kBFloat16) return bfloat16;
  if (dtype == at::kHalf) return half;
  return false;
}

template <typename T>
void run_items(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& cols,
               const c10::optional<at::Tensor>& bias, at::Tensor& y, int64_t blocksize, int64_t tile_tokens,
               bool gather) {
  const bool vnni = values.dim() == 4;
  const int64_t tokens = x.size(0), out_features = y.size(1), x_stride = x.stride(0);
  const int64_t block_rows = out_features / blocksize, block_numel = blocksize * blocksize;
  const int64_t tiles = (tokens + tile_tokens - 1) / tile_tokens;
  const T* x_data = x.const_data_ptr<T>();
  const T* blocks = values.const_data_ptr<T>();
  const int32_t* offsets = row_offsets.const_data_ptr<int32_t>();
  const int32_t* col = cols.const_data_ptr<int32_t>();
  const T* bias_data = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  T* y_data = y.mutable_data_ptr<T>();
  constexpr bool accumulate_in_output = std::is_same_v<T, float>;

  at::parallel_for(0, tiles * block_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(accumulate_in_output ? 0 : tile_tokens * blocksize);
    std::vector<T> panel;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item % block_rows, first_token = (item / block_rows) * tile_tokens;
      const int64_t m = std::min(tile_tokens, tokens - first_token);
      const T* row_bias = bias_data ? bias_data + row * blocksize : nullptr;
      T* out = y_data + first_token * out_features + row * blocksize;
      const int64_t first = offsets[row], last = offsets[row + 1];
      // float32 accumulates straight into the output; other dtypes in a float tile converted at the end.
      float* acc = accumulate_in_output ? reinterpret_cast<float*>(out) : tile.data();
      const int64_t acc_stride = accumulate_in_output ? out_features : blocksize;
      if (first == last) {
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t c = 0; c < blocksize; ++c) {
            out[i * out_features + c] = row_bias ? row_bias[c] : T(0.f);
          }
        }
        continue;
      }
      const T* x_tile = x_data + first_token * x_stride;
      if (gather && last - first > 1) {
        const int64_t depth = (last - first) * blocksize;
        panel.resize(m * depth);
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = first; j < last; ++j) {
            std::memcpy(panel.data() + i * depth + (j - first) * blocksize, x_tile + i * x_stride + col[j] * blocksize,
                        blocksize * sizeof(T));
          }
        }
        brgemm(m, blocksize, depth, depth, blocksize, acc_stride, false, panel.data(), blocks + first * block_numel,
               acc, vnni);
      } else {
        for (int64_t j = first; j < last; ++j) {
          brgemm(m, blocksize, blocksize, x_stride, blocksize, acc_stride, j > first, x_tile + col[j] * blocksize,
                 blocks + j * block_numel, acc, vnni);
        }
      }
      if (accumulate_in_output) {
        if (row_bias) {
          for (int64_t i = 0; i < m; ++i) {
            float* o = acc + i * acc_stride;
            for (int64_t c = 0; c < blocksize; ++c) o[c] += float(row_bias[c]);
          }
        }
      } else {
        for (int64_t i = 0; i < m; ++i) {
          store_row<T>(out + i * out_features, acc + i * acc_stride, row_bias, blocksize);
        }
      }
    }
    at::native::cpublas::brgemm_release(vnni);
  });
}

at::Tensor fused_bsr_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_offsets,
                            const at::Tensor& cols, const c10::optional<at::Tensor>& bias, int64_t out_features,
                            int64_t tile_tokens, bool gather) {
  TORCH_CHECK(input.dim() == 2, "fused_bsr_linear: expected a 2-D input, got ", input.dim(), " dimensions");
  TORCH_CHECK(values.scalar_type() == input.scalar_type(), "fused_bsr_linear: weight dtype ", values.scalar_type(),
              " does not match the input's ", input.scalar_type());
  TORCH_CHECK(tile_tokens > 0, "fused_bsr_linear: tile_tokens must be positive");
  TORCH_CHECK(values.dim() == 3 || values.dim() == 4, "fused_bsr_linear: values must come from fused_pack_blocks");
  TORCH_CHECK(row_offsets.scalar_type() == at::kInt && cols.scalar_type() == at::kInt && row_offsets.numel() >= 1,
              "fused_bsr_linear: row_offsets and cols must be int32, row_offsets of length block-rows + 1");
  const int64_t blocksize = values.dim() == 4 ? values.size(1) * 2 : values.size(1);
  // The input's rows may have any stride, but each row must be contiguous for brgemm's leading dimension.
  const at::Tensor x = input.stride(1) == 1 && input.size(1) > 0 ? input : input.contiguous();
  auto y = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return y;
  const int64_t block_rows = row_offsets.numel() - 1;
  TORCH_CHECK(block_rows * blocksize == out_features && x.size(1) % blocksize == 0, "fused_bsr_linear: blocks of ",
              blocksize, " do not tile ", out_features, " outputs in ", block_rows, " block-rows");
  const c10::optional<at::Tensor> c_bias = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : bias;
  switch (x.scalar_type()) {
    case at::kFloat:
      run_items<float>(x, values, row_offsets, cols, c_bias, y, blocksize, tile_tokens, gather);
      break;
    case at::kBFloat16:
      run_items<at::BFloat16>(x, values, row_offsets, cols, c_bias, y, blocksize, tile_tokens, gather);
      break;
    case at::kHalf:
      run_items<at::Half>(x, values, row_offsets, cols, c_bias, y, blocksize, tile_tokens, gather);
      break;
    default:
      TORCH_CHECK(false, "fused_bsr_linear: float32, bfloat16 or float16 input expected, got ", x.scalar_type());
  }
  return y;
}

// Blocks (kept, in, out) of a transposed weight -> the layout fused_bsr_linear reads: the same for float32; for
// bfloat16/float16, when allowed and the micro-kernel runs, (kept, in/2, out, 2): pairs of inputs interleaved.
at::Tensor fused_pack_blocks(const at::Tensor& blocks, bool allow_vnni) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) == blocks.size(2),
              "fused_pack_blocks: expected (kept, blocksize, blocksize) blocks");
  const auto dtype = blocks.scalar_type();
  const int64_t kept = blocks.size(0), blocksize = blocks.size(1);
  if (dtype == at::kFloat || !allow_vnni || blocksize % 2 != 0 || !vnni_runs(dtype)) return blocks.contiguous();
  auto source = blocks.contiguous();
  if (at::native::cpublas::could_pack(dtype)) {
    auto packed = at::empty({kept, blocksize / 2, blocksize, 2}, blocks.options());
    for (int64_t j = 0; j < kept; ++j) {
      const int64_t offset = j * blocksize * blocksize;
      at::native::cpublas::pack(blocksize, blocksize, blocksize, blocksize, dtype, dtype,
                                source.const_data_ptr<uint8_t>() + offset * source.element_size(),
                                packed.mutable_data_ptr<uint8_t>() + offset * packed.element_size());
    }
    return packed;
  }
  return source.view({kept, blocksize / 2, 2, blocksize}).transpose(2, 3).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(superblock, m) {
  m.def("fused_bsr_linear(Tensor input, Tensor values, Tensor row_offsets, Tensor cols, Tensor? bias, "
        "int out_features, int tile_tokens, bool gather) -> Tensor");
  m.def("fused_pack_blocks(Tensor blocks, bool allow_vnni) -> Tensor");
}

TORCH_LIBRARY_IMPL(superblock, CPU, m) {
  m.impl("fused_bsr_linear", &fused_bsr_linear);
  m.impl("fused_pack_blocks", &fused_pack_blocks);
}
