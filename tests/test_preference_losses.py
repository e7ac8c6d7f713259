"""jft's preference and GRPO losses, and their gradients, against TRL 1.16's on given log-probs.

TRL's loss code runs unbound, on a stub trainer (`_trainer`) and a stub model
(`_LogProbModel`) that returns given per-token log-probabilities the way TRL's fused LM
head does: shifted by one, 0 where the next token's label is -100 (not a completion
token). A sequence's log-probability in TRL is the sum of those over the row, so the
gradient TRL's autograd puts on each completion token of a sequence is the gradient with
respect to the sequence's summed log-probability, which is what `jax.grad` gives on jft's
side. Everything is float32 on both sides.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.utils import nanstd

from jft.objectives.dpo import dpo_losses
from jft.objectives.grpo import group_advantages, grpo_token_losses, reduce_losses
from jft.objectives.kto import kto_losses
from jft.objectives.orpo import log1mexp, odds_ratio_terms
from jft.objectives.sequences import masked_mean, pair_sums, segment_sums
from jft.objectives.simpo import simpo_losses

RTOL, ATOL = 1e-5, 1e-6
close = functools.partial(np.testing.assert_allclose, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- TRL stubs


def _trainer(**attributes):
    """What TRL's loss methods read from `self`: one CPU process, training mode."""
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), num_processes=1, process_index=0, sync_gradients=True,
        gather=lambda x: x, gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x)
    base = dict(accelerator=accelerator, model=SimpleNamespace(training=True),
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                _tp_size=1, aux_loss_enabled=False, args=SimpleNamespace())
    return SimpleNamespace(**(base | attributes))


class _LogProbModel:
    """A causal LM with a fused head: `model(input_ids=..., labels=...)` gives the per-token
    log-probs registered for that input width, 0 where the shifted label is -100."""

    def __init__(self, *leaves):
        self.by_width = {leaf.shape[1] + 1: leaf for leaf in leaves}

    def __call__(self, input_ids, labels, **kwargs):
        log_probs = self.by_width[input_ids.shape[1]].masked_fill(labels[:, 1:] == -100, 0.0)
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())


def _sequences(rng, prompt_lengths, completion_lengths, width):
    """TRL-side tensors of right-padded prompt+completion sequences: input_ids,
    attention_mask, completion_mask [N, width] and random per-token log-probs
    [N, width - 1] (shifted: column t scores token t + 1; non-completion columns hold
    values the model stub zeroes)."""
    n = len(prompt_lengths)
    attention = np.zeros((n, width), np.int64)
    completion = np.zeros((n, width), np.int64)
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
        assert p >= 1 and p + c <= width
        attention[i, :p + c] = 1
        completion[i, p:p + c] = 1
    ids = rng.integers(1, 50, (n, width)) * attention
    logps = rng.uniform(-3.0, -0.1, (n, width - 1)).astype(np.float32)
    return SimpleNamespace(input_ids=ids, attention_mask=attention, completion_mask=completion,
                           logps=logps, shift_mask=completion[:, 1:].astype(bool))


def _sums(seqs):
    """Per sequence: the summed completion log-prob (float32) and the completion length."""
    return (np.where(seqs.shift_mask, seqs.logps, 0).sum(1, dtype=np.float32),
            seqs.shift_mask.sum(1).astype(np.float32))


def _per_token(sequence_grads, seqs):
    """The per-token gradient TRL's autograd gives when d loss / d (summed log-prob) is
    `sequence_grads`: that value on each completion token, 0 elsewhere."""
    return np.where(seqs.shift_mask, np.asarray(sequence_grads)[:, None], 0).astype(np.float32)


# --------------------------------------------------------------------------- DPO

PAIRS = 3
PROMPTS = [2, 3, 1]
CHOSEN = [4, 2, 5]
REJECTED = [3, 6, 1]  # unequal lengths, so IPO's per-token normalisation matters
# The log-ratios the reference is set to give, so that βΔ spans both sides of hinge's 1.
CHOSEN_LOGRATIOS = np.array([2.0, -1.0, 0.5], np.float32)
REJECTED_LOGRATIOS = np.array([-1.5, 0.5, 3.0], np.float32)


