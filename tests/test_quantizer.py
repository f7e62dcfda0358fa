"""The EMA vector quantizer of the VQ-KD and PeCo tokenizers (hf_mim.models.quantizer).

The expected values are written out step by step here (loops over codes, explicit sums), not
taken from the module's own helper functions.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

from hf_mim.models.quantizer import EmaVectorQuantizer
from quantizer_ddp_worker import build_pair, ddp_batches, ddp_worker, run_steps

# ---------------------------------------------------------------------------------------------
# Expected values, written out
# ---------------------------------------------------------------------------------------------


def unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True)


def expected_ema_step(codebook: torch.Tensor, features: torch.Tensor, decay: float) -> torch.Tensor:
    """One EMA step as MIM_SPEC states it: assign by cosine, then per code: count, sum,
    normalise the mean, blend with the old code, normalise; unused codes unchanged."""
    vectors = unit(features.reshape(-1, codebook.shape[1]).float())
    nearest = (vectors @ codebook.T).argmax(dim=1)
    updated = codebook.clone()
    for code in range(codebook.shape[0]):
        members = vectors[nearest == code]
        count = members.shape[0]
        if count == 0:
            continue  # unused: keeps its value
        total = members.sum(dim=0)
        new = total / count
        new = new / new.norm()
        blended = decay * codebook[code] + (1 - decay) * new
        updated[code] = blended / blended.norm()
    return updated


def expected_kmeans(samples: torch.Tensor, means: torch.Tensor, iterations: int) -> torch.Tensor:
    """Cosine k-means: assign to the most similar mean, replace each non-empty mean by the
    normalised mean of its members; empty clusters keep their mean."""
    means = means.clone()
    for _ in range(iterations):
        nearest = (samples @ means.T).argmax(dim=1)
        for cluster in range(means.shape[0]):
            members = samples[nearest == cluster]
            if members.shape[0]:
                means[cluster] = unit(members.mean(dim=0))
    return means


def basis_quantizer(num_codes=8, **settings) -> EmaVectorQuantizer:
    """Codebook = the first `num_codes` standard basis vectors of R^num_codes, already initialised."""
    quantizer = EmaVectorQuantizer(num_codes=num_codes, code_dim=num_codes, kmeans_init=False, **settings)
    quantizer.embedding.weight.copy_(torch.eye(num_codes))
    quantizer.initted.fill_(1.0)
    return quantizer


def on_codes(codes: list[int], dim: int = 8) -> torch.Tensor:
    """Features [1, len(codes), dim] exactly on the given basis codes (scaled: the quantizer normalises)."""
    return 3.0 * torch.eye(dim)[codes].unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# EMA update, k-means init, straight-through estimator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.99, 0.7])
def test_ema_step_matches_the_formula_and_leaves_unused_codes_untouched(decay):
    torch.manual_seed(0)
    quantizer = EmaVectorQuantizer(num_codes=32, code_dim=8, decay=decay, kmeans_init=False).train()
    codebook = quantizer.embedding.weight.clone()
    for step in range(3):
        features = torch.randn(2, 10, 8) * 5  # 20 vectors: at most 20 of the 32 codes are used
        out = quantizer(features)
        expected = expected_ema_step(codebook, features, decay)
        nearest = (unit(features.reshape(-1, 8)) @ codebook.T).argmax(dim=1)
        unused = torch.ones(32, dtype=torch.bool)
        unused[nearest] = False
        assert torch.equal(out.indices, nearest.view(2, 10))  # assigned with the codes before the update
        assert unused.sum() >= 12
        assert torch.equal(quantizer.embedding.weight[unused], codebook[unused])  # bit for bit
        torch.testing.assert_close(quantizer.embedding.weight, expected, atol=1e-6, rtol=0)
        assert not torch.equal(quantizer.embedding.weight[~unused], codebook[~unused])
        torch.testing.assert_close(quantizer.embedding.weight.norm(dim=1), torch.ones(32))
        codebook = quantizer.embedding.weight.clone()


def test_eval_forward_and_encode_do_not_update():
    torch.manual_seed(0)
    quantizer = EmaVectorQuantizer(num_codes=16, code_dim=4).eval()
    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    features = torch.randn(3, 5, 4)
    out = quantizer(features)
    assert torch.equal(out.indices, quantizer.encode(features))
    assert torch.equal(quantizer.decode_indices(out.indices), quantizer.embedding.weight[out.indices])
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, before[name]), name  # no k-means, no EMA, no usage bookkeeping


def four_clusters(generator: torch.Generator, per_cluster: int = 50, dim: int = 8):
    """Unit vectors around 4 orthogonal directions (noise 0.05 per axis)."""
    centers = torch.eye(dim)[:4] * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    points = centers.repeat_interleave(per_cluster, 0) + 0.05 * torch.randn(4 * per_cluster, dim, generator=generator)
    return centers, unit(points)


def test_kmeans_init_recovers_separated_clusters_and_runs_once():
    generator = torch.Generator().manual_seed(1)
    centers, points = four_clusters(generator)
    torch.manual_seed(0)
    quantizer = EmaVectorQuantizer(num_codes=32, code_dim=8, kmeans_iters=10).train()
    assert quantizer.initted.item() == 0
    torch.manual_seed(5)  # the initial means are rows of the batch drawn with the global RNG
    initial = points[torch.randperm(points.shape[0])[:32]]
    torch.manual_seed(5)
    out = quantizer(points.unsqueeze(0))
    kmeans = expected_kmeans(points, initial, 10)
    torch.testing.assert_close(quantizer.embedding.weight, expected_ema_step(kmeans, points, 0.99), atol=1e-6, rtol=0)
    assert quantizer.initted.item() == 1

    codebook = quantizer.embedding.weight
    similarity_to_centers = codebook @ centers.T  # [32 codes, 4 clusters]
    assert (similarity_to_centers.max(dim=0).values > 0.99).all()  # every cluster has a code on it
    assert (similarity_to_centers.max(dim=1).values > 0.95).all()  # and every code sits on a cluster
    owner = similarity_to_centers.argmax(dim=1)  # the cluster of each code
    assert torch.equal(owner[out.indices[0]], torch.arange(4).repeat_interleave(50))  # points go to their cluster

    # A second batch, from other directions, only takes an EMA step: no second k-means.
    other = unit(torch.randn(200, 8, generator=generator))
    before = quantizer.embedding.weight.clone()
    quantizer(other)
    torch.testing.assert_close(quantizer.embedding.weight, expected_ema_step(before, other, 0.99), atol=1e-6, rtol=0)

    # A loaded, initialised state is not re-initialised either.
    reloaded = EmaVectorQuantizer(num_codes=32, code_dim=8).train()
    reloaded.load_state_dict(quantizer.state_dict())
    before = reloaded.embedding.weight.clone()
    reloaded(points)
    torch.testing.assert_close(reloaded.embedding.weight, expected_ema_step(before, points, 0.99), atol=1e-6, rtol=0)


def test_kmeans_with_fewer_vectors_than_codes_warns():
    quantizer = EmaVectorQuantizer(num_codes=64, code_dim=4).train()
    with pytest.warns(UserWarning, match=r"saw only 10 vectors for 64 codes"):
        quantizer(torch.randn(10, 4))


def reference_nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """beit2 `NormEMAVectorQuantizer.forward`, as written there: argmin of the squared distance."""
    distances = vectors.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * torch.einsum(
        "bd,nd->bn", vectors, codebook)
    return torch.argmin(distances, dim=1)


def reference_kmeans(samples: torch.Tensor, num_clusters: int, iterations: int) -> torch.Tensor:
    """beit2 `kmeans(..., use_cosine_sim=True)`: seeds drawn as its `sample_vectors` (with repeats when
    there are fewer samples than clusters), assignment by the largest dot product."""
    if samples.shape[0] >= num_clusters:
        means = samples[torch.randperm(samples.shape[0])[:num_clusters]]
    else:
        means = samples[torch.randint(0, samples.shape[0], (num_clusters,))]
    for _ in range(iterations):
        buckets = (samples @ means.t()).max(dim=-1).indices
        bins = torch.bincount(buckets, minlength=num_clusters)
        sums = samples.new_zeros(num_clusters, samples.shape[1]).scatter_add_(
            0, buckets[:, None].expand(-1, samples.shape[1]), samples)
        new_means = unit(sums / bins.masked_fill(bins == 0, 1)[..., None])
        means = torch.where((bins == 0)[..., None], means, new_means)
    return means


def test_codes_match_the_reference_when_kmeans_seeds_repeat():
    """100 vectors for 512 codes: k-means seeds repeat, so codes tie exactly; the index of every vector
    must still be the reference's (its argmin of distance breaks ties unlike an argmax of cosine)."""
    generator = torch.Generator().manual_seed(3)
    first, later = torch.randn(100, 32, generator=generator), torch.randn(4000, 32, generator=generator)
    quantizer = EmaVectorQuantizer(num_codes=512, code_dim=32, kmeans_iters=10).train()
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="saw only 100 vectors for 512 codes"):
        out = quantizer(first)
    torch.manual_seed(7)
    unit_first, unit_later = F.normalize(first, dim=-1), F.normalize(later, dim=-1)  # the reference's l2norm
    kmeans = reference_kmeans(unit_first, 512, 10)
    assert kmeans.unique(dim=0).shape[0] < 512  # the case in question: duplicate codes
    assert torch.equal(out.indices, reference_nearest_codes(unit_first, kmeans))
    codebook = quantizer.embedding.weight.clone()
    assert torch.equal(quantizer.eval()(later).indices, reference_nearest_codes(unit_later, codebook))
    assert torch.equal(quantizer.encode(later), reference_nearest_codes(unit_later, codebook))


