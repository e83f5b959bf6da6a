"""DeepSpeed ALST's contract under ``ds_burst.patch_deepspeed()``, on 2 CPU gloo ranks.

The scenarios of DeepSpeed's own ALST suite (``tests/unit/ulysses_alst/test_ulysses_sp_hf.py`` in the DeepSpeed
repository), written here for a tiny Llama saved with ``save_pretrained`` (hidden 32, 2 layers, 4 heads, 2 KV heads,
fp32), each run twice in one spawned world: with DeepSpeed's own ALST classes (unpatched), then with
``patch_deepspeed()`` applied, looking the classes up in ``deepspeed.runtime.sequence_parallel.ulysses_sp`` as ALST
code does:

* ``register_with_transformers(path, "sdpa", 2, 1, seq_length=64, seq_length_is_variable=True)``, a model from
  ``from_pretrained(path)``, plain ``deepspeed.initialize(config=..., model=..., model_parameters=..., mpu=mpu)``
  for ZeRO stages 2 and 3, the adapter's shard of the 6-token sample, DeepSpeed's token-weighted loss over the SP
  group, ``engine.backward``: the loss equals the one-process loss (1e-6 relative); layer 0's ``q_proj`` gradient
  (``safe_get_full_grad``) equals the one-process gradient (ZeRO-3: ALST's own check, ``torch.testing.assert_close``'s
  fp32 default; ZeRO-2: P times it, what DeepSpeed 0.19.8 gives ALST for this loss; both also to 1e-5 relative in
  norm) and is the same on both ranks; the patched run is at least as close as DeepSpeed's (up to 64 fp32 ulps);
  ZeRO-3 parameters are partitioned over both ranks; the adapter's shards are the ones ALST's yields; transformers'
  ``deepspeed_sp_compute_loss`` (it reads ``deepspeed.utils.groups._get_sequence_parallel_group()``) gives the
  one-process loss;
* the returned mpu presents to DeepSpeed what ALST's ``parallel_state_sp`` module presents (the same public
  functions, no ``get_data_parallel_group``, ``initialize_sequence_parallel``, model-parallel = sequence-parallel),
  and ds-burst's code takes it as a group;
* ``sequence_parallel_size=1`` returns ``None``; a PEFT-like object with only ``.config``; ``disable_in_eval=True``
  (eval logits equal the plain model's, exactly); a Hub kernel key (``lazy_import_flash_attention`` mocked to
  register it as a copy of sdpa, as DeepSpeed's test does); the errors a user matches on (mismatched
  ``core_attn_implementation``, eager, an invalid key, a fixed length without ``seq_length``) carry ALST's wording.

Patch order: DeepSpeed's ``DistributedAttention``, ``UlyssesSPAttentionHF`` and ``UlyssesSPDataLoaderAdapter``
(and a subclass) taken before ``patch_deepspeed()`` still construct and behave as DeepSpeed's after it, side by
side with ds-burst's class looked up after the patch, on the same float64 inputs; ``unpatch_deepspeed()`` restores
every binding and method.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dist_utils import run_ranks, values

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

SP = 2
HUB_KEY = "kernels-community/flash-attn2"
# the 6-token samples of DeepSpeed's test; each rank loads its own (rank r: sample r)
SAMPLES = [[1, 10, 10, 10, 2, 2], [1, 20, 20, 20, 2, 2]]
EXPECTED_SHARDS = [  # the first batch: SP rank r's shard of rank 0's sample, as ALST's adapter yields it
    {"input_ids": [[1, 10, 10]], "position_ids": [[0, 1, 2]], "shift_labels": [[10, 10, 10]]},
    {"input_ids": [[10, 2, 2]], "position_ids": [[3, 4, 5]], "shift_labels": [[2, 2, -100]]},
]
ZERO3_TOL = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing.assert_close's fp32 default: ALST's test under ZeRO-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny Llama saved with ``save_pretrained`` (``from_pretrained(path)`` gives the same weights every time)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention_dropout=0.0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return str(path)


def _ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "sequence_parallel_size": SP, "steps_per_print": 10**9}


def _loader() -> torch.utils.data.DataLoader:
    ids = torch.tensor(SAMPLES)
    ds = torch.utils.data.TensorDataset(ids, torch.arange(6).expand(2, -1))

    def collate(batch):
        i, p = batch[0]
        return {"input_ids": i[None], "position_ids": p[None], "labels": i[None]}

    return torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate)


def _reset_alst_groups() -> None:
    """ALST creates its groups once per process (a second ``register_with_transformers`` asserts): forget them."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as pss

    pss._release_sequence_parallel_groups()


