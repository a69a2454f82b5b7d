// The fused block-sparse Linear for CPUs: y = x @ W.T + bias, with W stored as its kept blocks only.
//
// Work is split into (tile of tokens, output block-row) items. Each item computes its row's products into a float
// tile, then adds the bias and writes its output tile in the output dtype. How the products run (`products`, which
// is faster depends on the CPU and the shape, so the caller measures them):
// - "blocks": one brgemm per kept block, reading the input's column-block in place (leading dimension = the input's
//   row stride).
// - "gather": an item whose row keeps several blocks first copies their input columns side by side into a small
//   panel and runs one brgemm over all of them (the row's blocks are stored one after the other, so they already
//   form one K x blocksize operand): fewer, longer products for a copy that stays in cache.
// - "amx": bfloat16 blocks of a multiple of 32 on a CPU with AMX, our own tile kernel (amx_tiles.h): the
//   accumulators stay in tile registers across the row's blocks. It adds in the order of "blocks" on AMX, so the
//   two give the same bits.
// Every item is computed by one thread from start to end, so the result is the same bit for bit whatever the
// thread count.
//
// fused_bsr_mlp runs a whole Linear -> activation -> Linear pair per tile of tokens (one work item each): the first
// Linear's outputs for the hidden blocks the second one reads go to a buffer of the thread's own, activated, and the
// second Linear reads them from there. The hidden activations, four times the width of a ViT's tokens, never make
// the trip to memory and back. On AVX-512 the activation runs in registers as the first Linear's float accumulators
// are stored (avx512_float.h; in bfloat16 one rounding, after it); elsewhere, and for float16, ATen's runs in place
// on the buffer.
//
// The weight blocks come from fused_pack_blocks below: each block transposed (in x out, the brgemm "B" operand),
// and for bfloat16/float16, where oneDNN's micro-kernel runs on this CPU, in its pair-interleaved (VNNI) layout.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "amx_tiles.h"
#include "avx512_float.h"
#include "block_index.h"

namespace {

using at::native::cpublas::brgemm;

using superblock::to_bfloat16_bits;

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

enum class Products { blocks, gather, amx };

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

// W's kept blocks as one product reads them: packed blocks (fused_pack_blocks), CSR offsets per output block-row,
// the column block of each kept block, and the bias (or null).
template <typename T>
struct BlockRows {
  const T* blocks;
  const int32_t* offsets;
  const int32_t* cols;
  const T* bias;
  int64_t blocksize;
  bool vnni;
};

// bias + activation + rounding to T of m rows of float accumulators, in AVX-512 registers. For float32 `acc` may be
// `out` itself (the products accumulate in the output).
template <superblock::Activation act, typename T>
SUPERBLOCK_AVX512_FLOAT void activate_rows(T* out, int64_t out_stride, const float* acc, int64_t acc_stride,
                                           const T* bias, int64_t m, int64_t blocksize) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < blocksize; c += 16) {
      __m512 v = _mm512_loadu_ps(acc + i * acc_stride + c);
      if (bias) v = _mm512_add_ps(v, superblock::load16(bias + c, 0xffff));
      superblock::store16(out + i * out_stride + c, superblock::activate16<act>(v));
    }
  }
}

// How a product's float accumulators are stored: on AVX-512, in registers by `store` (bias added, activated for an
// MLP's first Linear, rounded to the output dtype); where `store` is null, by portable loops (and ATen's activation).
template <typename T>
struct Epilogue {
  void (*store)(T*, int64_t, const float*, int64_t, const T*, int64_t, int64_t) = nullptr;
};

// The in-register epilogue for `activation` ("identity" for a plain Linear), where it runs: float32 or bfloat16,
// AVX-512, blocks of a multiple of 16. float32 takes GELU's precise erf, bfloat16 the polynomial (avx512_float.h).
template <typename T>
Epilogue<T> activating_epilogue(const std::string& activation, int64_t blocksize) {
  constexpr bool takes = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
  if constexpr (!takes) {
    return {};
  } else {
    if (!superblock::has_avx512() || blocksize % 16 != 0) return {};
    using superblock::Activation;
    switch (superblock::activation_of(activation)) {
      case Activation::gelu:
        if constexpr (std::is_same_v<T, float>) return {&activate_rows<Activation::gelu_precise, T>};
        return {&activate_rows<Activation::gelu, T>};
      case Activation::gelu_tanh: return {&activate_rows<Activation::gelu_tanh, T>};
      case Activation::relu: return {&activate_rows<Activation::relu, T>};
      default: return {&activate_rows<Activation::identity, T>};
    }
  }
}

