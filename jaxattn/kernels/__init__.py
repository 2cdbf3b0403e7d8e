"""Attention kernels: one file each, arrays in and arrays out.

Every kernel has the signature of :data:`jaxattn.implementations.Kernel`:

    kernel(query, key, value, bias, mask, *, scale, is_causal, q_offset, dropout_rate, dropout_rng, precision)
        -> (context, attn_weights or None)

with ``query (B, T, N, H)``, ``key (B, S, K, H)``, ``value (B, S, K, Hv)`` (``N % K == 0``;
query head ``i`` reads kv head ``i // (N // K)``), ``bias``/``mask`` ``None`` or rank 4,
broadcastable to ``(B, N, T, S)``, already checked by :func:`jaxattn.dot_product_attention`.
``T`` or ``S`` may be 0: no queries give an empty ``(B, 0, N, Hv)``, no keys give zeros
(every row sees no key), as from every kernel; weights, when returned, are ``(B, N, T, S)``.
``precision`` (``None`` or a ``jax.lax.Precision``) goes to every product the kernel
computes (library kernels document what they do with it). A kernel knows arrays only: no module, no table,
no global device choice. What each one supports is declared where it is registered
(:mod:`jaxattn.implementations`).
"""
