"""refine_llm.rewards, the one reward of heads and LoRA: REINFORCE's estimate is unbiased for the exact
gradient (and not zero at 2 samples), the head and the LoRA trainer compute the same loss on the same
candidate probabilities, the paper reward is on UnQover's reference scale, old objective names are refused."""

from __future__ import annotations

import pytest
import torch

from refine_llm import metrics, rewards
from refine_llm.config import BanditConfig, LoraConfig

K = 5


def _policy(n: int, m: int, seed: int = 0):
    """Random logits (4n,k) for n tuples + (m,k) specified prompts, candidate masks, gold masks, a base."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(4 * n + m, K, generator=g, dtype=torch.float64)
    mask = torch.zeros(4 * n + m, 2, K, dtype=torch.bool)
    for r in range(4 * n + m):
        perm = torch.randperm(K, generator=g)
        mask[r, 0, perm[0]] = True  # subject 1: one token, subject 2: one or two tokens, the rest neither
        mask[r, 1, perm[1: 2 + r % 2]] = True
    gold = torch.randint(2, (m,), generator=g)
    base = torch.log_softmax(torch.randn(m, K, generator=g, dtype=torch.float64), -1)
    return theta, mask, gold, base


def _loss(theta, mask, gold, base, n, objective, samples=2, seed=0, w=rewards.Weights(0.3, 0.7, 0.5), copies=1):
    """policy_loss on ``copies`` independent copies of the batch in one call (tuples and specified rows are
    independent terms of the loss, so copy d's rows carry draw d's gradient, scaled by 1/copies)."""
    m = len(gold)
    rep = lambda x: x.repeat(copies, *([1] * (x.ndim - 1)))
    logp = torch.log_softmax(theta, -1)
    u, s = rep(logp[: 4 * n]), rep(logp[4 * n:])
    gmask = rep(mask[4 * n:][torch.arange(m), gold])
    g = torch.Generator().manual_seed(seed)
    return rewards.policy_loss(u, rep(mask[: 4 * n]), objective, w, samples=samples, generator=g, spec_logp=s,
                               spec_gold_mask=gmask, spec_kl=rewards.kl_to_base(rep(base), s))


@pytest.mark.parametrize("samples", [2, 8])
def test_reinforce_gradient_is_the_exact_gradient_in_expectation(samples):
    n, m, draws = 3, 4, 4000
    theta, mask, gold, base = _policy(n, m)
    theta.requires_grad_(True)
    exact = torch.autograd.grad(_loss(theta, mask, gold, base, n, "direct")[0], theta)[0]
    # one call, 4000 independent draws: the gradient w.r.t. each copy's log-probs is that draw's estimate
    lp = torch.log_softmax(theta.detach(), -1)
    lp_rep = torch.cat([lp[: 4 * n].repeat(draws, 1), lp[4 * n:].repeat(draws, 1)]).requires_grad_(True)
    u, s = lp_rep[: 4 * n * draws], lp_rep[4 * n * draws:]
    w = rewards.Weights(0.3, 0.7, 0.5)
    gmask = mask[4 * n:][torch.arange(m), gold].repeat(draws, 1)
    loss, _ = rewards.policy_loss(u, mask[: 4 * n].repeat(draws, 1, 1), "reinforce", w, samples=samples,
                                  generator=torch.Generator().manual_seed(samples), spec_logp=s,
                                  spec_gold_mask=gmask, spec_kl=rewards.kl_to_base(base.repeat(draws, 1), s))
    g_lp = torch.autograd.grad(loss, lp_rep)[0] * draws  # d loss_d / d log-probs, per draw
    g_u = g_lp[: 4 * n * draws].view(draws, 4 * n, K)
    g_s = g_lp[4 * n * draws:].view(draws, m, K)
    per_draw = torch.cat([g_u, g_s], 1)  # (draws, 4n+m, k) w.r.t. log-probs
    # chain rule through log_softmax(theta), the same for every draw
    jac = torch.autograd.functional.jacobian(lambda t: torch.log_softmax(t, -1), theta.detach())  # (R,k,R,k)
    est = torch.einsum("drk,rksj->dsj", per_draw, jac)
    mean, se = est.mean(0), est.std(0) / draws**0.5
    z = ((mean - exact).abs() / (se + 1e-12)).max().item()
    assert z < 5.0, f"max |mean - exact| / se = {z:.2f} ({samples} samples)"
    assert exact.abs().max() > 10 * se.max(), "the test must be able to tell a zero gradient from the exact one"
    # the old estimator (a mean baseline including the sample) gave exactly 0 at 2 samples; this one does not
    assert (est.abs().sum((1, 2)) > 0).float().mean() > 0.5


def test_expected_reward_is_minus_c_squared_and_unbiased():
    n = 2
    theta, mask, _, _ = _policy(n, 0, seed=1)
    logp = torch.log_softmax(theta, -1)
    p = metrics.candidate_probs(logp, mask)
    c_exact = rewards.tuple_c(p)
    torch.testing.assert_close(rewards.expected_tuple_reward(p), -c_exact**2)
    g = torch.Generator().manual_seed(0)
    S = 20000
    a = torch.multinomial(logp.exp(), S, replacement=True, generator=g)  # (4n, S)
    ans = mask.double().gather(2, a.unsqueeze(1).expand(-1, 2, -1)).transpose(1, 2)  # (4n, S, 2)
    c = rewards.tuple_c(ans.transpose(0, 1).reshape(S * 4 * n, 2)).view(S, n)
    r = rewards.tuple_reward(c)
    se = r.std(0) / S**0.5
    assert ((r.mean(0) + c_exact**2).abs() < 5 * se + 1e-9).all(), (r.mean(0), -c_exact**2, se)


def test_paper_reward_is_on_the_reference_scale():
    """A fully stereotyped tuple has C = 1 on UnQover's reference scale, whatever metrics' own scale."""
    p = torch.zeros(4, 2, dtype=torch.float64)
    for r, (o, q) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        p[r, o ^ q] = 1.0
    assert rewards.reference_scale() * rewards.tuple_c(p).item() == pytest.approx(1.0)
    loss, logs = rewards.paper_loss(torch.cat([p, p.flip(-1)]).float())
    assert logs["reward"] == pytest.approx(-1.0) and torch.isfinite(loss)


def test_old_objective_names_are_refused_in_one_line():
    with pytest.raises(ValueError, match="objective='expected' was renamed: use 'direct'"):
        BanditConfig(objective="expected")
    with pytest.raises(ValueError, match="objective='bandit' was renamed: use 'reinforce'"):
        LoraConfig(objective="bandit")
    with pytest.raises(ValueError, match="not one of"):
        LoraConfig(objective="paper")  # heads only
    assert BanditConfig(objective="direct").objective == "direct" and LoraConfig().objective == "reinforce"


@pytest.fixture(scope="module")
def tiny_lm(smollm2_dir):
    """A 1-layer Llama with random weights on SmolLM2's real tokenizer (fast; only shapes matter here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from refine_llm import models

    tok = models.load_tokenizer(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.mark.parametrize("objective,utility", [("direct", 0.7), ("reinforce", 0.0)])
def test_head_and_lora_compute_the_same_loss_on_the_same_policy(tiny_lm, objective, utility):
    """The LoRA trainer's step on a model, and the head trainer's step on that model's top-k through an
    identity-initialised logit head, give the same loss and logs (one reward module, no second copy)."""
    from refine_llm import bandit, metrics
    from refine_llm.baselines import lora
    from refine_llm.config import HeadConfig, QuestionsConfig
    from refine_llm.head import build_head
    from refine_llm.prompts import load_prompt
    from refine_llm.questions import build_questions

    model, tok = tiny_lm
    qs = build_questions(QuestionsConfig(category="gender", max_tuples=2, seed=0))
    qs = qs.select([i for i, s in enumerate(qs["split"]) if s == "train"])
    prompt = load_prompt("qa")
    ts = lora.prepare_train_set(qs, prompt, tok)
    tuples = torch.arange(len(ts.tuple_rows)).numpy()
    lcfg = LoraConfig(objective=objective, top_k=K, samples=4, answer_mass_weight=0.3, utility_weight=utility,
                      kl_weight=0.0, seed=0)
    with torch.no_grad():
        l_loss, l_logs = lora.step_loss(model, ts, tuples, lcfg, torch.Generator().manual_seed(5))
        flat = ts.tuple_rows[tuples].reshape(-1).tolist()
        spec = [m for t in tuples for m in ts.spec_of_tuple[t]] if utility else []
        _, lpk, mask = lora.policy(model, ts, flat + spec, K)
    n4 = len(flat)
    data = bandit.BanditData(topk_logprobs=lpk, topk_ids=torch.zeros_like(lpk, dtype=torch.long), cand_mask=mask,
                             tuple_rows=torch.arange(n4).reshape(-1, 2, 2),
                             spec_rows=torch.arange(n4, n4 + len(spec)) if spec else None,
                             spec_gold=torch.tensor(metrics.gold_positions(qs, spec)) if spec else None)
    bcfg = BanditConfig(objective=objective, samples=4, answer_mass_weight=0.3, utility_weight=utility, kl_weight=0.0, seed=0)
    trainer = bandit.HeadTrainer(build_head(HeadConfig(variant="logit", k=K)), data, bcfg, progress=False)
    with torch.no_grad():
        h_loss, h_logs = trainer.loss(torch.arange(len(tuples)), torch.Generator().manual_seed(5))
    assert bool(spec) == bool(utility) and ("utility" in h_logs) == bool(utility)
    torch.testing.assert_close(h_loss.float(), l_loss.float(), atol=1e-5, rtol=1e-5)
    assert set(h_logs) == set(l_logs)
    for k in h_logs:
        assert h_logs[k] == pytest.approx(l_logs[k], abs=1e-5), k


@pytest.mark.parametrize("objective", ["direct", "reinforce"])
def test_anchor_kl_adds_its_weighted_mean_to_the_loss(objective):
    """The anchor term (KL to base on prompts with nothing to debias) is deterministic in both objectives."""
    g = lambda: torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(8, 5, generator=g()), -1)
    mask = torch.zeros(8, 2, 5, dtype=torch.bool)
    mask[:, 0, 0] = mask[:, 1, 1] = True
    akl = torch.tensor([0.2, 0.4, 0.0])
    off, _ = rewards.policy_loss(logp, mask, objective, rewards.Weights(answer_mass=0.1), generator=g())
    on, logs = rewards.policy_loss(logp, mask, objective, rewards.Weights(answer_mass=0.1, anchor=2.0),
                                   generator=g(), anchor_kl=akl)
    torch.testing.assert_close(on - off, torch.tensor(2.0 * 0.2))
    assert logs["anchor_kl"] == pytest.approx(0.2)