// out (m x blocksize, row stride out_stride) = x_tile (m rows, row stride x_stride) @ W[block-row `row`].T + bias,
// reading x_tile's column blocks in place. float32 accumulates straight into `out`; other dtypes into `scratch`
// (m x blocksize floats), converted at the end. `panel` is the buffer of "gather".
template <typename T>
void block_row_product(const BlockRows<T>& w, int64_t row, const T* x_tile, int64_t x_stride, int64_t m, T* out,
                       int64_t out_stride, float* scratch, std::vector<T>& panel, Products products,
                       const Epilogue<T>& epilogue = {}) {
  constexpr bool accumulate_in_output = std::is_same_v<T, float>;
  const int64_t blocksize = w.blocksize, block_numel = blocksize * blocksize;
  const T* row_bias = w.bias ? w.bias + row * blocksize : nullptr;
  const int64_t first = w.offsets[row], last = w.offsets[row + 1];
  if (first == last && !epilogue.store) {  // the bias alone (a scalar loop here cost a fifth of qkv's time)
    for (int64_t i = 0; i < m; ++i) {
      if (row_bias) {
        std::memcpy(out + i * out_stride, row_bias, blocksize * sizeof(T));
      } else {
        std::fill_n(out + i * out_stride, blocksize, T(0.f));
      }
    }
    return;
  }
  float* acc = accumulate_in_output ? reinterpret_cast<float*>(out) : scratch;
  const int64_t acc_stride = accumulate_in_output ? out_stride : blocksize;
  if (first == last) {
    for (int64_t i = 0; i < m; ++i) std::fill_n(acc + i * acc_stride, blocksize, 0.f);
  } else if (products == Products::amx) {  // never mixed with ATen's brgemm in one call: they share the tiles
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      superblock::amx_block_row_product<superblock::TileProduct::bfloat16>(
          x_tile, x_stride, m, w.blocks + first * block_numel, w.cols + first, last - first, blocksize, acc,
          acc_stride);
    }
  } else if (products == Products::gather && last - first > 1) {
    const int64_t depth = (last - first) * blocksize;
    panel.resize(m * depth);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = first; j < last; ++j) {
        std::memcpy(panel.data() + i * depth + (j - first) * blocksize, x_tile + i * x_stride + w.cols[j] * blocksize,
                    blocksize * sizeof(T));
      }
    }
    brgemm(m, blocksize, depth, depth, blocksize, acc_stride, false, panel.data(), w.blocks + first * block_numel,
           acc, w.vnni);
  } else {
    for (int64_t j = first; j < last; ++j) {
      brgemm(m, blocksize, blocksize, x_stride, blocksize, acc_stride, j > first, x_tile + w.cols[j] * blocksize,
             w.blocks + j * block_numel, acc, w.vnni);
    }
  }
  if (epilogue.store) {
    epilogue.store(out, out_stride, acc, acc_stride, row_bias, m, blocksize);
  } else if (accumulate_in_output) {
    if (row_bias) {
      for (int64_t i = 0; i < m; ++i) {
        float* o = acc + i * acc_stride;
        for (int64_t c = 0; c < blocksize; ++c) o[c] += float(row_bias[c]);
      }
    }
  } else {
    for (int64_t i = 0; i < m; ++i) {
      store_row<T>(out + i * out_stride, acc + i * acc_stride, row_bias, blocksize);
    }
  }
}

template <typename T>
BlockRows<T> block_rows_of(const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& cols,
                           const c10::optional<at::Tensor>& bias) {
  const bool vnni = values.dim() == 4;
  return {values.const_data_ptr<T>(), row_offsets.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>(),
          bias.has_value() ? bias->const_data_ptr<T>() : nullptr, vnni ? values.size(1) * 2 : values.size(1), vnni};
}