def test_straight_through_gradient_and_commitment_loss():
    torch.manual_seed(0)
    quantizer = EmaVectorQuantizer(num_codes=16, code_dim=4, kmeans_init=False, commitment_weight=0.25).train()
    codebook = quantizer.embedding.weight.clone()  # the codes the forward uses (the EMA step comes after)
    features = torch.randn(2, 6, 4, requires_grad=True)
    upstream = torch.randn(2, 6, 4)
    out = quantizer(features)
    codes = codebook[out.indices]  # [2, 6, 4]
    torch.testing.assert_close(out.quantized.detach(), codes, atol=1e-6, rtol=0)  # forward value: the codes
    # d quantized / d normalised features is the identity, so the gradient reaching the raw
    # features is exactly that of l2norm(features) receiving the upstream gradient.
    (grad,) = torch.autograd.grad(out.quantized, features, upstream, retain_graph=True)
    same = features.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.normalize(same, dim=-1), same, upstream)
    assert torch.equal(grad, expected)
    # Commitment loss = w * mean over every element of (codes - z)^2, the codes held constant.
    loss_input = features.detach().clone().requires_grad_(True)
    expected_loss = 0.25 * (codes - F.normalize(loss_input, dim=-1)).pow(2).mean()
    torch.testing.assert_close(out.commitment_loss, expected_loss)
    (loss_grad,) = torch.autograd.grad(out.commitment_loss, features)
    torch.testing.assert_close(loss_grad, torch.autograd.grad(expected_loss, loss_input)[0])
    assert list(quantizer.parameters()) == [] and not quantizer.embedding.weight.requires_grad