def _dpo_case(seed=0):
    rng = np.random.default_rng(seed)
    width = 1 + max(p + c for p, c in zip(PROMPTS * 2, CHOSEN + REJECTED, strict=True))
    seqs = _sequences(rng, PROMPTS * 2, CHOSEN + REJECTED, width)
    sums, counts = _sums(seqs)
    ref = (sums - np.concatenate([CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS])).astype(np.float32)
    return seqs, sums, counts, ref


def _trl_dpo(seqs, ref, loss_type, beta, label_smoothing):
    """(loss, d loss / d per-token log-probs [2B, T-1]) of DPOTrainer._compute_loss."""
    leaf = torch.tensor(seqs.logps, requires_grad=True)
    trainer = _trainer(beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                       label_smoothing=label_smoothing, f_divergence_type="reverse_kl",
                       ld_alpha=None, use_weighting=False, precompute_ref_logps=True)
    inputs = {"input_ids": torch.tensor(seqs.input_ids),
              "attention_mask": torch.tensor(seqs.attention_mask),
              "completion_mask": torch.tensor(seqs.completion_mask),
              "ref_chosen_logps": torch.tensor(ref[:PAIRS]),
              "ref_rejected_logps": torch.tensor(ref[PAIRS:])}
    loss = DPOTrainer._compute_loss(trainer, _LogProbModel(leaf), inputs, False)
    loss.backward()
    return loss.item(), leaf.grad.numpy()


DPO_CASES = [("sigmoid", 0.1, 0.0), ("robust", 0.1, 0.1), ("hinge", 0.5, 0.0), ("ipo", 0.1, 0.0)]


@pytest.mark.parametrize("loss_type,beta,label_smoothing", DPO_CASES)
def test_dpo_loss_and_gradient_equal_trl_dpo_trainer(loss_type, beta, label_smoothing):
    seqs, sums, counts, ref = _dpo_case()
    trl_loss, trl_grad = _trl_dpo(seqs, ref, loss_type, beta, label_smoothing)

    def mean_loss(chosen, rejected):
        return jnp.mean(dpo_losses(chosen - ref[:PAIRS], rejected - ref[PAIRS:],
                                   counts[:PAIRS], counts[PAIRS:], beta=beta,
                                   loss_type=loss_type, label_smoothing=label_smoothing))

    loss, grads = jax.value_and_grad(mean_loss, argnums=(0, 1))(sums[:PAIRS], sums[PAIRS:])
    close(float(loss), trl_loss)
    close(_per_token(np.concatenate(grads), seqs), trl_grad)
    if loss_type == "hinge":  # the case exercises both the active and the flat part
        margins = beta * (CHOSEN_LOGRATIOS - REJECTED_LOGRATIOS)
        assert (margins < 1).any() and (margins > 1).any()


def test_dpo_ipo_divides_each_logratio_by_its_own_completion_length():
    _, _, counts, _ = _dpo_case()
    assert (counts[:PAIRS] != counts[PAIRS:]).all()
    beta = 0.1
    losses = dpo_losses(CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, counts[:PAIRS], counts[PAIRS:],
                        beta=beta, loss_type="ipo")
    expected = (CHOSEN_LOGRATIOS.astype(np.float64) / counts[:PAIRS]
                - REJECTED_LOGRATIOS / counts[PAIRS:] - 1 / (2 * beta)) ** 2
    close(np.asarray(losses), expected)