def _save_attention() -> tuple[dict, dict]:
    """transformers' attention registry: the instance's overrides and the class-wide mapping."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return dict(ALL_ATTENTION_FUNCTIONS._local_mapping), dict(type(ALL_ATTENTION_FUNCTIONS)._global_mapping)


def _restore_attention(saved: tuple[dict, dict]) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for mapping, before in zip((ALL_ATTENTION_FUNCTIONS._local_mapping,
                                type(ALL_ATTENTION_FUNCTIONS)._global_mapping), saved):
        mapping.clear()
        mapping.update(before)


def _error(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and text are the result
        return type(e).__name__, str(e)
    return "no error", ""


def _train_step(ulysses_sp, path: str, stage: int) -> dict:
    """DeepSpeed's ALST test scenario, one ZeRO stage, with whatever classes ``ulysses_sp`` holds now."""
    import deepspeed
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn
    from deepspeed.utils import groups, safe_get_full_grad
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import deepspeed_sp_compute_loss

    from ds_burst.dist.comm import resolve_group

    mpu = ulysses_sp.UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=path, core_attn_implementation="sdpa", sequence_parallel_size=SP, micro_batch_size=1,
        seq_length=64, seq_length_is_variable=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config._attn_implementation == "sdpa"
    engine, *_ = deepspeed.initialize(config=_ds_config(stage), model=model, model_parameters=model.parameters(),
                                      mpu=mpu)
    res: dict = {"mpu": _mpu_view(mpu)}
    if not isinstance(mpu, type(deepspeed)):  # ds-burst's: its groups exist; the same size is a no-op
        res["reinit"] = (_error(lambda: mpu.initialize_sequence_parallel(SP)),
                         _error(lambda: mpu.initialize_sequence_parallel(2 * SP)))
    q_proj = engine.module.model.layers[0].self_attn.q_proj.weight
    if stage == 3:
        res["partitioned_over"] = dist.get_world_size(q_proj.ds_process_group)
    sp_group = groups._get_sequence_parallel_group()
    sp_world = groups._get_sequence_parallel_world_size()
    sp_rank = groups._get_sequence_parallel_rank()
    res["groups"] = (sp_world, sp_rank, resolve_group(mpu).world)
    dl = ulysses_sp.UlyssesSPDataLoaderAdapter(_loader(), sp_rank=sp_rank, sp_group=sp_group, sp_world_size=sp_world,
                                               device=engine.device)
    batch = next(iter(dl))
    res["shard"] = {k: v.tolist() for k, v in batch.items()}
    outputs = engine(**batch)
    shift = batch["shift_labels"]
    loss = engine.module.loss_function(logits=outputs.logits, labels=None, shift_labels=shift,
                                       vocab_size=engine.module.config.vocab_size)
    # DeepSpeed's test: the per-rank losses, differentiably gathered, weighted by their labelled tokens
    losses = dist_fn.all_gather(loss, group=sp_group)
    good = (shift != -100).sum()
    goods = dist_fn.all_gather(good, group=sp_group)
    loss = sum(losses[r] * goods[r] for r in range(sp_world)) / sum(goods)
    engine.backward(loss)
    res["loss"] = float(loss)
    res["grad"] = safe_get_full_grad(q_proj).detach().clone()
    # transformers' Trainer loss under sp_backend="deepspeed" reads DeepSpeed's groups (groups.mpu is this mpu now)
    with torch.no_grad():
        pc = type("PC", (), {"sp_backend": "deepspeed", "sp_size": SP})()
        res["trainer_loss"] = float(deepspeed_sp_compute_loss(None, engine, dict(batch), False, pc))
    engine.destroy()
    return res


