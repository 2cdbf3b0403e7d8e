"""The embedded default input: "Your journey starts with one step" (6 tokens, 3-d embeddings).

Values and expected outputs are copied from the book's notebooks (``shared/seeds``).
"""

import numpy as np

TOKENS = ("Your", "journey", "starts", "with", "one", "step")

#: ``inputs`` of section 3.3, shape ``(6, 3)``.
INPUTS = np.array(
    [
        [0.43, 0.15, 0.89],  # Your     (x^1)
        [0.55, 0.87, 0.66],  # journey  (x^2)
        [0.57, 0.85, 0.64],  # starts   (x^3)
        [0.22, 0.58, 0.33],  # with     (x^4)
        [0.77, 0.25, 0.10],  # one      (x^5)
        [0.05, 0.80, 0.55],  # step     (x^6)
    ],
    dtype=np.float32,
)

#: The book's context vectors of section 3.3 (``softmax(x @ x.T) @ x``) for :data:`INPUTS`,
#: as printed with 4 decimals in notebook 002 (``context_vector_fin``).
CONTEXT_VECS = np.array(
    [
        [0.4421, 0.5931, 0.5790],
        [0.4419, 0.6515, 0.5683],
        [0.4431, 0.6496, 0.5671],
        [0.4304, 0.6298, 0.5510],
        [0.4671, 0.5910, 0.5266],
        [0.4177, 0.6503, 0.5645],
    ],
    dtype=np.float32,
)