def test_dpo_sigmoid_with_label_smoothing_is_cdpo_as_in_trl_cpo_loss():
    """TRL 1.16's DPO `sigmoid` ignores label_smoothing; its CPO `sigmoid` is cDPO on a
    logit, so given the DPO log-ratios it is jft's smoothed DPO."""
    beta, eps = 0.3, 0.2
    chosen = torch.tensor(CHOSEN_LOGRATIOS, requires_grad=True)
    rejected = torch.tensor(REJECTED_LOGRATIOS, requires_grad=True)
    trainer = _trainer(beta=beta, label_smoothing=eps, loss_type="sigmoid", alpha=0.0)
    trl_losses, _, _ = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    trl_losses.mean().backward()

    counts = np.ones(PAIRS, np.float32)

    def mean_loss(c, r):
        return jnp.mean(dpo_losses(c, r, counts, counts, beta=beta, loss_type="sigmoid",
                                   label_smoothing=eps))

    losses = dpo_losses(CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, counts, counts, beta=beta,
                        loss_type="sigmoid", label_smoothing=eps)
    close(np.asarray(losses), trl_losses.detach().numpy())
    z = beta * (CHOSEN_LOGRATIOS.astype(np.float64) - REJECTED_LOGRATIOS)
    log_sigmoid = lambda x: -np.logaddexp(0, -x)  # noqa: E731
    close(np.asarray(losses), -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    grads = jax.grad(mean_loss, argnums=(0, 1))(CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS)
    close(np.asarray(grads[0]), chosen.grad.numpy())
    close(np.asarray(grads[1]), rejected.grad.numpy())


def _packed_pairs(seqs, ref):
    """The DPO case as jft packs it, [chosen rows; rejected rows]: pairs 0 and 1 are
    segments 1 and 2 of row 0, pair 2 segment 1 of row 1; every token is a segment
    position, the completion's tokens are the targets. Returns (batch, mask, per-token
    policy and reference log-probs [4, T], for each TRL sequence i and completion token j
    the (row, column) of that token)."""
    layout = [(0, 1), (0, 2), (1, 1)]  # pair -> (row within its half, segment id)
    width = 2 * (1 + max(p + c for p, c in zip(PROMPTS * 2, CHOSEN + REJECTED, strict=True)))
    segment_ids = np.zeros((2 * 2, width), np.int32)
    mask = np.zeros((2 * 2, width), bool)
    logps = np.full((2 * 2, width), -7.0, np.float32)  # non-targets: must not count
    reference = np.full((2 * 2, width), 5.0, np.float32)
    places = {}
    filled = np.zeros(2 * 2, int)
    for i in range(2 * PAIRS):
        half, pair = divmod(i, PAIRS)
        row, segment = layout[pair]
        row += 2 * half
        prompt, completion = PROMPTS[pair], (CHOSEN + REJECTED)[i]
        start = filled[row]
        segment_ids[row, start:start + prompt + completion] = segment
        filled[row] += prompt + completion
        for j in range(completion):
            column = start + prompt + j
            mask[row, column] = True
            logps[row, column] = seqs.logps[i, prompt + j - 1]
            reference[row, column] = ref[i] if j == 0 else 0.0
            places[i, j] = (row, column)
    assert filled.max() < width  # some padding at the end of every row
    return {"segment_ids": jnp.asarray(segment_ids)}, mask, logps, reference, places


@pytest.mark.parametrize("loss_type,beta,label_smoothing", DPO_CASES)
def test_dpo_through_packed_pair_sums_gives_trl_per_token_gradient(loss_type, beta,
                                                                  label_smoothing):
    """jft's DPO composition (pair_sums of policy and reference → dpo_losses → mean over
    valid pairs) on a packed batch: TRL's loss and per-token gradient, token for token."""
    seqs, _, _, ref = _dpo_case(seed=1)
    trl_loss, trl_grad = _trl_dpo(seqs, ref, loss_type, beta, label_smoothing)
    batch, mask, logps, reference, places = _packed_pairs(seqs, ref)

    def loss_fn(token_logps):
        policy = pair_sums(token_logps, mask, batch)
        ref_sums = pair_sums(reference, mask, batch)
        losses = dpo_losses(policy.first - ref_sums.first, policy.second - ref_sums.second,
                            policy.first_count, policy.second_count, beta=beta,
                            loss_type=loss_type, label_smoothing=label_smoothing)
        return masked_mean(losses, policy.valid)

    assert int(pair_sums(jnp.asarray(logps), mask, batch).valid.sum()) == PAIRS
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(logps))
    grad = np.asarray(grad)
    close(float(loss), trl_loss)
    mapped = np.zeros_like(trl_grad)
    for (i, j), (row, column) in places.items():
        mapped[i, PROMPTS[i % PAIRS] + j - 1] = grad[row, column]
    close(mapped, trl_grad)
    assert not grad[~mask].any()