def _size(group) -> int | None:
    """A process group's size (``None`` for ``None``): what the parent can compare."""
    import torch.distributed as dist

    return None if group is None else dist.get_world_size(group)


def _mpu_view(mpu) -> dict:
    """What DeepSpeed (``deepspeed.utils.groups``, after ``deepspeed.initialize(mpu=mpu)``) and ds-burst see of it."""
    from deepspeed.utils import groups

    from ds_burst.dist.comm import resolve_group

    assert groups.mpu is mpu
    return {
        "public": sorted(n for n in dir(mpu) if not n.startswith("_") and callable(getattr(mpu, n))
                         and not isinstance(getattr(mpu, n), type(groups))),  # functions, not modules
        "has_get_data_parallel_group": hasattr(mpu, "get_data_parallel_group"),
        "has_initialize_sequence_parallel": hasattr(mpu, "initialize_sequence_parallel"),
        "model_parallel": (mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank(),
                           mpu.get_model_parallel_group() is mpu.get_sequence_parallel_group()),
        "sequence_data_parallel": (mpu.get_sequence_data_parallel_world_size(), mpu.get_sequence_data_parallel_rank()),
        "deepspeed_dp_group": _size(groups._get_data_parallel_group()),
        "deepspeed_dp_world": groups._get_data_parallel_world_size(),
        "deepspeed_mp_world": groups._get_model_parallel_world_size(),
        "deepspeed_sdp_world": groups._get_sequence_data_parallel_world_size(),
        "ds_burst_group_world": resolve_group(mpu).world,
    }


def _register_variants(cls, path: str, saved: tuple[dict, dict], ref_logits: torch.Tensor) -> dict:
    """DeepSpeed's other ALST scenarios with ``cls.register_with_transformers`` (DeepSpeed's class or ds-burst's)."""
    import transformers.modeling_flash_attention_utils as fa_utils
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def clean() -> None:
        _restore_attention(saved)
        _reset_alst_groups()

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    r: dict = {"sp1": cls.register_with_transformers(path, "sdpa", 1, 1) is None}  # SP=1: nothing is done
    # a PEFT-like object with only .config
    peft = type("MockPEFTModel", (), {})()
    peft.config = AutoConfig.from_pretrained(path)
    mpu = cls.register_with_transformers(model_name_or_path=peft, core_attn_implementation="sdpa",
                                         sequence_parallel_size=SP, micro_batch_size=1, seq_length=64,
                                         seq_length_is_variable=True)
    r["peft"] = (mpu is not None, mpu.get_sequence_parallel_group() is not None, mpu.get_sequence_parallel_world_size())
    clean()
    # disable_in_eval: eval mode bypasses SP, the full sequence gives the plain model's logits
    mpu = cls.register_with_transformers(model_name_or_path=path, core_attn_implementation="sdpa",
                                         sequence_parallel_size=SP, micro_batch_size=1, seq_length=64,
                                         seq_length_is_variable=True, disable_in_eval=True)
    replaced = ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([SAMPLES[0]]), position_ids=torch.arange(6)[None]).logits
    r["eval"] = (mpu is not None, replaced, bool(torch.equal(logits, ref_logits)))
    clean()
    # a Hub kernel key: transformers registers it lazily (mocked, as DeepSpeed's test does)
    called: list[str] = []

    def fake_lazy_import(implementation, attention_wrapper=None, allow_all_kernels=False):
        called.append(implementation)
        if implementation == HUB_KEY and implementation not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(implementation, ALL_ATTENTION_FUNCTIONS["sdpa"])
        return (None, None, None, None), None

    real_lazy_import = fa_utils.lazy_import_flash_attention
    fa_utils.lazy_import_flash_attention = fake_lazy_import
    try:
        mpu = cls.register_with_transformers(model_name_or_path=path, core_attn_implementation=HUB_KEY,
                                             sequence_parallel_size=SP, micro_batch_size=1, seq_length=64,
                                             seq_length_is_variable=True)
        fn = ALL_ATTENTION_FUNCTIONS[HUB_KEY]
        r["hub"] = (mpu is not None, called, ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa, fn is not sdpa,
                    hasattr(fn, "burst_attention"))
    except ValueError as e:  # refused: the result (checked by the test)
        r["hub"] = (f"ValueError: {e}",)
    finally:
        fa_utils.lazy_import_flash_attention = real_lazy_import
        clean()
    # the errors a user matches on
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"
    holder = type("MockModel", (), {})()
    holder.config = config
    errors = {
        "mismatch": lambda: cls.register_with_transformers(holder, "flash_attention_2", SP, 1, seq_length=64),
        "eager": lambda: cls.register_with_transformers(path, "eager", SP, 1),
        "invalid": lambda: cls.register_with_transformers(path, "no_such_attention", SP, 1),
        "fixed_length": lambda: cls.register_with_transformers(path, "sdpa", SP, 1, seq_length_is_variable=False),
    }
    r["errors"] = {}
    for name, fn in errors.items():
        r["errors"][name] = _error(fn)
        clean()
    return r