template <typename T>
void linear_items(const at::Tensor& x, const BlockRows<T>& w, at::Tensor& y, int64_t tile_tokens,
                  Products products) {
  const int64_t tokens = x.size(0), out_features = y.size(1), x_stride = x.stride(0);
  const int64_t block_rows = out_features / w.blocksize;
  const int64_t tiles = (tokens + tile_tokens - 1) / tile_tokens;
  const T* x_data = x.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  const Epilogue<T> epilogue = activating_epilogue<T>("identity", w.blocksize);  // bias and rounding in registers
  at::parallel_for(0, tiles * block_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : tile_tokens * w.blocksize);
    std::vector<T> panel;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item % block_rows, first_token = (item / block_rows) * tile_tokens;
      const int64_t m = std::min(tile_tokens, tokens - first_token);
      block_row_product(w, row, x_data + first_token * x_stride, x_stride, m,
                        y_data + first_token * out_features + row * w.blocksize, out_features, scratch.data(), panel,
                        products, epilogue);
    }
    at::native::cpublas::brgemm_release(w.vnni);
  });
}

// The elementwise function between an MLP's two Linears, applied in place to a tile of hidden activations.
void activate(at::Tensor hidden, const std::string& activation) {
  if (activation == "gelu") {
    at::gelu_(hidden, "none");
  } else if (activation == "gelu_tanh") {
    at::gelu_(hidden, "tanh");
  } else if (activation == "relu") {
    at::relu_(hidden);
  }
}

// The whole MLP per tile of tokens: hidden = act(x @ W1.T + b1) for the hidden blocks W2 reads, kept in a buffer
// of the thread's own (it stays in cache), then y = hidden @ W2.T + b2. The hidden activations never go to memory.
template <typename T>
void mlp_items(const at::Tensor& x, const BlockRows<T>& w1, const BlockRows<T>& w2, const at::Tensor& cols2,
               at::Tensor& y, const std::string& activation, int64_t tile_tokens, Products products) {
  const int64_t tokens = x.size(0), out_features = y.size(1), x_stride = x.stride(0), blocksize = w1.blocksize;
  // Only the hidden blocks W2 reads are computed, side by side in the buffer: W2's columns are renumbered to them.
  const int32_t* col = cols2.const_data_ptr<int32_t>();
  int64_t max_col = -1;
  for (int64_t j = 0; j < cols2.numel(); ++j) max_col = std::max<int64_t>(max_col, col[j]);
  std::vector<char> read(max_col + 1, 0);
  for (int64_t j = 0; j < cols2.numel(); ++j) read[col[j]] = 1;
  std::vector<int32_t> position(max_col + 1, -1), live;
  for (int64_t h = 0; h <= max_col; ++h) {
    if (read[h]) {
      position[h] = int32_t(live.size());
      live.push_back(int32_t(h));
    }
  }
  std::vector<int32_t> renumbered(cols2.numel());
  for (int64_t j = 0; j < cols2.numel(); ++j) renumbered[j] = position[col[j]];
  BlockRows<T> w2_live = w2;
  w2_live.cols = renumbered.data();
  const int64_t width = int64_t(live.size()) * blocksize, block_rows = out_features / blocksize;
  const int64_t tiles = (tokens + tile_tokens - 1) / tile_tokens;
  const T* x_data = x.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  const auto dtype = x.scalar_type();
  const Epilogue<T> epilogue = activating_epilogue<T>(activation, blocksize);
  const Epilogue<T> second_epilogue = activating_epilogue<T>("identity", blocksize);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : tile_tokens * blocksize);
    // Not zero-filled (a std::vector would clear megabytes per call): every row the activation and W2 read is
    // written by W1's products first.
    std::unique_ptr<T[]> hidden(new T[tile_tokens * std::max<int64_t>(width, 1)]);
    std::vector<T> panel;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first_token = tile * tile_tokens, m = std::min(tile_tokens, tokens - first_token);
      const T* x_tile = x_data + first_token * x_stride;
      for (size_t k = 0; k < live.size(); ++k) {
        block_row_product(w1, live[k], x_tile, x_stride, m, hidden.get() + k * blocksize, width, scratch.data(),
                          panel, products, epilogue);
      }
      if (width > 0 && !epilogue.store) {
        activate(at::from_blob(hidden.get(), {m, width}, at::TensorOptions().dtype(dtype)), activation);
      }
      for (int64_t row = 0; row < block_rows; ++row) {
        block_row_product(w2_live, row, hidden.get(), width, m, y_data + first_token * out_features + row * blocksize,
                          out_features, scratch.data(), panel, products, second_epilogue);
      }
    }
    at::native::cpublas::brgemm_release(w1.vnni);
  });
}