# ---------------------------------------------------------------------------------------------
# float32 everywhere; save / load through a PreTrainedModel host
# ---------------------------------------------------------------------------------------------


def test_codebook_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    # Many codes and vectors: near-ties that a bf16 similarity would resolve differently.
    plain = EmaVectorQuantizer(num_codes=256, code_dim=8).train()
    autocast = EmaVectorQuantizer(num_codes=256, code_dim=8).train()
    autocast.load_state_dict(plain.state_dict())
    features = torch.randn(8, 128, 8).bfloat16()
    for _ in range(2):
        torch.manual_seed(1)
        expected = plain(features.float())
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = autocast(features)
        assert autocast.embedding.weight.dtype == torch.float32
        assert torch.equal(autocast.embedding.weight, plain.embedding.weight)  # autocast changed nothing
        assert torch.equal(out.indices, expected.indices)
        assert out.commitment_loss.dtype == torch.float32 and out.quantized.dtype == torch.bfloat16


def test_training_with_a_cast_codebook_fails_loudly():
    quantizer = EmaVectorQuantizer(num_codes=8, code_dim=4).train().bfloat16()
    with pytest.raises(TypeError, match=r"need float32. Call `quantizer.float\(\)`"):
        quantizer(torch.randn(20, 4))


@strict
class QuantizerHostConfig(PreTrainedConfig):
    model_type = "hf_mim_test_quantizer_host"
    num_codes: int = 16
    code_dim: int = 8


class QuantizerHost(PreTrainedModel):
    """The smallest host: a Linear (to see the bf16 load happen) and the quantizer."""

    config_class = QuantizerHostConfig
    _keep_in_fp32_modules_strict = ["quantize"]

    def __init__(self, config: QuantizerHostConfig):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.code_dim, config.code_dim)
        self.quantize = EmaVectorQuantizer(config.num_codes, config.code_dim)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, EmaVectorQuantizer):
            module.reset_state(init.copy_)
        elif isinstance(module, torch.nn.Linear):
            init.normal_(module.weight, std=0.02)
            init.zeros_(module.bias)

    def forward(self, features):
        return self.quantize(self.proj(features))


class QuantizerHostWithoutFp32List(QuantizerHost):
    """The buffers are created float32 explicitly, so they stay float32 even without the list."""

    _keep_in_fp32_modules_strict = None