def _contract_worker(rank: int, world: int, path: str) -> dict:
    import deepspeed
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as pss
    import deepspeed.runtime.sequence_parallel.ulysses_sp as ulysses_sp
    from transformers import AutoModelForCausalLM

    import ds_burst

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")  # torch.distributed is up already: deepspeed.comm joins it
    saved = _save_attention()
    res: dict = {}
    # the one-process reference: the full sample, plain model
    ref_model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([SAMPLES[0]])
    out = ref_model(input_ids=ids, position_ids=torch.arange(6)[None], labels=ids)
    out.loss.backward()
    res["ref_loss"] = float(out.loss)
    res["ref_grad"] = ref_model.model.layers[0].self_attn.q_proj.weight.grad.detach().clone()
    ref_model.eval()
    with torch.no_grad():
        ref_logits = ref_model(input_ids=ids, position_ids=torch.arange(6)[None]).logits

    for backend in ("alst", "burst"):  # DeepSpeed's own classes, then ds-burst's through patch_deepspeed()
        if backend == "burst":
            ds_burst.patch_deepspeed()
        r: dict = {}
        try:
            for stage in (2, 3):
                r[stage] = _train_step(ulysses_sp, path, stage)
                _restore_attention(saved)
                _reset_alst_groups()
            r.update(_register_variants(ulysses_sp.UlyssesSPAttentionHF, path, saved, ref_logits))
        finally:
            if backend == "burst":
                ds_burst.unpatch_deepspeed()
            _restore_attention(saved)
        res[backend] = r
    res["alst_module_public"] = sorted(n for n in dir(pss) if not n.startswith("_") and callable(getattr(pss, n))
                                       and not isinstance(getattr(pss, n), type(pss)))  # functions, not modules
    res["restored"] = ulysses_sp.UlyssesSPAttentionHF.__module__ == ulysses_sp.__name__
    return res


@pytest.fixture(scope="module")
def contract(model_dir):
    return values(run_ranks(_contract_worker, SP, model_dir, timeout=400))


def _close(got: torch.Tensor, want: torch.Tensor, tol: dict) -> bool:
    return bool(torch.allclose(got, want, rtol=tol["rtol"], atol=tol["atol"]))


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max())


