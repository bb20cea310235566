"""Named error limits, each with a comment saying what it bounds (the measures: tests.helpers.errors).

Kernel limits bound rel_err (||y - ref|| / ||ref||) of a kernel's output against the reference
implementation (codequant.kernels.reference, float32); logits limits bound max_rel_err
(max |a - ref| / max |ref|) of a float32 model's logits against those of the model as built, run
as usual.
"""

# ---- whole models, max_rel_err of the logits, float32
LOGITS_SAME_COMPUTATION = 1e-5  # the same float computation arranged differently (layers run one by one)
LOGITS_EQUIVALENT = 1e-4  # function-preserving rewrites: norm folding, rotations, permutations, online Hadamard

# ---- CPU kernels (codequant.kernels.cpu), rel_err
CPU_FLOAT32 = 1e-5  # float32 in and out, activations not quantized: float32 summation order only
# against the reference computed with the kernel's int8 codebooks (quantized activations) or with bf16 in and
# out: float32 and bf16 rounding, and rarely one code step where h moves across a rounding edge
CPU_INT8 = 5e-3

# ---- GPU kernels (codequant.kernels.gpu), rel_err
GPU_BF16 = 1.5e-2  # the GPU backend (Triton; on CUDA the table's choice): bf16 dot operands, codebook rounded to bf16
GPU_EXACT = 2e-3  # the GPU backend: fp16 dot of exact operands (W4A4: fp16 codebook x exact q - z), fp32 accumulation
CUDA_BF16 = 1e-2  # the CUDA C++ kernels: bf16 x and the codebook rounded to bf16, fp32 accumulation
CUDA_EXACT = 1e-4  # the CUDA C++ kernels: fp16 dot of exact operands (W4A4 codes, fp16 codebook), fp32 accumulation
CUDA_FP8 = 6e-2  # the CUDA W4A4 prefill: codebook entries rounded to e4m3 with a per-row scale
OUTPUT_16BIT = 4e-3  # a bf16 / fp16 output: its rounding to 16 bits (the limit alone, or added to the float32 one)