def trained_host(host_class=QuantizerHost) -> QuantizerHost:
    torch.manual_seed(0)
    host = host_class(QuantizerHostConfig()).train()
    for _ in range(3):
        host(torch.randn(4, 12, 8))
    host.quantize.steps_since_used[5] = 7.0  # a distinctive usage history
    return host


@pytest.mark.parametrize("host_class", [QuantizerHost, QuantizerHostWithoutFp32List])
def test_save_and_load_keep_codebook_and_state_in_float32(tmp_path, host_class):
    host = trained_host(host_class)
    assert host_class(QuantizerHostConfig()).quantize.initted.item() == 0  # fresh: reset_state ran
    host.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as file:
        assert {"quantize.embedding.weight", "quantize.initted", "quantize.steps_since_used"} <= set(file.keys())
        assert file.get_tensor("quantize.embedding.weight").shape == (16, 8)
    saved = host.state_dict()
    for dtype in (None, torch.bfloat16, torch.float16):
        loaded = host_class.from_pretrained(tmp_path, dtype=dtype)
        if dtype is not None:
            assert loaded.proj.weight.dtype == dtype  # the host really is in half precision
        for name in ("quantize.embedding.weight", "quantize.initted", "quantize.steps_since_used"):
            value = loaded.get_buffer(name)
            assert value.dtype == torch.float32, (name, dtype)
            assert torch.equal(value, saved[name]), (name, dtype)
        # Training resumes with an EMA step, not a new k-means.
        loaded.train()
        features = torch.randn(30, 8)
        before = loaded.quantize.embedding.weight.clone()
        projected = loaded.proj(features.to(loaded.proj.weight.dtype))
        loaded(features.to(loaded.proj.weight.dtype))
        expected = expected_ema_step(before, projected.float(), 0.99)
        torch.testing.assert_close(loaded.quantize.embedding.weight, expected, atol=1e-6, rtol=0)


def test_buffers_missing_from_a_checkpoint_are_initialised_and_loaded_ones_kept(tmp_path):
    host = trained_host()
    host.config.save_pretrained(tmp_path)
    missing = {"quantize.embedding.weight", "quantize.steps_since_used"}
    partial = {key: value for key, value in host.state_dict().items() if key not in missing}
    save_file(partial, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = QuantizerHost.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(loaded.proj.weight, host.proj.weight.bfloat16()) and loaded.quantize.initted.item() == 1
    # Missing buffers come from reset_state (via _init_weights), not from uninitialised memory.
    codebook = loaded.quantize.embedding.weight
    assert codebook.dtype == torch.float32 and not torch.equal(codebook, host.quantize.embedding.weight)
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(16))
    assert torch.equal(loaded.quantize.steps_since_used, torch.zeros(16))


# ---------------------------------------------------------------------------------------------
# Usage metrics, collapse warning, dead-code restart
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_usage_and_perplexity_of_known_assignments(training):
    quantizer = basis_quantizer().train(training)
    uniform = quantizer(on_codes([0, 1, 2, 3] * 5))  # uniform over 4 of 8 codes
    assert uniform.codebook_usage.item() == pytest.approx(0.5)
    assert uniform.perplexity.item() == pytest.approx(4.0, rel=1e-6)
    skewed = quantizer(on_codes([6, 6, 6, 2]))  # frequencies 3/4 and 1/4
    assert skewed.codebook_usage.item() == pytest.approx(2 / 8)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed.perplexity.item() == pytest.approx(math.exp(entropy), rel=1e-6)
    single = quantizer(on_codes([5, 5, 5]))
    assert single.codebook_usage.item() == pytest.approx(1 / 8) and single.perplexity.item() == pytest.approx(1.0)


def test_dead_codes_are_counted_over_the_window():
    quantizer = basis_quantizer(dead_code_threshold=3, usage_warning_threshold=0.0).train()
    dead = [quantizer(on_codes([0, 1, 2, 3])).dead_codes.item() for _ in range(3)]
    assert dead == [0, 0, 4]  # codes 4..7 unused for 3 steps
    assert quantizer.steps_since_used.tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    assert quantizer(on_codes([4, 5])).dead_codes.item() == 2  # 4 and 5 are alive again
    assert quantizer.eval()(on_codes([0])).dead_codes.item() == 2  # eval reads the window, does not advance it


