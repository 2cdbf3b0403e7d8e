"""The help texts of ``crosscheck --help``: what the run does, and the epilog by topic."""

DESCRIPTION = """\
Run the same attention weights and inputs through the torch float32 reference (the book's
chapter-3 classes), jaxattn's Flax modules and the ttnn program, and compare every output
with the torch reference: max abs error, max relative error, PCC and (float32) ULP distance,
with a pass/fail verdict from one tolerance table (crosscheck/pipeline/compare.py).

With no arguments: the seed sentence "Your journey starts with one step" (6 tokens x 3)
through all 8 variants on torch, Flax and ttnn, with weights from torch.manual_seed(123).
"""

EPILOG = """\
weights and config:
  --weights takes a torch state dict (.pt/.pth loaded with weights_only=True, or .safetensors).
  Shapes (and the causal mask buffer) pin down d_in, d_out, qkv_bias, context_length and,
  for MultiHeadAttentionWrapper, num_heads; a flag that contradicts them is an error (exit 2).
  Without --variant, the variants whose keys and shapes the file fits are run. Hyperparameters
  the file cannot carry default to the seed config (d_out=2, num_heads=2; 1 for
  TorchMultiheadAttention), context_length to the input's token count.
  Dropout is carried in the config only: every backend runs in inference mode (but see --train).

grouped-query attention and transformers' layers (run only when named or when --weights fit them):
  GroupedQueryAttention (the book's Llama 3 / Qwen3 classes), LlamaAttention, Qwen3Attention and
  GPT2Attention (transformers' keys; those three need the [hf] extra: transformers). A whole
  model's weights take --prefix (model.layers.0.self_attn., transformer.h.0.attn., trf_blocks.0.att.);
  --config config.json supplies heads, kv heads, head_dim and RoPE (rope_parameters or
  rope_theta/rope_scaling). Random weights: --num-kv-groups, --head-dim, --rope-theta, --qk-norm.
  A flag that contradicts the config file or the weights' shapes is an error (exit 2).

inputs:
  default: the seed sentence, (6, 3); v1/v2/simplified variants take it unbatched, the
  others as a batch of one. --input reads (tokens, d_in) or (batch, tokens, d_in) from
  .npy, .pt or .safetensors (one tensor, or one named inputs/x). Any of --batch, --tokens,
  --seed, --d-in without --input: uniform [0, 1) values (numpy default_rng(seed)).

verdicts (POLICY in crosscheck/pipeline/compare.py; every backend vs the torch float32 reference;
abs bounds are multiplied by max(1, max|ref|)):
  torch float32 (vs float64), flax float32   max abs 1e-5, max rel 1e-4, PCC >= 0.99999
  flax float16                               max abs 5e-3, PCC >= 0.9999
  flax bfloat16                              max abs 4e-2, PCC >= 0.999
  flax float32 --shard vs 1 device           max abs 1e-6, PCC >= 0.99999 (same program split: sum order only)
  flax float32 at --matmul-precision
    default/high (TF32 on a GPU)             max abs 5e-3, PCC >= 0.9999 (10-bit mantissa: ~10 x 2^-11)
  ttnn bfloat16                              max abs n * 2^-8 (n = 4..10 bf16 roundings of
                                             the variant, crosscheck.tt), PCC >= 0.999
  max rel err = max |a - r| / max(|r|, 0.01 * max|r|); ULP (float32 outputs only) is reported,
  not gated: outputs that cancel to ~0 make honest rounding read as 10^5 ULP.

subcommands (run `crosscheck bench --help`, `crosscheck bundle --help` for their options):
  crosscheck bench ...                          forward latency of JAX vs torch (crosscheck.benchmarks.bench)
  crosscheck bundle export OUT [run options]    write weights + inputs + configs to a bundle
  crosscheck bundle run BUNDLE OUT [--backend ttnn|flax] [--ttnn-runtime R]
                                                run a bundle in this interpreter
  crosscheck bundle compare BUNDLE OUTPUTS... [--json PATH]
                                                torch reference from the bundle vs outputs files
  crosscheck convert IN OUT [--variant V] [--prefix P] [--no-check] [--force]
                                                torch state dict <-> Flax params (.safetensors,
                                                .msgpack), checked on one input before writing

Flax NNX:
  --api nnx runs the jaxattn.nnx modules (same math, nnx.Param at the Linen paths) as the flax
  backend, rows "flax-nnx"; --api both adds them next to the Linen rows (forward check only).

decoding and padding:
  --decode PROMPT_LEN prefills PROMPT_LEN tokens and decodes the rest of the input (--tokens N
  for random inputs) one token at a time: torch with the book's kv_cache API, Flax with
  decode=True and its 'cache' collection, ttnn with device-side caches. Rows: torch decode vs
  torch full forward; flax and ttnn decode vs torch decode and vs their own full forward
  (same tolerances as the forward check); JSON "detail" names the worst token.
  --padding left|right --pad-lengths 0,3,... runs a padded batch with an attention mask and
  compares its real tokens with each sequence run alone (torch float32); NaN anywhere fails.

attention core:
  --attention-impl NAME runs the Flax modules with that core (CausalAttention, the wrapper,
  MultiHeadAttention, ...CombinedQKV, TorchMultiheadAttention); without --variant the
  other variants run as usual, a named variant without a choice of core is an error (exit 2).
  The report records the core (terminal header, JSON "attention_impl").

explaining a mismatch:
  --stages compares each intermediate of flax and ttnn with torch's (queries, keys, values; after
  RMSNorm and RoPE where present; scores q @ k.T; weights; context; output), a row per stage, and
  names each backend's first stage over its bound (the same table's bounds; PCC gated at the output).
  --plot DIR writes each variant's attention weights per head and backend (tokens on the axes) beside
  |difference to torch|, and summary.png: each variant's error over its bound (needs .[plot]).
  --json - prints the JSON report alone on stdout (the table goes to stderr, no progress bar).

training mode and gradients (torch vs Flax only, float32; ttnn in --backends is skipped, the report says why):
  --train runs every variant with dropout active (--dropout, default 0.1) on identical masks: each
  dropout site gets one mask (jax.random from --seed, default 0), applied by jaxattn's naive kernel in
  Flax and by the torch module in place of its nn.Dropout (nn.MultiheadAttention: its steps with the
  mask). Rows: torch float32 vs float64 and flax vs torch, same masks; variants without dropout say so.
  --grad compares d sum(output * R) / d(input and every parameter), R ~ N(0,1) from --seed, torch
  autograd vs jax.grad, one row per torch parameter name; bound: max abs 2e-5 x max(1, max|ref|), at
  least 4 x torch's own float32 error vs float64 (compare.py row "flax grad", GRAD_REFERENCE_FACTOR);
  rel and PCC reported. --train --grad: gradients in training mode on the masks.

resource budget (crosscheck/pipeline/budget.py):
  before anything is allocated, the memory a run needs is estimated from shapes (weights, mask buffers
  context_length^2, inputs, attention scores batch x heads x tokens^2, every copy counted) and a run over
  --max-memory (default: half of the physical memory, or the address-space limit RLIMIT_AS if lower) is
  exit 2 naming the flag, the estimate and the limit; tensors in files are sized from their headers (an
  expanded .pt view by its dense shape).

exit codes: 0 all checks passed, 1 a mismatch (failing variants named), 2 bad usage or input,
130 interrupted (Ctrl-C: nothing written).
Colour follows the terminal; --no-color or NO_COLOR turns it off.
"""
