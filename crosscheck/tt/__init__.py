"""The ttnn execution path: host model, programs, porting, runtime selection.

* :mod:`crosscheck.tt.host_model` — a numpy model of ttnn's numerics (not ttnn).
* :mod:`crosscheck.tt.ops` — the programs' building blocks: masks, attention, head layouts, stage taps.
* :mod:`crosscheck.tt.programs`, :mod:`crosscheck.tt.gqa_programs` — one ttnn program per variant, written
  against the real API; :mod:`crosscheck.tt.decode_programs` — their KV-cache decodes.
* :mod:`crosscheck.tt.port` — torch state dict -> ttnn parameter tree (bf16, TILE, on device).
* :mod:`crosscheck.tt.runtime` — ``open_runtime("auto"|"device"|"host")``, ``run_variant``, ``run_variant_decode``.

Numpy + ml_dtypes only: this package runs in the ttnn interpreter, without torch or JAX.

bfloat16 error budget
---------------------
``u = 2**-8`` is bfloat16's unit roundoff: round-to-nearest-even with an 8-bit
significand moves a value ``v`` by at most ``u * |v|``. A program rounds to bf16
at every stage, so to first order its max-abs error against the float32 torch
reference is at most ``n * u * M``, where ``n`` counts the bf16 roundings on the
longest data path and ``M`` bounds the magnitudes those roundings act on. The
budget assumes the book's **unit-scale data** (|x| <= ~1, ``nn.Linear``'s default
init, or weights of scale ~1/sqrt(d_in)), so that ``M = 1`` and the stages do not
amplify errors (|scores| <= ~1 keeps softmax's sensitivity below 1). Outside that
regime (e.g. ``torch.rand`` weights at d_in=40, scores in the hundreds) the
absolute error grows with the scores and only the PCC bar is meaningful.

Each program's count of roundings lives on its :class:`crosscheck.variants.variant.Variant`
(``bf16_roundings``; reshape/permute/slice/concat and adding a 0 mask entry are exact):
4 for ``SimplifiedSelfAttention`` (x, scores, softmax weights, context); 8 for the
single-head projections (x, weight and bias, q/k/v, scores, the 1/sqrt(head_dim)
scalar, scaled scores, weights, context); 10 with an output projection (its weight and
its output). ``GroupedQueryAttention`` (Llama 3) adds three for RoPE (the bf16 cos/sin
table, ``x * cos``, the sum) to 13; Qwen3's ``qk_norm`` two more (``rms_norm``'s output
and its scale) to 15. The tables read off the entries (``BF16_ROUNDINGS``, the ttnn tolerance
table ``TTNN_BF16_TOLERANCE``) are in :mod:`crosscheck.variants.registry`: the entries hold this
package's programs, so this package never imports the registry.

PCC: 0.999, tt-metal's bar for bf16 linear layers (softmax tests use 0.997-0.999).
Measured on the host model (seed sentence and 2x50x40 inputs): max-abs 1.4e-3 to
6e-3 (<= 1.5 u), PCC >= 0.99989; the budgets are 4-10 u. They also bound a device
run with the programs' HiFi4 + fp32-accumulation + exact-exp kernel config.
"""

#: bfloat16 unit roundoff (RNE, 8-bit significand).
BF16_UNIT_ROUNDOFF = 2.0**-8

#: The PCC bar for every variant.
TTNN_MIN_PCC: float = 0.999