def test_collapse_warning_gives_the_numbers():
    quantizer = basis_quantizer(dead_code_threshold=2, usage_warning_threshold=0.75).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantizer(on_codes([0, 1, 2, 3]))  # nothing is dead yet
    with pytest.warns(RuntimeWarning, match=r"only 4 of 8 codes \(50\.0%\) were used in the last 2 training steps"):
        quantizer(on_codes([0, 1, 2, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantizer(on_codes([0, 1, 2, 3]))  # at most one warning per window
    with pytest.warns(RuntimeWarning, match="4 codes are dead"):
        quantizer(on_codes([0, 1, 2, 3]))


def test_dead_code_restart_when_enabled_and_unchanged_behaviour_when_disabled():
    torch.manual_seed(0)
    plain = basis_quantizer(dead_code_threshold=2, usage_warning_threshold=0.0).train()
    restarting = basis_quantizer(dead_code_threshold=2, usage_warning_threshold=0.0, dead_code_restart=True).train()
    batches = [unit(on_codes([0, 1, 2, 3] * 3)[0] + 0.1 * torch.rand(12, 8)) for _ in range(3)]
    codebook = plain.embedding.weight.clone()
    # Step 1: no code is dead yet, both behave identically (and as the formula).
    plain(batches[0])
    restarting(batches[0])
    assert torch.equal(plain.embedding.weight, restarting.embedding.weight)
    torch.testing.assert_close(plain.embedding.weight, expected_ema_step(codebook, batches[0], 0.99), atol=1e-6, rtol=0)
    # Step 2: codes 4..7 are dead. Disabled: the formula, dead codes untouched. Enabled: re-seeded.
    codebook = plain.embedding.weight.clone()
    out_plain, out_restart = plain(batches[1]), restarting(batches[1])
    assert out_plain.dead_codes.item() == out_restart.dead_codes.item() == 4
    torch.testing.assert_close(plain.embedding.weight, expected_ema_step(codebook, batches[1], 0.99), atol=1e-6, rtol=0)
    assert torch.equal(plain.embedding.weight[4:], torch.eye(8)[4:])
    assert torch.equal(restarting.embedding.weight[:4], plain.embedding.weight[:4])
    batch_vectors = F.normalize(batches[1], dim=-1)
    for code in range(4, 8):  # each restarted code is one of this batch's (normalised) vectors
        assert (restarting.embedding.weight[code] == batch_vectors).all(dim=1).any()
    assert restarting.steps_since_used.tolist() == [0.0] * 8 and plain.steps_since_used[4:].tolist() == [2.0] * 4


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_settings_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"decay=1.5 must be in \[0, 1\]"):
        EmaVectorQuantizer(decay=1.5)
    quantizer = EmaVectorQuantizer(num_codes=8, code_dim=4).train()
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\] \(channels last\).*code_dim=3"):
        quantizer(torch.randn(2, 5, 3))
    quantizer(torch.randn(20, 4))
    before = quantizer.state_dict()
    before = {name: value.clone() for name, value in before.items()}
    poisoned = torch.randn(20, 4)
    poisoned[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="1 vector"):
        quantizer(poisoned)
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, before[name]), name  # the codebook was not poisoned


# ---------------------------------------------------------------------------------------------
# Two real processes (gloo): different data per rank, bit-identical codebooks. The spawned
# processes run tests/quantizer_ddp_worker.py, which loads the quantizer file on its own.
# ---------------------------------------------------------------------------------------------

def run_steps_on(quantizer: EmaVectorQuantizer, features: torch.Tensor) -> torch.Tensor:
    quantizer(features)
    return quantizer.embedding.weight.clone()


def test_two_processes_keep_bit_identical_codebooks(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    for run in ("reference", "restarting"):
        for step, (state0, state1) in enumerate(zip(rank0[run], rank1[run])):
            for key in state0:
                assert torch.equal(state0[key], state1[key]), (run, step, key)
    # Control: each rank's first batch alone (the reference's local k-means) gives different codebooks.
    local = []
    for rank in (0, 1):
        reference, _ = build_pair()
        torch.manual_seed(0)
        local.append(run_steps_on(reference, ddp_batches(0)[rank]))
    assert not torch.allclose(local[0], local[1], atol=1e-2)
    # Codes died and were restarted (identically, checked above): none stays dead after a restart.
    restarted = [state for state in rank0["restarting"] if state["dead"].item() > 0]
    assert restarted and all((state["steps_since_used"] < 2).all() for state in restarted)

    # One process on the concatenated batches, same seeds: the same run within float tolerance.
    reference, _ = build_pair()
    torch.manual_seed(0)
    single = run_steps(reference, None)
    for step, (distributed, alone) in enumerate(zip(rank0["reference"], single)):
        torch.testing.assert_close(distributed["codebook"], alone["codebook"], atol=1e-5, rtol=0, msg=f"step {step}")
        for key in ("steps_since_used", "usage", "perplexity", "dead"):
            torch.testing.assert_close(distributed[key], alone[key], msg=f"{key} at step {step}")