# --------------------------------------------------------------------------- ORPO

ORPO_CHOSEN = np.array([-0.05, -0.4, -0.9, -2.5, -0.7], np.float32)  # mean token log-probs
ORPO_REJECTED = np.array([-0.3, -1.2, -0.6, -0.69, -4.0], np.float32)


def test_log1mexp_equals_trl_on_both_sides_of_minus_log_2():
    x = np.array([-1e-6, -1e-3, -0.3, -0.69, -0.6931, -0.7, -1.5, -10.0, -40.0], np.float32)
    close(np.asarray(log1mexp(x)), trl_log1mexp(torch.tensor(x)).numpy())
    close(np.asarray(log1mexp(x)), np.log(-np.expm1(x.astype(np.float64))))


def test_orpo_odds_ratio_term_and_gradient_equal_trl_odds_ratio_loss():
    beta = 0.1
    chosen = torch.tensor(ORPO_CHOSEN, requires_grad=True)
    rejected = torch.tensor(ORPO_REJECTED, requires_grad=True)
    trainer = _trainer(beta=beta)
    trl_losses, _, _, trl_mean_ratio, trl_mean_log_odds = ORPOTrainer.odds_ratio_loss(
        trainer, chosen, rejected)
    # TRL's ORPO loss is nll − mean(β·log σ); jft's per pair nll − β·log σ.
    (-trl_losses.mean()).backward()

    ratio, log_odds = odds_ratio_terms(ORPO_CHOSEN, ORPO_REJECTED)
    close(beta * np.asarray(ratio), trl_losses.detach().numpy())
    close(float(jnp.mean(ratio)), trl_mean_ratio.item())
    close(float(jnp.mean(log_odds)), trl_mean_log_odds.item())

    grads = jax.jit(jax.grad(lambda c, r: -jnp.mean(beta * odds_ratio_terms(c, r)[0]),
                             argnums=(0, 1)))(ORPO_CHOSEN, ORPO_REJECTED)
    close(np.asarray(grads[0]), chosen.grad.numpy())
    close(np.asarray(grads[1]), rejected.grad.numpy())


# --------------------------------------------------------------------------- SimPO

SIMPO_CHOSEN = np.array([-0.4, -1.1, -0.9, -0.2, -1.6], np.float32)  # mean token log-probs
SIMPO_REJECTED = np.array([-1.7, -1.3, -0.4, -2.2, -2.5], np.float32)


def _trl_cpo(chosen, rejected, **attributes):
    chosen = torch.tensor(chosen, requires_grad=True)
    rejected = torch.tensor(rejected, requires_grad=True)
    losses, _, _ = CPOTrainer.cpo_loss(_trainer(alpha=0.0, **attributes), chosen, rejected)
    losses.mean().backward()
    return losses.detach().numpy(), chosen.grad.numpy(), rejected.grad.numpy()


def _jft_simpo(chosen, rejected, **options):
    losses = simpo_losses(chosen, rejected, **options)
    grads = jax.grad(lambda c, r: jnp.mean(simpo_losses(c, r, **options)), argnums=(0, 1))(
        chosen, rejected)
    return np.asarray(losses), np.asarray(grads[0]), np.asarray(grads[1])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_sigmoid_equals_trl_cpo_simpo_with_gamma_equal_ratio_times_beta(label_smoothing):
    beta, gamma_beta_ratio = 2.0, 0.5
    trl = _trl_cpo(SIMPO_CHOSEN, SIMPO_REJECTED, loss_type="simpo", beta=beta,
                   simpo_gamma=gamma_beta_ratio * beta, label_smoothing=label_smoothing)
    jft = _jft_simpo(SIMPO_CHOSEN, SIMPO_REJECTED, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
                     label_smoothing=label_smoothing, loss_type="sigmoid")
    for ours, theirs in zip(jft, trl, strict=True):
        close(ours, theirs)