// Checks one block-sparse weight's operands; returns its block size.
int64_t check_blocks(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_offsets,
                     const at::Tensor& cols, int64_t in_features, int64_t out_features) {
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": weight dtype ", values.scalar_type(),
              " does not match the input's ", x.scalar_type());
  TORCH_CHECK(values.dim() == 3 || values.dim() == 4, op, ": values must come from fused_pack_blocks");
  TORCH_CHECK(row_offsets.scalar_type() == at::kInt && cols.scalar_type() == at::kInt && row_offsets.numel() >= 1 &&
              row_offsets.is_contiguous() && cols.is_contiguous(),
              op, ": row_offsets and cols must be contiguous int32, row_offsets of length block-rows + 1");
  const int64_t blocksize = values.dim() == 4 ? values.size(1) * 2 : values.size(1);
  const int64_t block_rows = row_offsets.numel() - 1;
  TORCH_CHECK(block_rows * blocksize == out_features && in_features % blocksize == 0, op, ": blocks of ", blocksize,
              " do not tile ", out_features, " outputs in ", block_rows, " block-rows");
  const bool ok = values.size(0) == cols.numel() &&
                  superblock::indexes_blocks(row_offsets.const_data_ptr<int32_t>(), block_rows,
                                             cols.const_data_ptr<int32_t>(), cols.numel(), in_features / blocksize);
  TORCH_CHECK(ok, op, ": row_offsets and cols do not index ", values.size(0), " blocks of a ", out_features, "x",
              in_features, " weight");
  return blocksize;
}

// The input as brgemm reads it: rows may have any stride, but each row must be contiguous (its leading dimension).
at::Tensor rows_contiguous(const char* op, const at::Tensor& input, int64_t tile_tokens) {
  TORCH_CHECK(input.dim() == 2, op, ": expected a 2-D input, got ", input.dim(), " dimensions");
  TORCH_CHECK(tile_tokens > 0, op, ": tile_tokens must be positive");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16 ||
              input.scalar_type() == at::kHalf, op, ": float32, bfloat16 or float16 input expected, got ",
              input.scalar_type());
  return input.stride(1) == 1 && input.size(1) > 0 ? input : input.contiguous();
}

c10::optional<at::Tensor> contiguous_bias(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : bias;
}

// Runs `body` with T = the C++ type of a float32, bfloat16 or float16 input.
template <typename Body>
void with_dtype(at::ScalarType dtype, Body body) {
  switch (dtype) {
    case at::kFloat: body(float(0.f)); break;
    case at::kBFloat16: body(at::BFloat16(0.f)); break;
    default: body(at::Half(0.f)); break;
  }
}

// `products` by name, checked against the operands: "amx" needs AMX, bfloat16 and pair-interleaved blocks of a
// multiple of 32.
Products products_of(const char* op, c10::string_view name, const at::Tensor& x, const at::Tensor& values) {
  const std::string products(name);
  TORCH_CHECK(products == "blocks" || products == "gather" || products == "amx", op,
              ": products must be blocks, gather or amx, not '", products, "'");
  if (products == "blocks") return Products::blocks;
  if (products == "gather") return Products::gather;
  TORCH_CHECK(superblock::amx_runs(), op, ": products 'amx' need AMX (amx_bf16), which this CPU lacks or "
              "SUPERBLOCK_HIDE_ISA hides");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && values.dim() == 4 && values.size(1) % 16 == 0, op,
              ": products 'amx' need bfloat16 blocks of a multiple of 32 in the pair-interleaved layout");
  return Products::amx;
}

