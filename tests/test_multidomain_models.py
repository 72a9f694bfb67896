"""Multi-scenario layers (experts, gates, partitioned norm, star linear, adapters) against numpy and
their gradients, and the multi-domain models: shapes, per-domain heads, gates, STAR's shared
network, adapters and parameter groups."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from test_features import tiny_interactions
from testutil import check_param_grads
from testutil import rbg_key as _key

from recjax.data.features import build_feature_tables
from recjax.errors import ConfigError
from recjax.models.multidomain import PLE, STAR, DomainMLP, MMoE, SharedBottom, param_group
from recjax.nn.features import FieldEncoder
from recjax.nn.multidomain import (
  DomainAdapter,
  Experts,
  Gate,
  PartitionedNorm,
  StarLinear,
  mix,
  partitioned_stats,
  select_heads,
)

MODELS = {"domain_mlp": (DomainMLP, dict(mlp_dims=(6, 5))),
          "shared_bottom": (SharedBottom, dict(bottom_dims=(6,), tower_dims=(5,))),
          "mmoe": (MMoE, dict(num_experts=3, expert_dims=(6,), tower_dims=(5,))),
          "ple": (PLE, dict(num_levels=2, shared_experts=2, specific_experts=1, expert_dims=(6,), tower_dims=(5,))),
          "star": (STAR, dict(star_dims=(6, 5), aux_dims=(5,)))}
K, T = 3, 2
BATCH = {"user": jnp.array([1, 2, 3, 4, 1, 2, 3, 1], jnp.int32), "item": jnp.array([1, 2, 3, 4, 2, 1, 1, 3], jnp.int32),
         "domain": jnp.array([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32),
         "weight": jnp.array([1, 1, 1, 1, 1, 1, 0, 1], jnp.float32)}


@functools.lru_cache
def _tables():
  return build_feature_tables(tiny_interactions())


def _model(name: str, **kwargs):
  cls, sizes = MODELS[name]
  return cls(_tables(), **{"num_domains": K, "num_tasks": T, "dim": 4, **sizes, **kwargs})


def _variables(model, seed: int = 0, std: float = 0.3) -> dict:
  """Variables of the model's shapes drawn by numpy (no initialiser to compile): params N(0, std^2),
  running means N(0, 0.1^2), running variances U(0.5, 1.5)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, _key(0), BATCH)
  out = {"params": jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype), shapes["params"])}
  if "batch_stats" in shapes:
    stats = flatten_dict(shapes["batch_stats"])
    out["batch_stats"] = unflatten_dict({
        k: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if k[-1] == "var" else rng.normal(0.0, 0.1, s.shape), s.dtype)
        for k, s in stats.items()})
  return out


def _jitter(tree, rng, std: float):
  """tree + N(0, std^2) noise, in numpy (float32 arrays; no op-by-op compiles)."""
  return jax.tree.map(lambda a: (np.asarray(a) + std * rng.normal(size=a.shape)).astype(np.float32), tree)


def _groups(variables) -> dict[str, str]:
  return {"/".join(k): param_group(k) for k in flatten_dict(variables["params"])}


def _set(variables, path: str, fn) -> dict:
  """A copy of `variables` with the param at "a/b/c" replaced by fn(old numpy array)."""
  flat = flatten_dict(variables["params"])
  key = tuple(path.split("/"))
  flat[key] = jnp.asarray(fn(np.array(flat[key])))
  return {**variables, "params": unflatten_dict(flat)}


# ----------------------------------------------------------------------------- layers

def test_select_heads_picks_the_rows_domain():
  x = jnp.arange(4 * K * T).reshape(4, K * T)                                  # head = domain * T + task
  np.testing.assert_array_equal(select_heads(x, jnp.array([0, 2, 1, 2]), T),
                                [[0, 1], [10, 11], [14, 15], [22, 23]])