@pytest.mark.parametrize("stage", [2, 3])
def test_gradients_and_losses_match_one_process(contract, stage):
    """DeepSpeed's scenario, both ZeRO stages, DeepSpeed's classes and ds-burst's: the one-process loss, the one-process
    gradient of layer 0's q_proj (the same on both ranks), ZeRO-3 partitioned over both ranks.

    The scenario's loss gathers the ranks' losses with a differentiable all_gather, whose backward sums the P copies:
    every rank holds P times its share of the gradient. DeepSpeed 0.19.8 averages over the SP ranks under ZeRO-3
    (``reduce_scatter``) but sums under ZeRO-2, so there ALST's own run gives P times the one-process gradient
    (DeepSpeed's test lets that through with atol 1e-3 on a model with smaller gradients). The patched run must give
    ALST's numbers: P times under ZeRO-2 as well.
    """
    for rank, res in enumerate(contract):
        ref_loss = res["ref_loss"]
        want = res["ref_grad"] * (SP if stage == 2 else 1)
        runs = {b: res[b][stage] for b in ("alst", "burst")}
        errs = {b: _err(run["grad"], want) for b, run in runs.items()}
        rel = {b: float((run["grad"] - want).norm() / want.norm()) for b, run in runs.items()}
        print(f"ZeRO-{stage} rank {rank}: loss one-process {ref_loss:.8f} ALST {runs['alst']['loss']:.8f} ds-burst "
              f"{runs['burst']['loss']:.8f}; q_proj gradient vs {'2 x ' if stage == 2 else ''}one-process: max abs "
              f"err ALST {errs['alst']:.3g} ds-burst {errs['burst']:.3g} (largest {float(want.abs().max()):.3g}), "
              f"relative (norm) ALST {rel['alst']:.3g} ds-burst {rel['burst']:.3g}")
        for b, run in runs.items():
            assert math.isclose(run["loss"], ref_loss, rel_tol=1e-6), (b, run["loss"], ref_loss)
            assert math.isclose(run["trainer_loss"], ref_loss, rel_tol=1e-6), (b, run["trainer_loss"], ref_loss)
            assert _close(run["grad"], want, ZERO3_TOL) and rel[b] < 1e-5, (b, stage, errs, rel)
            if stage == 3:  # ALST's own check (ZeRO-3): assert_close against the one-process gradient
                assert _close(run["grad"], res["ref_grad"], ZERO3_TOL), (b, errs)
                assert run["partitioned_over"] == SP, (b, run["partitioned_over"])
            assert run["groups"] == (SP, rank, SP), (b, run["groups"])
            assert run["shard"] == EXPECTED_SHARDS[rank], (b, run["shard"])
        # the patched run is at least as close as DeepSpeed's own ALST, up to fp32 rounding of the two attention
        # implementations (64 ulps of the largest element)
        slack = 64 * torch.finfo(torch.float32).eps * float(want.abs().max())
        assert errs["burst"] <= errs["alst"] + slack, (errs, slack)
    for b in ("alst", "burst"):  # the same gradient on both ranks
        assert torch.equal(contract[0][b][stage]["grad"], contract[1][b][stage]["grad"]), b


@pytest.mark.parametrize("stage", [2, 3])
def test_mpu_presents_alst_interface(contract, stage):
    for res in contract:
        alst, burst = res["alst"][stage]["mpu"], res["burst"][stage]["mpu"]
        assert alst["public"] == res["alst_module_public"], alst["public"]
        assert burst == alst, (burst, alst)
        assert burst["has_initialize_sequence_parallel"] and not burst["has_get_data_parallel_group"]
        assert burst["deepspeed_dp_group"] is None  # DeepSpeed's "the world" for an ALST mpu
        assert burst["model_parallel"][0] == SP and burst["deepspeed_sdp_world"] == SP
        assert burst["ds_burst_group_world"] == SP
        assert res["restored"]
        same, other = res["burst"][stage]["reinit"]
        assert same == ("no error", "") and other[0] == "ValueError" and "sequence_parallel_size=2" in other[1], other