at::Tensor fused_bsr_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_offsets,
                            const at::Tensor& cols, const c10::optional<at::Tensor>& bias, int64_t out_features,
                            int64_t tile_tokens, c10::string_view products) {
  const at::Tensor x = rows_contiguous("fused_bsr_linear", input, tile_tokens);
  const Products how = products_of("fused_bsr_linear", products, x, values);
  auto y = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return y;
  check_blocks("fused_bsr_linear", x, values, row_offsets, cols, x.size(1), out_features);
  const auto b = contiguous_bias(bias);
  with_dtype(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    linear_items<T>(x, block_rows_of<T>(values, row_offsets, cols, b), y, tile_tokens, how);
  });
  return y;
}

at::Tensor fused_bsr_mlp(const at::Tensor& input, const at::Tensor& values1, const at::Tensor& row_offsets1,
                         const at::Tensor& cols1, const c10::optional<at::Tensor>& bias1, const at::Tensor& values2,
                         const at::Tensor& row_offsets2, const at::Tensor& cols2,
                         const c10::optional<at::Tensor>& bias2, int64_t out_features, c10::string_view activation,
                         int64_t tile_tokens, c10::string_view products) {
  const std::string act(activation);
  TORCH_CHECK(act == "gelu" || act == "gelu_tanh" || act == "relu" || act == "identity",
              "fused_bsr_mlp: activation must be gelu, gelu_tanh, relu or identity, not ", act);
  const at::Tensor x = rows_contiguous("fused_bsr_mlp", input, tile_tokens);
  const Products how = products_of("fused_bsr_mlp", products, x, values1);
  auto y = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return y;
  const int64_t hidden = (row_offsets1.numel() - 1) * (values1.dim() == 4 ? values1.size(1) * 2 : values1.size(1));
  const int64_t blocksize = check_blocks("fused_bsr_mlp", x, values1, row_offsets1, cols1, x.size(1), hidden);
  TORCH_CHECK(check_blocks("fused_bsr_mlp", x, values2, row_offsets2, cols2, hidden, out_features) == blocksize &&
              values1.dim() == values2.dim(), "fused_bsr_mlp: both Linears must have the same block size and layout");
  const auto b1 = contiguous_bias(bias1), b2 = contiguous_bias(bias2);
  with_dtype(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    mlp_items<T>(x, block_rows_of<T>(values1, row_offsets1, cols1, b1),
                 block_rows_of<T>(values2, row_offsets2, cols2, b2), cols2, y, act, tile_tokens, how);
  });
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
                                static_cast<const char*>(source.const_data_ptr()) + offset * source.element_size(),
                                static_cast<char*>(packed.mutable_data_ptr()) + offset * packed.element_size());
    }
    return packed;
  }
  return source.view({kept, blocksize / 2, 2, blocksize}).transpose(2, 3).contiguous();
}

// The products fused_bsr_linear and fused_bsr_mlp can take for `dtype` on this CPU (given pair-interleaved blocks
// of a multiple of 32 for "amx").
std::vector<std::string> fused_products(at::ScalarType dtype) {
  std::vector<std::string> products{"blocks", "gather"};
  if (dtype == at::kBFloat16 && superblock::amx_runs()) products.push_back("amx");
  return products;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(superblock, m) {
  m.def("fused_bsr_linear(Tensor input, Tensor values, Tensor row_offsets, Tensor cols, Tensor? bias, "
        "int out_features, int tile_tokens, str products) -> Tensor");
  m.def("fused_bsr_mlp(Tensor input, Tensor values1, Tensor row_offsets1, Tensor cols1, Tensor? bias1, "
        "Tensor values2, Tensor row_offsets2, Tensor cols2, Tensor? bias2, int out_features, str activation, "
        "int tile_tokens, str products) -> Tensor");
  m.def("fused_pack_blocks(Tensor blocks, bool allow_vnni) -> Tensor");
  m.def("fused_products(ScalarType dtype) -> str[]", &fused_products);
}

TORCH_LIBRARY_IMPL(superblock, CPU, m) {
  m.impl("fused_bsr_linear", &fused_bsr_linear);
  m.impl("fused_bsr_mlp", &fused_bsr_mlp);
  m.impl("fused_pack_blocks", &fused_pack_blocks);
}