@pytest.mark.parametrize("gamma_beta_ratio", [0.0, 0.5])
def test_simpo_hinge_equals_trl_cpo_hinge_on_margin_shifted_by_gamma_over_beta(
        gamma_beta_ratio):
    """TRL's CPO `hinge` has no γ; relu(1 − β(c − r − γ/β)) is it on (c − γ/β, r), the
    SimPO repository's hinge."""
    beta = 2.0
    trl = _trl_cpo(SIMPO_CHOSEN - np.float32(gamma_beta_ratio), SIMPO_REJECTED,
                   loss_type="hinge", beta=beta, label_smoothing=0.0)
    jft = _jft_simpo(SIMPO_CHOSEN, SIMPO_REJECTED, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
                     loss_type="hinge")
    for ours, theirs in zip(jft, trl, strict=True):
        close(ours, theirs)
    logits = beta * (SIMPO_CHOSEN - SIMPO_REJECTED - gamma_beta_ratio)
    assert (logits < 1).any() and (logits > 1).any()


# --------------------------------------------------------------------------- KTO

KTO_PROMPTS = [2, 1, 3, 2, 1]
KTO_COMPLETIONS = [3, 4, 2, 5, 1]
KTO_LABELS = np.array([True, False, False, True, False])
KTO_LOGRATIOS = np.array([0.8, -0.5, 1.5, -2.0, 0.3], np.float32)


@pytest.mark.parametrize("kl_mean", [0.6, -0.4], ids=["kl_positive", "kl_clamped_to_0"])
def test_kto_loss_and_gradient_equal_trl_kto_trainer_with_mixed_labels(kl_mean):
    beta, desirable_weight, undesirable_weight = 0.5, 1.3, 0.7
    rng = np.random.default_rng(2)
    width = 1 + max(p + c for p, c in zip(KTO_PROMPTS, KTO_COMPLETIONS, strict=True))
    seqs = _sequences(rng, KTO_PROMPTS, KTO_COMPLETIONS, width)
    # The KL sequences: example i's prompt, example i−1's completion; another width.
    kl_completions = np.roll(KTO_COMPLETIONS, 1).tolist()
    kl_seqs = _sequences(rng, KTO_PROMPTS, kl_completions, width + 2)
    sums, _ = _sums(seqs)
    kl_sums, _ = _sums(kl_seqs)
    ref = (sums - KTO_LOGRATIOS).astype(np.float32)
    kl_offsets = kl_mean + rng.uniform(-0.3, 0.3, len(KTO_LABELS)).astype(np.float32)
    ref_kl = (kl_sums - (kl_offsets - kl_offsets.mean() + kl_mean)).astype(np.float32)
    kl = np.float32(max(0.0, float(np.mean(kl_sums - ref_kl, dtype=np.float32))))
    assert (kl > 0) == (kl_mean > 0)

    leaf = torch.tensor(seqs.logps, requires_grad=True)
    kl_leaf = torch.tensor(kl_seqs.logps)
    trainer = _trainer(beta=beta, desirable_weight=desirable_weight,
                       undesirable_weight=undesirable_weight, loss_type="kto",
                       calculate_KL=True, precompute_ref_logps=True)
    trainer._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, trainer)
    inputs = {"input_ids": torch.tensor(seqs.input_ids),
              "attention_mask": torch.tensor(seqs.attention_mask),
              "completion_mask": torch.tensor(seqs.completion_mask),
              "KL_input_ids": torch.tensor(kl_seqs.input_ids),
              "KL_attention_mask": torch.tensor(kl_seqs.attention_mask),
              "KL_completion_mask": torch.tensor(kl_seqs.completion_mask),
              "label": torch.tensor(KTO_LABELS),
              "ref_logps": torch.tensor(ref), "ref_KL_logps": torch.tensor(ref_kl)}
    trl_loss = KTOTrainer._compute_loss(trainer, _LogProbModel(leaf, kl_leaf), inputs, False)
    trl_loss.backward()
    close(trainer._metrics["train"]["kl"][-1], float(kl))

    def mean_loss(policy_sums):
        return jnp.mean(kto_losses(policy_sums - ref, KTO_LABELS, kl, beta=beta,
                                   desirable_weight=desirable_weight,
                                   undesirable_weight=undesirable_weight))

    loss, grad = jax.value_and_grad(mean_loss)(sums)
    close(float(loss), trl_loss.item())
    close(_per_token(grad, seqs), leaf.grad.numpy())


