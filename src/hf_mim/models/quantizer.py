"""Vector quantizer with an l2-normalised codebook learned by exponential moving averages.

The quantizer of BEiT v2's VQ-KD tokenizer, shared with the PeCo tokenizer. For input features
x [..., D] (channels last):

  z = l2norm(x)                                    every computation in float32, autocast off
  index = argmin_k |z|^2 + |e_k|^2 - 2 <z, e_k>    nearest code by squared distance, as the reference
  quantized = z + (e_index - z).detach()           straight-through: d quantized / d z = identity
  commitment_loss = w * mean((e_index.detach() - z) ** 2)   mean over every element; the
                                                   reference's `beta * mse_loss(z_q.detach(), z)`, w = 1

The gradient reaches x through the l2 normalisation, as in the reference. The codebook `e` is a
float32 buffer (`embedding.weight`, the reference's `quantize.embedding.weight` key): gradients and
optimizers never see it. Each training forward then takes one EMA step with the codes as they were
before it (the ones `quantized` used):

  count_k = number of vectors assigned to code k,  sum_k = their sum      (all-reduced over processes)
  count_k > 0:  new_k = l2norm(sum_k / count_k);  e_k <- l2norm(decay * e_k + (1 - decay) * new_k)
  count_k = 0:  e_k keeps its value, bit for bit

Deliberate differences from the reference (microsoft/unilm beit2):
- k-means init: the reference runs it on each process's own first batch and never broadcasts, so
  the processes start from, and keep, different codebooks. Here the first batches of all processes
  are gathered, k-means runs on rank 0 and its result is broadcast: every process starts with the
  same codebook, equal to a single-process run on the concatenated batch. Without k-means init,
  rank 0's random codebook is broadcast instead.
- Unused codes keep their exact value (the reference recomputes l2norm(0.99 e + 0.01 e), equal up to
  rounding).
- The nearest code is computed with the reference's own formula (argmin of the squared distance, not the
  argmax of the cosine, which is the same code for unit vectors only up to rounding): when the first
  k-means batch holds fewer vectors than codes, seeds repeat, codes tie, and the two rules break the ties
  differently (issue 16 measured 85.6-95.3% equal indices). k-means itself assigns by cosine, as the
  reference.
- Additions: usage metrics, a warning with the numbers when usage collapses, and an optional
  dead-code restart (off by default, so the default is the reference's behaviour).
- The [vectors x codes] similarity matrix is computed in chunks, bounding memory at any batch size.

Evaluation forwards make no collective calls (ranks may evaluate different numbers of batches), so
their metrics describe the local batch. The EMA step assumes every process calls the training
forward equally often, as DDP itself does.

This file ships with every checkpoint (``trust_remote_code``): torch and stdlib only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Rows of the [vectors x codes] similarity computed at once: at most 2**26 floats (256 MB).
SIMILARITY_CHUNK_ELEMENTS = 2**26


@dataclass
class QuantizerOutput:
    """quantized [..., D] (straight-through codes, in the input's dtype); indices [...] (int64);
    commitment_loss, codebook_usage (fraction of codes used by this batch), perplexity
    (exp of the entropy of the batch's code frequencies) as float32 scalars; dead_codes (codes
    unused for the last `dead_code_threshold` training steps) as an int64 scalar. In training the
    batch statistics are over all processes."""

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_usage: torch.Tensor
    perplexity: torch.Tensor
    dead_codes: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def chunk_rows(codebook: torch.Tensor) -> int:
    """Rows of vectors per [rows x codes] matrix, bounding its memory."""
    return max(1, SIMILARITY_CHUNK_ELEMENTS // max(1, codebook.shape[0]))


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """vectors [M, D], codebook [K, D] -> index of the nearest code [M] by squared distance, computed as
    the reference (beit2 `NormEMAVectorQuantizer.forward`) does, term for term, so that ties and
    near-ties between codes resolve to the same index; in chunks."""
    code_norms = codebook.pow(2).sum(dim=1)  # [K]

    def nearest(chunk: torch.Tensor) -> torch.Tensor:
        distances = chunk.pow(2).sum(dim=1, keepdim=True) + code_norms - 2 * torch.einsum("bd,nd->bn", chunk, codebook)
        return torch.argmin(distances, dim=1)

    return torch.cat([nearest(chunk) for chunk in vectors.split(chunk_rows(codebook))])


def most_similar_means(samples: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """k-means assignment: samples [M, D] -> index of the mean with the largest dot product [M] (the
    reference's cosine k-means: `(samples @ means.t()).max(dim=-1).indices`), in chunks."""
    return torch.cat([(chunk @ means.t()).max(dim=-1).indices for chunk in samples.split(chunk_rows(means))])


def code_statistics(vectors: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code count [K] and sum of the assigned vectors [K, D], both float32."""
    counts = torch.bincount(indices, minlength=num_codes).float()  # [K]
    sums = vectors.new_zeros(num_codes, vectors.shape[1]).index_add_(0, indices, vectors)  # [K, D]
    return counts, sums


def ema_codebook_update(codebook: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, decay: float) -> torch.Tensor:
    """The EMA step: used codes move towards the l2-normalised mean of their vectors and are
    re-normalised; unused codes (count 0) are returned unchanged."""
    used = counts > 0  # [K]
    means = F.normalize(sums / counts.clamp_min(1.0)[:, None], dim=-1)  # [K, D]
    blended = F.normalize(decay * codebook + (1.0 - decay) * means, dim=-1)  # [K, D]
    return torch.where(used[:, None], blended, codebook)


def spherical_kmeans(samples: torch.Tensor, means: torch.Tensor, iterations: int) -> torch.Tensor:
    """Cosine k-means of unit vectors samples [M, D] from the initial unit means [K, D]: assign
    each sample to the most similar mean, replace every non-empty cluster's mean by the
    l2-normalised mean of its samples; an empty cluster keeps its mean."""
    for _ in range(iterations):
        counts, sums = code_statistics(samples, most_similar_means(samples, means), means.shape[0])
        updated = F.normalize(sums / counts.clamp_min(1.0)[:, None], dim=-1)  # [K, D]
        means = torch.where((counts > 0)[:, None], updated, means)
    return means


def usage_and_perplexity(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [K] -> (fraction of codes with count > 0, exp(entropy of counts / total))."""
    probs = counts / counts.sum().clamp_min(1.0)  # [K]
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
    return (counts > 0).float().mean(), entropy.exp()


def sample_rows(vectors: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows of vectors [M, D], without replacement when M >= count (global torch RNG)."""
    if vectors.shape[0] >= count:
        picks = torch.randperm(vectors.shape[0], device=vectors.device)[:count]
    else:
        picks = torch.randint(vectors.shape[0], (count,), device=vectors.device)
    return vectors[picks]


def count_non_finite(vectors: torch.Tensor) -> torch.Tensor:
    """Number of rows of vectors [M, D] holding a NaN or an infinity, as a float32 scalar."""
    return (~vectors.isfinite().all(dim=1)).sum().float()


def random_codebook(num_codes: int, code_dim: int, device=None) -> torch.Tensor:
    return F.normalize(torch.randn(num_codes, code_dim, dtype=torch.float32, device=device), dim=-1)


# ---------------------------------------------------------------------------------------------
# torch.distributed helpers (no-ops in a single process)
# ---------------------------------------------------------------------------------------------


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sum each tensor over processes with a single collective call."""
    if world_size() == 1:
        return list(tensors)
    flat = torch.cat([tensor.reshape(-1).float() for tensor in tensors])
    dist.all_reduce(flat)
    return [part.view_as(tensor) for part, tensor in zip(flat.split([t.numel() for t in tensors]), tensors)]


def gather_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Concatenate vectors [M_r, D] of every process in rank order (M_r may differ by rank)."""
    if world_size() == 1:
        return vectors
    size = torch.tensor([vectors.shape[0]], device=vectors.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes).item())
    padded = vectors.new_zeros(longest, vectors.shape[1])
    padded[: vectors.shape[0]] = vectors
    gathered = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[: int(n.item())] for rows, n in zip(gathered, sizes)])


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class Codebook(nn.Module):
    """Holds the codebook as the buffer `weight` [K, D] (key `embedding.weight`, as the reference)."""

    def __init__(self, num_codes: int, code_dim: int):
        super().__init__()
        self.register_buffer("weight", random_codebook(num_codes, code_dim))


class EmaVectorQuantizer(nn.Module):
    """BEiT v2's normalised EMA vector quantizer; see the module docstring for the exact math.

    Host `PreTrainedModel`s list this module in `_keep_in_fp32_modules_strict` (every buffer is
    created float32 explicitly, so it already stays float32 under `from_pretrained(dtype=bf16)`;
    the list makes the intent explicit) and call `module.reset_state(transformers.initialization.copy_)`
    from `_init_weights`: the model is built on the meta device, and `init.copy_` re-initialises
    only the buffers that the checkpoint did not provide. A model cast to bf16/fp16 afterwards
    (`model.to(dtype)`) fails loudly at the next training step: call `quantizer.float()`.

    Buffers, all saved and float32 (transformers' keep-in-fp32 loading casts every tensor of a
    listed module to float32, bool and int64 included, so they are float32 from the start):
    `embedding.weight` [K, D] the codebook; `initted` (1.0: the codebook is ready and identical on
    every process, so a loaded checkpoint is never re-initialised; a converted reference
    checkpoint must set it to 1); `steps_since_used` [K] (training steps since each code was last
    chosen by any process; exact up to 2**24 steps).

    Not safe inside activation checkpointing: a recomputed training forward would repeat the EMA step.
    """

    def __init__(
        self,
        num_codes: int = 8192,
        code_dim: int = 32,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        commitment_weight: float = 1.0,
        dead_code_restart: bool = False,
        dead_code_threshold: int = 100,
        usage_warning_threshold: float = 0.5,
    ):
        super().__init__()
        self.check_settings(num_codes, code_dim, decay, kmeans_iters, commitment_weight, dead_code_threshold,
                            usage_warning_threshold)
        self.num_codes, self.code_dim, self.decay = num_codes, code_dim, float(decay)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.commitment_weight = float(commitment_weight)
        self.dead_code_restart, self.dead_code_threshold = dead_code_restart, dead_code_threshold
        self.usage_warning_threshold = float(usage_warning_threshold)
        self.embedding = Codebook(num_codes, code_dim)
        self.register_buffer("initted", torch.tensor(0.0, dtype=torch.float32))
        self.register_buffer("steps_since_used", torch.zeros(num_codes, dtype=torch.float32))
        self._steps_since_warning = dead_code_threshold  # warn at most once per window

    @staticmethod
    def check_settings(num_codes, code_dim, decay, kmeans_iters, commitment_weight, dead_code_threshold,
                       usage_warning_threshold) -> None:
        problems = []
        if num_codes < 1 or code_dim < 1:
            problems.append(f"num_codes={num_codes} and code_dim={code_dim} must be >= 1 (BEiT v2: 8192 and 32)")
        if not 0.0 <= decay <= 1.0:
            problems.append(f"decay={decay} must be in [0, 1] (BEiT v2: 0.99)")
        if kmeans_iters < 0:
            problems.append(f"kmeans_iters={kmeans_iters} must be >= 0 (BEiT v2: 10)")
        if commitment_weight < 0:
            problems.append(f"commitment_weight={commitment_weight} must be >= 0 (BEiT v2: 1.0)")
        if dead_code_threshold < 1:
            problems.append(f"dead_code_threshold={dead_code_threshold} must be >= 1 training step")
        if not 0.0 <= usage_warning_threshold <= 1.0:
            problems.append(f"usage_warning_threshold={usage_warning_threshold} must be in [0, 1] (0 disables it)")
        if problems:
            raise ValueError("Invalid quantizer settings: " + "; ".join(problems) + ".")

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, decay={self.decay}, "
                f"kmeans_init={self.kmeans_init}, dead_code_restart={self.dead_code_restart}")

    @torch.no_grad()
    def reset_state(self, copy_: Callable[[torch.Tensor, torch.Tensor], object] | None = None) -> None:
        """A fresh random codebook, not initialised, no usage history. `copy_(buffer, value)` does
        the writing (transformers' `init.copy_` skips buffers loaded from a checkpoint)."""
        copy_ = copy_ or (lambda tensor, value: tensor.copy_(value))
        device = self.embedding.weight.device
        copy_(self.embedding.weight, random_codebook(self.num_codes, self.code_dim, device))
        copy_(self.initted, torch.tensor(0.0, device=device))
        copy_(self.steps_since_used, torch.zeros(self.num_codes, device=device))

    # -- inference ------------------------------------------------------------------------------

    def normalized_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., D] -> l2-normalised float32 vectors [M, D]."""
        if features.shape[-1] != self.code_dim or not features.is_floating_point():
            raise ValueError(
                f"The quantizer expects floating-point features [..., {self.code_dim}] (channels last), got "
                f"{features.dtype} {list(features.shape)}. Move the channel axis last (e.g. "
                f"x.permute(0, 2, 3, 1)) or build the quantizer with code_dim={features.shape[-1]}."
            )
        if features.numel() == 0:
            raise ValueError(f"The quantizer got an empty batch {list(features.shape)}.")
        return F.normalize(features.float().reshape(-1, self.code_dim), dim=-1)

    def codebook(self) -> torch.Tensor:
        return self.embedding.weight.float()  # [K, D]; a no-op when kept in float32 as it should be

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., D] -> code indices [...] (no update, no init; any mode)."""
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
            vectors = self.normalized_vectors(features)  # [M, D]
            self.check_finite(count_non_finite(vectors), "encoding")
            return nearest_codes(vectors, self.codebook()).view(features.shape[:-1])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [...] -> unit codes [..., D] float32."""
        return F.embedding(indices, self.codebook())

    # -- training -------------------------------------------------------------------------------

    def forward(self, features: torch.Tensor) -> QuantizerOutput:
        """features [..., D] -> QuantizerOutput; in training also initialises the codebook (first
        call only) and takes one EMA step."""
        with torch.autocast(features.device.type, enabled=False):
            vectors = self.normalized_vectors(features)  # [M, D] fp32, carries the gradient
            if self.training:
                self.check_codebook_dtype()
                if not bool(self.initted):
                    self.initialize_codebook(vectors.detach())
            codebook = self.codebook()  # [K, D], the codes before this step's update
            indices = nearest_codes(vectors.detach(), codebook)  # [M]
            codes = codebook[indices]  # [M, D]
            commitment_loss = self.commitment_weight * F.mse_loss(codes, vectors)  # codes carry no grad
            quantized = vectors + (codes - vectors).detach()  # [M, D] straight-through
            with torch.no_grad():
                if self.training:
                    usage, perplexity, dead = self.training_step(vectors.detach(), indices)
                else:
                    self.check_finite(count_non_finite(vectors), "evaluation")
                    counts = torch.bincount(indices, minlength=self.num_codes).float()
                    usage, perplexity = usage_and_perplexity(counts)
                    dead = (self.steps_since_used >= self.dead_code_threshold).sum()
        return QuantizerOutput(
            quantized=quantized.view(features.shape).to(features.dtype),
            indices=indices.view(features.shape[:-1]),
            commitment_loss=commitment_loss,
            codebook_usage=usage,
            perplexity=perplexity,
            dead_codes=dead,
        )

    @torch.no_grad()
    def initialize_codebook(self, vectors: torch.Tensor) -> None:
        """k-means on the first batch of every process, run on rank 0 and broadcast (or, without
        k-means, rank 0's random codebook broadcast), so that all processes start identical."""
        if self.kmeans_init:
            samples = gather_rows(vectors)  # [sum of M_r, D], identical on every process
            self.check_finite(count_non_finite(samples), "k-means initialisation")
            if is_main_process():
                if samples.shape[0] < self.num_codes:
                    warnings.warn(
                        f"k-means initialisation saw only {samples.shape[0]} vectors for {self.num_codes} codes: "
                        f"at least {self.num_codes - samples.shape[0]} codes start as duplicates of others. "
                        f"Use a larger first batch or fewer codes.", stacklevel=3,
                    )
                means = spherical_kmeans(samples, sample_rows(samples, self.num_codes), self.kmeans_iters)
                self.embedding.weight.copy_(means)
        broadcast_from_main(self.embedding.weight)
        self.steps_since_used.zero_()
        self.initted.fill_(1.0)

    @staticmethod
    def check_finite(non_finite: torch.Tensor, where: str) -> None:
        if non_finite.item() > 0:
            raise FloatingPointError(
                f"Non-finite features reached the vector quantizer during {where}: {int(non_finite.item())} "
                f"vector(s) hold NaN or inf (summed over processes in training); the codebook was left "
                f"unchanged. Check the encoder's outputs "
                f"(a too-high learning rate, or fp16 overflow)."
            )

    def check_codebook_dtype(self) -> None:
        if self.embedding.weight.dtype != torch.float32:
            raise TypeError(
                f"The codebook is {self.embedding.weight.dtype}; its k-means and EMA updates need float32. "
                f"Call `quantizer.float()` after casting the model (`model.to(dtype)`, `.half()`, `.bfloat16()`)."
            )

    def training_step(self, vectors: torch.Tensor, indices: torch.Tensor):
        """The EMA step with statistics summed over processes; returns (usage, perplexity, dead codes)."""
        counts, sums = code_statistics(vectors, indices, self.num_codes)  # [K], [K, D]
        non_finite = count_non_finite(vectors)
        counts, sums, non_finite = all_reduce_sum(counts, sums, non_finite)
        self.check_finite(non_finite, "training")
        self.embedding.weight.copy_(ema_codebook_update(self.embedding.weight, counts, sums, self.decay))
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_since_used >= self.dead_code_threshold  # [K]
        dead_count = dead.sum()
        self.warn_on_collapse(int(dead_count.item()))
        if self.dead_code_restart and bool(dead.any()):
            self.restart_codes(dead, vectors)
        usage, perplexity = usage_and_perplexity(counts)
        return usage, perplexity, dead_count

    def restart_codes(self, dead: torch.Tensor, vectors: torch.Tensor) -> None:
        """Re-seed dead codes [K] (bool) with random vectors of rank 0's batch, broadcast to all."""
        seeds = vectors.new_zeros(int(dead.sum().item()), self.code_dim)  # [n_dead, D]
        if is_main_process():
            seeds.copy_(sample_rows(vectors, seeds.shape[0]))
        broadcast_from_main(seeds)
        self.embedding.weight[dead] = seeds
        self.steps_since_used[dead] = 0

    def warn_on_collapse(self, dead_count: int) -> None:
        """Warn (rank 0, at most once per `dead_code_threshold` steps) when fewer than
        `usage_warning_threshold` of the codes were used in the last `dead_code_threshold` steps."""
        self._steps_since_warning += 1
        used_fraction = 1.0 - dead_count / self.num_codes
        if used_fraction >= self.usage_warning_threshold or self._steps_since_warning < self.dead_code_threshold:
            return
        self._steps_since_warning = 0
        if is_main_process():
            action = "dead codes are being restarted" if self.dead_code_restart else "consider dead_code_restart=True"
            warnings.warn(
                f"Codebook collapse: only {self.num_codes - dead_count} of {self.num_codes} codes "
                f"({100 * used_fraction:.1f}%) were used in the last {self.dead_code_threshold} training steps "
                f"(warning threshold {100 * self.usage_warning_threshold:.0f}%); {dead_count} codes are dead. "
                f"{action.capitalize()}, or use fewer codes or a lower learning rate.", RuntimeWarning, stacklevel=4,
            )


__all__ = ["EmaVectorQuantizer", "QuantizerOutput", "ema_codebook_update", "spherical_kmeans"]