def test_register_variants_like_alst(contract):
    for res in contract:
        for b in ("alst", "burst"):
            r = res[b]
            assert r["sp1"], b
            assert r["peft"] == (True, True, SP), (b, r["peft"])
            assert r["eval"] == (True, True, True), (b, r["eval"])
            assert r["hub"][:4] == (True, [HUB_KEY], True, True), (b, r["hub"])
        assert res["burst"]["hub"][4]  # ds-burst's attention function under the hub key


# ALST's wording that users and DeepSpeed's tests match on
ALST_WORDING = {
    "mismatch": "core_attn_implementation='flash_attention_2' does not match model config "
                "attn_implementation='sdpa'",
    "eager": "eager attn_implementation isn't currently supported by",
    "invalid": "no_such_attention is not a valid attn_implementation. The choices are",
    "fixed_length": "Either `seq_length_is_variable` needs to be `True` or `seq_length` needs to be set",
}


@pytest.mark.parametrize("case", sorted(ALST_WORDING))
def test_errors_carry_alst_wording(contract, case):
    for res in contract:
        for b in ("alst", "burst"):
            kind, text = res[b]["errors"][case]
            assert kind == "ValueError" and ALST_WORDING[case] in text, (b, kind, text)


# ---------------------------------------------------------------------------------------------
# patch order