# --------------------------------------------------------------------------- GRPO advantages

REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.3, 0.7, 0.1, 0.9,
                    0.4, 0.4])


def _trl_advantages(rewards, group_size, scale):
    """TRL 1.16's GRPOTrainer advantage code (sum_then_normalize, every reward scored)."""
    rewards = torch.tensor(rewards, dtype=torch.float64)
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    if scale in ["group", "none"]:
        if group_size > 1:
            std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
        else:
            std = torch.zeros_like(rewards)
    else:
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(
            rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).numpy()


def _loop_advantages(rewards, group_size, scale):
    """The formula, one number at a time: centred in its group, divided by the group's (or
    the batch's) sample std + 1e-4."""

    def sample_std(values):
        if len(values) < 2:
            return 0.0
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    rewards = [float(r) for r in rewards]
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        std = {"group": sample_std(group), "batch": sample_std(rewards)}.get(scale)
        out += [(r - mean) if std is None else (r - mean) / (std + 1e-4) for r in group]
    return np.array(out)


@pytest.mark.parametrize("group_size", [4, 2, 1])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl_and_the_plain_formula(group_size, scale):
    ours = group_advantages(REWARDS, group_size, scale)
    # TRL's nanstd computes Bessel's n / (n − 1) in float32 (an int / int division), so its
    # float64 advantages carry a float32-sized relative error.
    np.testing.assert_allclose(ours, _trl_advantages(REWARDS, group_size, scale), rtol=1e-7,
                               atol=1e-12)
    np.testing.assert_allclose(ours, _loop_advantages(REWARDS, group_size, scale), rtol=1e-12,
                               atol=1e-12)
    if scale == "group" and group_size == 4:
        assert not ours[4:8].any()  # a group of equal rewards: std 0, advantages 0


# --------------------------------------------------------------------------- GRPO loss

# (row, prompt length, completion length) of each completion, packed two to a row.
COMPLETIONS = [(0, 2, 3), (0, 1, 4), (1, 3, 5), (1, 2, 2)]
ADVANTAGES = np.array([1.2, -0.7, 0.4, -1.5], np.float32)
ROW_WIDTH, MAX_NEW_TOKENS = 12, 6
EPSILON, EPSILON_HIGH, GRPO_BETA = 0.2, 0.28, 0.1


def _grpo_case(seed=3):
    """The same completions packed for jft ([2, ROW_WIDTH] per-token arrays) and padded for
    TRL ([4, MAX_NEW_TOKENS]), with `places[n, j]` the jft position of token j of n."""
    rng = np.random.default_rng(seed)
    n = len(COMPLETIONS)
    lengths = [c for _, _, c in COMPLETIONS]
    logps = rng.uniform(-2.0, -0.2, (n, MAX_NEW_TOKENS)).astype(np.float32)
    old = (logps - rng.uniform(-0.6, 0.6, logps.shape)).astype(np.float32)
    ref = (logps + rng.uniform(-0.5, 0.5, logps.shape)).astype(np.float32)
    completion_mask = np.arange(MAX_NEW_TOKENS)[None] < np.array(lengths)[:, None]

    shape = (2, ROW_WIDTH)
    packed = {name: np.zeros(shape, np.float32) for name in ("logps", "old", "ref", "adv")}
    packed["logps"][:] = packed["old"][:] = packed["ref"][:] = -1.0
    segment_ids, mask = np.zeros(shape, np.int32), np.zeros(shape, bool)
    filled, segments, places = [0, 0], [0, 0], {}
    for k, (row, prompt, completion) in enumerate(COMPLETIONS):
        segments[row] += 1
        start = filled[row]
        segment_ids[row, start:start + prompt + completion] = segments[row]
        packed["adv"][row, start:start + prompt + completion] = ADVANTAGES[k]
        for j in range(completion):
            column = start + prompt + j
            places[k, j] = (row, column)
            mask[row, column] = True
            for name, values in (("logps", logps), ("old", old), ("ref", ref)):
                packed[name][row, column] = values[k, j]
        filled[row] += prompt + completion
    assert min(filled) < ROW_WIDTH  # a padded row
    return SimpleNamespace(logps=logps, old=old, ref=ref, completion_mask=completion_mask,
                           packed=packed, segment_ids=segment_ids, mask=mask, places=places)


