"""Vector quantization of a float matrix, VPTQ-style (Liu et al. 2024, arXiv 2409.17066).

A matrix W (rows M = output channels, columns N = input dimensions) is first divided by a scale per row (its
rms, float16), then cut, column by column, into vectors of v consecutive weights down the column. Each vector is
stored as the index of its nearest entry in a codebook of 2^b1 vectors plus the index of the nearest entry of a
residual codebook of 2^b2 vectors for what is left:

    w[r] ~ s_r (C1[i1] + C2[i2])[r mod v]

Both codebooks come from k-means over the matrix's vectors weighted by the diagonal of the layer's input
Hessian H = X^T X (X: the layer's inputs on calibration data): a vector in column j weighs H_jj, VPTQ's
"channel-independent" objective. The vectors are then assigned column by column in GPTQ's order with error
feedback: column j's quantization error, divided by the diagonal of the upper Cholesky factor U of H^-1, is
carried into the columns not yet quantized through U's row j, so the later columns absorb what column j lost.

Per matrix the file holds the row scales and the two codebooks (float16) and the indices packed at b1 and b2 bits:

    bits per weight = (8 ceil(n b1 / 8) + 8 ceil(n b2 / 8) + 16 v (2^b1 + 2^b2) + 16 M) / (M N),   n = ceil(M / v) N

(the rows padded with zeros to a multiple of v). Codebooks weigh on a small matrix: at v = 4, b1 = 8, b2 = 7 the
indices take 3.75 bits a weight, the codebooks 0.09 and the row scales 0.125 more on the tiny preset's 2048 x 128
embedding: 3.97 bits.

Decoding is exact: a weight is a float16 row scale times the float32 sum of two float16 codebook entries, the same
numbers in the same order wherever it runs; the encoder's quantized matrix is that decode.

Where we differ from the paper: no outlier codebook and no fine-tuning of the codebooks or of the rest of the model
after quantizing (VPTQ's optional steps); one codebook pair per matrix. The row scales are our normalisation (VPTQ's
is optional and per input channel): an embedding's rows differ in size (frequent tokens' are larger), and without
them one codebook serves the large rows worst (on the stand-in at the default setting, VQ without them cost 0.057
of validation mean task success, with them none). VPTQ
quantizes linear layers; a tied embedding is also a lookup table, so its Hessian here is the LM head's (the final
hidden states') plus a multiple of the identity for the lookup role (LOOKUP_SHARE, our addition); a matrix no
linear layer reads gets H = I (plain k-means).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

CODEBOOK_BYTES = 2  # float16 per codebook entry
DAMPING = 0.01  # added to H's diagonal, times its mean, before inverting (GPTQ's percdamp)
# A tied embedding is also read as a lookup table, whose rows go into the residual stream whole: that role
# weighs every column alike (H = c I). Its share of the tied matrix's Hessian, as a multiple of the head's mean
# diagonal: 1 gives the two roles equal trace. Chosen on validation: on the stand-in at the default setting, 0 (the
# head alone: the feedback pushes the error into the columns the head reads least) cost 0.029 of validation mean
# task success, past the gate's 0.02; 1 cost none.
LOOKUP_SHARE = 1.0
KMEANS_ITERATIONS = 25
DISTANCE_CHUNK = 16_384  # vectors scored against a codebook at once: 64 MB of float32 at 1,024 entries


@dataclass(frozen=True)
class VQShape:
    vector: int = 4  # v: consecutive weights down a column
    codebook_bits: int = 8  # b1: the main codebook has 2^b1 entries
    residual_bits: int = 7  # b2: the residual codebook has 2^b2 entries; 0 for none

    def vectors(self, shape: Sequence[int]) -> int:
        rows, columns = shape
        return math.ceil(rows / self.vector) * columns

    def payload_bytes(self, shape: Sequence[int]) -> int:
        n = self.vectors(shape)
        entries = 2**self.codebook_bits + (2**self.residual_bits if self.residual_bits else 0)
        return (math.ceil(n * self.codebook_bits / 8) + math.ceil(n * self.residual_bits / 8)
                + CODEBOOK_BYTES * (self.vector * entries + shape[0]))

    def bits_per_weight(self, shape: Sequence[int]) -> float:
        """The formula of the module docstring: indices, both codebooks and the row scales over the weights."""
        return 8 * self.payload_bytes(shape) / math.prod(shape)


@dataclass
class VQTensor:
    """One matrix in VQ form: what the file stores for it (indices unpacked here, one per vector)."""

    shape: tuple[int, int]
    row_scales: torch.Tensor  # float16 (M,)
    codebook: torch.Tensor  # float16 (2^b1, v)
    residual_codebook: torch.Tensor  # float16 (2^b2, v), (0, v) without a residual
    indices: torch.Tensor  # int64 (N, ceil(M / v)): column j's vectors top to bottom
    residual_indices: torch.Tensor  # int64 (N, ceil(M / v)), all 0 without a residual

    @property
    def vq_shape(self) -> VQShape:
        residual = len(self.residual_codebook)
        residual_bits = int(math.log2(residual)) if residual else 0
        return VQShape(self.codebook.shape[1], int(math.log2(len(self.codebook))), residual_bits)

    def payload_bytes(self) -> int:
        """Bytes of the packed indices, the codebooks and the row scales, as the file holds them."""
        shape = self.vq_shape
        return (len(pack_bits(self.indices, shape.codebook_bits))
                + len(pack_bits(self.residual_indices, shape.residual_bits))
                + self.codebook.nbytes + self.residual_codebook.nbytes + self.row_scales.nbytes)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers below 2^bits, row-major, each in `bits` bits (most significant first): uint8."""
    if bits == 0:
        return torch.zeros(0, dtype=torch.uint8)
    flat = values.reshape(-1).numpy().astype(np.int64)
    if flat.min(initial=0) < 0 or flat.max(initial=0) >= 2**bits:
        raise ValueError(f"values outside [0, 2^{bits})")
    bit_planes = (flat[:, None] >> np.arange(bits - 1, -1, -1)) & 1  # (n, bits)
    return torch.from_numpy(np.packbits(bit_planes.astype(np.uint8).reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` integers pack_bits stored at `bits` bits each: int64."""
    if bits == 0:
        return torch.zeros(count, dtype=torch.int64)
    bit_planes = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy(bit_planes @ (1 << np.arange(bits - 1, -1, -1)))


def _nearest(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of each vector's nearest codebook entry (squared distance), in chunks."""
    squared = codebook.pow(2).sum(1)
    return torch.cat([torch.addmm(squared, chunk, codebook.T, alpha=-2).argmin(1)
                      for chunk in vectors.split(DISTANCE_CHUNK)])


def weighted_kmeans(vectors: torch.Tensor, weights: torch.Tensor, entries: int,
                    generator: torch.Generator) -> torch.Tensor:
    """k-means minimising sum_i weights_i ||vectors_i - c(i)||^2: k-means++ seeding (weighted), then Lloyd's
    iterations; an entry that loses all its vectors keeps its place."""
    centroids = vectors.new_empty(entries, vectors.shape[1])
    chance = weights.double()
    closest = torch.full((len(vectors),), math.inf)
    for k in range(entries):
        # Draw a vector with probability proportional to its chance (weight x squared distance to the nearest
        # entry so far); when every vector sits on an entry already, any vector does.
        total = chance.cumsum(0)
        draw = float(torch.rand(1, generator=generator, dtype=torch.float64)) * float(total[-1])
        if total[-1] > 0:
            pick = min(int(torch.searchsorted(total, draw, right=True)), len(vectors) - 1)
        else:
            pick = k % len(vectors)
        centroids[k] = vectors[pick]
        torch.minimum(closest, (vectors - centroids[k]).pow(2).sum(1), out=closest)
        chance = weights.double() * closest
    for _ in range(KMEANS_ITERATIONS):
        assigned = _nearest(vectors, centroids)
        mass = torch.zeros(entries).index_add_(0, assigned, weights)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, vectors * weights[:, None])
        moved = mass > 0
        updated = centroids.clone()
        updated[moved] = sums[moved] / mass[moved, None]
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _inverse_hessian_factor(hessian: torch.Tensor) -> torch.Tensor:
    """U, upper triangular with U^T U = (H + damping)^-1, as GPTQ sweeps with it (float64)."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # an input that is always zero: any value of its column does
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMPING * float(h.diagonal().mean()))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def encode(weight: torch.Tensor, hessian: torch.Tensor, shape: VQShape = VQShape(), seed: int = 0) -> VQTensor:
    """The matrix (M, N) quantized to two codebooks under the input Hessian (N, N), with error feedback."""
    rows, columns = weight.shape
    v = shape.vector
    blocks = math.ceil(rows / v)
    # Each row's rms; float16's least normal for a zero row, which then divides to zeros.
    row_scales = weight.detach().float().pow(2).mean(1).sqrt().clamp(min=2**-14).half()
    w = torch.zeros(blocks * v, columns, dtype=torch.float64)
    w[:rows] = weight.detach().double() / row_scales.double()[:, None]
    importance = hessian.double().diagonal().clamp(min=0)
    importance = importance if importance.sum() > 0 else torch.ones(columns, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    vectors = w.T.reshape(columns * blocks, v).float()  # column j's vectors at [j * blocks, (j + 1) * blocks)
    weights = importance.float().repeat_interleave(blocks)
    codebook = weighted_kmeans(vectors, weights, 2**shape.codebook_bits, generator).half()
    main = codebook.float()[_nearest(vectors, codebook.float())]
    residual_codebook = (weighted_kmeans(vectors - main, weights, 2**shape.residual_bits, generator).half()
                         if shape.residual_bits else torch.zeros(0, v, dtype=torch.float16))

    u = _inverse_hessian_factor(hessian)
    books = codebook.float(), residual_codebook.float()
    indices = torch.empty(columns, blocks, dtype=torch.int64)
    residual_indices = torch.zeros(columns, blocks, dtype=torch.int64)
    for j in range(columns):
        column = w[:, j].float().view(blocks, v)
        indices[j] = _nearest(column, books[0])
        quantized = books[0][indices[j]]
        if shape.residual_bits:
            residual_indices[j] = _nearest(column - quantized, books[1])
            quantized = quantized + books[1][residual_indices[j]]
        error = (w[:, j] - quantized.reshape(-1).double()) / u[j, j]
        w[:, j + 1:] -= error[:, None] * u[j, j + 1:][None, :]
    return VQTensor((rows, columns), row_scales, codebook, residual_codebook, indices, residual_indices)


def decode(encoded: VQTensor) -> torch.Tensor:
    """The float32 matrix the codebooks and indices give; exact (see the module docstring)."""
    rows, columns = encoded.shape
    vectors = encoded.codebook.float()[encoded.indices]  # (N, blocks, v)
    if len(encoded.residual_codebook):
        vectors = vectors + encoded.residual_codebook.float()[encoded.residual_indices]
    return vectors.reshape(columns, -1)[:, :rows].T * encoded.row_scales.float()[:, None]


@torch.no_grad()
def input_hessians(model, keys: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per parameter key, H = X^T X (float64) over the inputs X of the linear layers that use it as their
    weight (a tied embedding: the LM head), at the unmasked positions, plus LOOKUP_SHARE times its mean diagonal
    on the diagonal when an embedding also looks rows up in it; the identity for a key no linear layer uses (an
    untied embedding is a lookup only: every column weighs alike)."""
    readers = {key: [module for module in model.modules() if isinstance(module, torch.nn.Linear)
                     and module.weight is model.get_parameter(key)] for key in keys}
    lookups = {key for key in keys for module in model.modules()
               if isinstance(module, torch.nn.Embedding) and module.weight is model.get_parameter(key)}
    hessians = {key: torch.zeros(model.get_parameter(key).shape[1], model.get_parameter(key).shape[1],
                                 dtype=torch.float64) for key in keys}
    mask: list[torch.Tensor] = []

    def hook_for(key: str):
        def add(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[mask[0].reshape(-1)].double()
            hessians[key].addmm_(x.T, x)
        return add

    handles = [module.register_forward_hook(hook_for(key)) for key, modules in readers.items() for module in modules]
    try:
        for start in range(0, len(input_ids), batch_size):
            batch = slice(start, start + batch_size)
            mask[:] = [attention_mask[batch].bool()]  # the positions the hooks count
            model(input_ids=input_ids[batch], attention_mask=attention_mask[batch])
    finally:
        for handle in handles:
            handle.remove()
    for key in keys:
        if not readers[key]:
            hessians[key] = torch.eye(len(hessians[key]), dtype=torch.float64)
        elif key in lookups:
            hessians[key].diagonal().add_(LOOKUP_SHARE * float(hessians[key].diagonal().mean()))
    return hessians