class _CountingAttention(torch.nn.Module):
    """Exact causal float64 attention on ``[b, S, h, d]``; counts its calls (DeepSpeed's layer calls it)."""

    def __init__(self) -> None:
        super().__init__()
        self.causal = True
        self.calls = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        n = q.shape[1]
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _patch_order_worker(rank: int, world: int, path: str) -> dict:
    import deepspeed
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as pss
    import deepspeed.runtime.sequence_parallel.ulysses_sp as ulysses_sp
    import deepspeed.sequence.layer as ds_layer
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter
    from deepspeed.sequence.layer import DistributedAttention  # bound before the patch, as Megatron-DeepSpeed does
    from transformers import AutoConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import ds_burst
    from ds_burst.integrations import alst

    deepspeed.init_distributed(dist_backend="gloo")
    group = ds_burst.init_sequence_parallel(world).get_sequence_parallel_group()

    class Subclass(DistributedAttention):  # defined before the patch
        pass

    held = {"DistributedAttention": DistributedAttention, "UlyssesSPAttentionHF": UlyssesSPAttentionHF,
            "UlyssesSPDataLoaderAdapter": UlyssesSPDataLoaderAdapter}
    methods = {(c, n): c.__dict__[n] for c in held.values() for n in c.__dict__}
    saved = _save_attention()
    res: dict = {}
    g = torch.Generator().manual_seed(1)
    S, H, Hkv, D = 8, 4, 2, 8
    full = [torch.randn(2, S, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H)]
    lo, hi = rank * S // world, (rank + 1) * S // world

    def run(layer) -> list[torch.Tensor]:
        q, k, v = (x[:, lo:hi].clone().requires_grad_(True) for x in full[:3])
        out = layer(q, k, v, 0)
        out.backward(full[3][:, lo:hi])
        return [out.detach(), q.grad, k.grad, v.grad]

    ds_burst.patch_deepspeed()
    try:
        looked_up = ds_layer.DistributedAttention  # looked up after the patch: ds-burst's
        res["looked_up_is_burst"] = looked_up is ds_burst.DistributedAttention
        outs = {}
        for name, cls in (("held", DistributedAttention), ("subclass", Subclass), ("looked_up", looked_up)):
            local = _CountingAttention()
            try:
                layer = cls(local, group)
            except Exception as e:  # noqa: BLE001 - the construction failing is the result
                res[f"{name}_error"] = f"{type(e).__name__}: {e}"
                continue
            res[f"{name}_type"] = (type(layer) is cls, isinstance(layer, ds_burst.DistributedAttention))
            outs[name] = run(layer)
            res[f"{name}_local_calls"] = local.calls
        if "held" in outs and "looked_up" in outs:
            res["held_vs_burst"] = max(_err(a, b) for a, b in zip(outs["held"], outs["looked_up"]))
            res["subclass_vs_burst"] = max(_err(a, b) for a, b in zip(outs["subclass"], outs["looked_up"]))
        # ALST's classes held before the patch: DeepSpeed's register_with_transformers (it names its class by the
        # module global) builds DeepSpeed's attention and returns DeepSpeed's mpu; DeepSpeed's adapter shards
        config = AutoConfig.from_pretrained(path)
        peft = type("MockPEFTModel", (), {})()
        peft.config = config
        try:
            mpu = UlyssesSPAttentionHF.register_with_transformers(peft, "sdpa", world, 1, seq_length=64)
            fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
            cells = [c.cell_contents for c in (fn.__closure__ or ())]
            res["held_alst"] = (mpu is pss, any(type(c) is UlyssesSPAttentionHF for c in cells),
                                hasattr(fn, "burst_attention"))
        except Exception as e:  # noqa: BLE001
            res["held_alst"] = f"{type(e).__name__}: {e}"
        finally:
            _restore_attention(saved)
            _reset_alst_groups()
        ad = UlyssesSPDataLoaderAdapter(_loader(), sp_rank=rank, sp_group=group, sp_world_size=world,
                                        device=torch.device("cpu"))
        res["held_adapter"] = (type(ad) is held["UlyssesSPDataLoaderAdapter"],
                               {k: v.tolist() for k, v in next(iter(ad)).items()})
        res["patched_names"] = (ulysses_sp.UlyssesSPAttentionHF is alst.BurstSPAttentionHF,
                                ulysses_sp.UlyssesSPDataLoaderAdapter is alst.BurstSPDataLoaderAdapter)
    finally:
        ds_burst.unpatch_deepspeed()
    res["restored_names"] = (ds_layer.DistributedAttention is DistributedAttention,
                             ulysses_sp.UlyssesSPAttentionHF is UlyssesSPAttentionHF,
                             ulysses_sp.UlyssesSPDataLoaderAdapter is UlyssesSPDataLoaderAdapter)
    res["restored_methods"] = all(c.__dict__.get(n) is m for (c, n), m in methods.items()) and all(
        set(c.__dict__) == {n for (cc, n) in methods if cc is c} for c in held.values())
    layer = DistributedAttention(_CountingAttention(), group)  # after unpatch: DeepSpeed's, as before
    res["after_unpatch"] = type(layer) is DistributedAttention
    return res


def test_classes_taken_before_patch_stay_deepspeeds(model_dir):
    for rank, res in enumerate(values(run_ranks(_patch_order_worker, SP, model_dir, timeout=240))):
        print(f"rank {rank}: DeepSpeed's DistributedAttention (taken before the patch) vs ds-burst's: max err "
              f"{res.get('held_vs_burst')}")
        for name in ("held", "subclass", "looked_up"):
            assert f"{name}_error" not in res, res[f"{name}_error"]
        assert res["looked_up_is_burst"]
        assert res["held_type"] == (True, False) and res["subclass_type"] == (True, False)
        assert res["looked_up_type"] == (True, True)
        # DeepSpeed's layer calls the local attention it was given (once per forward); ds-burst's never does
        assert res["held_local_calls"] == 1 and res["subclass_local_calls"] == 1 and res["looked_up_local_calls"] == 0
        assert res["held_vs_burst"] < 1e-9 and res["subclass_vs_burst"] < 1e-9, res
        assert res["held_alst"] == (True, True, False), res["held_alst"]
        assert res["held_adapter"] == (True, EXPECTED_SHARDS[rank]), res["held_adapter"]
        assert res["patched_names"] == (True, True)
        assert res["restored_names"] == (True, True, True) and res["restored_methods"] and res["after_unpatch"]
