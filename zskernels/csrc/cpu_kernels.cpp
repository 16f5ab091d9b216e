// The Python module of zskernels' CPU kernels (built by zskernels/_cpu_kernel.py).
#include <torch/extension.h>

torch::Tensor int8_pack(const torch::Tensor& w);
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale);
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor int4_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                          const torch::Tensor& min, int64_t N);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_pack", &int8_pack, "int8 (N, K) -> the int8 kernel's layout");
  m.def("int8_matmul", &int8_matmul, "bf16 x (M, K) @ (w * scale)^T -> bf16 (M, N), w from int8_pack");
  m.def("bf16_linear", &bf16_linear, "bf16 x (M, K) @ w^T -> bf16 (M, N), w bf16 (N, K) as it is stored");
  m.def("int4_matmul", &int4_matmul,
        "bf16 x (M, K) @ W_hat^T -> bf16 (M, N), W_hat int4 with a scale and min per group");
}