def test_experts_gate_mixture_against_numpy_and_gradients():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  experts, gate = Experts(3, (6, 2), dropout=0.5), Gate(2, 3)

  def run(tree, x):
    return mix(gate.apply(tree["gate"], x), experts.apply(tree["experts"], x))   # [B, 2, 2]

  tree = jax.jit(lambda: {"experts": experts.init(_key(0), x), "gate": gate.init(_key(1), x)})()
  tree = _jitter(tree, rng, 0.1)      # nonzero biases

  @jax.jit
  def outputs(tree):
    per_expert = experts.apply(tree["experts"], jnp.repeat(x[:, None], 3, 1))   # [B, E, D] inputs
    return run(tree, x), per_expert, experts.apply(tree["experts"], x, True, rngs={"dropout": _key(2)})

  p, g = tree["experts"]["params"], tree["gate"]["params"]
  outs = [np.maximum(np.maximum(x @ p["kernel_0"][e] + p["bias_0"][e], 0) @ p["kernel_1"][e] + p["bias_1"][e], 0)
          for e in range(3)]
  logits = np.einsum("bd,gde->bge", x, g["kernel"]) + g["bias"]
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  mixed, per_expert, dropped = outputs(tree)
  np.testing.assert_allclose(mixed, np.einsum("bge,ebh->bgh", weights, np.stack(outs)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(per_expert, np.stack(outs, 1), rtol=1e-4, atol=1e-5)
  assert not np.allclose(dropped, per_expert)
  check_param_grads(lambda t: jnp.sum(jnp.sin(run(t, t["x"]))), {**tree, "x": x})


def test_star_linear_and_adapter_against_numpy_and_gradients():
  rng = np.random.default_rng(1)
  x, domain = rng.normal(size=(6, 4)).astype(np.float32), np.array([0, 1, 2, 2, 0, 1])
  star, adapter = StarLinear(K, 3), DomainAdapter(K, 4, 2)

  @jax.jit
  def outputs(star_vars, adapter_vars):
    return (star.apply(star_vars, x, domain), adapter.apply(adapter_vars, x, domain),
            adapter.apply(adapter_vars, jnp.stack([x, 2 * x], 1), domain))     # [B, E, W] inputs

  star_vars, adapter_vars = jax.jit(lambda: (star.init(_key(0), x, domain), adapter.init(_key(1), x, domain)))()
  p = star_vars["params"]
  assert not np.any(p["domain_bias"]) and np.all(p["domain_kernel"] == 1)     # untrained: the shared layer
  star_out, adapter_out, _ = outputs(star_vars, adapter_vars)
  np.testing.assert_allclose(star_out, x @ p["kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(adapter_out, x, rtol=0, atol=0)                   # untrained: the identity
  star_vars, adapter_vars = _jitter((star_vars, adapter_vars), rng, 0.3)
  star_out, adapter_out, extra = outputs(star_vars, adapter_vars)
  p, a = star_vars["params"], adapter_vars["params"]
  expected = np.stack([x[b] @ (p["kernel"] * p["domain_kernel"][d]) + p["bias"] + p["domain_bias"][d]
                       for b, d in enumerate(domain)])
  np.testing.assert_allclose(star_out, expected, rtol=1e-4, atol=1e-5)
  expected = np.stack([x[b] + np.maximum(x[b] @ a["down_kernel"][d] + a["down_bias"][d], 0) @ a["up_kernel"][d]
                       + a["up_bias"][d] for b, d in enumerate(domain)])
  np.testing.assert_allclose(adapter_out, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(extra[:, 0], expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="input width 3 != width 4"):
    jax.eval_shape(adapter.apply, adapter_vars, x[:, :3], domain)
  check_param_grads(lambda t: jnp.sum(jnp.sin(star.apply(t["star"], t["x"], domain)))
                    + jnp.sum(jnp.cos(adapter.apply(t["adapter"], t["x"], domain))),
                    {"star": star_vars, "adapter": adapter_vars, "x": x})


def _pn_reference(z, domain, p, mean, var, eps=1e-5):
  """numpy PN with per-domain statistics mean, var `[K, D]`."""
  scale = p["gamma"] * p["domain_gamma"][domain] / np.sqrt(var[domain] + eps)
  return (z - mean[domain]) * scale + p["beta"] + p["domain_beta"][domain]


def test_partitioned_norm_uses_each_domains_own_statistics():
  rng = np.random.default_rng(2)
  domain = np.array([0, 0, 1, 1, 0, 2, 0, 1])                                  # domain 3 absent
  weight = np.array([1, 1, 1, 1, 0, 1, 1, 1], np.float32)                      # row 4 pads domain 0
  z = rng.normal(size=(8, 5)).astype(np.float32) * 2 + 1
  norm = PartitionedNorm(4, momentum=0.9)
  variables = jax.jit(lambda: norm.init(_key(0), z, domain, True, weight))()
  assert not np.any(variables["batch_stats"]["mean"]) and np.all(variables["batch_stats"]["var"] == 1)
  variables = {"params": _jitter(variables["params"], rng, 0.3),
               "batch_stats": {"mean": rng.normal(size=(4, 5)), "var": rng.uniform(0.5, 2, (4, 5))}}
  p, stats = variables["params"], variables["batch_stats"]

  @jax.jit
  def train(variables, z):
    return norm.apply(variables, z, domain, True, weight, mutable=["batch_stats"])

  @jax.jit
  def others(variables, z):   # evaluation; training with immutable statistics; the statistics alone
    return (norm.apply(variables, z, domain), norm.apply(variables, z, domain, True, weight),
            partitioned_stats(z, domain, 4, weight))

  out, updated = train(variables, z)
  mean, var = np.zeros((4, 5)), np.ones((4, 5))
  for d in range(3):
    rows = z[(domain == d) & (weight > 0)]
    mean[d], var[d] = rows.mean(0), rows.var(0)
  np.testing.assert_allclose(out, _pn_reference(z, domain, p, mean, var), rtol=1e-4, atol=1e-4)
  evaluated, immutable, got = others(variables, z)
  np.testing.assert_allclose(got[0][:3], mean[:3], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[2], [3, 3, 1, 0])
  # domain 1's rows and the padding row do not move domain 0's rows
  other = z.copy()
  other[domain == 1] += rng.normal(size=(3, 5)).astype(np.float32)          # not a shift: shifts cancel
  other[4] -= 7.0
  out_other, _ = train(variables, other)
  keep = (domain == 0) & (weight > 0)
  np.testing.assert_allclose(out_other[keep], out[keep], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out_other[domain == 1], out[domain == 1])
  # running averages: EMA for the domains present, unchanged for domain 3
  new = updated["batch_stats"]
  np.testing.assert_allclose(new["mean"][:3], 0.9 * stats["mean"][:3] + 0.1 * mean[:3], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"][:3], 0.9 * stats["var"][:3] + 0.1 * var[:3], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new["mean"][3], np.asarray(stats["mean"][3], np.float32))
  np.testing.assert_array_equal(new["var"][3], np.asarray(stats["var"][3], np.float32))
  # evaluation: the stored statistics; training without mutable stats: batch statistics, no update
  np.testing.assert_allclose(evaluated, _pn_reference(z, domain, p, stats["mean"], stats["var"]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(immutable, out, rtol=1e-5, atol=1e-6)
  check_param_grads(lambda t: jnp.sum(jnp.sin(norm.apply({**variables, "params": t["params"]}, t["z"], domain, True,
                                                          weight))), {"params": p, "z": z})


# ----------------------------------------------------------------------------- models

NAMES = sorted(MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_domains_param_groups_and_untrained_adapters(name):
  model, adapted = _model(name), _model(name, adapter_dim=3)
  variables = _variables(model, std=1.0)
  moved = {**BATCH, "domain": (BATCH["domain"] + 1) % K}
  flat = flatten_dict(variables["params"])
  shapes = flatten_dict(jax.eval_shape(adapted.init, _key(0), BATCH)["params"])
  adapters = [k for k in shapes if param_group(k) == "adapter"]
  assert adapters and {k for k in shapes if k not in adapters} == set(flat)
  rng = np.random.default_rng(5)
  trained = {k: rng.normal(0, 0.3, shapes[k].shape).astype(np.float32) for k in adapters}
  untrained = {k: np.zeros_like(v) if k[-1].startswith("up_") else v for k, v in trained.items()}
  with_adapters = lambda extra: {**variables, "params": unflatten_dict({**flat, **extra})}  # noqa: E731

  @jax.jit
  def run(variables, untrained, trained):
    train = lambda m, v: m.apply(v, BATCH, True, rngs={"dropout": _key(1)}, mutable=["batch_stats"])  # noqa: E731
    return {"logits": model.apply(variables, BATCH), "moved": model.apply(variables, moved),
            "method": model.apply(variables, BATCH, method="logits"), "train": train(model, variables),
            "penalty": model.apply(variables, method="penalty"),
            "untrained": adapted.apply(untrained, BATCH), "trained": adapted.apply(trained, BATCH),
            "untrained_train": train(adapted, untrained)[0]}

  out = jax.device_get(run(variables, with_adapters(untrained), with_adapters(trained)))
  logits, (train, state) = out["logits"], out["train"]
  assert logits.shape == (8, T) and train.shape == (8, T) and out["penalty"].shape == ()
  assert np.isfinite(logits).all() and np.isfinite(train).all()
  np.testing.assert_array_equal(logits, out["method"])
  assert np.all(np.abs(logits - out["moved"]).max(1) > 1e-4)                   # each row: its domain matters
  assert not np.allclose(logits[:, 0], logits[:, 1])                            # tasks differ
  assert not np.allclose(train, logits)                                         # dropout in training
  assert ("batch_stats" in state) == (name == "star")
  groups = _groups(variables)
  assert set(groups.values()) == {"shared", "domain"}, groups
  assert groups["encoder/token_embedding"] == "shared"
  assert isinstance(model.score_bytes_per_pair, int) and model.score_bytes_per_pair >= 4 * model.in_dim
  assert model.multidomain and model.kind == "ctr" and model.needs_features and not model.factorized
  # adapters: untrained (up = 0) the identity, in evaluation and in training; trained, they act
  np.testing.assert_allclose(out["untrained"], logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["untrained_train"], train, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out["trained"], logits)


def test_domain_mlp_without_the_domain_input_is_one_model_for_all():
  model = _model("domain_mlp", domain_input=False)
  variables = _variables(model)
  assert set(_groups(variables).values()) == {"shared"}
  moved = {**BATCH, "domain": (BATCH["domain"] + 1) % K}
  run = jax.jit(lambda v, b: model.apply(v, b))
  np.testing.assert_array_equal(run(variables, BATCH), run(variables, moved))
  with pytest.raises(ConfigError, match="num_domains and num_tasks must be >= 1"):
    _model("domain_mlp", num_tasks=0)


def _gates(model, variables):
  """Every Gate's output in the forward pass: {path: weights [B, G, E]}."""
  _, state = model.apply(variables, BATCH, capture_intermediates=lambda m, _: isinstance(m, Gate),
                         mutable=["intermediates"])
  return {"/".join(k[:-1]): v[0] for k, v in flatten_dict(state["intermediates"]).items()}


@pytest.mark.parametrize("name", ["mmoe", "ple"])
def test_gates_are_distributions_and_a_zero_weight_expert_is_ignored(name):
  model = _model(name)
  variables = _variables(model, std=1.0)
  gates = jax.jit(functools.partial(_gates, model))(variables)
  g = K * T
  expected = ({"domain_gate": (8, g, 3)} if name == "mmoe"
              else {"domain_gate_0": (8, g, 3), "gate_0": (8, 1, g + 2), "domain_gate_1": (8, g, 3)})
  assert {k: v.shape for k, v in gates.items()} == expected
  for w in gates.values():
    assert np.all(np.asarray(w) >= 0)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-5)

  # Close one expert in every gate that sees it: its kernel column 0, its bias -1e9 -> weight exactly 0.
  if name == "mmoe":
    expert, closed = "experts", [("domain_gate", 1)]                           # expert 1 of 3
    index = 1
  else:
    expert, closed = "experts_0", [("domain_gate_0", 1), ("gate_0", g)]       # level 1's shared expert 0
    index = 0

  def close(a, column):
    a[..., column] = -1e9 if a.ndim == 2 else 0.0
    return a

  for gate, column in closed:
    for leaf in ("kernel", "bias"):
      variables = _set(variables, f"{gate}/{leaf}", functools.partial(close, column=column))

  def perturb(a):
    a[index] += 3.0
    return a

  perturbed = _set(_set(variables, f"{expert}/kernel_0", perturb), f"{expert}/bias_0", perturb)
  open_perturbed = _set(_set(_variables(model, std=1.0), f"{expert}/kernel_0", perturb), f"{expert}/bias_0", perturb)
  run = jax.jit(lambda v: (model.apply(v, BATCH), _gates(model, v)))
  (base, gates), (moved, _) = run(variables), run(perturbed)
  for gate, column in closed:
    assert np.all(np.asarray(gates[gate])[..., column] == 0.0)
  np.testing.assert_allclose(moved, base, rtol=1e-6, atol=1e-6)
  assert not np.allclose(run(open_perturbed)[0], run(_variables(model, std=1.0))[0])   # open: the expert counts
  groups = _groups(variables)
  assert groups[f"{expert}/kernel_0"] == "shared" and groups[f"{closed[0][0]}/kernel"] == "domain"


def test_star_with_identity_domain_weights_is_the_shared_network():
  model = _model("star")
  variables = _variables(model, seed=3)
  identity = {"domain_kernel": np.ones_like, "domain_gamma": np.ones_like, "domain_bias": np.zeros_like,
              "domain_beta": np.zeros_like}
  flat = flatten_dict(variables["params"])
  flat = {k: jnp.asarray(identity[k[-1]](np.asarray(v))) if k[-1] in identity else v for k, v in flat.items()}
  variables = {**variables, "params": unflatten_dict(flat)}
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  stats = jax.tree.map(np.asarray, variables["batch_stats"]["norm"])
  encoder = FieldEncoder(model.tables, 4, first_order=False)

  @jax.jit
  def run(variables):
    emb, _ = encoder.apply({"params": variables["params"]["encoder"]}, BATCH["user"], BATCH["item"])
    return emb, model.apply(variables, BATCH)

  emb, got = run(variables)
  x, d = np.asarray(emb, np.float64).reshape(8, -1), np.asarray(BATCH["domain"])
  relu = lambda a: np.maximum(a, 0)  # noqa: E731
  h = (x - stats["mean"][d]) / np.sqrt(stats["var"][d] + 1e-5) * p["norm"]["gamma"] + p["norm"]["beta"]
  for layer in ("star_0", "star_1"):
    h = relu(h @ p[layer]["kernel"] + p[layer]["bias"])
  star = h @ p["star_output"]["kernel"] + p["star_output"]["bias"]
  aux_in = np.concatenate([p["domain_embedding"]["embedding"][d], x], 1)
  aux = relu(aux_in @ p["aux"]["kernel_0"] + p["aux"]["bias_0"]) @ p["aux_output"]["kernel"] + p["aux_output"]["bias"]
  np.testing.assert_allclose(got, star + aux, rtol=1e-4, atol=1e-5)
  # one domain's weights move that domain's rows only
  moved = _set(variables, "star_0/domain_kernel", lambda a: a + (np.arange(K) == 2)[:, None, None] * 0.5)
  out = np.asarray(jax.jit(lambda v: model.apply(v, BATCH))(moved))
  np.testing.assert_allclose(out[d != 2], np.asarray(got)[d != 2], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[d == 2], np.asarray(got)[d == 2])


def test_star_training_updates_the_running_statistics_of_present_domains():
  model = _model("star", num_domains=4, dropout=0.0)
  variables = _variables(model)
  batch = {**BATCH, "domain": jnp.array([0, 1, 0, 0, 1, 0, 0, 1], jnp.int32)}   # domains 2, 3 absent

  @jax.jit
  def run(variables):
    other = {**batch, "item": batch["item"].at[jnp.array([1, 4, 7])].set(4)}   # domain 1's rows only
    train, state = model.apply(variables, batch, True, mutable=["batch_stats"])
    return train, model.apply(variables, other, True, mutable=["batch_stats"])[0], state

  train, train_other, state = run(variables)
  old, new = variables["batch_stats"]["norm"], state["batch_stats"]["norm"]
  for key in ("mean", "var"):
    np.testing.assert_array_equal(new[key][2:], np.asarray(old[key][2:]))
    assert not np.allclose(new[key][:2], old[key][:2])
  rows = np.asarray(batch["domain"]) == 0
  np.testing.assert_allclose(train_other[rows], train[rows], rtol=1e-6, atol=1e-6)


def test_star_running_statistics_stay_float32_under_bfloat16_compute():
  """A momentum-0.99 EMA moves by 1% of the gap a step: in bfloat16 that step rounds away and the statistics
  stall. They are kept (and computed) in float32 whatever the compute dtype."""
  import optax

  from recjax import tasks
  from recjax.train.state import create_train_state
  from recjax.train.step import make_train_step

  model = _model("star", dropout=0.0)
  variables = _variables(model)
  batch = {**BATCH, "label": jnp.zeros((8, T), jnp.float32)}
  step = make_train_step(tasks.pointwise_loss_fn(model), optax.sgd(0.0), compute_dtype=jnp.bfloat16, donate=False)
  state = create_train_state(variables, optax.sgd(0.0), jax.random.PRNGKey(0))
  for _ in range(1200):   # the same batch: the EMA converges to its statistics (0.99^1200 < 1e-5 of the gap left)
    state, _ = step(state, batch)
  stats = state.params["batch_stats"]["norm"]
  assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
  bf16 = {**variables, "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables["params"])}
  z = np.asarray(model.apply(bf16, BATCH, method=lambda m, b: m._inputs(b)[0]), np.float64)   # the norm's bf16 input
  rows = (np.asarray(BATCH["domain"]) == 0) & (np.asarray(BATCH["weight"]) != 0)
  np.testing.assert_allclose(stats["mean"][0], z[rows].mean(0), rtol=0.01, atol=2e-3)   # bf16: 3 digits
  np.testing.assert_allclose(stats["var"][0], z[rows].var(0), rtol=0.01, atol=1e-4)