def _numpy_grpo_loss(case, loss_type):
    """TRL's GRPO objective, written out in float64 on the padded [N, C] arrays."""
    logps, old, ref = (x.astype(np.float64) for x in (case.logps, case.old, case.ref))
    mask = case.completion_mask
    advantages = ADVANTAGES.astype(np.float64)[:, None]
    ratio = np.exp(logps - old)
    clipped = np.clip(ratio, 1 - EPSILON, 1 + EPSILON_HIGH)
    kl = np.exp(ref - logps) - (ref - logps) - 1
    token = -np.minimum(ratio * advantages, clipped * advantages) + GRPO_BETA * kl
    token = np.where(mask, token, 0.0)
    if loss_type == "grpo":
        return np.mean(token.sum(1) / mask.sum(1))
    if loss_type == "bnpo":
        return token.sum() / mask.sum()
    return token.sum() / (len(mask) * MAX_NEW_TOKENS)


def _trl_grpo(case, loss_type):
    leaf = torch.tensor(case.logps, requires_grad=True)
    n = len(COMPLETIONS)
    trainer = _trainer(
        beta=GRPO_BETA, loss_type=loss_type, epsilon_low=EPSILON, epsilon_high=EPSILON_HIGH,
        importance_sampling_level="token", top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, max_completion_length=MAX_NEW_TOKENS,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None))
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.zeros_like(leaf),
                                                                  None)
    inputs = {"prompt_ids": torch.ones((n, 2), dtype=torch.long),
              "prompt_mask": torch.ones((n, 2), dtype=torch.long),
              "completion_ids": torch.ones((n, MAX_NEW_TOKENS), dtype=torch.long),
              "completion_mask": torch.tensor(case.completion_mask, dtype=torch.long),
              "advantages": torch.tensor(ADVANTAGES),
              "old_per_token_logps": torch.tensor(case.old),
              "ref_per_token_logps": torch.tensor(case.ref)}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.item(), leaf.grad.numpy(), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_clipped_loss_and_gradient_equal_formula_and_trl_on_packed_rows(loss_type):
    case = _grpo_case()
    batch = {"segment_ids": jnp.asarray(case.segment_ids)}
    packed = case.packed

    def loss_fn(logps):
        losses, _, _ = grpo_token_losses(logps, packed["old"], packed["ref"], packed["adv"],
                                         beta=GRPO_BETA, epsilon=EPSILON,
                                         epsilon_high=EPSILON_HIGH)
        return reduce_losses(losses, case.mask, batch, loss_type, MAX_NEW_TOKENS)

    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(packed["logps"]))
    close(float(loss), _numpy_grpo_loss(case, loss_type))

    trl_loss, trl_grad, trl_metrics = _trl_grpo(case, loss_type)
    close(float(loss), trl_loss)
    grad = np.asarray(grad)
    mapped = np.zeros_like(trl_grad)
    for (k, j), (row, column) in case.places.items():
        mapped[k, j] = grad[row, column]
    close(mapped, trl_grad)
    assert not grad[~case.mask].any()

    # Both clipping regions occur (their tokens get no gradient from the surrogate), and
    # the clipped fraction is TRL's clip_ratio/region_mean.
    _, _, was_clipped = grpo_token_losses(packed["logps"], packed["old"], packed["ref"],
                                          packed["adv"], beta=GRPO_BETA, epsilon=EPSILON,
                                          epsilon_high=EPSILON_HIGH)
    ratio = np.exp(packed["logps"] - packed["old"])
    assert (case.mask & (ratio < 1 - EPSILON) & (packed["adv"] < 0)).any()
    assert (case.mask & (ratio > 1 + EPSILON_HIGH) & (packed["adv"] > 0)).any()
    assert (case.mask & (ratio > 1 + EPSILON_HIGH) & (packed["adv"] < 0)).any()  # not clipped
    clip_fraction = np.sum(case.mask & np.asarray(was_clipped)) / case.mask.sum()
    close(clip_fraction, trl_metrics["clip_ratio/region_mean"][-1])


def test_grpo_loss_gradient_equals_finite_differences_of_the_numpy_formula():
    case = _grpo_case()
    batch = {"segment_ids": jnp.asarray(case.segment_ids)}
    packed = case.packed

    def loss_fn(logps):
        losses, _, _ = grpo_token_losses(logps, packed["old"], packed["ref"], packed["adv"],
                                         beta=GRPO_BETA, epsilon=EPSILON,
                                         epsilon_high=EPSILON_HIGH)
        return reduce_losses(losses, case.mask, batch, "grpo", MAX_NEW_TOKENS)

    grad = np.asarray(jax.jit(jax.grad(loss_fn))(jnp.asarray(packed["logps"])))
    step = 1e-6
    for (k, j), (row, column) in case.places.items():
        shifted = []
        for sign in (1, -1):
            moved = SimpleNamespace(**vars(case))
            moved.logps = case.logps.astype(np.float64).copy()
            moved.logps[k, j] += sign * step
            shifted.append(_numpy_grpo_loss(moved, "grpo"))
        np.testing.assert_allclose(grad[row, column], (shifted[0] - shifted[1]) / (2 * step),
                                   rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- packed sums


def test_segment_sums_and_pair_sums_equal_a_python_loop_on_a_packed_pair_batch():
    # Two halves of 2 rows; segment k of row r in each half is one pair. Row 1's second
    # pair keeps no target token in its second sequence (invalid); 0 is padding.
    segment_ids = np.array([
        [1, 1, 1, 2, 2, 3, 3, 3, 0, 0],
        [1, 1, 1, 1, 2, 2, 2, 0, 0, 0],
        [1, 1, 2, 2, 2, 2, 3, 3, 3, 0],
        [1, 1, 2, 2, 2, 0, 0, 0, 0, 0],
    ], np.int32)
    mask = np.array([
        [0, 1, 1, 0, 1, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 1, 1, 0, 0, 0],
        [0, 1, 0, 1, 1, 1, 0, 0, 1, 0],
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ], bool)
    rng = np.random.default_rng(4)
    values = rng.normal(size=segment_ids.shape).astype(np.float32)
    values[segment_ids == 0] = 100.0  # padding must not count
    batch = {"segment_ids": jnp.asarray(segment_ids)}
    rows, width = segment_ids.shape

    def loop(vals, keep):
        out = np.zeros((rows, width), np.float64)
        for r in range(rows):
            for t in range(width):
                if segment_ids[r, t] > 0 and keep[r, t]:
                    out[r, segment_ids[r, t] - 1] += vals[r, t]
        return out

    everywhere = np.ones_like(mask)
    close(np.asarray(segment_sums(jnp.asarray(values), batch)), loop(values, everywhere))

    pairs = pair_sums(jnp.asarray(values), jnp.asarray(mask), batch)
    sums, counts = loop(values, mask), loop(np.ones_like(values), mask)
    close(np.asarray(pairs.first), sums[:2])
    close(np.asarray(pairs.second), sums[2:])
    np.testing.assert_array_equal(np.asarray(pairs.first_count), counts[:2])
    np.testing.assert_array_equal(np.asarray(pairs.second_count), counts[2:])
    expected_valid = np.zeros((2, width), bool)
    expected_valid[0, :3] = True  # row 0: three pairs, each with targets on both sides
    expected_valid[1, 0] = True  # row 1: pair 2's second sequence has no target
    np.testing.assert_array_equal(np.asarray(pairs.valid), expected_valid)
    assert counts[1, 1] > 0 and counts[3, 1] == 0
